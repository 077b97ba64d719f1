"""Pure builders: a Qwen3NextDeployment (spec + plan) in, child manifests (dicts) out.

Nothing here talks to the API server, so every child can be checked in unit tests.
The command lines match `nextserve worker` and `nextserve router` flag for flag.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any

from nextserve.operator.spec import GROUP, KIND, VERSION, DeploymentSpec, Placement
from nextserve.proto import health
from nextserve.worker.plan import ExpertPlan

MANAGER = "nextserve-operator"
PLAN_FILE = "plan.json"
PLAN_DIR = "/etc/nextserve/plan"
MODEL_DIR = "/model"
# Seconds a terminating router keeps serving before it is told to stop: the endpoints controller
# needs a moment to take the pod out of the Service, and requests sent meanwhile must not be refused.
PRE_STOP_SECONDS = 5
# Seconds a stopping process gets, beyond its drain, to close connections and exit.
EXIT_MARGIN_SECONDS = 5
WORKER_DRAIN_SECONDS = 10
CACHE_PORT = 6379
CACHE_URL_ENV = "NEXTSERVE_CACHE_URL"

# Labels the operator selects its children by; the app.kubernetes.io ones are for people.
LABEL_DEPLOYMENT = f"{GROUP}/deployment"
LABEL_PLAN = f"{GROUP}/plan"
LABEL_SHARD = f"{GROUP}/shard"
ANNOTATION_PLAN = f"{GROUP}/plan"
COMPONENT = "app.kubernetes.io/component"
# The per-pod custom metric an autoscaled router is scaled on (the Prometheus adapter's rule
# in docs/operator.md computes it from nextserve_router_running/waiting_sequences).
ROUTER_SEQUENCES_METRIC = "nextserve_router_sequences"

# StatefulSet names longer than 52 characters break the controller-revision-hash pod label.
STS_NAME_LIMIT = 52
NAME_LIMIT = 63


def short_name(*parts: str, limit: int = NAME_LIMIT) -> str:
    """Join name parts; when too long, cut the first part and add a hash so names stay unique."""
    name = "-".join(parts)
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    tail = "-".join(parts[1:])
    keep = limit - len(tail) - len(digest) - 2
    head = parts[0][: max(keep, 1)].rstrip("-.")
    return "-".join(p for p in (head, digest, tail) if p)[:limit].rstrip("-.")


def label_value(value: str) -> str:
    """Label values are at most 63 characters."""
    return short_name(value, limit=NAME_LIMIT)


def plan_configmap_name(name: str, plan: ExpertPlan) -> str:
    return short_name(name, "plan", plan.fingerprint())


def worker_name(name: str, plan: ExpertPlan, shard: int) -> str:
    # The plan fingerprint is part of the name: a new plan gets new StatefulSets next to
    # the old ones, so the router can keep serving with the old plan until the new one is up.
    return short_name(name, "w" + plan.fingerprint()[:8], str(shard), limit=STS_NAME_LIMIT)


def router_name(name: str) -> str:
    return short_name(name, "router")


def worker_addresses(name: str, namespace: str, spec: DeploymentSpec, plan: ExpertPlan) -> list[str]:
    """`S=HOST:PORT` for every replica of every shard, via the StatefulSet pods' stable DNS names."""
    out = []
    for shard in plan.shard_indices:
        sts = worker_name(name, plan, shard)
        for replica in range(spec.experts.replicas_per_shard):
            host = f"{sts}-{replica}.{sts}.{namespace}.svc.cluster.local"
            out.append(f"{shard}={host}:{spec.experts.port}")
    return out


def cache_name(name: str) -> str:
    return short_name(name, "cache")


