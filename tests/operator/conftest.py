"""Shared fixtures: the CRD, and a KMock API server dressed up as a small cluster."""

from __future__ import annotations

import asyncio
import copy
import itertools
import pathlib
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jsonpointer
import kmock as kmock_lib
import pytest
import pytest_asyncio
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "charts" / "nextserve" / "crds" / "qwen3nextdeployments.yaml"
NS = "serving"
CR_RESOURCE = "serving.nextserve.io/v1alpha1/qwen3nextdeployments"


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="session")
def cr_schema(crd) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def make_body(name: str = "demo", spec: dict[str, Any] | None = None, namespace: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "serving.nextserve.io/v1alpha1",
        "kind": "Qwen3NextDeployment",
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "generation": 1,
                     "resourceVersion": "1"},
        "spec": copy.deepcopy(spec) if spec is not None else small_spec(),
    }


def small_spec(**experts: Any) -> dict[str, Any]:
    return {
        "model": {"source": {"pvc": {"claimName": "models", "path": "qwen3-next-tiny"}}, "numExperts": 8, "dtype": "float32"},
        "experts": {"shards": 2, "replicasPerShard": 2, "device": "cpu", **experts},
        "router": {"replicas": 2, "device": "cpu"},
        "images": {"serving": "nextserve:test"},
    }


