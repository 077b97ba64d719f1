"""CacheReady end to end: the real operator against KMock, a real router process (`nextserve up`:
one worker and a router with --cache-url) and a real redis-server that the test stops and restarts.

KMock plays the kubelet: it holds a router Pod whose IP is loopback and whose container port named
grpc is the real router's port, so the operator asks the real router, as it asks a pod in a cluster.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import pytest_asyncio

from nextserve.client import Client
from nextserve.operator import manifests as m

pytestmark = pytest.mark.asyncio

POD = "demo-router-6f7d9c-x2k4q"
STARTUP_SECONDS = 150


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(port: int) -> bool:
    with Client(f"127.0.0.1:{port}", timeout=1.0, retries=0) as client:
        try:
            return client.health()
        except Exception:  # not listening yet
            return False


@pytest_asyncio.fixture()
async def router_with_cache(tiny_checkpoint, redis_server, tmp_path):
    """The router's gRPC port, once `nextserve up` serves with the module's redis-server as its cache."""
    port = _free_port()
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "nextserve.cli.main", "up", "--checkpoint", str(tiny_checkpoint), "--shards", "1",
             "--port", str(port), "--no-http", "--dtype", "float32", "--kv-cache-memory", "4MiB",
             "--cache-url", redis_server.url, "--startup-timeout", str(STARTUP_SECONDS)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = asyncio.get_running_loop().time() + STARTUP_SECONDS
        while not await asyncio.to_thread(_serving, port):
            assert up.poll() is None and asyncio.get_running_loop().time() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.3)
        yield port
    finally:
        up.terminate()  # `nextserve up` stops its worker and router
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)


def router_pod(port: int) -> dict:
    """A router pod as the kubelet reports it: scheduled, running, ready, at loopback."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD, "namespace": "serving", "uid": "pod-uid", "labels": m.labels("demo", "router")},
        "spec": {"containers": [{"name": "router", "image": "nextserve:test", "ports": [
            {"name": "grpc", "containerPort": port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": m.METRICS_PORT, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def _generate(port: int, prompt: list[int]) -> list[int]:
    with Client(f"127.0.0.1:{port}", timeout=60) as client:
        return client.generate(prompt, max_tokens=3, temperature=0, ignore_eos=True).token_ids


async def test_cache_ready_follows_what_the_router_reports(cluster, operator, router_with_cache, redis_server):
    port = router_with_cache
    await operator.start()
    spec = cluster.small_spec()
    spec["cache"] = {"urlSecret": {"name": "shared-redis"}}  # an existing Redis: the test's redis-server
    await cluster.create_cr(cluster.make_body(spec=spec))
    await cluster.eventually(lambda: "demo-router" in cluster.deployments(), what="router Deployment")

    # No router pod yet: nobody to ask.
    await cluster.eventually(lambda: cluster.condition("CacheReady")["reason"] == "NoRouterReady", what="NoRouterReady")
    assert cluster.condition("CacheReady")["status"] == "Unknown"

    cluster.ready_all()
    cluster.kmock.objects["/v1/pods", cluster.NS, POD] = router_pod(port)
    await cluster.eventually(lambda: cluster.condition("CacheReady")["status"] == "True", timeout=30, what="CacheReady")
    working = cluster.condition("CacheReady")
    assert working["reason"] == "CacheWorking" and "every ready router replica (1)" in working["message"]
    assert cluster.condition("Ready")["status"] == "True"

    # Redis goes while the router is idle: its health check notices (no request needed) and it says so.
    redis_server.kill()
    await cluster.eventually(lambda: cluster.condition("CacheReady")["status"] == "False", timeout=30,
                             what="CacheReady=False")
    degraded = cluster.condition("CacheReady")
    assert degraded["reason"] == "CacheDegraded"
    assert f"{POD}: Redis unreachable" in degraded["message"] and "Ready does not depend on it" in degraded["message"]
    # A degraded cache serves correctly, only slower: Ready stays, and a request is answered.
    prompt = [(7 * i + 3) % 400 + 30 for i in range(90)]
    assert len(await asyncio.to_thread(_generate, port, prompt)) == 3
    assert cluster.condition("Ready")["status"] == "True" and cluster.cr()["status"]["phase"] == "Ready"

    # Redis is back: the router finds it by itself (no request needed), and so does the condition.
    redis_server.start()
    await cluster.eventually(lambda: cluster.condition("CacheReady")["status"] == "True", timeout=30,
                             what="CacheReady=True again")
    assert cluster.condition("CacheReady")["reason"] == "CacheWorking"

    # The router pod goes: no one to ask again, which is not a reason for Ready to change.
    cluster.kmock.objects["/v1/pods", cluster.NS, POD].delete()
    await cluster.eventually(lambda: cluster.condition("CacheReady")["reason"] == "NoRouterReady",
                             what="NoRouterReady after the pod left")
    assert cluster.condition("Ready")["status"] == "True"
