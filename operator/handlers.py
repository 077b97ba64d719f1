"""kopf handlers: thin wrappers that run one reconciliation pass and write the status.

Every trigger (creation, spec change, resume after an operator restart, the periodic
timer that follows the children's readiness) runs the same idempotent pass.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import kopf

from nextserve.operator import kube
from nextserve.operator.reconcile import reconcile
from nextserve.operator.spec import GROUP, PLURAL, VERSION

RESOURCE = (GROUP, VERSION, PLURAL)
DEFAULT_RESYNC_SECONDS = 10.0


async def startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    memo.api = kube.Kube(kube.connection_info(settings))


def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    # Explicit, so kopf and the children's client always authenticate the same way,
    # whatever client libraries happen to be installed.
    return kube.connection_info(settings)


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    api = getattr(memo, "api", None)
    if api is not None:
        await api.close()


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
                if 400 <= exc.status < 500 and exc.status not in (404, 409, 429):
                    # The API server rejected a child as built: retrying the same will not
                    # help until the spec (or the operator) changes.
                    raise kopf.PermanentError(f"the API server rejected a child: {exc}") from exc
                raise kopf.TemporaryError(f"API call failed, retrying: {exc}", delay=retry_delay) from exc
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise kopf.TemporaryError(f"API server unreachable, retrying: {exc!r}", delay=retry_delay) from exc
            except RuntimeError:
                if memo.api.closed:  # the operator stopped under a running pass
                    return
                raise
            memo["last_status"] = status
        patch.status.update(status)
        ready = next((c for c in status["conditions"] if c["type"] == "Ready"), None)
        if ready and ready["status"] != "True":
            logger.debug("not ready: %s: %s", ready["reason"], ready["message"])
    return reconcile_handler


def build_registry(resync_seconds: float = DEFAULT_RESYNC_SECONDS) -> kopf.OperatorRegistry:
    """A registry with every handler; separate registries keep tests independent."""
    registry = kopf.OperatorRegistry()
    reconcile_handler = make_reconcile_handler(retry_delay=min(5.0, resync_seconds))
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.resume(*RESOURCE, registry=registry, id="resume")(reconcile_handler)
    kopf.on.create(*RESOURCE, registry=registry, id="create")(reconcile_handler)
    kopf.on.update(*RESOURCE, field="spec", registry=registry, id="update")(reconcile_handler)
    # Children become ready on their own schedule: follow them by polling the CR's
    # children on a timer rather than watching every StatefulSet in the cluster.
    kopf.timer(*RESOURCE, interval=resync_seconds, initial_delay=resync_seconds, registry=registry,
               id="resync")(reconcile_handler)
    return registry


def configure(settings: kopf.OperatorSettings, *, peering_name: str | None, clusterwide: bool) -> None:
    # The CRD's status schema is strict: keep kopf's bookkeeping in annotations, not status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-spec")
    settings.posting.level = 20  # INFO and above become Kubernetes events
    if peering_name:
        # Several replicas of the operator: only the one holding the peering works.
        settings.peering.name = peering_name
        settings.peering.mandatory = True
        settings.peering.clusterwide = clusterwide
    else:
        settings.peering.standalone = True
