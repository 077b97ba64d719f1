"""Start a router: check the workers, load the dense model, serve clients and the health service."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nextserve.model.checkpoint import load_config
from nextserve.model.tokenizer import load_tokenizer_if_present
from nextserve.proto.v1 import serving_pb2_grpc
from nextserve.worker.fingerprint import checkpoint_fingerprint
from nextserve.worker.plan import ExpertPlan
from nextserve.worker.server import GRPC_OPTIONS

from .engine import Engine
from .http_server import HttpServer, serve_openai
from .runner import ModelRunner, load_dense_model
from .scheduler import Scheduler
from .service import ServingService
from .shards import ShardPool

log = logging.getLogger("nextserve.router")
SERVICE_NAME = "nextserve.v1.Serving"


@dataclass(slots=True)
class RouterOptions:
    checkpoint: str
    plan: ExpertPlan
    workers: dict[int, list[str]]  # shard -> addresses (several = replicas of that shard)
    host: str = "0.0.0.0"
    port: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    max_batch_tokens: int = 2048
    max_running_requests: int = 64
    max_queue: int = 256
    expert_timeout: float = 60.0  # seconds a worker may take for one layer before it counts as failed
    # Accepted now, used by later features (prefix cache in Redis, OpenTelemetry tracing).
    cache_url: str | None = None
    cache_ttl: float | None = None
    otlp_endpoint: str | None = None
    trace_sample_ratio: float = 0.0
    # The OpenAI-compatible HTTP API beside gRPC (None: off) and its Responses-API session store.
    http_port: int | None = None
    served_model_name: str | None = None  # the "model" HTTP clients name; default: the checkpoint folder's name
    session_ttl: float = 3600.0
    max_sessions: int = 10_000

    def __post_init__(self):
        if self.max_batch_tokens < 1 or self.max_running_requests < 1 or self.max_queue < 0:
            raise ValueError(f"need --max-batch-tokens >= 1, --max-running-requests >= 1 and --max-queue >= 0; got "
                             f"{self.max_batch_tokens}, {self.max_running_requests}, {self.max_queue}")
        if not self.session_ttl > 0 or self.max_sessions < 1:
            raise ValueError(f"need --session-ttl > 0 and --max-sessions >= 1; got {self.session_ttl}, {self.max_sessions}")


def parse_workers(specs: list[str]) -> dict[int, list[str]]:
    """["0=host:port", "1=host:port", "0=other:port"] -> {0: [host:port, other:port], 1: [...]}."""
    workers: dict[int, list[str]] = {}
    for spec in specs:
        shard, sep, address = spec.partition("=")
        if not sep or not shard.strip().isdigit() or ":" not in address:
            raise ValueError(f"--worker {spec!r}: expected SHARD=HOST:PORT, e.g. 0=10.0.0.5:50051")
        workers.setdefault(int(shard), []).append(address.strip())
    return workers


class Router:
    """A running router (server, engine, pool); `await stop()` releases everything."""

    def __init__(self, server: grpc.aio.Server, port: int, engine: Engine, pool: ShardPool, health_service,
                 http: HttpServer | None = None):
        self.server, self.port, self.engine, self.pool, self.health = server, port, engine, pool, health_service
        self.http = http  # the OpenAI-compatible API, when on

    async def stop(self, grace: float = 1.0) -> None:
        if self.http is not None:
            await self.http.stop(grace)
        await self.server.stop(grace)
        await self.pool.close()  # first: a forward pass in flight then fails fast instead of waiting on workers
        await self.engine.stop()


async def start_router(options: RouterOptions) -> Router:
    """Check the workers (FingerprintMismatch if one serves another checkpoint), load the dense model,
    then serve. Health is SERVING while every expert is reachable and NOT_SERVING otherwise."""
    config = load_config(options.checkpoint)
    if options.plan.num_experts != config.num_experts:
        raise ValueError(f"the plan is for {options.plan.num_experts} experts, the checkpoint has {config.num_experts}")
    loop = asyncio.get_running_loop()
    fingerprint = await loop.run_in_executor(None, checkpoint_fingerprint, options.checkpoint)
    pool = ShardPool(options.plan, options.workers, fingerprint, request_timeout=options.expert_timeout)
    await pool.start()
    try:
        model = await loop.run_in_executor(None, lambda: load_dense_model(
            options.checkpoint, pool, dtype=options.dtype, device=options.device))
        tokenizer = load_tokenizer_if_present(options.checkpoint)  # token-id prompts need none
    except BaseException:
        await pool.close()
        raise
    scheduler = Scheduler(options.max_batch_tokens, options.max_running_requests, options.max_queue)
    eos = tokenizer.eos_token_id if tokenizer is not None else config.eos_token_id
    engine = Engine(ModelRunner(model), scheduler, pool, eos, config.max_position_embeddings)

    server = grpc.aio.server(options=GRPC_OPTIONS)
    serving_pb2_grpc.add_ServingServicer_to_server(ServingService(engine, config, tokenizer, fingerprint), server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    port = server.add_insecure_port(f"{options.host}:{options.port}")
    if port == 0:
        await pool.close()
        raise OSError(f"cannot listen on {options.host}:{options.port}")

    async def set_health(healthy: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_service.set(name, status)

    pool.listeners.append(lambda healthy: asyncio.ensure_future(set_health(healthy)))
    await set_health(pool.healthy)
    engine.start()
    http = None
    if options.http_port is not None:  # before gRPC: once gRPC health answers, HTTP answers too
        try:
            http = await serve_openai(engine, config, tokenizer, options.checkpoint, options.host, options.http_port,
                                      options.served_model_name, options.session_ttl, options.max_sessions)
        except BaseException:
            await Router(server, port, engine, pool, health_service).stop(0)
            raise
    await server.start()
    log.info("router serving %s on %s:%d (fingerprint %s, %d workers, %s)", Path(options.checkpoint).name,
             options.host, port, fingerprint, len(pool.connections),
             "healthy" if pool.healthy else "waiting for: " + "; ".join(pool.down_shards()))
    return Router(server, port, engine, pool, health_service, http)
