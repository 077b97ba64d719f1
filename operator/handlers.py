"""kopf handlers: thin wrappers that run one reconciliation pass and write the status.

Every trigger (creation, spec change, resume after an operator restart, the periodic
timer that follows the children's readiness) runs the same idempotent pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from typing import Any

import aiohttp
import kopf

from nextserve.operator import health, kube
from nextserve.operator.reconcile import reconcile
from nextserve.operator.spec import GROUP, PLURAL, VERSION

RESOURCE = (GROUP, VERSION, PLURAL)
DEFAULT_RESYNC_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Peering:
    """How this operator shares the work with its replicas (None name: it runs alone)."""
    name: str | None
    identity: str
    priority: int
    namespaces: tuple[str, ...]
    clusterwide: bool


def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    # Explicit, so kopf authenticates the same way whatever client libraries are installed:
    # the in-cluster service account first, then the kubeconfig (as kubernetes_asyncio does).
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig found")
    return info


def make_startup(peering: Peering) -> Any:
    async def startup(memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        memo.api = await kube.Kube.connect(user_agent=f"{kube.FIELD_MANAGER}/{peering.identity}")
        memo.problems = health.Problems()
        memo.peering = None
        if peering.name:
            memo.peering = health.PeeringWatch(memo.api.api_client, name=peering.name, identity=peering.identity,
                                               priority=peering.priority, namespaces=peering.namespaces,
                                               clusterwide=peering.clusterwide, problems=memo.problems)
            logger.info("peering %r as %s with priority %d: the live replica with the highest priority works",
                        peering.name, peering.identity, peering.priority)
            memo.peering_task = asyncio.create_task(_watch_peering(memo.peering))
    return startup


async def _watch_peering(watch: health.PeeringWatch) -> None:
    while True:
        try:
            await watch.check()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            watch.problems.report("peering/api", f"cannot reach the API server to check peering: {exc!r}")
        except Exception as exc:  # the check must outlive any surprise, and say what it was
            watch.problems.report("peering/api", f"checking the peering failed: {exc!r}")
        else:
            watch.problems.clear("peering/api")
        await asyncio.sleep(health.CHECK_INTERVAL_SECONDS)


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = getattr(memo, "peering_task", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    api = getattr(memo, "api", None)
    if api is not None:
        await api.close()


async def probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """Part of /healthz: whether this replica works or stands by, and what keeps it from working."""
    problems = getattr(memo, "problems", None)
    watch = getattr(memo, "peering", None)
    return {
        "role": watch.role if watch is not None else "standalone",
        "problems": problems.messages() if problems is not None else [],
    }


def make_reconcile_handler(retry_delay: float) -> Any:
    async def reconcile_handler(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger,
                                stopped: kopf.DaemonStopped | None = None, **_: Any) -> None:
        # The timer and the change handlers may fire together for one object; one pass at a time.
        lock = memo.setdefault("lock", asyncio.Lock())
        async with lock:
            if stopped or memo.api.closed:  # shutting down, or the object is being deleted
                return
            try:
                status = await reconcile(memo.api, body, old_status=memo.get("last_status"))
            except kube.ApiError as exc:
                if exc.status == 403:
                    memo.problems.report("rbac", f"RBAC denies a call the operator needs ({_api_message(exc)}): grant "
                                                 f"its ServiceAccount the rules of the chart's templates/rbac.yaml")
                    raise kopf.TemporaryError(f"forbidden, retrying: {_api_message(exc)}", delay=retry_delay) from exc
                if 400 <= exc.status < 500 and exc.status not in (404, 409, 429):
                    # The API server rejected a child as built: retrying the same will not
                    # help until the spec (or the operator) changes.
                    raise kopf.PermanentError(f"the API server rejected a child: {_api_message(exc)}") from exc
                raise kopf.TemporaryError(f"API call failed, retrying: {_api_message(exc)}", delay=retry_delay) from exc
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise kopf.TemporaryError(f"API server unreachable, retrying: {exc!r}", delay=retry_delay) from exc
            except RuntimeError:
                if memo.api.closed:  # the operator stopped under a running pass
                    return
                raise
            memo.problems.clear("rbac")
            written = memo.get("last_status")
            memo["last_status"] = status
        # Only a change is written: a resync that finds the same state sends no status PATCH
        # (compared with what this process wrote too: the body a timer gets may predate it).
        if _without_nones(status) not in (_without_nones(dict(body.get("status") or {})), _without_nones(written)):
            patch.status.update(status)
        ready = next((c for c in status["conditions"] if c["type"] == "Ready"), None)
        if ready and ready["status"] != "True":
            logger.debug("not ready: %s: %s", ready["reason"], ready["message"])
    return reconcile_handler


def _without_nones(value: Any) -> Any:
    # A merge patch deletes keys set to None: the stored status has no such keys.
    if isinstance(value, dict):
        return {k: _without_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nones(v) for v in value]
    return value


def _api_message(exc: kube.ApiError) -> str:
    # The API server's Status message says what was refused and why; fall back to the HTTP reason.
    try:
        return json.loads(exc.body).get("message") or f"HTTP {exc.status} {exc.reason}"
    except (TypeError, ValueError, AttributeError):
        return f"HTTP {exc.status} {exc.reason}"


def build_registry(peering: Peering, resync_seconds: float = DEFAULT_RESYNC_SECONDS) -> kopf.OperatorRegistry:
    """A registry with every handler; separate registries keep tests independent."""
    registry = kopf.OperatorRegistry()
    reconcile_handler = make_reconcile_handler(retry_delay=min(5.0, resync_seconds))
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(make_startup(peering))
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.probe(registry=registry, id="operator")(probe)
    kopf.on.resume(*RESOURCE, registry=registry, id="resume")(reconcile_handler)
    kopf.on.create(*RESOURCE, registry=registry, id="create")(reconcile_handler)
    kopf.on.update(*RESOURCE, field="spec", registry=registry, id="update")(reconcile_handler)
    # Children become ready on their own schedule: follow them by polling the CR's
    # children on a timer rather than watching every StatefulSet in the cluster.
    kopf.timer(*RESOURCE, interval=resync_seconds, initial_delay=resync_seconds, registry=registry,
               id="resync")(reconcile_handler)
    return registry


def configure(settings: kopf.OperatorSettings, peering: Peering) -> None:
    # The CRD's status schema is strict: keep kopf's bookkeeping in annotations, not status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-spec")
    settings.posting.level = 20  # INFO and above become Kubernetes events
    # A deleted deployment is released once its running resync pass ends (a few seconds):
    # look again every second rather than kopf's default minute.
    settings.background.cancellation_polling = 1.0
    if not peering.clusterwide and not any(c in ns for ns in peering.namespaces for c in "*?[!"):
        # Named namespaces only: nothing to discover at runtime, so kopf needs no cluster-wide
        # list/watch of namespaces and CRDs, and a namespaced install grants none.
        settings.scanning.disabled = True
    if peering.name:
        # Several replicas of the operator: only the live one with the highest priority works.
        settings.peering.name = peering.name
        settings.peering.mandatory = True
        settings.peering.clusterwide = peering.clusterwide
        settings.peering.priority = peering.priority
    else:
        settings.peering.standalone = True
