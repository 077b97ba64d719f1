"""The Helm chart through Helm's own engine (helm-sdkpy, in the Python 3.12 .venv-helm),
installed into KMock; rendered manifests checked with kubernetes-validate --strict."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import kmock as kmock_lib
import kubernetes_validate
import pytest
import pytest_asyncio
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "nextserve"
HELM_PY = ROOT / ".venv-helm" / "bin" / "python"
SCRIPT = pathlib.Path(__file__).with_name("helm_check.py")
K8S_VERSION = "1.30.0"
RELEASE_NS = "nextserve-system"

pytestmark = pytest.mark.asyncio

if not HELM_PY.exists():
    # Not a skip: the chart must be checked; the environment is a prerequisite.
    pytest.fail(f"{HELM_PY} is missing; create it with: make .venv-helm/.installed (make test does it)", pytrace=False)


async def helm(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict | None, str]:
    proc = await asyncio.create_subprocess_exec(
        str(HELM_PY), str(SCRIPT), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HELM_DRIVER": "memory", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    data = json.loads(out) if proc.returncode == 0 and out.strip() else None
    return proc.returncode, data, err.decode()


def _establish_crds(kmock):
    """Emulate the API server accepting a CRD: Helm waits for Established=True."""
    def establish(request):
        name = (request.data or {}).get("metadata", {}).get("name") or request.name
        obj = kmock.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, name]
        obj.patch({"metadata": {"uid": f"uid-{name}", "resourceVersion": "1"}, "status": {"conditions": [
            {"type": "NamesAccepted", "status": "True"}, {"type": "Established", "status": "True"}]}})
        return obj.raw
    return establish


def _core_discovery(kmock):
    """The core group's resource list with groupVersion "v1" (KMock 0.8 answers "/v1",
    which client-go cannot parse, so Helm would find no core kinds)."""
    def serve(request):
        resources = []
        for res in kmock.resources:
            if res.group == "" and res.version == "v1":
                info = kmock.resources[res]
                for sub in [""] + sorted(info.subresources):
                    resources.append({
                        "name": f"{res.plural}/{sub}" if sub else res.plural, "kind": info.kind,
                        "singularName": info.singular or "", "namespaced": bool(info.namespaced),
                        "verbs": sorted(info.verbs), "shortNames": sorted(info.shortnames),
                    })
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": resources}
    return serve


@pytest_asyncio.fixture()
async def apiserver(kmock, tmp_path):
    kmock.resources.load_bundled()
    for res, kind, namespaced in (
        ("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", False),
        ("kopf.dev/v1/kopfpeerings", "KopfPeering", True),
        ("serving.nextserve.io/v1alpha1/qwen3nextdeployments", "Qwen3NextDeployment", True),
    ):
        kmock.resources[res] = kmock_lib.ResourceInfo(kind=kind, namespaced=namespaced, singular=kind.lower(),
                                                      verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
    kmock.objects["/v1/namespaces", None, RELEASE_NS] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NS}}
    kmock["get /api/v1"] << _core_discovery(kmock)
    # The chart needs >= 1.27 (native gRPC probes); KMock's built-in answer is older.
    kmock["get /version"] << {"major": "1", "minor": "30", "gitVersion": "v1.30.0", "platform": "linux/amd64"}
    kmock[kmock_lib.action.CREATE, kmock_lib.resource("apiextensions.k8s.io/v1/customresourcedefinitions")] << _establish_crds(kmock)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "t"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": RELEASE_NS}}],
    }))
    return kmock, {"KUBECONFIG": str(kubeconfig)}


async def test_chart_lints():
    rc, result, err = await helm("lint", str(CHART))
    assert rc == 0, err
    assert not result["Errors"], result
    # Only informational messages (severity 1), no warnings or errors.
    assert all(m["Severity"] <= 1 for m in result["Messages"]), result["Messages"]


def _validate(docs):
    for doc in docs:
        if doc["apiVersion"].startswith("kopf.dev"):
            continue  # a custom resource: its CRD is checked below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _rules(role) -> dict[tuple[str, str], set[str]]:
    return {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}


def _check_least_privilege(rules):
    assert not any("*" in verbs or r == "*" or g == "*" for (g, r), verbs in rules.items())
    assert not any(r == "secrets" for _, r in rules)  # the operator reads no Secret
    # The children: exactly the verbs operator/kube.py uses on each kind, no more.
    from nextserve.operator.kube import KINDS, VERBS_USED
    groups = {"ConfigMap": "", "Service": "", "StatefulSet": "apps", "Deployment": "apps", "PodDisruptionBudget": "policy",
              "HorizontalPodAutoscaler": "autoscaling", "Pod": ""}
    for kind, verbs in VERBS_USED.items():
        plural = {"PodDisruptionBudget": "poddisruptionbudgets",
                  "HorizontalPodAutoscaler": "horizontalpodautoscalers"}.get(kind, kind.lower() + "s")
        assert kind in KINDS and rules[(groups[kind], plural)] == verbs, kind


async def test_default_install_cluster_wide(apiserver):
    kmock, env = apiserver
    rc, release, err = await helm("install", str(CHART), "ns", RELEASE_NS, "{}", env=env)
    assert rc == 0, err
    docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    assert sorted(d["kind"] for d in docs) == ["ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "Deployment",
                                                "ServiceAccount"]
    _validate(docs)

    # Helm applied the CRDs from crds/ (the same file the operator tests load) and the objects.
    crds = {name for (res, _, name), obj in kmock.objects.items() if res.plural == "customresourcedefinitions"}
    assert crds == {"qwen3nextdeployments.serving.nextserve.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for crd in crds:
        kubernetes_validate.validate(kmock.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd].raw,
                                     K8S_VERSION, strict=True)
    deployment = kmock.objects["apps/v1/deployments", RELEASE_NS, "ns-nextserve-operator"].raw
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # Two replicas, each with its own peering priority from its pod name: one works, one stands by.
    assert deployment["spec"]["replicas"] == 2
    assert container["command"] == ["python", "-m", "nextserve.operator.main"]
    assert "--all-namespaces" in container["args"] and "--peering=nextserve" in container["args"]
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == "ns-nextserve-operator"
    assert ("kopf.dev/v1/clusterkopfpeerings", None, "nextserve") in {
        (f"{r.group}/{r.version}/{r.plural}", ns, n) for (r, ns, n) in kmock.objects.keys()}

    rules = _rules(next(d for d in docs if d["kind"] == "ClusterRole"))
    assert rules[("kopf.dev", "clusterkopfpeerings")] == {"get", "list", "watch", "patch"}
    assert rules[("", "events")] == {"create"}
    _check_least_privilege(rules)
    # No image is published: the default install says so first.
    assert release["info"]["notes"].lstrip().startswith("WARNING: image.repository")


async def test_namespaced_install_grants_roles_only(apiserver):
    kmock, env = apiserver
    values = {"watchNamespaces": ["team-a", "team-b"], "image": {"repository": "registry.example.com/nextserve-operator",
                                                                 "pullPolicy": "IfNotPresent"}}
    rc, release, err = await helm("install", str(CHART), "ns", RELEASE_NS, json.dumps(values), env=env)
    assert rc == 0, err
    docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    assert sorted((d["kind"], d["metadata"].get("namespace")) for d in docs) == sorted([
        ("KopfPeering", "team-a"), ("KopfPeering", "team-b"), ("Role", "team-a"), ("Role", "team-b"),
        ("RoleBinding", "team-a"), ("RoleBinding", "team-b"), ("Deployment", RELEASE_NS),
        ("ServiceAccount", RELEASE_NS)])
    _validate(docs)
    for role in (d for d in docs if d["kind"] == "Role"):
        rules = _rules(role)
        assert rules[("kopf.dev", "kopfpeerings")] == {"get", "list", "watch", "patch"}
        assert ("apiextensions.k8s.io", "customresourcedefinitions") not in rules
        _check_least_privilege(rules)
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ns-nextserve-operator", "namespace": RELEASE_NS}]
    container = kmock.objects["apps/v1/deployments", RELEASE_NS, "ns-nextserve-operator"].raw["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["--namespace=team-a", "--namespace=team-b"]
    assert "WARNING" not in release["info"]["notes"]


async def test_values_schema_rejects_typos(apiserver):
    kmock, env = apiserver
    rc, _, err = await helm("install", str(CHART), "typo", RELEASE_NS, json.dumps({"replicaCont": 2}), env=env)
    assert rc != 0
    assert "replicaCont" in err


async def test_long_release_names_are_truncated(apiserver):
    kmock, env = apiserver
    release = "r" * 50
    rc, result, err = await helm("install", str(CHART), release, RELEASE_NS,
                                 json.dumps({"replicaCount": 3, "peering": {"create": False, "name": "x"},
                                             "image": {"repository": "r.example/op", "pullPolicy": "Always"}}), env=env)
    assert rc == 0, err
    for doc in yaml.safe_load_all(result["manifest"]):
        if doc:
            assert len(doc["metadata"]["name"]) <= 63
    assert result["info"]["notes"].lstrip().startswith("WARNING: peering.create=false")


# -- the operator as the chart runs it ------------------------------------------------------

class OperatorProcess:
    """The operator as a process with the Deployment's own args and POD_ID (the pod name).
    Only the health endpoint's address differs: pods have a network namespace each, these
    processes share one."""

    def __init__(self, args: list[str], pod_id: str, kubeconfig: str, log_dir: pathlib.Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.health_port = s.getsockname()[1]
        self.pod_id = pod_id
        self.log_path = log_dir / f"operator-{pod_id}.log"
        argv = [sys.executable, "-m", "nextserve.operator.main",
                *[a for a in args if not a.startswith("--liveness=")],
                f"--liveness=http://127.0.0.1:{self.health_port}/healthz"]
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env={**env, "KUBECONFIG": kubeconfig, "POD_ID": pod_id})

    def log(self) -> str:
        return self.log_path.read_text()

    async def stop(self) -> int:
        self.popen.send_signal(signal.SIGTERM)  # what the kubelet sends
        for _ in range(300):
            if self.popen.poll() is not None:
                break
            await asyncio.sleep(0.1)
        else:
            self.popen.kill()
        self._log.close()
        return self.popen.wait(10)


@pytest_asyncio.fixture()
async def operator_processes():
    started: list[OperatorProcess] = []

    def start(*args, **kwargs) -> OperatorProcess:
        started.append(OperatorProcess(*args, **kwargs))
        return started[-1]

    yield start
    for op in started:
        if op.popen.poll() is None:
            op.popen.kill()
            op.popen.wait(10)


def _chart_container(kmock) -> dict:
    deployment = kmock.objects["apps/v1/deployments", RELEASE_NS, "ns-nextserve-operator"].raw
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _operator_requests(kmock) -> list:
    """Requests the operators sent: kopf's own and the children client's (named by its user agent).
    Discovery (/api, /apis/GROUP/VERSION: no resource) is open to every authenticated user."""
    return [r for r in kmock if r.resource is not None and r.resource.plural is not None and
            r.headers.get("User-Agent", "").startswith(("kopf/", "nextserve-operator/"))]


def _child_writes(kmock, agent: str | None = None) -> list:
    return [r for r in _operator_requests(kmock)
            if r.method in ("POST", "PATCH", "PUT", "DELETE") and r.headers["User-Agent"].startswith("nextserve-operator/")
            and (agent is None or r.headers["User-Agent"] == agent)]


async def test_two_replicas_with_the_chart_defaults_one_works_then_the_other(apiserver, cluster, tmp_path,
                                                                             operator_processes):
    kmock, env = apiserver
    rc, _, err = await helm("install", str(CHART), "ns", RELEASE_NS, json.dumps({"resyncSeconds": 1}), env=env)
    assert rc == 0, err
    args = _chart_container(kmock)["args"]
    ops = [operator_processes(args, f"ns-nextserve-operator-5d8f9-{s}", env["KUBECONFIG"], tmp_path)
           for s in ("x2k4q", "p7w9z")]

    def peers() -> dict:
        return kmock.objects["kopf.dev/v1/clusterkopfpeerings", None, "nextserve"].raw.get("status") or {}

    await cluster.eventually(lambda: {op.pod_id for op in ops} <= set(peers()), timeout=60, what="both replicas peered")
    priority = {op.pod_id: peers()[op.pod_id]["priority"] for op in ops}
    assert len(set(priority.values())) == 2  # distinct: neither freezes
    active, standby = sorted(ops, key=lambda op: -priority[op.pod_id])

    await cluster.create_cr(cluster.make_body())
    await cluster.eventually(lambda: "demo-router" in cluster.deployments() and cluster.condition("Ready"),
                             timeout=30, what="reconciled")
    cluster.ready_all()
    await cluster.eventually(lambda: cluster.condition("Ready")["status"] == "True", timeout=30, what="Ready")
    # Exactly one replica did the work: every child written once, all by the active one.
    writes = _child_writes(kmock)
    assert {r.headers["User-Agent"] for r in writes} == {f"nextserve-operator/{active.pod_id}"}
    creates = sorted((r.resource.plural, r.data["metadata"]["name"]) for r in writes if r.method == "POST")
    applies = sorted((r.resource.plural, r.name) for r in writes if r.method == "PATCH")
    assert len(creates) == len(set(creates)) == len(cluster.statefulsets()) * 3 + 1 + 3  # shard: sts, svc, pdb; plan; router: 3
    assert applies == creates  # the one apply of each new child (the emulator answers it 404, then the create)
    assert "Handler 'create' succeeded" in active.log()
    assert "Handler 'create' succeeded" not in standby.log() and "Timer 'resync' succeeded" not in standby.log()

    # The active replica stops (a rollout, a node drain): it leaves the peering, the other takes over.
    assert await active.stop() == 0
    await cluster.eventually(lambda: active.pod_id not in peers(), timeout=20, what="active replica left the peering")
    await cluster.create_cr(cluster.make_body("second"))
    await cluster.eventually(lambda: "second-router" in cluster.deployments(), timeout=30, what="the standby took over")
    assert _child_writes(kmock, f"nextserve-operator/{standby.pod_id}")
    cluster.ready_all()
    await cluster.eventually(lambda: cluster.condition("Ready", "second")["status"] == "True", timeout=30,
                             what="second Ready")


def _allowed(roles: list[dict], namespace: str | None, group: str, resource: str, verb: str) -> bool:
    for role in roles:
        if role["kind"] == "Role" and role["metadata"]["namespace"] != namespace:
            continue
        if verb in _rules(role).get((group, resource), set()):
            return True
    return False


_VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}


async def test_operator_works_with_only_the_namespaced_roles(apiserver, cluster, tmp_path, operator_processes):
    kmock, env = apiserver
    values = {"watchNamespaces": [cluster.NS], "resyncSeconds": 1}
    rc, release, err = await helm("install", str(CHART), "ns", RELEASE_NS, json.dumps(values), env=env)
    assert rc == 0, err
    roles = [d for d in yaml.safe_load_all(release["manifest"]) if d and d["kind"] in ("Role", "ClusterRole")]
    assert [r["kind"] for r in roles] == ["Role"]
    op = operator_processes(_chart_container(kmock)["args"], "ns-nextserve-operator-5d8f9-q1", env["KUBECONFIG"],
                            tmp_path)

    # Create, become ready, re-shard (new workers, router switch, old ones deleted): every verb the operator has;
    # a shared cache, so that the router pods are listed too.
    spec = cluster.small_spec()
    spec["cache"] = {"managed": {}}
    await cluster.create_cr(cluster.make_body(spec=spec))
    await cluster.eventually(lambda: "demo-router" in cluster.deployments(), timeout=60, what="router")
    cluster.ready_all()
    await cluster.eventually(lambda: cluster.condition("Ready")["status"] == "True", timeout=30, what="Ready")
    await cluster.patch_spec(cluster.small_spec(shards=4))
    await cluster.eventually(lambda: len(cluster.statefulsets()) == 6, timeout=30, what="new shards")

    def settle() -> bool:  # the kubelet keeps reporting ready: the router switches, then the old shards go
        cluster.ready_all()
        return len(cluster.statefulsets()) == 4

    await cluster.eventually(settle, timeout=30, interval=0.2, what="old shards retired")

    used = set()
    for r in _operator_requests(kmock):
        verb = {"PATCH": "patch", "PUT": "update"}.get(str(r.method.value), _VERBS.get(str(r.action.value)))
        resource = r.resource.plural + (f"/{r.subresource}" if r.subresource else "")
        used.add((r.namespace, r.resource.group, resource, verb))
    denied = sorted(u for u in used if not _allowed(roles, *u))
    assert not denied, f"requests the Roles do not allow: {denied}\n{op.log()[-3000:]}"
    assert all(ns == cluster.NS for ns, *_ in used), sorted(used)  # nothing cluster-wide, nothing elsewhere
    for needed in [("serving.nextserve.io", "qwen3nextdeployments", "watch"),
                   ("serving.nextserve.io", "qwen3nextdeployments/status", "patch"), ("kopf.dev", "kopfpeerings", "patch"),
                   ("apps", "statefulsets", "delete"), ("policy", "poddisruptionbudgets", "create"), ("", "pods", "list")]:
        assert (cluster.NS, *needed) in used, needed
    assert op.popen.poll() is None, op.log()[-3000:]



def _monitoring_crds(kmock):
    for res, kind in (("monitoring.coreos.com/v1/servicemonitors", "ServiceMonitor"),
                      ("monitoring.coreos.com/v1/podmonitors", "PodMonitor")):
        kmock.resources[res] = kmock_lib.ResourceInfo(kind=kind, namespaced=True, singular=kind.lower(),
                                                      verbs={"get", "list", "watch", "create", "patch", "update", "delete"})


@pytest.mark.parametrize("monitor", ["serviceMonitor", "podMonitor"])
async def test_monitoring_objects_select_every_router_and_worker_metrics_port(apiserver, monitor):
    from nextserve.operator import manifests

    kmock, env = apiserver
    _monitoring_crds(kmock)
    values = {"watchNamespaces": ["team-a"], "monitoring": {monitor: {"enabled": True, "labels": {"release": "kps"}},
                                                            "grafanaDashboard": {"enabled": True}}}
    rc, release, err = await helm("install", str(CHART), "ns", RELEASE_NS, json.dumps(values), env=env)
    assert rc == 0, err
    docs = {d["kind"]: d for d in yaml.safe_load_all(release["manifest"]) if d}
    kind = monitor[0].upper() + monitor[1:]
    assert set(docs) == {kind, "ConfigMap", "KopfPeering", "Role", "RoleBinding", "Deployment", "ServiceAccount"}
    spec = docs[kind]["spec"]
    assert docs[kind]["metadata"]["labels"]["release"] == "kps"
    assert spec["namespaceSelector"] == {"matchNames": ["team-a"]}
    # the labels the operator puts on router and worker pods and Services, and the port it names
    child = manifests.labels("qwen", "worker")
    for key, value in spec["selector"]["matchLabels"].items():
        assert child[key] == value
    assert spec["selector"]["matchExpressions"] == [
        {"key": manifests.COMPONENT, "operator": "In", "values": ["router", "worker"]}]
    [endpoint] = spec["endpoints" if monitor == "serviceMonitor" else "podMetricsEndpoints"]
    assert endpoint["port"] == manifests.METRICS_SERVICE_PORT["name"] == "metrics"
    dashboard = json.loads(docs["ConfigMap"]["data"]["nextserve.json"])
    assert dashboard["uid"] == "nextserve" and docs["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    kubernetes_validate.validate(docs["ConfigMap"], K8S_VERSION, strict=True)


async def test_enabling_both_monitors_fails_with_a_reason(apiserver):
    kmock, env = apiserver
    _monitoring_crds(kmock)
    values = {"monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}
    rc, _, err = await helm("install", str(CHART), "both", RELEASE_NS, json.dumps(values), env=env)
    assert rc != 0 and "not both" in err