def router_endpoint(name: str, namespace: str, spec: DeploymentSpec) -> str:
    return f"{router_name(name)}.{namespace}.svc.cluster.local:{spec.router.service_port}"


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(name: str, component: str, **extra: str) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "nextserve",
        "app.kubernetes.io/instance": label_value(name),
        COMPONENT: component,
        "app.kubernetes.io/part-of": "nextserve",
        "app.kubernetes.io/managed-by": MANAGER,
        LABEL_DEPLOYMENT: label_value(name),
    }
    out.update(extra)
    return out


def selector_labels(name: str, component: str, **extra: str) -> dict[str, str]:
    return {LABEL_DEPLOYMENT: label_value(name), COMPONENT: component, **extra}


def _metadata(body: Mapping[str, Any], name: str, lbls: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": body["metadata"]["namespace"],
        "labels": lbls,
        "ownerReferences": [owner_reference(body)],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


# -- pod building blocks -----------------------------------------------------------------

POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _resources(raw: Mapping[str, Any], device: str, default_requests: Mapping[str, str]) -> dict[str, Any]:
    requests = dict(raw.get("requests") or {})
    limits = dict(raw.get("limits") or {})
    for key, value in default_requests.items():
        requests.setdefault(key, value)
    if device == "cuda":
        # Extended resources are scheduled from limits and may not be overcommitted;
        # a GPU pod without a GPU limit would land on a node with no GPU for it.
        gpus = limits.get("nvidia.com/gpu", requests.get("nvidia.com/gpu", 1))
        limits["nvidia.com/gpu"] = gpus
        requests["nvidia.com/gpu"] = gpus
    out: dict[str, Any] = {"requests": requests}
    if limits:
        out["limits"] = limits
    return out


def _grpc_probes(port: int, readiness_service: str) -> dict[str, Any]:
    # Loading a shard of an 80B checkpoint takes minutes: the startup probe allows 30 of
    # them before the liveness probe may restart the container. Liveness asks a service that
    # stays SERVING while the process runs: a router waiting for a lost worker is not restarted.
    live = {"grpc": {"port": port, "service": health.LIVENESS}}
    return {
        "startupProbe": {**live, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {"grpc": {"port": port, "service": readiness_service}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**live, "periodSeconds": 20, "failureThreshold": 3},
    }


def _model_volume(spec: DeploymentSpec) -> dict[str, Any]:
    if spec.model.pvc_claim:
        return {"name": "model", "persistentVolumeClaim": {"claimName": spec.model.pvc_claim, "readOnly": spec.model.pvc_read_only}}
    return {"name": "model", "hostPath": {"path": spec.model.host_path, "type": "Directory"}}


def _checkpoint_dir(spec: DeploymentSpec) -> str:
    if spec.model.pvc_claim and spec.model.pvc_path:
        return f"{MODEL_DIR}/{spec.model.pvc_path.strip('/')}"
    return MODEL_DIR


def _pod_volumes(spec: DeploymentSpec, plan_cm: str) -> list[dict[str, Any]]:
    return [
        _model_volume(spec),
        {"name": "plan", "configMap": {"name": plan_cm, "items": [{"key": PLAN_FILE, "path": PLAN_FILE}]}},
        # The root filesystem is read-only; compilers (triton) and Python need scratch space.
        {"name": "tmp", "emptyDir": {}},
        # NCCL and torch shared-memory tensors need more than the container default 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]


def _mounts(spec: DeploymentSpec) -> list[dict[str, Any]]:
    return [
        {"name": "model", "mountPath": MODEL_DIR, "readOnly": True},
        {"name": "plan", "mountPath": PLAN_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]


def _base_env(spec: DeploymentSpec) -> list[dict[str, Any]]:
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


# -- observability: every router and worker serves /metrics here; tracing follows the CR's block ---------

METRICS_PORT = 9464  # the port OpenTelemetry's own Prometheus exporters default to


METRICS_SERVICE_PORT = {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP",
                        "appProtocol": "http"}


def telemetry_args() -> list[str]:
    return ["--metrics-port", str(METRICS_PORT)]


def telemetry_env(name: str, namespace: str, spec: DeploymentSpec, role: str) -> list[dict[str, Any]]:
    """The standard OTEL_* variables for a router or worker container ([] when the CR has no tracing block).

    Only routers start traces (at the CR's sample ratio, and always when the caller's trace is sampled);
    workers continue the routers' traces, so they sample whatever their parent sampled."""
    if spec.tracing is None:
        return []
    sampler = ([{"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"},
                {"name": "OTEL_TRACES_SAMPLER_ARG", "value": repr(spec.tracing.sample_ratio)}] if role == "router"
               else [{"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_always_on"}])
    return [
        {"name": "OTEL_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "OTEL_SERVICE_NAME", "value": f"nextserve-{role}"},
        # $(OTEL_POD_NAME) is expanded by the kubelet from the variable above.
        {"name": "OTEL_RESOURCE_ATTRIBUTES",
         "value": f"k8s.namespace.name={namespace},k8s.pod.name=$(OTEL_POD_NAME),nextserve.deployment={name}"},
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": spec.tracing.otlp_endpoint},
        {"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": "grpc"},
        *sampler,
    ]


def _serving_container(spec: DeploymentSpec, role: str, args: list[str], port: int, env: list[dict[str, Any]],
                       placement: Placement, device: str, readiness_service: str) -> dict[str, Any]:
    """A `nextserve worker` or `nextserve router` container: the serving image, its gRPC and metrics ports, probes."""
    return {
        "name": role,
        "image": spec.images.serving,
        "imagePullPolicy": spec.images.pull_policy,
        "command": ["nextserve"],
        "args": args + telemetry_args(),
        "ports": [{"name": "grpc", "containerPort": port, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": _resources(placement.resources, device, {"cpu": "1", "memory": "4Gi"}),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": _mounts(spec),
        **_grpc_probes(port, readiness_service),
    }


def _pod_spec(spec: DeploymentSpec, placement: Placement, containers: list[dict[str, Any]], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": containers,
        "volumes": volumes,
        "enableServiceLinks": False,
    }
    if placement.node_selector:
        pod["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod["tolerations"] = copy.deepcopy(placement.tolerations)
    if placement.affinity:
        pod["affinity"] = copy.deepcopy(placement.affinity)
    if spec.images.pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in spec.images.pull_secrets]
    return pod


# -- children ------------------------------------------------------------------------------

def plan_configmap(body: Mapping[str, Any], plan: ExpertPlan) -> dict[str, Any]:
    name = body["metadata"]["name"]
    fp = plan.fingerprint()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(body, plan_configmap_name(name, plan), labels(name, "plan", **{LABEL_PLAN: fp})),
        # Immutable: a plan never changes in place, a new plan is a new ConfigMap.
        "immutable": True,
        "data": {PLAN_FILE: plan.to_json()},
    }


def worker_args(spec: DeploymentSpec, shard: int) -> list[str]:
    return [
        "worker",
        "--checkpoint", _checkpoint_dir(spec),
        "--plan", f"{PLAN_DIR}/{PLAN_FILE}",
        "--shard", str(shard),
        "--port", str(spec.experts.port),
        "--host", "0.0.0.0",
        "--dtype", spec.model.dtype,
        "--device", spec.experts.device,
        "--drain-grace", str(WORKER_DRAIN_SECONDS),
    ]


def worker_service(body: Mapping[str, Any], spec: DeploymentSpec, plan: ExpertPlan, shard: int) -> dict[str, Any]:
    name = body["metadata"]["name"]
    sts = worker_name(name, plan, shard)
    fp = plan.fingerprint()
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(body, sts, labels(name, "worker", **{LABEL_PLAN: fp, LABEL_SHARD: str(shard)})),
        "spec": {
            "clusterIP": "None",
            # The router dials pods by name while they load; DNS must resolve before readiness.
            "publishNotReadyAddresses": True,
            "selector": selector_labels(name, "worker", **{LABEL_PLAN: fp, LABEL_SHARD: str(shard)}),
            "ports": [{"name": "grpc", "port": spec.experts.port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                      METRICS_SERVICE_PORT],
        },
    }


def worker_statefulset(body: Mapping[str, Any], spec: DeploymentSpec, plan: ExpertPlan, shard: int) -> dict[str, Any]:
    name = body["metadata"]["name"]
    sts = worker_name(name, plan, shard)
    fp = plan.fingerprint()
    lbls = labels(name, "worker", **{LABEL_PLAN: fp, LABEL_SHARD: str(shard)})
    env = _base_env(spec) + telemetry_env(name, body["metadata"]["namespace"], spec, "worker")
    container = _serving_container(spec, "worker", worker_args(spec, shard), spec.experts.port, env,
                                   spec.experts.placement, spec.experts.device, health.WORKER_READINESS)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(body, sts, lbls, {ANNOTATION_PLAN: fp}),
        "spec": {
            "serviceName": sts,
            "replicas": spec.experts.replicas_per_shard,
            # Replicas of a shard are interchangeable: start them together, not one by one.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": selector_labels(name, "worker", **{LABEL_PLAN: fp, LABEL_SHARD: str(shard)})},
            "template": {
                "metadata": {"labels": lbls, "annotations": {ANNOTATION_PLAN: fp}},
                "spec": {
                    **_pod_spec(spec, spec.experts.placement, [container], _pod_volumes(spec, plan_configmap_name(name, plan))),
                    "terminationGracePeriodSeconds": WORKER_DRAIN_SECONDS + EXIT_MARGIN_SECONDS,
                },
            },
        },
    }


def router_args(name: str, namespace: str, spec: DeploymentSpec, plan: ExpertPlan) -> list[str]:
    args = [
        "router",
        "--checkpoint", _checkpoint_dir(spec),
        "--plan", f"{PLAN_DIR}/{PLAN_FILE}",
    ]
    for address in worker_addresses(name, namespace, spec, plan):
        args += ["--worker", address]
    args += [
        "--port", str(spec.router.port),
        *(["--http-port", str(spec.router.http_port)] if spec.router.http_port is not None else ["--no-http"]),
        "--host", "0.0.0.0",
        "--dtype", spec.model.dtype,
        "--device", spec.router.device,
    ]
    if spec.router.max_batch_tokens is not None:
        args += ["--max-batch-tokens", str(spec.router.max_batch_tokens)]
    if spec.router.max_running_requests is not None:
        args += ["--max-running-requests", str(spec.router.max_running_requests)]
    if spec.router.max_queue is not None:
        args += ["--max-queue", str(spec.router.max_queue)]
    args += ["--drain-grace", str(spec.router.drain_seconds)]
    if spec.cache is not None:
        # The kubelet expands $(VAR) from the container's env: a URL from a Secret never enters the pod spec.
        args += ["--cache-url", f"$({CACHE_URL_ENV})"]
    return args


def cache_env(name: str, namespace: str, spec: DeploymentSpec) -> list[dict[str, Any]]:
    """The router's NEXTSERVE_CACHE_URL: the managed Redis's Service, or the CR's Secret ([] without a cache)."""
    if spec.cache is None:
        return []
    if spec.cache.managed is not None:
        return [{"name": CACHE_URL_ENV, "value": f"redis://{cache_name(name)}.{namespace}.svc.cluster.local:{CACHE_PORT}/0"}]
    return [{"name": CACHE_URL_ENV,
             "valueFrom": {"secretKeyRef": {"name": spec.cache.url_secret_name, "key": spec.cache.url_secret_key}}}]


def router_deployment(body: Mapping[str, Any], spec: DeploymentSpec, plan: ExpertPlan) -> dict[str, Any]:
    """The router, wired to `plan` (the plan in force, not necessarily the newest one)."""
    name = body["metadata"]["name"]
    namespace = body["metadata"]["namespace"]
    fp = plan.fingerprint()
    lbls = labels(name, "router")
    env = _base_env(spec) + telemetry_env(name, namespace, spec, "router") + cache_env(name, namespace, spec)
    container = _serving_container(spec, "router", router_args(name, namespace, spec, plan), spec.router.port, env,
                                   spec.router.placement, spec.router.device, health.ROUTER_READINESS)
    # Kubernetes runs preStop before SIGTERM: the router keeps serving while the endpoints
    # controller takes the pod out of the Service, then drains (router/drain.py).
    container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_SECONDS)]}}}
    if spec.router.http_port is not None:
        container["ports"].append({"name": "http", "containerPort": spec.router.http_port, "protocol": "TCP"})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(body, router_name(name), lbls, {ANNOTATION_PLAN: fp}),
        "spec": {
            # Under an autoscaler the count is the HPA's: a replicas field here would fight it.
            **({} if spec.router.autoscaling is not None else {"replicas": spec.router.replicas}),
            # Never fewer ready routers than asked for: a plan switch surges a new router
            # and retires an old one only once the new one passes its health check.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "selector": {"matchLabels": selector_labels(name, "router")},
            "template": {
                "metadata": {"labels": lbls, "annotations": {ANNOTATION_PLAN: fp}},
                "spec": {
                    **_pod_spec(spec, spec.router.placement, [container], _pod_volumes(spec, plan_configmap_name(name, plan))),
                    "terminationGracePeriodSeconds": PRE_STOP_SECONDS + spec.router.drain_seconds + EXIT_MARGIN_SECONDS,
                },
            },
        },
    }


