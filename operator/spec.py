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

DEFAULT_SERVING_IMAGE = "ghcr.io/nextserve/nextserve:0.1.0"
DEFAULT_REDIS_IMAGE = "redis:7.4-alpine"


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
    placement: Placement


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
    placement: Placement
    http_port: int | None = 8000  # the OpenAI-compatible HTTP API (container and Service port); None: off


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    managed: bool
    ttl_seconds: int
    max_memory: str
    resources: dict[str, Any]
    secret_name: str | None
    secret_key: str


@dataclasses.dataclass(frozen=True)
class TracingSpec:
    otlp_endpoint: str
    sample_ratio: float


@dataclasses.dataclass(frozen=True)
class ImagesSpec:
    serving: str
    redis: str
    pull_policy: str
    pull_secrets: list[str]


@dataclasses.dataclass(frozen=True)
class DeploymentSpec:
    model: ModelSpec
    experts: ExpertsSpec
    router: RouterSpec
    cache: CacheSpec | None
    tracing: TracingSpec | None
    images: ImagesSpec


def _placement(raw: Mapping[str, Any]) -> Placement:
    return Placement(
        resources=dict(raw.get("resources") or {}),
        node_selector=dict(raw.get("nodeSelector") or {}),
        tolerations=list(raw.get("tolerations") or []),
        affinity=dict(raw.get("affinity") or {}),
    )


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
    cache_raw = raw.get("cache")
    tracing_raw = raw.get("tracing")
    images = raw.get("images") or {}

    cache = None
    if cache_raw:
        managed = cache_raw.get("managed")
        external = cache_raw.get("external")
        if (managed is not None) == (external is not None):
            raise InvalidSpec("InvalidSpec", "spec.cache must set exactly one of managed or external")
        ref = (external or {}).get("urlSecretRef") or {}
        cache = CacheSpec(
            managed=managed is not None,
            ttl_seconds=int(cache_raw.get("ttlSeconds", 3600)),
            max_memory=str((managed or {}).get("maxMemory", "1gb")),
            resources=dict((managed or {}).get("resources") or {}),
            secret_name=ref.get("name"),
            secret_key=ref.get("key", "url"),
        )

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
            placement=_placement(router),
            http_port=int(http.get("port", 8000)) if http.get("enabled", True) else None,
        ),
        cache=cache,
        tracing=TracingSpec(
            otlp_endpoint=tracing_raw["otlpEndpoint"],
            sample_ratio=float(tracing_raw.get("sampleRatio", 1.0)),
        ) if tracing_raw else None,
        images=ImagesSpec(
            serving=images.get("serving", DEFAULT_SERVING_IMAGE),
            redis=images.get("redis", DEFAULT_REDIS_IMAGE),
            pull_policy=images.get("pullPolicy", "IfNotPresent"),
            pull_secrets=list(images.get("pullSecrets") or []),
        ),
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


def check_cache_secret(spec: DeploymentSpec, secret: Mapping[str, Any] | None) -> None:
    """The external cache Secret must exist and hold the key; the router cannot start otherwise."""
    if spec.cache is None or spec.cache.managed:
        return
    if secret is None:
        raise InvalidSpec(
            "SecretNotFound",
            f"the cache URL Secret {spec.cache.secret_name!r} does not exist in this namespace",
        )
    data = {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
    if spec.cache.secret_key not in data:
        raise InvalidSpec(
            "SecretKeyNotFound",
            f"the Secret {spec.cache.secret_name!r} has no key {spec.cache.secret_key!r}",
        )
