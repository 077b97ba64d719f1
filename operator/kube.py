"""A minimal asynchronous Kubernetes API client for the operator's children.

kopf talks to the API server for the custom resource itself but has no public client
for other kinds.  The operator needs only get/list/apply/delete on a handful of kinds,
so a few dozen lines over aiohttp (already a kopf dependency) replace a large client
library.  Credentials come from kopf's own login functions, so the operator authenticates
exactly as kopf does: in-cluster service account first, then the kubeconfig.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
import urllib.parse
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

FIELD_MANAGER = "nextserve-operator"

# kind -> (api prefix, plural) for the children the operator manages.
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("api/v1", "configmaps"),
    "Secret": ("api/v1", "secrets"),
    "Service": ("api/v1", "services"),
    "StatefulSet": ("apis/apps/v1", "statefulsets"),
    "Deployment": ("apis/apps/v1", "deployments"),
}


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:500]}")
        self.status = status


def _write_temp(data: str | bytes) -> str:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    handle = tempfile.NamedTemporaryFile(delete=False, suffix=".pem")
    handle.write(raw)
    handle.close()
    return handle.name


def connection_info(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """The same credentials kopf would use: in-cluster first, then the kubeconfig."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig found")
    return info


class Kube:
    """get/list/apply/delete for namespaced objects of the kinds in KINDS."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self._base = info.server.rstrip("/")
        headers = {}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        ctx: ssl.SSLContext | bool | None = None
        if self._base.startswith("https"):
            if info.insecure:
                ctx = False
            else:
                ctx = ssl.create_default_context(
                    cafile=info.ca_path or (_write_temp(info.ca_data) if info.ca_data else None)
                )
                cert = info.certificate_path or (_write_temp(info.certificate_data) if info.certificate_data else None)
                key = info.private_key_path or (_write_temp(info.private_key_data) if info.private_key_data else None)
                if cert and key:
                    ctx.load_cert_chain(cert, key)
        self._session = aiohttp.ClientSession(
            headers=headers,
            auth=auth,
            connector=aiohttp.TCPConnector(ssl=ctx) if ctx is not None else None,
            timeout=aiohttp.ClientTimeout(total=30),
        )

    @property
    def closed(self) -> bool:
        return self._session.closed

    async def close(self) -> None:
        await self._session.close()

    def _url(self, kind: str, namespace: str, name: str | None = None, query: Mapping[str, str] | None = None) -> str:
        prefix, plural = KINDS[kind]
        url = f"{self._base}/{prefix}/namespaces/{namespace}/{plural}"
        if name:
            url += f"/{name}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return url

    async def _call(self, method: str, url: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body) if body is not None else None
        for attempt in (1, 2):
            try:
                async with self._session.request(method, url, data=data, headers={"Content-Type": content_type}) as resp:
                    text = await resp.text()
                    if resp.status >= 400:
                        raise ApiError(resp.status, text)
                    return json.loads(text) if text else None
            except aiohttp.ServerDisconnectedError:
                # A pooled keep-alive connection the server had already closed: the request
                # never reached it, so sending it once more is safe.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", self._url(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())}
        result = await self._call("GET", self._url(kind, namespace, query=query))
        items = result.get("items") or []
        # Filter here too: cheap, and correct even against servers that ignore selectors.
        return [
            item for item in items
            if all(((item.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items())
        ]

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply: creates or updates, and drops fields the operator stopped setting."""
        meta = obj["metadata"]
        url = self._url(obj["kind"], meta["namespace"], meta["name"], {"fieldManager": FIELD_MANAGER, "force": "true"})
        try:
            return await self._call("PATCH", url, obj, "application/apply-patch+yaml")
        except ApiError as exc:
            # Real API servers create on apply; simpler ones answer 404, so create explicitly.
            if exc.status != 404:
                raise
        return await self._call("POST", self._url(obj["kind"], meta["namespace"]), obj)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self._call("DELETE", self._url(kind, namespace, name), {"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status != 404:
                raise