def router_autoscaler(body: Mapping[str, Any], spec: DeploymentSpec) -> dict[str, Any]:
    """The router's HorizontalPodAutoscaler (spec.router.autoscaling must be set).

    `sequencesPerRouter` scales on ROUTER_SEQUENCES_METRIC, a per-pod custom metric that the
    Prometheus adapter derives from the routers' running + waiting sequence gauges (the rule is in
    docs/operator.md); `cpuUtilization` on the routers' CPU use, which metrics-server provides."""
    name = body["metadata"]["name"]
    auto = spec.router.autoscaling
    if auto.sequences_per_router is not None:
        metric = {"type": "Pods", "pods": {"metric": {"name": ROUTER_SEQUENCES_METRIC},
                                           "target": {"type": "AverageValue",
                                                      "averageValue": str(auto.sequences_per_router)}}}
    else:
        metric = {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": auto.cpu_utilization}}}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(body, router_name(name), labels(name, "router")),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": router_name(name)},
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [metric],
            # A router leaving drains its generations (drainSeconds): scale down slowly, one at a time.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}},
        },
    }


def router_service(body: Mapping[str, Any], spec: DeploymentSpec) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(body, router_name(name), labels(name, "router")),
        "spec": {
            "type": spec.router.service_type,
            "selector": selector_labels(name, "router"),
            "ports": [{"name": "grpc", "port": spec.router.service_port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}]
            + ([{"name": "http", "port": spec.router.http_port, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]
               if spec.router.http_port is not None else [])
            # /metrics never goes on an externally reachable Service: scrape such routers by PodMonitor.
            + ([METRICS_SERVICE_PORT] if spec.router.service_type == "ClusterIP" else []),
        },
    }


