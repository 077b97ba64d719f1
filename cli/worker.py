"""`nextserve worker`: serve one shard of the routed experts over gRPC."""
from __future__ import annotations

import asyncio
import logging
import sys

from nextserve.cli.process import add_telemetry_arguments


def add_parser(sub) -> None:
    p = sub.add_parser(
        "worker", help="serve one shard of the MoE experts to routers",
        description="Load the routed experts that the plan assigns to --shard (and nothing else) and serve "
                    "their forward pass over gRPC, with the standard gRPC health service (SERVING once loaded).")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="HF-layout checkpoint directory")
    p.add_argument("--plan", required=True, metavar="FILE", help="expert plan JSON (which shard holds which experts)")
    p.add_argument("--shard", required=True, type=int, metavar="S", help="shard index in the plan")
    p.add_argument("--port", required=True, type=int, metavar="P", help="port to listen on (0: any free port)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="expert weight and compute dtype; must be the router's --dtype, which it checks "
                        "when it connects (default bfloat16)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    add_telemetry_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from nextserve.cli.process import default_device, until_signalled
    from nextserve.telemetry.metrics_http import MetricsServer
    from nextserve.worker.server import build_service, load_plan, serve

    try:
        device = args.device or default_device()
        plan = load_plan(args.plan)
        service = build_service(args.checkpoint, plan, args.shard, args.dtype, device, args.otlp_endpoint)
        metrics = (MetricsServer(service.telemetry.registry, args.host, args.metrics_port)
                   if args.metrics_port is not None else None)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        server, _ = await serve(service, args.host, args.port)
        await until_signalled()
        await server.stop(grace=2)
        if metrics is not None:
            metrics.close()
        service.telemetry.shutdown()  # flush the spans still queued

    asyncio.run(main())
    return 0
