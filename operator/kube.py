"""The operator's hands on its children: kubernetes_asyncio's typed APIs behind five verbs.

kopf watches the custom resource itself; everything the operator builds (ConfigMaps,
Services, StatefulSets, Deployments, PodDisruptionBudgets, the router's HorizontalPodAutoscaler) goes through the official
asyncio client, and so does the one kind it only lists: the router Pods, to ask them about their
cache. Credentials are loaded by that client the usual way: the in-cluster service
account in a pod, the current kubeconfig context elsewhere.

Children are written with server-side apply, and only when the desired object differs from
what was last applied (a hash of it rides along as an annotation): a resync with nothing to
change sends no write, and fields that others changed since (`kubectl scale` on the router)
are left alone until the spec itself changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from nextserve.operator.spec import GROUP

FIELD_MANAGER = "nextserve-operator"
ANNOTATION_APPLIED = f"{GROUP}/applied-hash"
APPLY_PATCH = "application/apply-patch+yaml"

# kind -> (typed API class, the snake_case name in its method names)
KINDS: dict[str, tuple[type, str]] = {
    "ConfigMap": (client.CoreV1Api, "config_map"),
    "Service": (client.CoreV1Api, "service"),
    "StatefulSet": (client.AppsV1Api, "stateful_set"),
    "Deployment": (client.AppsV1Api, "deployment"),
    "PodDisruptionBudget": (client.PolicyV1Api, "pod_disruption_budget"),
    "HorizontalPodAutoscaler": (client.AutoscalingV2Api, "horizontal_pod_autoscaler"),
    "Pod": (client.CoreV1Api, "pod"),
}

# The verbs each kind is used with; the chart's RBAC rules are checked against this table.
VERBS_USED: dict[str, set[str]] = {
    "ConfigMap": {"get", "list", "create", "patch", "delete"},
    "Service": {"get", "list", "create", "patch", "delete"},
    "StatefulSet": {"get", "list", "create", "patch", "delete"},
    "Deployment": {"get", "list", "create", "patch", "delete"},
    "PodDisruptionBudget": {"get", "list", "create", "patch", "delete"},
    "HorizontalPodAutoscaler": {"get", "create", "patch", "delete"},  # one per deployment, found by name
    "Pod": {"list"},  # the router pods, read only: asked for their cache state (router_probe.py)
}

ApiError = ApiException


def applied_hash(obj: Mapping[str, Any]) -> str:
    """A digest of the desired object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


async def load_configuration() -> client.Configuration:
    """In a pod: the service account; elsewhere: the current kubeconfig context."""
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        # $KUBECONFIG read now: the client's own default is read once, when it is imported.
        await config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                      client_configuration=configuration)
    return configuration


class Kube:
    """get/list/apply/delete for namespaced children of the kinds in KINDS."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._client = api_client
        self._apis = {cls: cls(api_client) for cls, _ in KINDS.values()}
        self._closed = False

    @classmethod
    async def connect(cls, user_agent: str = FIELD_MANAGER) -> Kube:
        api_client = client.ApiClient(await load_configuration())
        api_client.user_agent = user_agent
        return cls(api_client)

    @property
    def api_client(self) -> client.ApiClient:
        return self._client

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._closed = True
        await self._client.close()

    def _method(self, verb: str, kind: str) -> Any:
        api, noun = KINDS[kind]
        return getattr(self._apis[api], f"{verb}_namespaced_{noun}")

    def _plain(self, obj: Any) -> dict[str, Any]:
        # Typed model -> the API's own JSON shape (camelCase keys), which the builders and
        # status code speak.
        return self._client.sanitize_for_serialization(obj)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(await self._method("read", kind)(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{k}={v}" for k, v in selector.items())
        result = await self._method("list", kind)(namespace, label_selector=label_selector)
        items = [self._plain(item) for item in result.items or []]
        # Filtered here too: cheap, and the retire step deletes what it lists, so it must stay
        # correct even against an API emulator that ignores selectors.
        return [item for item in items
                if all(((item.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items())]

    async def apply(self, obj: Mapping[str, Any]) -> bool:
        """Server-side apply `obj` unless it is what was applied last; True when a write was sent."""
        meta = obj["metadata"]
        digest = applied_hash(obj)
        live = await self.get(obj["kind"], meta["namespace"], meta["name"])
        if live is not None and ((live.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_APPLIED) == digest:
            return False
        body = {**obj, "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}), ANNOTATION_APPLIED: digest}}}
        try:
            # force: the operator owns what it builds; a field someone else took over is taken back.
            await self._method("patch", obj["kind"])(meta["name"], meta["namespace"], body, field_manager=FIELD_MANAGER,
                                                     force=True, _content_type=APPLY_PATCH)
        except ApiException as exc:
            # The API server creates on apply (so one field manager owns every field from the
            # start); an emulator without apply answers 404, and gets a plain create.
            if exc.status != 404 or live is not None:
                raise
            await self._method("create", obj["kind"])(meta["namespace"], body, field_manager=FIELD_MANAGER)
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self._method("delete", kind)(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise
