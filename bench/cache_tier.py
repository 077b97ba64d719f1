"""Benchmark of the cache's Redis tier alone, before the engine uses it (not a test).

    python bench/cache_tier.py [--preset small] [--history 1024 4096 16384 32768] [--url redis://host:6379/0]

Per history length: the Redis bytes one session costs (its KV blocks and one state snapshot, heads
and parts), the time to encode and write them through the tier's queue, and the time of a lookup of
the whole chain that hits (one pipelined round trip for the heads, one for the parts, verification and
decoding) and of one that misses. Starts its own redis-server on loopback (no persistence) unless
--url is given. Time to first token cold vs resumed needs the engine and lives in bench/serving.py.
Numbers depend on the machine and the network to Redis.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: install it (apt-get install redis-server) or pass --url")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", directory, "--maxmemory-policy", "allkeys-lru"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port, socket_timeout=1).ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.RedisError:
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit("redis-server did not start")
            time.sleep(0.05)


async def bench(url: str, preset: str, histories: list[int], repeats: int) -> None:
    import torch

    from nextserve.model.presets import config_from_preset
    from nextserve.router.cache.keys import CacheNamespace, chain_keys
    from nextserve.router.cache.layout import ModelLayout
    from nextserve.router.cache.redis_tier import RedisTier, RedisTierOptions

    layout = ModelLayout.from_config(config_from_preset(preset), "bfloat16")
    # generous timeouts: this measures the time, it should not cut it short
    options = RedisTierOptions(url, lookup_timeout_s=30, fetch_timeout_s=120, write_timeout_s=120, queue_bytes=1 << 40)
    print(f"preset {preset}, bfloat16, Redis {url}")
    print(f"{'history':>8} {'MiB/session':>12} {'write s':>8} {'hit s':>8} {'miss s':>8}")
    for history in histories:
        tier = RedisTier(options, CacheNamespace(os.urandom(8).hex(), "bfloat16"), layout)
        await tier.start()
        tokens = [(17 * i) % 50000 for i in range(history)]
        keys = chain_keys(tier.namespace, tokens)

        def rand(specs):
            return {n: torch.randn(s).to(getattr(torch, d)) for n, (d, s) in specs.items()}
        block, state = rand(layout.kv(64)), rand(layout.state())  # the same bytes under every key: only size matters
        start = time.perf_counter()
        for key in keys:
            tier.submit_kv(key, block)
        tier.submit_state(keys[-1], state)
        await tier.drain()
        write_s = time.perf_counter() - start
        hit_s, miss_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            hit = await tier.lookup(keys)
            hit_s.append(time.perf_counter() - start)
            assert hit.position == history, hit.reason
            start = time.perf_counter()
            miss = await tier.lookup(chain_keys(tier.namespace, [t + 1 for t in tokens]))
            miss_s.append(time.perf_counter() - start)
            assert not miss.hit
        mib = tier.counters.bytes_written / 2**20
        print(f"{history:>8} {mib:>12.1f} {write_s:>8.3f} {min(hit_s):>8.3f} {min(miss_s):>8.4f}")
        await tier.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model shapes (tiny, small, 80b-a3b; default small)")
    p.add_argument("--history", type=int, nargs="+", default=[1024, 4096, 16384, 32768],
                   help="tokens of history, multiples of 64 (default 1024 4096 16384 32768)")
    p.add_argument("--repeats", type=int, default=3, help="lookups per case; the fastest is reported (default 3)")
    p.add_argument("--url", help="an existing Redis (default: start redis-server on loopback)")
    args = p.parse_args(argv)
    if any(h < 64 or h % 64 for h in args.history):
        p.error("--history: every length must be a positive multiple of 64")
    with tempfile.TemporaryDirectory() as directory:
        process, url = (None, args.url) if args.url else start_redis(directory)
        try:
            asyncio.run(bench(url, args.preset, args.history, args.repeats))
        finally:
            if process is not None:
                process.kill()
                process.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
