"""The Helm chart through Helm's own engine (helm-sdkpy, in the Python 3.12 .venv-helm),
installed into KMock; rendered manifests checked with kubernetes-validate --strict."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib

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


async def test_chart_installs_into_emulated_cluster_and_validates(apiserver):
    kmock, env = apiserver
    values = {"replicaCount": 2, "watchNamespaces": ["team-a", "team-b"]}
    rc, release, err = await helm("install", str(CHART), "ns", RELEASE_NS, json.dumps(values), env=env)
    assert rc == 0, err

    docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    for doc in docs:
        if doc["apiVersion"].startswith("kopf.dev"):
            continue  # a custom resource: checked against its CRD below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    # Helm applied the CRDs from crds/ (the same file the operator tests load) and the objects.
    crds = {name for (res, _, name), obj in kmock.objects.items() if res.plural == "customresourcedefinitions"}
    assert crds == {"qwen3nextdeployments.serving.nextserve.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for crd in crds:
        kubernetes_validate.validate(kmock.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd].raw,
                                     K8S_VERSION, strict=True)
    deployment = kmock.objects["apps/v1/deployments", RELEASE_NS, "ns-nextserve-operator"].raw
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert container["command"] == ["python", "-m", "nextserve.operator.main"]
    assert container["args"][:2] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--peering=nextserve" in container["args"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ns-nextserve-operator"

    role = next(d for d in docs if d["kind"] == "ClusterRole")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules[("kopf.dev", "clusterkopfpeerings")] >= {"get", "list", "watch", "patch"}
    assert rules[("", "events")] >= {"create"}
    assert rules[("apps", "statefulsets")] >= {"create", "patch", "delete"}
    assert rules[("", "secrets")] == {"get"}  # read only, no listing of secrets
    assert not any("*" in verbs or r == "*" for (g, r), verbs in rules.items())
    assert "WARNING" not in release.get("info", {}).get("notes", "")


async def test_values_schema_rejects_typos(apiserver):
    kmock, env = apiserver
    rc, _, err = await helm("install", str(CHART), "typo", RELEASE_NS, json.dumps({"replicaCont": 2}), env=env)
    assert rc != 0
    assert "replicaCont" in err


async def test_long_release_names_are_truncated(apiserver):
    kmock, env = apiserver
    release = "r" * 50
    rc, result, err = await helm("install", str(CHART), release, RELEASE_NS,
                                 json.dumps({"replicaCount": 3, "peering": {"create": False, "name": "x"}}), env=env)
    assert rc == 0, err
    for doc in yaml.safe_load_all(result["manifest"]):
        if doc:
            assert len(doc["metadata"]["name"]) <= 63
    assert result["info"]["notes"].lstrip().startswith("WARNING")


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
    assert set(docs) == {kind, "ConfigMap", "ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "Deployment",
                         "ServiceAccount"}
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
