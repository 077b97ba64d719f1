"""Whether this operator can work, said out loud: a warning in the log that names the remedy,
and the same words in the /healthz document (a kopf probe), never a silent wait.

Replicas of the operator coordinate through kopf's peering object: each has its own priority,
derived from its identity (the pod name in a pod), so exactly one, the highest, is active and
the others stand by; when the active one goes, the next highest takes over. Two operators
with the same priority would both pause (kopf's rule), so a collision is reported too.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("nextserve.operator")

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
CHECK_INTERVAL_SECONDS = 15.0


def priority_of(identity: str) -> int:
    """A priority for kopf's peering, distinct per identity (28 bits: collisions are 1 in 10^8)."""
    return int(hashlib.sha256(identity.encode()).hexdigest()[:7], 16)


class Problems:
    """The current reasons this operator cannot do its job, each logged once when it appears."""

    def __init__(self) -> None:
        self._now: dict[str, str] = {}

    def report(self, key: str, message: str) -> None:
        if self._now.get(key) != message:
            log.warning("%s", message)
        self._now[key] = message

    def clear(self, key: str) -> None:
        if self._now.pop(key, None) is not None:
            log.info("resolved: %s", key)

    def clear_prefix(self, prefix: str) -> None:
        for key in [k for k in self._now if k.startswith(prefix)]:
            self.clear(key)

    def messages(self) -> list[str]:
        return [self._now[k] for k in sorted(self._now)]


def _alive(info: dict[str, Any], now: datetime.datetime) -> bool:
    try:
        seen = datetime.datetime.fromisoformat(str(info["lastseen"]))
    except (KeyError, ValueError):
        return False
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=datetime.timezone.utc)
    return seen + datetime.timedelta(seconds=float(info.get("lifetime", 60))) > now


class PeeringWatch:
    """Checks the peering objects this operator relies on, and knows whether it is the active replica."""

    def __init__(self, api_client: client.ApiClient, *, name: str, identity: str, priority: int,
                 namespaces: Sequence[str], clusterwide: bool, problems: Problems) -> None:
        self._api = client.CustomObjectsApi(api_client)
        self.name, self.identity, self.priority = name, identity, priority
        self.namespaces, self.clusterwide, self.problems = list(namespaces), clusterwide, problems
        self.role = "unknown"

    def _remedy(self, where: str) -> str:
        create = (f"apiVersion: kopf.dev/v1, kind: ClusterKopfPeering, metadata.name: {self.name}" if self.clusterwide
                  else f"apiVersion: kopf.dev/v1, kind: KopfPeering, metadata: {{name: {self.name}, namespace: {where}}}")
        return (f"create it ({create}; the Helm chart does, with peering.create=true), or run a single "
                f"operator with --peering ''")

    async def _get(self, namespace: str | None) -> dict[str, Any] | None:
        if namespace is None:
            return await self._api.get_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", self.name)
        return await self._api.get_namespaced_custom_object(PEERING_GROUP, PEERING_VERSION, namespace, "kopfpeerings",
                                                            self.name)

    async def check(self) -> None:
        # Namespace globs are resolved by kopf as namespaces appear; only literal names can be checked here.
        places: list[str | None] = [None] if self.clusterwide else [
            ns for ns in self.namespaces if not any(c in ns for c in "*?[!")]
        now = datetime.datetime.now(datetime.timezone.utc)
        roles = []
        for namespace in places:
            where = namespace or "cluster-wide"
            key = f"peering/{where}"
            what = (f"ClusterKopfPeering {self.name!r}" if namespace is None
                    else f"KopfPeering {self.name!r} in namespace {namespace!r}")
            try:
                peering = await self._get(namespace)
            except ApiException as exc:
                if exc.status == 404:
                    self.problems.report(key, f"the {what} does not exist: this operator waits for it and handles "
                                              f"nothing; {self._remedy(where)}")
                elif exc.status == 403:
                    self.problems.report(key, f"RBAC denies reading the {what}: grant this operator's ServiceAccount "
                                              f"get/list/watch/patch on it (the Helm chart's rbac.create=true does)")
                else:
                    self.problems.report(key, f"cannot read the {what}: HTTP {exc.status} {exc.reason}")
                roles.append("waiting")
                continue
            self.problems.clear(key)
            peers = {pid: info for pid, info in ((peering or {}).get("status") or {}).items()
                     if pid != self.identity and isinstance(info, dict) and _alive(info, now)}
            same = sorted(pid for pid, info in peers.items() if int(info.get("priority", 0)) == self.priority)
            if same:
                self.problems.report(f"conflict/{where}", f"operator(s) {', '.join(same)} share this operator's priority "
                                                          f"{self.priority} in the {what}: kopf pauses all of them; give "
                                                          f"each its own --priority")
                roles.append("paused")
                continue
            self.problems.clear(f"conflict/{where}")
            higher = any(int(info.get("priority", 0)) > self.priority for info in peers.values())
            roles.append("standby" if higher else "active")
        self.role = roles[0] if len(set(roles)) == 1 else ",".join(roles) if roles else "active"

