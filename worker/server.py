"""Start an expert worker: load the shard's experts, then serve them and the gRPC health service."""
from __future__ import annotations

import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from nextserve.proto.v1 import experts_pb2, experts_pb2_grpc
from nextserve.telemetry import attributes as attr
from nextserve.telemetry.tracing import setup_tracing

from .fingerprint import checkpoint_fingerprint, dtype_name
from .plan import ExpertPlan
from .service import ExpertWorkerService
from .shard import ShardExperts
from .telemetry import WorkerTelemetry

log = logging.getLogger("nextserve.worker")

# Requests carry [T, H] hidden states: a 4096-token prefill chunk of the 80B model is 16 MiB in fp32.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def load_plan(path: str | Path) -> ExpertPlan:
    return ExpertPlan.from_json(Path(path).read_text())


def build_service(checkpoint: str | Path, plan: ExpertPlan, shard: int, dtype: str, device: str,
                  otlp_endpoint: str | None = None) -> ExpertWorkerService:
    """The shard's service. Tracing follows `otlp_endpoint` or the OTEL_* variables (off without an endpoint);
    a worker never starts a trace, it continues the router steps' traces (so it has no sample ratio)."""
    tracing = setup_tracing("nextserve-worker", otlp_endpoint, resource_attributes={attr.SHARD: shard})
    experts = ShardExperts.load(checkpoint, plan.experts_of(shard), dtype=dtype, device=device)
    if plan.num_experts != experts.config.num_experts:
        raise ValueError(f"the plan is for {plan.num_experts} experts, the checkpoint has {experts.config.num_experts}")
    info = experts_pb2.InfoResponse(
        fingerprint=checkpoint_fingerprint(checkpoint), shard=shard, expert_ids=experts.expert_ids,
        moe_layers=sorted(experts.layers), num_experts=experts.config.num_experts,
        hidden_size=experts.config.hidden_size, dtype=dtype_name(experts.dtype),
        parameter_bytes=experts.parameter_bytes)
    return ExpertWorkerService(experts, info, WorkerTelemetry(CollectorRegistry(), tracing, shard))


async def serve(service: ExpertWorkerService, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns (server, bound port). Health is SERVING from here on: the weights are loaded."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    experts_pb2_grpc.add_ExpertWorkerServicer_to_server(service, server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    for name in ("", "nextserve.v1.ExpertWorker"):
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    info = service.info
    log.info("worker shard %d serving %d experts x %d layers (%.1f MiB, %s) on %s:%d, fingerprint %s",
             info.shard, len(info.expert_ids), len(info.moe_layers), info.parameter_bytes / 2**20, info.dtype,
             host, bound, info.fingerprint)
    return server, bound
