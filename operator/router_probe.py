"""Ask the router pods what their cache reports (gRPC ModelInfo), for the CacheReady condition.

The router knows whether its shared tier works (it sees every Redis error); a Redis pod's readiness
does not say whether the routers can reach it. So the operator asks each ready router pod directly,
at its pod IP and its container port named `grpc` (the Service would answer for one pod only).

Every call is short and bounded, the pods are asked concurrently (at most MAX_CONCURRENT at a time),
and nothing here raises on a router: a pod that does not answer becomes a report saying why.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from nextserve.client import AsyncClient, ServingError
from nextserve.operator.status import RouterCacheReport

TIMEOUT_SECONDS = 2.0   # one ModelInfo: the router answers from memory, so a slow answer is a problem
MAX_CONCURRENT = 16     # pods asked at once: a pass with many routers stays bounded in sockets and time


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Ready and not on its way out (a terminating router drains; its report would soon be gone)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def grpc_address(pod: Mapping[str, Any]) -> str | None:
    """host:port of the pod's container port named `grpc` (None when it has no IP or no such port)."""
    ip = (pod.get("status") or {}).get("podIP")
    ports = [p for c in (pod.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []
             if p.get("name") == "grpc"]
    if not ip or not ports:
        return None
    host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    return f"{host}:{ports[0]['containerPort']}"


async def ask_routers(pods: Iterable[Mapping[str, Any]], timeout: float = TIMEOUT_SECONDS,
                      max_concurrent: int = MAX_CONCURRENT) -> list[RouterCacheReport]:
    """One report per ready router pod, in pod-name order."""
    ready = sorted((p for p in pods if pod_ready(p)), key=lambda p: p["metadata"]["name"])
    slots = asyncio.Semaphore(max_concurrent)

    async def ask(pod: Mapping[str, Any]) -> RouterCacheReport:
        name = pod["metadata"]["name"]
        address = grpc_address(pod)
        if address is None:
            return RouterCacheReport(name, error="the pod has no IP or no container port named grpc")
        async with slots:
            return await _model_info_cache(name, address, timeout)

    return list(await asyncio.gather(*(ask(p) for p in ready)))


async def _model_info_cache(name: str, address: str, timeout: float) -> RouterCacheReport:
    # No client-side retries: the next resync asks again, and a pass must not wait on one pod.
    client = AsyncClient(address, timeout=timeout, retries=0)
    try:
        cache = (await client.model_info()).cache
    except ServingError as exc:
        return RouterCacheReport(name, error=f"ModelInfo at {address} failed: {exc.code.name}: {exc.details[:200]}")
    finally:
        await client.close()
    return RouterCacheReport(name, tiers=cache.tiers, degraded=cache.degraded, reason=cache.reason)
