"""What every long-running `nextserve` process shares: picking its device, its telemetry flags and
waiting for a stop signal."""
from __future__ import annotations

import asyncio
import signal


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu"."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = ("float32", "bfloat16", "float16")
CACHE_MEMORY_HELP = ("memory for the KV cache blocks and DeltaNet state slots: an amount such as 4GiB, or a "
                     "fraction in (0, 1] of the memory free after loading the weights (default 4GiB)")


def add_dtype_flag(parser, what: str) -> None:
    """The `--dtype` every serving command takes, with the same choices and default."""
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help=f"{what} dtype (default: bfloat16 on CUDA, float32 on CPU, the exactness mode)")


def resolve_dtype(dtype: str | None, device: str) -> str:
    # CPU defaults to float32: it is the exactness mode, and the CPU path is not faster in bf16 yet.
    return dtype or ("bfloat16" if device.startswith("cuda") else "float32")


async def until_signalled() -> None:
    """Wait for SIGINT or SIGTERM (Kubernetes stops pods with SIGTERM)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def add_telemetry_arguments(parser) -> None:
    """--metrics-port and --otlp-endpoint, the same on router and worker (the OTEL_* variables do the rest)."""
    parser.add_argument("--metrics-port", type=int, default=None, metavar="P",
                        help="serve Prometheus metrics at http://HOST:P/metrics (default: not served)")
    parser.add_argument("--otlp-endpoint", metavar="URL",
                        help="OpenTelemetry collector (OTLP/gRPC), e.g. http://otel-collector:4317; tracing is off "
                             "without it or OTEL_EXPORTER_OTLP_ENDPOINT")


def add_cache_arguments(p) -> None:
    """The Redis shared by the prefix cache's second tier and the session records, on `router` and `up`
    (the local cache tier is always on)."""
    p.add_argument("--cache-url", default=None, metavar="URL",
                   help="share the prefix cache through Redis: redis://[user:password@]host:port/db, or rediss:// "
                        "for TLS. Every router replica given the same URL reuses what the others computed; Redis "
                        "failures are cache misses. Session records (gRPC sessions, /v1/responses) live there too "
                        "(default: the router's own memory only)")
    p.add_argument("--cache-ttl", type=float, default=24 * 3600.0, metavar="SECONDS",
                   help="how long a Redis cache entry lives unless a hit refreshes it (default 86400)")