async def eventually(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll `check` until it returns a truthy value (sync or async); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if isinstance(last, Awaitable):
                last = await last
            if last:
                return last
        except (KeyError, TypeError, IndexError, AssertionError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}: last={last!r}")
        await asyncio.sleep(interval)


class Cluster:
    """The test's hands on the emulated cluster: the API server's generation bookkeeping,
    the kubelet's readiness reports and the garbage collector, played explicitly."""

    # Helpers for the test modules (pytest's importlib mode cannot import conftest).
    NS = NS
    eventually = staticmethod(eventually)
    make_body = staticmethod(make_body)
    small_spec = staticmethod(small_spec)

    def __init__(self, kmock: Any, session: aiohttp.ClientSession) -> None:
        self.kmock = kmock
        self.session = session

    # -- objects -------------------------------------------------------------------------
    def objects(self, resource: str, namespace: str = NS) -> dict[str, dict[str, Any]]:
        out = {}
        for (res, ns, name), obj in self.kmock.objects.items():
            if ns == namespace and f"{res.group}/{res.version}/{res.plural}".lstrip("/") == resource.lstrip("/") and not obj.deleted:
                out[name] = obj.raw
        return out

    def statefulsets(self) -> dict[str, dict[str, Any]]:
        return self.objects("apps/v1/statefulsets")

    def deployments(self) -> dict[str, dict[str, Any]]:
        return self.objects("apps/v1/deployments")

    def services(self) -> dict[str, dict[str, Any]]:
        return self.objects("/v1/services")

    def configmaps(self) -> dict[str, dict[str, Any]]:
        return self.objects("/v1/configmaps")

    def cr(self, name: str = "demo") -> dict[str, Any]:
        return self.objects(CR_RESOURCE)[name]

    def condition(self, type_: str, name: str = "demo") -> dict[str, Any] | None:
        for c in (self.cr(name).get("status") or {}).get("conditions") or []:
            if c["type"] == type_:
                return c
        return None

    # -- API calls through HTTP, so that watchers (kopf) see them -----------------------
    async def create_cr(self, body: dict[str, Any]) -> None:
        url = f"{self.kmock.url}/apis/serving.nextserve.io/v1alpha1/namespaces/{body['metadata']['namespace']}/qwen3nextdeployments"
        async with self.session.post(url, json=body) as resp:
            assert resp.status < 300, await resp.text()

    async def patch_spec(self, spec: dict[str, Any], name: str = "demo") -> None:
        generation = self.cr(name)["metadata"].get("generation", 1) + 1
        url = f"{self.kmock.url}/apis/serving.nextserve.io/v1alpha1/namespaces/{NS}/qwen3nextdeployments/{name}"
        # The API server bumps generation on spec changes; KMock does not.
        body = {"metadata": {"generation": generation}, "spec": spec}
        async with self.session.patch(url, json=body, headers={"Content-Type": "application/merge-patch+json"}) as resp:
            assert resp.status < 300, await resp.text()

    async def delete(self, resource: str, name: str, namespace: str = NS) -> None:
        prefix = "api/v1" if resource.startswith("/v1/") else f"apis/{resource.rsplit('/', 1)[0]}"
        plural = resource.rsplit("/", 1)[1]
        url = f"{self.kmock.url}/{prefix}/namespaces/{namespace}/{plural}/{name}"
        async with self.session.delete(url) as resp:
            assert resp.status < 300, await resp.text()

    async def create(self, resource: str, obj: dict[str, Any], namespace: str = NS) -> None:
        prefix = "api/v1" if resource.startswith("/v1/") else f"apis/{resource.rsplit('/', 1)[0]}"
        plural = resource.rsplit("/", 1)[1]
        async with self.session.post(f"{self.kmock.url}/{prefix}/namespaces/{namespace}/{plural}", json=obj) as resp:
            assert resp.status < 300, await resp.text()

    # -- the kubelet and controllers ---------------------------------------------------
    def set_ready(self, resource: str, name: str, ready: int | None = None) -> None:
        """Report `ready` (default: all) replicas ready and up to date, like the controllers do."""
        key = (resource, NS, name)
        obj = self.kmock.objects[key]
        desired = obj["spec"].get("replicas", 1)
        ready = desired if ready is None else ready
        obj.patch({"status": {
            "observedGeneration": obj["metadata"].get("generation", 1),
            "replicas": desired, "readyReplicas": ready, "updatedReplicas": ready, "availableReplicas": ready,
        }})

    def ready_all(self) -> None:
        for name in self.statefulsets():
            self.set_ready("apps/v1/statefulsets", name)
        for name in self.deployments():
            self.set_ready("apps/v1/deployments", name)

    async def garbage_collect(self, owner_uid: str) -> list[str]:
        """Delete every object whose controller owner reference names `owner_uid`."""
        gone = []
        for (res, ns, name), obj in list(self.kmock.objects.items()):
            if obj.deleted:
                continue
            refs = (obj.raw.get("metadata") or {}).get("ownerReferences") or []
            if any(r.get("uid") == owner_uid for r in refs):
                obj.delete()
                gone.append(f"{res.plural}/{name}")
        return gone


class ApiServerEmulator(kmock_lib.KubernetesEmulator):
    """KMock with two more traits of the real API server, both of which kopf relies on:
    every write gets a new resourceVersion, and a JSON patch whose "test" op fails is
    refused with 422.

    After its own patch kopf waits for the watch event that carries the patched
    resourceVersion and treats older events as stale. With versions that never change, a
    stale event queued before the patch passes for the patched state, and kopf runs the
    change handlers again on an outdated body, over and over; the deletion, queued behind
    them, then takes longer than a test waits. kopf guards its finalizer patches with a
    "test" on the resourceVersion and takes a 422 as "newer changes pending, retry on the
    next cycle"; any other status it retries as a server error, blocking the object.
    """

    _versions = itertools.count(1000)  # one counter for the cluster, as etcd's revision

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and request.action in (kmock_lib.action.CREATE, kmock_lib.action.UPDATE):
            version = str(next(self._versions))
            if isinstance(request.data, dict):  # a create, a merge patch
                request.data.setdefault("metadata", {})["resourceVersion"] = version
            elif isinstance(request.data, list):  # a JSON patch: after its own "test" ops
                self._refuse_failed_tests(request)
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        return await super()._handle(request)

    def _refuse_failed_tests(self, request: Any) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # the base class answers 404
        stored = self.objects[key].raw
        for op in request.data:
            if op.get("op") != "test":
                continue
            actual = jsonpointer.resolve_pointer(stored, op["path"], None)
            if actual != op.get("value"):
                raise kmock_lib.KubernetesError(status=422, reason="Invalid",
                                                message=f"the test of {op['path']} failed: {actual!r} is not {op.get('value')!r}")


@pytest.fixture()
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    return {**kmock_options, "cls": ApiServerEmulator}


def _bump_generation(kmock: Any) -> Callable[[Any], None]:
    """Emulate the API server: a new workload gets generation 1, a spec change +1."""
    def bump(request: Any) -> dict[str, Any]:
        name = request.name or (request.data or {}).get("metadata", {}).get("name")
        namespace = request.namespace or (request.data or {}).get("metadata", {}).get("namespace")
        obj = kmock.objects[request.resource, namespace, name]
        history = [v for v in obj.history if v is not None]
        previous = history[-2] if len(history) > 1 else None
        generation = (previous or {}).get("metadata", {}).get("generation", 0) if previous else 0
        if previous is None or previous.get("spec") != obj.get("spec"):
            generation += 1
        obj.patch({"metadata": {"generation": generation, "uid": obj.get("metadata", {}).get("uid") or str(uuid.uuid4())}})
        # Answer like the API server: with the stored object (a reaction that answers
        # nothing is spent after one request).
        return obj.raw
    return bump


@pytest_asyncio.fixture()
async def cluster(kmock, crd, tmp_path, monkeypatch):
    kmock.resources.load_bundled()
    names = crd["spec"]["names"]
    kmock.resources[CR_RESOURCE] = kmock_lib.ResourceInfo(
        kind=names["kind"], singular=names["singular"], namespaced=True, shortnames=set(names["shortNames"]),
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"}, subresources={"status"},
    )
    kmock.resources["kopf.dev/v1/clusterkopfpeerings"] = kmock_lib.ResourceInfo(
        kind="ClusterKopfPeering", singular="clusterkopfpeering", namespaced=False,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    )
    kmock.objects["/v1/namespaces", None, NS] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "uid": "ns-uid"}}
    for res in ("apps/v1/statefulsets", "apps/v1/deployments"):
        for action in (kmock_lib.action.CREATE, kmock_lib.action.UPDATE):
            kmock[action, kmock_lib.resource(res)] << _bump_generation(kmock)

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NS}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with aiohttp.ClientSession() as session:
        yield Cluster(kmock, session)


