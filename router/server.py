"""Start a router: check the workers, load the dense model, serve clients and the health service."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from nextserve.model.checkpoint import load_config
from nextserve.model.tokenizer import load_tokenizer_if_present
from nextserve.proto import health as health_names
from nextserve.proto.v1 import serving_pb2_grpc
from nextserve.telemetry.metrics_http import MetricsServer
from nextserve.telemetry.tracing import setup_tracing
from nextserve.worker.fingerprint import checkpoint_fingerprint
from nextserve.worker.plan import ExpertPlan
from nextserve.worker.server import GRPC_OPTIONS

from .drain import Drain, RefuseWhileDraining
from .engine import Engine
from .cache_budget import parse_cache_memory
from .http_server import HttpServer, serve_openai
from .acceptance import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from .cache.keys import CacheNamespace
from .cache_metrics import PrefixCacheCollector
from .cache.layout import ModelLayout
from .cache.redis_tier import RedisTier, RedisTierOptions
from .prefix_cache import SNAPSHOTS_PER_SLOT, CachingBlockManager
from .redis_cache import RedisCache
from .runner import ModelRunner, load_dense_model, plan_cache
from .scheduler import Scheduler
from .service import ServingService
from .session_stores import SessionStores, open_session_stores
from .shards import ShardPool
from .telemetry import RouterTelemetry, moe_layers

log = logging.getLogger("nextserve.router")
SERVICE_NAME = health_names.ROUTER_READINESS
# Seconds the server gets, once the drain is over, to send the last messages of the generations it cut.
EXIT_GRACE_SECONDS = 2.0


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
    kv_cache_memory: str = "4GiB"  # KV blocks + DeltaNet state slots: an amount or a fraction of free memory
    expert_timeout: float = 60.0  # seconds a worker may take for one layer before it counts as failed
    # The Redis shared by the prefix cache's second tier and the session records (None: the local tier only,
    # sessions in memory) and the cache entries' lifetime.
    cache_url: str | None = None
    cache_ttl: float = 24 * 3600.0
    cache_snapshot_interval: int = 1024  # prefix cache: a DeltaNet state snapshot every N prompt tokens (64 | N)
    micro_batches: int = 1  # 2: two micro-batches ping-pong, one computing while the other's tokens are away
    speculative_tokens: int = 0  # 1..4: draft with the MTP head and verify in one pass (router/speculative.py)
    speculative_adaptive: bool = True  # each step drafts the k in 0..K with the best measured goodput; False: K
    # Tracing: off unless an endpoint is given here or in OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT; the ratio
    # overrides OTEL_TRACES_SAMPLER(_ARG). Metrics: /metrics on this port (None: not served; 0: any free port).
    otlp_endpoint: str | None = None
    trace_sample_ratio: float | None = None
    metrics_port: int | None = None
    # The OpenAI-compatible HTTP API beside gRPC (None: off).
    http_port: int | None = None
    served_model_name: str | None = None  # the "model" HTTP clients name; default: the checkpoint folder's name
    # The session store of gRPC sessions and the Responses API: in memory (at most max_sessions records)
    # unless cache_url names a Redis (redis:// or rediss://); records expire session_ttl seconds after last use.
    session_ttl: float = 3600.0
    max_sessions: int = 10_000

    def __post_init__(self):
        if self.micro_batches not in (1, 2):
            raise ValueError(f"--micro-batches must be 1 or 2, got {self.micro_batches}")
        if not 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"--speculative-tokens must be in 0..{MAX_SPECULATIVE_TOKENS}, got {self.speculative_tokens}")
        if self.speculative_tokens and self.micro_batches == 2:
            raise ValueError("--speculative-tokens runs each step as one pass: use it with --micro-batches 1")
        if self.max_batch_tokens < 1 or self.max_running_requests < 1 or self.max_queue < 0:
            raise ValueError(f"need --max-batch-tokens >= 1, --max-running-requests >= 1 and --max-queue >= 0; got "
                             f"{self.max_batch_tokens}, {self.max_running_requests}, {self.max_queue}")
        parse_cache_memory(self.kv_cache_memory)  # a typo fails here, before any weight is loaded
        if self.cache_url is not None:
            RedisTierOptions(self.cache_url, ttl_seconds=self.cache_ttl)  # a bad URL or TTL fails here
        if self.cache_snapshot_interval < 64 or self.cache_snapshot_interval % 64:
            raise ValueError(f"--cache-snapshot-interval must be a positive multiple of 64, got "
                             f"{self.cache_snapshot_interval}")
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
    """A running router (server, engine, pool); `await shutdown(grace)` drains and releases everything."""

    def __init__(self, server: grpc.aio.Server, port: int, engine: Engine, pool: ShardPool, health_service,
                 drain: Drain, sessions: SessionStores, metrics: MetricsServer | None = None,
                 http: HttpServer | None = None):
        self.server, self.port, self.engine, self.pool, self.health = server, port, engine, pool, health_service
        self.drain, self.sessions, self.metrics = drain, sessions, metrics
        self.http = http  # the OpenAI-compatible API, when on

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    async def set_readiness(self) -> None:
        """Readiness ("" and the Serving service): every expert reachable and not draining."""
        serving = self.pool.healthy and self.drain.admitting
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def shutdown(self, grace: float) -> int:
        """Drain (router/drain.py), then stop. Returns how many generations the grace period cut."""
        self.drain.begin(grace)
        await self.set_readiness()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.engine.num_active:
            log.info("draining: %d generations running, up to %.0f s for them to finish", self.engine.num_active, grace)
        while self.engine.num_active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        cut = self.engine.num_active
        if cut:
            log.warning("drain grace of %.0f s over: ending %d running generations with UNAVAILABLE", grace, cut)
        await self.engine.stop()  # what still runs gets its UNAVAILABLE now, while the servers can send it
        if self.http is not None:
            await self.http.stop(EXIT_GRACE_SECONDS)
        await self.server.stop(EXIT_GRACE_SECONDS)
        await self.pool.close()
        await self.sessions.close()
        await self._close_cache()
        await self._close_telemetry()
        return cut

    async def stop(self, grace: float = 1.0) -> None:
        if self.http is not None:
            await self.http.stop(grace)
        await self.server.stop(grace)
        await self.pool.close()  # first: a forward pass in flight then fails fast instead of waiting on workers
        await self.engine.stop()
        await self.sessions.close()
        await self._close_cache()
        await self._close_telemetry()

    async def _close_cache(self) -> None:
        if self.engine.redis_cache is not None:  # writes still queued get a bounded moment, then are dropped
            await self.engine.redis_cache.tier.close(drain_timeout_s=EXIT_GRACE_SECONDS)

    async def _close_telemetry(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        # Flushes the spans still queued (bounded by the exporter's timeout).
        await asyncio.get_running_loop().run_in_executor(None, self.engine.telemetry.shutdown)


async def start_router(options: RouterOptions) -> Router:
    """Check the workers (FingerprintMismatch if one serves another checkpoint), load the dense model,
    then serve. Readiness is SERVING while every expert is reachable and the router is not draining;
    liveness (proto/health.py) is SERVING while it runs."""
    config = load_config(options.checkpoint)
    if options.plan.num_experts != config.num_experts:
        raise ValueError(f"the plan is for {options.plan.num_experts} experts, the checkpoint has {config.num_experts}")
    loop = asyncio.get_running_loop()
    fingerprint = await loop.run_in_executor(None, checkpoint_fingerprint, options.checkpoint)
    pool = ShardPool(options.plan, options.workers, fingerprint, options.dtype, request_timeout=options.expert_timeout)
    await pool.start()
    try:
        model = await loop.run_in_executor(None, lambda: load_dense_model(
            options.checkpoint, pool, dtype=options.dtype, device=options.device,
            with_mtp=options.speculative_tokens > 0))
        tokenizer = load_tokenizer_if_present(options.checkpoint)  # token-id prompts need none
        sizes = plan_cache(model, options.kv_cache_memory, options.max_running_requests)
    except BaseException:
        await pool.close()
        raise
    # With speculation every KV block holds the MTP head's layer too: its own namespace (router/cache/keys.py).
    blocks = CachingBlockManager(sizes.num_blocks, sizes.num_slots,
                                 CacheNamespace(fingerprint, options.dtype, mtp=model.mtp is not None),
                                 max_snapshots=SNAPSHOTS_PER_SLOT * sizes.num_slots,
                                 snapshot_interval=options.cache_snapshot_interval)
    log.info("%s; prefix cache: up to %d DeltaNet state snapshots (%.1f MiB)%s", sizes.describe(),
             blocks.max_snapshots, blocks.max_snapshots * sizes.slot_bytes / 2**20,
             f"; speculative decoding: up to {options.speculative_tokens} MTP drafts per step, their KV in every "
             f"cached block" if options.speculative_tokens else "")
    scheduler = Scheduler(options.max_batch_tokens, options.max_running_requests, options.max_queue, blocks)
    try:
        tracing = setup_tracing("nextserve-router", options.otlp_endpoint, options.trace_sample_ratio)
    except ValueError:
        await pool.close()
        raise
    telemetry = RouterTelemetry(CollectorRegistry(), tracing, Path(options.checkpoint).name, moe_layers(config),
                                config.num_experts)
    runner = ModelRunner(model, sizes, ping_pong=pool.baton if options.micro_batches == 2 else None,
                         speculative=SpeculativeConfig(options.speculative_tokens, options.speculative_adaptive)
                         if options.speculative_tokens else None)
    eos = tokenizer.eos_token_id if tokenizer is not None else config.eos_token_id
    redis_cache = None
    if options.cache_url is not None:
        tier = RedisTier(RedisTierOptions(options.cache_url, ttl_seconds=options.cache_ttl), blocks.namespace,
                         runner.layout)
        await tier.start()  # never fails on Redis: `degraded` says why it is not working
        redis_cache = RedisCache(tier, blocks, runner.pools, runner.layout)
    engine = Engine(runner, scheduler, pool, eos, config.max_position_embeddings, telemetry, redis_cache)
    telemetry.registry.register(PrefixCacheCollector(blocks, redis_cache))

    drain = Drain()
    sessions = open_session_stores(options.cache_url, options.session_ttl, options.max_sessions)
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[RefuseWhileDraining(drain)])
    serving_pb2_grpc.add_ServingServicer_to_server(
        ServingService(engine, config, tokenizer, fingerprint, sessions.sessions), server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)

    async def release() -> None:
        """What is open before the Router exists to stop it: the pool, the session stores, the cache tier."""
        await pool.close()
        await sessions.close()
        if redis_cache is not None:
            await redis_cache.tier.close(drain_timeout_s=0)

    port = server.add_insecure_port(f"{options.host}:{options.port}")
    if port == 0:
        await release()
        raise OSError(f"cannot listen on {options.host}:{options.port}")
    try:
        metrics = (MetricsServer(telemetry.registry, options.host, options.metrics_port)
                   if options.metrics_port is not None else None)
    except OSError:
        telemetry.shutdown()
        await release()
        raise

    router = Router(server, port, engine, pool, health_service, drain, sessions, metrics)
    # Liveness: SERVING for as long as this process serves at all (a lost worker or a drain is no reason to restart it).
    await health_service.set(health_names.LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    pool.listeners.append(lambda healthy: asyncio.ensure_future(router.set_readiness()))
    await router.set_readiness()
    engine.start()
    if options.http_port is not None:  # before gRPC: once gRPC health answers, HTTP answers too
        try:
            router.http = await serve_openai(engine, config, tokenizer, options.checkpoint, options.host,
                                             options.http_port, options.served_model_name, sessions.responses, drain)
        except BaseException:
            await router.stop(0)
            raise
    await server.start()
    log.info("router serving %s on %s:%d (fingerprint %s, %d workers, sessions %s, %s)", Path(options.checkpoint).name,
             options.host, port, fingerprint, len(pool.connections), sessions.where,
             "healthy" if pool.healthy else "waiting for: " + "; ".join(pool.down_shards()))
    return router
