"""`nextserve router`: the client-facing server; runs the dense model and dispatches experts to workers."""
from __future__ import annotations

import asyncio
import logging
import sys

from nextserve.cli.process import CACHE_MEMORY_HELP, add_cache_arguments, add_dtype_flag, add_telemetry_arguments


def add_parser(sub) -> None:
    p = sub.add_parser(
        "router", help="serve clients: dense model here, routed experts on the workers",
        description="Load the dense weights of a checkpoint (never the routed experts), connect to every expert "
                    "worker, check that each serves the same checkpoint and that every expert is reachable, then "
                    "serve the nextserve.v1.Serving gRPC API and the gRPC health service, and beside them the "
                    "OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions, /v1/responses, "
                    "/health, /ready; see docs/http-api.md). A checkpoint without tokenizer.json (as transformers' "
                    "save_pretrained writes) serves prompts given as token ids.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="HF-layout checkpoint directory")
    p.add_argument("--plan", required=True, metavar="FILE", help="expert plan JSON (which shard holds which experts)")
    p.add_argument("--worker", action="append", required=True, metavar="S=HOST:PORT",
                   help="an expert worker serving shard S; repeat for every shard, and again for a replica")
    p.add_argument("--port", required=True, type=int, metavar="P", help="port to listen on (0: any free port)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    add_dtype_flag(p, "dense weight, activation and KV cache")
    http = p.add_argument_group("OpenAI-compatible HTTP API")
    http.add_argument("--http-port", type=int, default=8000, metavar="P",
                      help="port of the HTTP API on --host (default 8000; 0: any free port)")
    http.add_argument("--no-http", action="store_true", help="serve gRPC only")
    http.add_argument("--served-model-name", metavar="NAME",
                      help='the "model" HTTP clients name (default: the checkpoint folder\'s name)')
    sessions = p.add_argument_group("sessions (gRPC session_id and /v1/responses previous_response_id); with "
                                    "--cache-url their records live in that Redis, survive a router restart and "
                                    "every replica continues them, and while it is unreachable requests naming a "
                                    "session get UNAVAILABLE / 503 (default: in memory)")
    sessions.add_argument("--session-ttl", type=float, default=3600.0, metavar="SECONDS",
                          help="a session or stored response expires this long after its last use (default 3600)")
    sessions.add_argument("--max-sessions", type=int, default=10_000, metavar="N",
                          help="in memory: records kept at most, the least recently used go first (default 10000); "
                               "in Redis the bound is its maxmemory")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--max-batch-tokens", type=int, default=2048, metavar="N",
                   help="tokens per forward pass: decodes plus prompt chunks (default 2048)")
    p.add_argument("--max-running-requests", type=int, default=64, metavar="N",
                   help="sequences decoding together (default 64)")
    p.add_argument("--kv-cache-memory", default="4GiB", metavar="SIZE", help=CACHE_MEMORY_HELP)
    add_cache_arguments(p)
    p.add_argument("--cache-snapshot-interval", type=int, default=1024, metavar="N",
                   help="prefix cache: also keep the DeltaNet state every N prompt tokens of a long prefill, so a "
                        "prompt that shares only part of a long prefix resumes near it (a multiple of 64; "
                        "default 1024)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting to start; beyond it new ones get RESOURCE_EXHAUSTED over gRPC, 429 "
                        "over HTTP (default 256)")
    p.add_argument("--micro-batches", type=int, default=1, choices=[1, 2],
                   help="2: cut each step's sequences in two micro-batches that take turns, so the router runs "
                        "one's dense layers while the other's tokens are at the workers (default 1)")
    p.add_argument("--speculative-tokens", type=int, default=0, choices=range(0, 5), metavar="K",
                   help="draft up to K (1-4) tokens per step with the checkpoint's MTP head and verify them in one "
                        "pass; each request drafts only while its acceptance pays (docs/speculative.md). "
                        "0 (default): off. Needs --micro-batches 1")
    p.add_argument("--speculative-fixed", action="store_true",
                   help="draft K tokens every step instead of the k in 0..K that the router measures to yield "
                        "the most accepted tokens per second (docs/speculative.md)")
    p.add_argument("--drain-grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT: readiness turns NOT_SERVING, new generations get UNAVAILABLE, running "
                        "ones may finish for this long, then what remains ends with UNAVAILABLE (default 30)")
    add_telemetry_arguments(p)
    p.add_argument("--trace-sample-ratio", type=float, default=None, metavar="F",
                   help="fraction of requests that start a trace, in [0, 1]; a request whose caller traces it is "
                        "always traced (default: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, else every request)")
    p.set_defaults(func=run)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from nextserve.cli.process import default_device, resolve_dtype, until_signalled
    from nextserve.router.server import RouterOptions, parse_workers, start_router
    from nextserve.router.shards import FingerprintMismatch
    from nextserve.worker.server import load_plan

    try:
        if args.speculative_fixed and not args.speculative_tokens:
            raise ValueError("--speculative-fixed tunes --speculative-tokens, which is off")
        if args.drain_grace < 0:
            raise ValueError(f"--drain-grace must be >= 0, got {args.drain_grace}")
        if args.trace_sample_ratio is not None and not 0.0 <= args.trace_sample_ratio <= 1.0:
            raise ValueError(f"--trace-sample-ratio must be in [0, 1], got {args.trace_sample_ratio}")
        options = RouterOptions(
            checkpoint=args.checkpoint, plan=load_plan(args.plan), workers=parse_workers(args.worker),
            host=args.host, port=args.port, dtype=resolve_dtype(args.dtype, args.device or default_device()),
            device=args.device or default_device(), kv_cache_memory=args.kv_cache_memory,
            max_batch_tokens=args.max_batch_tokens, max_running_requests=args.max_running_requests,
            max_queue=args.max_queue, micro_batches=args.micro_batches,
            speculative_tokens=args.speculative_tokens,
            speculative_adaptive=not args.speculative_fixed,
            cache_snapshot_interval=args.cache_snapshot_interval, cache_url=args.cache_url, cache_ttl=args.cache_ttl,
            otlp_endpoint=args.otlp_endpoint, trace_sample_ratio=args.trace_sample_ratio,
            metrics_port=args.metrics_port,
            http_port=None if args.no_http else args.http_port, served_model_name=args.served_model_name,
            session_ttl=args.session_ttl, max_sessions=args.max_sessions)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        try:
            router = await start_router(options)
        except (FingerprintMismatch, ValueError, OSError) as e:
            print(f"error: refusing to serve: {e}", file=sys.stderr)
            return 1
        await until_signalled()
        await router.shutdown(args.drain_grace)
        return 0

    return asyncio.run(main())