# -- the managed Redis (spec.cache.managed): session records, and the prefix cache once the engine uses it ----------

def cache_deployment(body: Mapping[str, Any], spec: DeploymentSpec) -> dict[str, Any]:
    """One redis-server without persistence: what it holds can be recomputed (prefix cache) or is reported
    lost to the client (a session's history), never served wrong, so a restart that empties it is safe."""
    name = body["metadata"]["name"]
    managed = spec.cache.managed
    lbls = labels(name, "cache")
    container = {
        "name": "redis",
        "image": managed.image,
        "imagePullPolicy": spec.images.pull_policy,
        "args": ["--port", str(CACHE_PORT), "--save", "", "--appendonly", "no", "--protected-mode", "no",
                 "--maxmemory", managed.max_memory, "--maxmemory-policy", "allkeys-lru", "--dir", "/data"],
        "ports": [{"name": "redis", "containerPort": CACHE_PORT, "protocol": "TCP"}],
        "resources": _resources(managed.resources, "cpu", {"cpu": "250m", "memory": "256Mi"}),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10, "failureThreshold": 6},
    }
    pod = {
        # The official image's redis user; runAsNonRoot needs a numeric id.
        "securityContext": {**copy.deepcopy(POD_SECURITY), "runAsUser": 999, "runAsGroup": 999, "fsGroup": 999},
        "containers": [container],
        "volumes": [{"name": "data", "emptyDir": {}}],
        "enableServiceLinks": False,
    }
    if spec.images.pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in spec.images.pull_secrets]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(body, cache_name(name), lbls),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector_labels(name, "cache")},
            "template": {"metadata": {"labels": lbls}, "spec": pod},
        },
    }