class Operator:
    """Runs the real operator entry point in a thread with its own event loop (as in a pod):
    kopf cancels every task of its loop that it did not start, so it must not share the
    test's loop.  Stoppable and restartable."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.thread: threading.Thread | None = None
        self.stop_flag: threading.Event | None = None
        self.error: BaseException | None = None

    def _main(self, ready: threading.Event) -> None:
        from nextserve.operator import main

        args = main.build_parser().parse_args(self.argv)
        try:
            asyncio.run(main.operate(args, stop_flag=self.stop_flag, ready_flag=ready))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    async def start(self) -> None:
        self.stop_flag = threading.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), daemon=True)
        self.thread.start()
        await cluster_wait(ready.is_set, "operator ready")

    async def stop(self) -> None:
        assert self.thread is not None and self.stop_flag is not None
        self.stop_flag.set()
        await cluster_wait(lambda: not self.thread.is_alive(), "operator stopped")
        self.thread = None
        if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
            raise self.error


async def cluster_wait(check: Callable[[], bool], what: str) -> None:
    await eventually(check, timeout=20, what=what)


@pytest_asyncio.fixture()
async def operator(cluster):
    # As the docs run it by hand: no peering flag, so no peering object is needed.
    op = Operator(["--all-namespaces", "--resync-seconds", "0.2", "--liveness", ""])
    yield op
    if op.thread is not None:
        await op.stop()
