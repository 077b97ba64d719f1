"""Pure builders: the children are exactly what the spec asks for."""

from __future__ import annotations

import copy
import pathlib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from nextserve.operator import manifests as m
from nextserve.operator import spec as s
from nextserve.operator import status as st
from nextserve.operator.main import build_parser
from nextserve.worker.plan import ExpertPlan

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"


def body(spec: dict, name: str = "qwen", namespace: str = "prod") -> dict:
    return {"apiVersion": "serving.nextserve.io/v1alpha1", "kind": "Qwen3NextDeployment",
            "metadata": {"name": name, "namespace": namespace, "uid": "uid-123", "generation": 4},
            "spec": spec}


BIG = {
    "model": {"source": {"pvc": {"claimName": "weights", "path": "Qwen3-Next-80B-A3B"}}, "numExperts": 512},
    "experts": {
        "shards": 8, "replicasPerShard": 2,
        "resources": {"requests": {"cpu": "8", "memory": "96Gi"}, "limits": {"nvidia.com/gpu": 1}},
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "router": {"replicas": 2, "maxBatchTokens": 8192, "maxRunningRequests": 64, "maxQueue": 256,
               "service": {"type": "LoadBalancer", "port": 443}, "drainSeconds": 90,
               "disruptionBudget": {"maxUnavailable": 0}},
    "tracing": {"otlpEndpoint": "http://otel-collector.observability:4317", "sampleRatio": 0.1},
    "images": {"serving": "registry.example/nextserve:1.2.3", "pullPolicy": "Always", "pullSecrets": ["regcred"]},
}
TINY = {
    "model": {"source": {"hostPath": {"path": "/srv/models/tiny"}}, "numExperts": 8, "dtype": "float32"},
    "experts": {"shards": 2, "device": "cpu"},
    "router": {"device": "cpu"},
    "images": {"serving": "nextserve:dev"},
}


def build(spec: dict):
    b = body(spec)
    parsed = s.parse_spec(spec)
    plan = s.resolve_plan(parsed)
    return b, parsed, plan, m.all_children(b, parsed, plan)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_big_spec_children():
    b, parsed, plan, children = build(BIG)
    kinds = [(c["kind"], c["metadata"]["name"]) for c in children]
    fp = plan.fingerprint()
    assert kinds[0] == ("ConfigMap", f"qwen-plan-{fp}")
    sts = [c for c in children if c["kind"] == "StatefulSet"]
    svcs = {c["metadata"]["name"]: c for c in children if c["kind"] == "Service"}
    assert len(sts) == 8
    # Shards cover every expert exactly once, and each worker is told its own shard.
    cm = children[0]
    loaded = ExpertPlan.from_json(cm["data"]["plan.json"])
    assert sorted(e for sh in loaded.shards for e in sh.experts) == list(range(512))
    for shard, obj in enumerate(sorted(sts, key=lambda o: int(o["metadata"]["labels"][m.LABEL_SHARD]))):
        args = obj["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:1] == ["worker"]
        assert flag(args, "--shard") == str(shard)
        assert flag(args, "--checkpoint") == "/model/Qwen3-Next-80B-A3B"
        assert flag(args, "--plan") == "/etc/nextserve/plan/plan.json"
        assert flag(args, "--port") == "50051" and flag(args, "--host") == "0.0.0.0"
        assert flag(args, "--dtype") == "bfloat16" and flag(args, "--device") == "cuda"
        assert obj["spec"]["replicas"] == 2
        assert obj["spec"]["serviceName"] == obj["metadata"]["name"]
        assert svcs[obj["metadata"]["name"]]["spec"]["clusterIP"] == "None"
        assert svcs[obj["metadata"]["name"]]["spec"]["selector"].items() <= obj["spec"]["template"]["metadata"]["labels"].items()
        assert obj["spec"]["selector"]["matchLabels"].items() <= obj["spec"]["template"]["metadata"]["labels"].items()
        assert len(obj["metadata"]["name"]) <= 52
        pod = obj["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["resources"]["requests"]["memory"] == "96Gi"
        # Liveness asks a service that is SERVING while the process runs; readiness asks the worker's own.
        assert c["livenessProbe"]["grpc"] == c["startupProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
        assert c["readinessProbe"]["grpc"] == {"port": 50051, "service": "nextserve.v1.ExpertWorker"}
        assert flag(args, "--drain-grace") == str(m.WORKER_DRAIN_SECONDS)
        assert pod["terminationGracePeriodSeconds"] > m.WORKER_DRAIN_SECONDS
        assert pod["nodeSelector"] == BIG["experts"]["nodeSelector"]
        assert pod["tolerations"] == BIG["experts"]["tolerations"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert c["image"] == "registry.example/nextserve:1.2.3" and c["imagePullPolicy"] == "Always"
        assert {"name": "plan", "configMap": {"name": cm["metadata"]["name"], "items": [{"key": "plan.json", "path": "plan.json"}]}} in pod["volumes"]

    router = next(c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"] == "qwen-router")
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "router"
    workers = [args[i + 1] for i, a in enumerate(args) if a == "--worker"]
    assert len(workers) == 16
    sts0 = m.worker_name("qwen", plan, 0)
    assert workers[:2] == [f"0={sts0}-0.{sts0}.prod.svc.cluster.local:50051", f"0={sts0}-1.{sts0}.prod.svc.cluster.local:50051"]
    assert sorted({w.split("=")[0] for w in workers}, key=int) == [str(i) for i in range(8)]
    assert flag(args, "--max-batch-tokens") == "8192"
    assert flag(args, "--max-running-requests") == "64"
    assert flag(args, "--max-queue") == "256"
    # No flag for a feature the router does not have yet (the cache); tracing travels as OTEL_* variables.
    assert not {"--cache-url", "--cache-ttl", "--otlp-endpoint", "--trace-sample-ratio"} & set(args)
    router_env = {e["name"]: e.get("value") for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert router_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert float(router_env["OTEL_TRACES_SAMPLER_ARG"]) == 0.1
    # Drain: preStop keeps the router serving while it leaves the Service's endpoints, then
    # SIGTERM starts the drain; the kubelet's hard kill comes only after both and a margin.
    rpod = router["spec"]["template"]["spec"]
    rc = rpod["containers"][0]
    assert flag(args, "--drain-grace") == "90"
    assert rc["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(m.PRE_STOP_SECONDS)]
    assert rpod["terminationGracePeriodSeconds"] == m.PRE_STOP_SECONDS + 90 + m.EXIT_MARGIN_SECONDS
    assert rc["livenessProbe"]["grpc"] == {"port": 50050, "service": "liveness"}
    assert rc["readinessProbe"]["grpc"] == {"port": 50050, "service": "nextserve.v1.Serving"}
    assert router["spec"]["replicas"] == 2
    assert router["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert router["metadata"]["annotations"][m.ANNOTATION_PLAN] == fp
    assert svcs["qwen-router"]["spec"]["type"] == "LoadBalancer"
    assert svcs["qwen-router"]["spec"]["ports"][0]["port"] == 443
    assert not any(c["kind"] == "Deployment" and c["metadata"]["name"] != "qwen-router" for c in children)

    # A budget per shard, selecting exactly that shard's pods, and one for the routers.
    pdbs = {c["metadata"]["name"]: c for c in children if c["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {o["metadata"]["name"] for o in sts} | {"qwen-router"}
    for obj in sts:
        pdb = pdbs[obj["metadata"]["name"]]
        assert pdb["spec"]["selector"] == obj["spec"]["selector"] and pdb["spec"]["maxUnavailable"] == 1
    assert pdbs["qwen-router"]["spec"]["selector"] == router["spec"]["selector"]
    assert pdbs["qwen-router"]["spec"]["maxUnavailable"] == 0

    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "prod"
        assert meta["ownerReferences"] == [{"apiVersion": "serving.nextserve.io/v1alpha1", "kind": "Qwen3NextDeployment",
                                            "name": "qwen", "uid": "uid-123", "controller": True, "blockOwnerDeletion": True}]
        assert meta["labels"]["app.kubernetes.io/instance"] == "qwen"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "nextserve-operator"
        assert meta["labels"]["app.kubernetes.io/name"] == "nextserve"


def test_tiny_cpu_children():
    b, parsed, plan, children = build(TINY)
    assert [c["kind"] for c in children].count("StatefulSet") == 2
    sts = next(c for c in children if c["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {}) and "nvidia.com/gpu" not in c["resources"]["requests"]
    assert flag(c["args"], "--device") == "cpu" and flag(c["args"], "--dtype") == "float32"
    assert flag(c["args"], "--checkpoint") == "/model"
    assert {"name": "model", "hostPath": {"path": "/srv/models/tiny", "type": "Directory"}} in pod["volumes"]
    router = next(c for c in children if c["kind"] == "Deployment")
    rc = router["spec"]["template"]["spec"]["containers"][0]
    assert "--max-batch-tokens" not in rc["args"]
    assert flag(rc["args"], "--drain-grace") == str(s.DEFAULT_DRAIN_SECONDS)
    assert not [e for e in rc["env"] if e["name"].startswith("OTEL_")]  # no tracing block: tracing stays off


@pytest.mark.parametrize("spec", [BIG, TINY], ids=["big", "tiny"])
def test_children_pass_kubernetes_validate(spec):
    *_, children = build(spec)
    for child in children:
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_plan_change_renames_workers_and_configmap():
    b, parsed, plan8, _ = build(BIG)
    spec4 = copy.deepcopy(BIG)
    spec4["experts"]["shards"] = 4
    plan4 = s.resolve_plan(s.parse_spec(spec4))
    assert m.plan_configmap_name("qwen", plan4) != m.plan_configmap_name("qwen", plan8)
    assert {m.worker_name("qwen", plan4, i) for i in range(4)}.isdisjoint({m.worker_name("qwen", plan8, i) for i in range(8)})
    # Same spec, same names: reconciliation is idempotent.
    assert m.all_children(b, parsed, plan8) == m.all_children(b, s.parse_spec(BIG), s.resolve_plan(s.parse_spec(BIG)))


def test_long_names_are_truncated_uniquely():
    long = "a" * 60
    plan = ExpertPlan.contiguous(8, 2)
    names = {m.worker_name(long, plan, i) for i in range(2)} | {m.worker_name(long + "b", plan, 0)}
    assert len(names) == 3 and all(len(n) <= 52 for n in names)
    assert len(m.router_name("x" * 80)) <= 63
    assert len(m.labels("y" * 80, "router")["app.kubernetes.io/instance"]) <= 63


@pytest.mark.parametrize(("experts", "reason", "text"), [
    ({"shards": 3}, "ExpertsNotDivisible", "cannot be split evenly"),
    ({"shards": 2, "plan": [{"shard": 0, "experts": [0, 1, 2]}, {"shard": 1, "experts": [3, 4]}]}, "InvalidPlan", "held by no shard: 5, 6, 7"),
    ({"shards": 3, "plan": [{"shard": 0, "experts": [0, 1, 2, 3]}, {"shard": 1, "experts": [4, 5, 6, 7]}]}, "InvalidPlan", "shards 0..2"),
    ({"shards": 2, "plan": [{"shard": 0, "experts": [0, 1, 2, 3]}, {"shard": 1, "experts": [4, 5, 6, 8]}]}, "InvalidPlan", "out of range"),
])
def test_invalid_specs(experts, reason, text):
    spec = copy.deepcopy(TINY)
    spec["experts"] = {**spec["experts"], **experts}
    with pytest.raises(s.InvalidSpec) as info:
        s.resolve_plan(s.parse_spec(spec))
    assert info.value.reason == reason and text in info.value.message


def test_spec_without_an_image_is_refused():
    spec = copy.deepcopy(TINY)
    del spec["images"]
    with pytest.raises(s.InvalidSpec, match="spec.images.serving"):
        s.parse_spec(spec)


def _schema_defaults(schema: dict, value):
    """Structural defaulting as the API server does it."""
    if schema.get("type") == "object" and isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _schema_defaults(sub, value[key])
    return value


def test_parser_defaults_match_crd_defaults(cr_schema):
    """A spec defaulted by the API server and one defaulted by the parser mean the same."""
    for raw in (TINY, {"model": {"source": {"pvc": {"claimName": "c"}}}, "experts": {"shards": 8},
                       "images": {"serving": "x"}}):
        defaulted = _schema_defaults(cr_schema["properties"]["spec"], copy.deepcopy(raw))
        assert s.parse_spec(defaulted) == s.parse_spec(raw)


def test_crd_schema_rejects_what_it_can(cr_schema):
    validator = jsonschema.Draft4Validator(cr_schema)
    ok = body(TINY)
    assert not list(validator.iter_errors(ok))
    bad = [
        ("experts", {"shards": 0}),
        ("experts", {"shards": 2, "device": "tpu"}),
        ("model", {"source": {"pvc": {"claimName": "x"}, "hostPath": {"path": "/x"}}}),
        ("model", {"source": {}}),
        ("model", {"source": {"hostPath": {"path": "relative"}}, "dtype": "int8"}),
        ("router", {"replicas": "two"}),
        ("router", {"drainSeconds": -1}),
        ("router", {"disruptionBudget": {"maxUnavailable": -1}}),
        ("images", {"pullPolicy": "Always"}),
    ]
    for key, value in bad:
        broken = body({**TINY, key: value})
        assert list(validator.iter_errors(broken)), f"{key}={value} should be rejected"
    assert list(validator.iter_errors(body({"model": TINY["model"]})))  # experts required
    # The cache block exists because the routers use it (session records in Redis); tracing is built.
    assert {"cache", "tracing"} <= set(cr_schema["properties"]["spec"]["properties"])
    for cache in ({}, {"managed": {}, "urlSecret": {"name": "r"}}, {"urlSecret": {}},
                  {"managed": {"maxMemory": "lots"}}):
        assert list(validator.iter_errors(body({**TINY, "cache": cache}))), f"cache={cache} should be rejected"


def test_examples_validate_against_crd(cr_schema):
    validator = jsonschema.Draft4Validator(cr_schema)
    examples = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
    assert {p.name for p in examples} >= {"qwen3-next-80b.yaml", "tiny-cpu.yaml"}
    for path in examples:
        doc = yaml.safe_load(path.read_text())
        errors = [e.message for e in validator.iter_errors(doc)]
        assert not errors, f"{path.name}: {errors}"
        spec = s.parse_spec(doc["spec"])
        s.resolve_plan(spec)  # and the operator can deploy it
    big = s.parse_spec(yaml.safe_load((ROOT / "deploy/examples/qwen3-next-80b.yaml").read_text())["spec"])
    assert (big.experts.shards, big.router.replicas, big.router.drain_seconds, big.model.num_experts) == (8, 2, 120, 512)
    tiny = s.parse_spec(yaml.safe_load((ROOT / "deploy/examples/tiny-cpu.yaml").read_text())["spec"])
    assert tiny.experts.device == "cpu" and tiny.router.device == "cpu"


def test_rollout_decisions():
    assert st.decide_rollout("new", None, False, False) == st.RolloutStep("new", True, False)
    assert st.decide_rollout("new", "old", False, True) == st.RolloutStep("old", False, False)
    assert st.decide_rollout("new", "old", True, True) == st.RolloutStep("new", True, False)
    assert st.decide_rollout("new", "new", True, False) == st.RolloutStep("new", True, False)
    assert st.decide_rollout("new", "new", True, True) == st.RolloutStep("new", True, True)


def test_readiness_respects_generation():
    dep = {"metadata": {"generation": 3}, "spec": {"replicas": 2},
           "status": {"observedGeneration": 2, "readyReplicas": 2, "updatedReplicas": 2}}
    assert st.deployment_ready(dep) == (2, 2, False)
    dep["status"]["observedGeneration"] = 3
    assert st.deployment_ready(dep) == (2, 2, True)
    assert st.statefulset_ready(None) == (0, 0, False)


def test_expert_ranges():
    assert st.expert_ranges([0, 1, 2, 3, 8, 9, 11]) == "0-3,8-9,11"
    assert st.expert_ranges(list(range(0, 40, 2))).endswith("(20 experts)")


def test_cli_arguments():
    args = build_parser().parse_args(["--namespace", "a", "--namespace", "b"])
    assert args.namespace == ["a", "b"] and not args.all_namespaces
    assert build_parser().parse_args(["-A"]).namespace == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--namespace", "a", "--all-namespaces"])


def test_run_by_hand_needs_no_peering_and_replicas_get_distinct_priorities():
    assert build_parser().parse_args(["--namespace", "team-a"]).peering == ""  # standalone: works out of the box
    from nextserve.operator.health import priority_of
    pods = [f"nextserve-operator-5d8f9-{s}" for s in ("x2k4q", "p7w9z", "a1b2c")]
    assert len({priority_of(p) for p in pods}) == 3
    assert priority_of(pods[0]) == priority_of(pods[0])  # a restarted process keeps its pod's priority


def test_flag_registration_does_not_import_kopf():
    import subprocess
    import sys

    code = ("import argparse, sys; from nextserve.operator.main import add_arguments; "
            "p = argparse.ArgumentParser(); add_arguments(p); print('kopf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tracing_block_becomes_otel_variables_and_every_pod_serves_metrics():
    b, parsed, plan, children = build(BIG)
    pods = {(c["kind"], c["metadata"]["name"]): c["spec"]["template"]["spec"]["containers"][0]
            for c in children if c["kind"] in ("StatefulSet", "Deployment") and "redis" not in c["metadata"]["name"]}
    assert len(pods) == 9  # 8 worker shards and the router
    for (kind, _), container in pods.items():
        role = "router" if kind == "Deployment" else "worker"
        env = {e["name"]: e for e in container["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4317"
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "grpc"
        assert env["OTEL_SERVICE_NAME"]["value"] == f"nextserve-{role}"
        assert env["OTEL_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        names = [e["name"] for e in container["env"]]
        assert names.index("OTEL_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")  # $(VAR) needs it defined first
        assert "k8s.pod.name=$(OTEL_POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert "k8s.namespace.name=prod" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        # only routers start traces; workers follow their parent's decision
        expected_sampler = "parentbased_traceidratio" if role == "router" else "parentbased_always_on"
        assert env["OTEL_TRACES_SAMPLER"]["value"] == expected_sampler
        assert ("OTEL_TRACES_SAMPLER_ARG" in env) is (role == "router")
        assert flag(container["args"], "--metrics-port") == str(m.METRICS_PORT)
        assert {"name": "metrics", "containerPort": m.METRICS_PORT, "protocol": "TCP"} in container["ports"]
    services = {c["metadata"]["name"]: c["spec"] for c in children if c["kind"] == "Service" and "redis" not in
                c["metadata"]["name"]}
    assert len(services) == 9
    for name, service in services.items():
        # BIG's router Service is a LoadBalancer: its metrics stay off the outside (a PodMonitor scrapes them)
        assert (m.METRICS_SERVICE_PORT in service["ports"]) is (service.get("type") != "LoadBalancer")
    *_, tiny_children = build(TINY)
    tiny_router = next(c for c in tiny_children if c["kind"] == "Service" and c["metadata"]["name"] == "qwen-router")
    assert tiny_router["spec"]["type"] == "ClusterIP" and m.METRICS_SERVICE_PORT in tiny_router["spec"]["ports"]


def test_operator_command_lines_are_accepted_by_the_nextserve_cli():
    """Every flag the operator writes exists in `nextserve worker` / `nextserve router`."""
    from nextserve.cli.main import build_parser as cli_parser

    b, parsed, plan, children = build(BIG)
    parser = cli_parser()
    for child in children:
        if child["kind"] in ("StatefulSet", "Deployment") and "redis" not in child["metadata"]["name"]:
            args = child["spec"]["template"]["spec"]["containers"][0]["args"]
            assert parser.parse_args(args).metrics_port == m.METRICS_PORT


def _router_container_and_service(children):
    router = next(c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"].endswith("-router"))
    service = next(c for c in children if c["kind"] == "Service" and c["metadata"]["name"].endswith("-router"))
    return router["spec"]["template"]["spec"]["containers"][0], service


@pytest.mark.parametrize("http, port", [(None, 8000), ({"port": 9000}, 9000), ({"enabled": False}, None)],
                         ids=["default-on", "own-port", "off"])
def test_router_http_api_port_follows_the_cr_switch(cr_schema, http, port):
    spec = copy.deepcopy(TINY)
    if http is not None:
        spec["router"]["http"] = http
    validator = jsonschema.Draft4Validator(cr_schema)
    assert not list(validator.iter_errors(body(spec)))
    assert list(validator.iter_errors(body({**spec, "router": {"http": {"enabled": "no"}}})))
    assert list(validator.iter_errors(body({**spec, "router": {"http": {"port": 80}}})))
    *_, children = build(spec)
    container, service = _router_container_and_service(children)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service_ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    if port is None:
        assert "--no-http" in container["args"] and "--http-port" not in container["args"]
        assert "http" not in container_ports and "http" not in service_ports
    else:
        assert flag(container["args"], "--http-port") == str(port) and "--no-http" not in container["args"]
        assert container_ports["http"] == port and service_ports["http"] == port
    assert "grpc" in container_ports and "grpc" in service_ports
    for child in children:
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


@pytest.mark.parametrize("autoscaling, metric", [
    ({"maxReplicas": 6, "sequencesPerRouter": 24}, {"type": "Pods", "pods": {
        "metric": {"name": "nextserve_router_sequences"}, "target": {"type": "AverageValue", "averageValue": "24"}}}),
    ({"minReplicas": 2, "maxReplicas": 4, "cpuUtilization": 70}, {"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}),
], ids=["sequences", "cpu"])
def test_router_autoscaling_is_an_hpa_that_owns_the_replicas(cr_schema, autoscaling, metric):
    spec = copy.deepcopy(TINY)
    spec["router"]["autoscaling"] = autoscaling
    assert not list(jsonschema.Draft4Validator(cr_schema).iter_errors(body(spec)))
    b, parsed, plan, children = build(spec)
    [hpa] = [c for c in children if c["kind"] == "HorizontalPodAutoscaler"]
    router = next(c for c in children if c["kind"] == "Deployment")
    assert "replicas" not in router["spec"]  # the HPA's field: the operator must not write it
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": router["metadata"]["name"]}
    assert hpa["spec"]["metrics"] == [metric]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (autoscaling.get("minReplicas", 1),
                                                                        autoscaling["maxReplicas"])
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == "uid-123"
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    kubernetes_validate.validate(router, K8S_VERSION, strict=True)
    if "cpuUtilization" in autoscaling:  # utilisation is a share of the request: there must be one
        assert "cpu" in router["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]

    # without the block: replicas from the spec, no HPA
    *_, plain = build(TINY)
    assert next(c for c in plain if c["kind"] == "Deployment")["spec"]["replicas"] == 1
    assert not [c for c in plain if c["kind"] == "HorizontalPodAutoscaler"]


@pytest.mark.parametrize("autoscaling, schema_rejects", [
    ({"maxReplicas": 4}, True),                                           # no target
    ({"maxReplicas": 4, "sequencesPerRouter": 8, "cpuUtilization": 50}, True),  # two targets
    ({"sequencesPerRouter": 8}, True),                                    # no upper bound
    ({"maxReplicas": 4, "cpuUtilization": 150}, True),
    ({"minReplicas": 5, "maxReplicas": 4, "sequencesPerRouter": 8}, False),  # the CEL rule; the parser too
], ids=["no-target", "two-targets", "no-max", "cpu-over-100", "min-above-max"])
def test_bad_router_autoscaling_is_refused_by_schema_or_parser(cr_schema, autoscaling, schema_rejects):
    spec = copy.deepcopy(TINY)
    spec["router"]["autoscaling"] = autoscaling
    assert bool(list(jsonschema.Draft4Validator(cr_schema).iter_errors(body(spec)))) is schema_rejects
    if "cpuUtilization" in autoscaling and autoscaling["cpuUtilization"] > 100:
        return  # a range only the schema checks
    with pytest.raises(s.InvalidSpec) as error:
        s.parse_spec(spec)
    assert error.value.reason == "InvalidAutoscaling"


@pytest.mark.parametrize("cache", [{"managed": {}}, {"managed": {"image": "mirror/redis:7", "maxMemory": "4gb"}},
                                   {"urlSecret": {"name": "shared-redis"}}, None],
                         ids=["managed", "managed-own", "secret", "none"])
def test_the_cache_block_runs_a_redis_or_reads_a_secret_and_feeds_the_router_cache_url(cr_schema, cache):
    spec = copy.deepcopy(TINY)
    if cache is not None:
        spec["cache"] = cache
    assert not list(jsonschema.Draft4Validator(cr_schema).iter_errors(body(spec)))
    defaulted = _schema_defaults(cr_schema["properties"]["spec"], copy.deepcopy(spec))
    assert s.parse_spec(defaulted) == s.parse_spec(spec)
    *_, children = build(spec)
    container, _ = _router_container_and_service(children)
    env = {e["name"]: e for e in container["env"]}
    redis = [c for c in children if c["metadata"]["labels"][m.COMPONENT] == "cache"]
    if cache is None:
        assert "--cache-url" not in container["args"] and m.CACHE_URL_ENV not in env and redis == []
        return
    assert flag(container["args"], "--cache-url") == f"$({m.CACHE_URL_ENV})"
    if "urlSecret" in cache:
        assert env[m.CACHE_URL_ENV]["valueFrom"] == {"secretKeyRef": {"name": "shared-redis", "key": "url"}}
        assert redis == []
    else:
        assert env[m.CACHE_URL_ENV]["value"] == "redis://qwen-cache.prod.svc.cluster.local:6379/0"
        assert sorted(c["kind"] for c in redis) == ["Deployment", "Service"]
        deployment = next(c for c in redis if c["kind"] == "Deployment")
        redis_container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert redis_container["image"] == cache["managed"].get("image", s.DEFAULT_REDIS_IMAGE)
        assert flag(redis_container["args"], "--maxmemory") == cache["managed"].get("maxMemory", "1gb")
        assert flag(redis_container["args"], "--save") == ""  # no persistence: a restart comes back empty
        service = next(c for c in redis if c["kind"] == "Service")
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # the router's command line is one `nextserve router` accepts
    from nextserve.cli.main import build_parser as cli_parser
    args = cli_parser().parse_args(container["args"])
    assert args.cache_url == f"$({m.CACHE_URL_ENV})"
    for child in children:
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_a_cache_block_with_both_or_neither_source_is_refused():
    for cache in ({"managed": {}, "urlSecret": {"name": "r"}}, {"image": "redis"}):
        with pytest.raises(s.InvalidSpec, match="exactly one of managed"):
            s.parse_spec({**TINY, "cache": cache})