def cache_service(body: Mapping[str, Any], spec: DeploymentSpec) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(body, cache_name(name), labels(name, "cache")),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name, "cache"),
            "ports": [{"name": "redis", "port": CACHE_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }


def cache_children(body: Mapping[str, Any], spec: DeploymentSpec) -> list[dict[str, Any]]:
    """The managed Redis's Service and Deployment; [] for an external Redis or none."""
    if spec.cache is None or spec.cache.managed is None:
        return []
    return [cache_service(body, spec), cache_deployment(body, spec)]


def disruption_budget(body: Mapping[str, Any], name: str, lbls: dict[str, str], selector: dict[str, str],
                       max_unavailable: int) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(body, name, lbls),
        "spec": {
            "maxUnavailable": max_unavailable,
            "selector": {"matchLabels": selector},
            # A pod that is not ready serves nothing: evicting it cannot hurt, and a budget
            # that counted it would block node drains behind a crash-looping pod.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def worker_disruption_budget(body: Mapping[str, Any], spec: DeploymentSpec, plan: ExpertPlan, shard: int) -> dict[str, Any]:
    name = body["metadata"]["name"]
    fp = plan.fingerprint()
    extra = {LABEL_PLAN: fp, LABEL_SHARD: str(shard)}
    return disruption_budget(body, worker_name(name, plan, shard), labels(name, "worker", **extra),
                             selector_labels(name, "worker", **extra), spec.experts.max_unavailable)


def router_disruption_budget(body: Mapping[str, Any], spec: DeploymentSpec) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return disruption_budget(body, router_name(name), labels(name, "router"), selector_labels(name, "router"),
                             spec.router.max_unavailable)


def worker_children(body: Mapping[str, Any], spec: DeploymentSpec, plan: ExpertPlan) -> list[dict[str, Any]]:
    """The plan ConfigMap first (pods mount it), then a Service, StatefulSet and budget per shard."""
    out = [plan_configmap(body, plan)]
    for shard in plan.shard_indices:
        out.append(worker_service(body, spec, plan, shard))
        out.append(worker_statefulset(body, spec, plan, shard))
        out.append(worker_disruption_budget(body, spec, plan, shard))
    return out


def router_children(body: Mapping[str, Any], spec: DeploymentSpec, plan: ExpertPlan) -> list[dict[str, Any]]:
    return [router_service(body, spec), router_deployment(body, spec, plan)]


def all_children(body: Mapping[str, Any], spec: DeploymentSpec, plan: ExpertPlan) -> list[dict[str, Any]]:
    """Everything a settled deployment consists of (no rollout in flight)."""
    return (worker_children(body, spec, plan) + cache_children(body, spec) + router_children(body, spec, plan)
            + [router_disruption_budget(body, spec)]
            + ([router_autoscaler(body, spec)] if spec.router.autoscaling is not None else []))
