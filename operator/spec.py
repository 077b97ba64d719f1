"""Typed view of a Qwen3NextDeployment spec, and the checks the CRD schema cannot make.

The API server already enforces types, ranges and enums from the CRD's openAPIV3Schema
and fills in its defaults.  The parser below still applies the same defaults so that a
spec read from anywhere (a unit test, an emulator without defaulting, an old object
stored before a default was added) means the same thing; a test keeps both in step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nextserve.worker.plan import ExpertPlan

GROUP = "serving.nextserve.io"
VERSION = "v1alpha1"
PLURAL = "qwen3nextdeployments"
KIND = "Qwen3NextDeployment"

DEFAULT_DRAIN_SECONDS = 30
DEFAULT_REDIS_IMAGE = "redis:7.4-alpine"
DEFAULT_REDIS_MAX_MEMORY = "1gb"
DEFAULT_URL_SECRET_KEY = "url"


class InvalidSpec(Exception):
    """A spec the schema accepted but that cannot be deployed.  `reason` is CamelCase."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class Placement:
    resources: dict[str, Any]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    affinity: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    pvc_claim: str | None
    pvc_path: str
    pvc_read_only: bool
    host_path: str | None
    dtype: str
    num_experts: int


@dataclasses.dataclass(frozen=True)
class ExpertsSpec:
    shards: int
    replicas_per_shard: int
    device: str
    port: int
    plan: list[dict[str, Any]] | None
    max_unavailable: int        # PodDisruptionBudget of each shard
    placement: Placement


@dataclasses.dataclass(frozen=True)
class AutoscalingSpec:
    """An HPA owns the router's replica count, between the bounds, on exactly one target."""
    min_replicas: int
    max_replicas: int
    sequences_per_router: int | None  # average running + waiting sequences (a custom metric)
    cpu_utilization: int | None       # average CPU use, percent of the request (resource metrics)


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    replicas: int
    device: str
    port: int
    max_batch_tokens: int | None
    max_running_requests: int | None
    max_queue: int | None
    service_type: str
    service_port: int
    drain_seconds: int          # running generations may finish for this long after SIGTERM
    max_unavailable: int        # PodDisruptionBudget of the routers
    placement: Placement
    http_port: int | None = 8000  # the OpenAI-compatible HTTP API (container and Service port); None: off
    autoscaling: AutoscalingSpec | None = None  # set: `replicas` is the HPA's, not the operator's


@dataclasses.dataclass(frozen=True)
class TracingSpec:
    otlp_endpoint: str
    sample_ratio: float


@dataclasses.dataclass(frozen=True)
class ManagedRedisSpec:
    image: str
    max_memory: str             # redis-server --maxmemory (e.g. 2gb); least recently used keys go beyond it
    resources: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The Redis the routers keep their session records in (--cache-url): one the operator runs, or
    an external one whose URL is in a Secret (never in the CR)."""
    managed: ManagedRedisSpec | None
    url_secret_name: str | None
    url_secret_key: str


@dataclasses.dataclass(frozen=True)
class ImagesSpec:
    serving: str
    pull_policy: str
    pull_secrets: list[str]


@dataclasses.dataclass(frozen=True)
class DeploymentSpec:
    model: ModelSpec
    experts: ExpertsSpec
    router: RouterSpec
    tracing: TracingSpec | None
    images: ImagesSpec
    cache: CacheSpec | None = None


def _placement(raw: Mapping[str, Any]) -> Placement:
    return Placement(
        resources=dict(raw.get("resources") or {}),
        node_selector=dict(raw.get("nodeSelector") or {}),
        tolerations=list(raw.get("tolerations") or []),
        affinity=dict(raw.get("affinity") or {}),
    )


def _autoscaling(raw: Mapping[str, Any] | None) -> AutoscalingSpec | None:
    if not raw:
        return None
    targets = [key for key in ("sequencesPerRouter", "cpuUtilization") if raw.get(key) is not None]
    if len(targets) != 1:
        raise InvalidSpec("InvalidAutoscaling", "spec.router.autoscaling must set exactly one target: "
                                                "sequencesPerRouter or cpuUtilization")
    if "maxReplicas" not in raw:
        raise InvalidSpec("InvalidAutoscaling", "spec.router.autoscaling.maxReplicas is required")
    low, high = int(raw.get("minReplicas", 1)), int(raw["maxReplicas"])
    if low > high:
        raise InvalidSpec("InvalidAutoscaling", f"spec.router.autoscaling.minReplicas ({low}) is above "
                                                f"maxReplicas ({high})")
    per_router, cpu = raw.get("sequencesPerRouter"), raw.get("cpuUtilization")
    return AutoscalingSpec(low, high, int(per_router) if per_router is not None else None,
                           int(cpu) if cpu is not None else None)


def parse_spec(raw: Mapping[str, Any]) -> DeploymentSpec:
    """Read a spec dict (as stored by the API server) into typed, defaulted form."""
    try:
        model = raw["model"]
        source = model["source"]
        experts = raw["experts"]
    except (KeyError, TypeError) as exc:
        raise InvalidSpec("InvalidSpec", f"spec lacks the required field {exc}") from exc
    pvc = source.get("pvc")
    host = source.get("hostPath")
    if bool(pvc) == bool(host):
        raise InvalidSpec("InvalidSpec", "spec.model.source must set exactly one of pvc or hostPath")
    router = raw.get("router") or {}
    service = router.get("service") or {}
    http = router.get("http") or {}
    tracing = raw.get("tracing")
    cache = _cache(raw.get("cache"))
    images = raw.get("images") or {}
    if not images.get("serving"):
        raise InvalidSpec("InvalidSpec", "spec.images.serving must name the serving image you built and pushed "
                                         "(no image is published; see docs/operator.md)")

    return DeploymentSpec(
        model=ModelSpec(
            pvc_claim=pvc.get("claimName") if pvc else None,
            pvc_path=(pvc or {}).get("path", ""),
            pvc_read_only=bool((pvc or {}).get("readOnly", True)),
            host_path=host.get("path") if host else None,
            dtype=model.get("dtype", "bfloat16"),
            num_experts=int(model.get("numExperts", 512)),
        ),
        experts=ExpertsSpec(
            shards=int(experts["shards"]),
            replicas_per_shard=int(experts.get("replicasPerShard", 1)),
            device=experts.get("device", "cuda"),
            port=int(experts.get("port", 50051)),
            plan=list(experts["plan"]) if experts.get("plan") else None,
            max_unavailable=int((experts.get("disruptionBudget") or {}).get("maxUnavailable", 1)),
            placement=_placement(experts),
        ),
        router=RouterSpec(
            replicas=int(router.get("replicas", 1)),
            device=router.get("device", "cuda"),
            port=int(router.get("port", 50050)),
            max_batch_tokens=router.get("maxBatchTokens"),
            max_running_requests=router.get("maxRunningRequests"),
            max_queue=router.get("maxQueue"),
            service_type=service.get("type", "ClusterIP"),
            service_port=int(service.get("port", 50050)),
            drain_seconds=int(router.get("drainSeconds", DEFAULT_DRAIN_SECONDS)),
            max_unavailable=int((router.get("disruptionBudget") or {}).get("maxUnavailable", 1)),
            placement=_placement(router),
            http_port=int(http.get("port", 8000)) if http.get("enabled", True) else None,
            autoscaling=_autoscaling(router.get("autoscaling")),
        ),
        tracing=TracingSpec(
            otlp_endpoint=tracing["otlpEndpoint"],
            sample_ratio=float(tracing.get("sampleRatio", 1.0)),
        ) if tracing else None,
        images=ImagesSpec(
            serving=images["serving"],
            pull_policy=images.get("pullPolicy", "IfNotPresent"),
            pull_secrets=list(images.get("pullSecrets") or []),
        ),
        cache=cache,
    )


def _cache(raw: Mapping[str, Any] | None) -> CacheSpec | None:
    if raw is None:
        return None
    managed, secret = raw.get("managed"), raw.get("urlSecret")
    if (managed is None) == (secret is None):
        raise InvalidSpec("InvalidSpec", "spec.cache must set exactly one of managed (a Redis the operator runs) "
                                         "or urlSecret (the URL of an existing one, in a Secret)")
    return CacheSpec(
        managed=ManagedRedisSpec(
            image=managed.get("image", DEFAULT_REDIS_IMAGE),
            max_memory=managed.get("maxMemory", DEFAULT_REDIS_MAX_MEMORY),
            resources=dict(managed.get("resources") or {}),
        ) if managed is not None else None,
        url_secret_name=secret["name"] if secret is not None else None,
        url_secret_key=(secret or {}).get("key", DEFAULT_URL_SECRET_KEY),
    )


def resolve_plan(spec: DeploymentSpec) -> ExpertPlan:
    """The expert plan the spec asks for, or InvalidSpec saying why there is none."""
    num_experts = spec.model.num_experts
    if spec.experts.plan is None:
        try:
            return ExpertPlan.contiguous(num_experts, spec.experts.shards)
        except ValueError as exc:
            raise InvalidSpec("ExpertsNotDivisible", str(exc)) from exc
    try:
        plan = ExpertPlan.from_mapping(num_experts, spec.experts.plan)
        plan.validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidSpec("InvalidPlan", f"spec.experts.plan: {exc}") from exc
    if plan.shard_indices != list(range(spec.experts.shards)):
        raise InvalidSpec(
            "InvalidPlan",
            f"spec.experts.plan must list shards 0..{spec.experts.shards - 1} exactly once "
            f"(spec.experts.shards is {spec.experts.shards}), got shards {plan.shard_indices}",
        )
    return plan
