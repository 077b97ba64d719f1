"""Benchmark of the prefix cache inside the engine: cold vs resumed time to first token (not a test).

    python bench/cache_ttft.py [--preset small] [--history 1024 4096 16384 32768] [--device cuda]
                               [--sessions 4 --turns 4] [--url redis://host:6379/0]

A real deployment in this process: the router (its engine, local tier and Redis tier) and one expert
worker over loopback gRPC, and a redis-server on loopback (started here, no persistence) unless --url
is given. Per history length, in the same run:
  - cold: a fresh history plus a 16-token turn, nothing cached;
  - resumed (local): the same history again, then a new turn on it: the router's own blocks and snapshot;
  - resumed (redis): a second router sharing the Redis: the turn is restored from Redis (up to the
    history's last block boundary, the rest computed);
  - Redis bytes the session cost (what the first router wrote for it).
Then a multi-turn workload: --sessions concurrent conversations of --turns turns each, each turn the
whole history plus a new message; the hit ratio is cached prompt tokens / prompt tokens.
The time to first token is the router's own measurement (the response's timings). Numbers depend on
the machine: take them on the target hardware, never on a shared CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cache_tier import start_redis  # noqa: E402  (the same loopback redis-server)

TURN_TOKENS = 16


async def deploy(checkpoint: str, url: str, device: str, dtype: str, kv_cache_memory: str):
    from nextserve.model.checkpoint import load_config
    from nextserve.router.server import RouterOptions, start_router
    from nextserve.worker.plan import ExpertPlan
    from nextserve.worker.server import build_service, serve

    plan = ExpertPlan.contiguous(load_config(checkpoint).num_experts, 1)
    worker, port = await serve(build_service(checkpoint, plan, 0, dtype, device), "127.0.0.1", 0)
    routers = [await start_router(RouterOptions(
        checkpoint=checkpoint, plan=plan, workers={0: [f"127.0.0.1:{port}"]}, host="127.0.0.1", port=0,
        dtype=dtype, device=device, kv_cache_memory=kv_cache_memory, cache_url=url, max_batch_tokens=8192))
        for _ in range(2)]
    return worker, routers


def ttft(client, prompt: list[int]) -> tuple[float, int]:
    got = client.generate(prompt, max_tokens=1, temperature=0, ignore_eos=True)
    return got.first_token_seconds, got.cached_tokens


async def main(args) -> None:
    from nextserve.client import Client
    from nextserve.model.make_checkpoint import make_checkpoint

    work = tempfile.mkdtemp(prefix="cache-ttft-")
    url = args.url
    redis_process = None
    if url is None:
        redis_process, url = start_redis(work)
    checkpoint = os.path.join(work, "checkpoint")
    config = make_checkpoint(checkpoint, args.preset, dtype=args.dtype, progress=False)
    worker, routers = await deploy(checkpoint, url, args.device, args.dtype, args.kv_cache_memory)
    loop = asyncio.get_running_loop()
    clients = [Client(f"127.0.0.1:{r.port}", timeout=3600) for r in routers]
    rng = random.Random(0)

    def tokens(n):
        return [rng.randrange(10, config.vocab_size) for _ in range(n)]

    def call(fn, *a):
        return loop.run_in_executor(None, fn, *a)

    try:
        print(f"preset {args.preset}, {args.dtype} on {args.device}, Redis {url}")
        print(f"{'history':>8} {'cold s':>8} {'local s':>8} {'redis s':>8} {'local x':>8} {'redis x':>8} "
              f"{'MiB/session':>12}")
        for history in args.history:
            h = tokens(history)
            written = routers[0].engine.redis_cache.tier.counters.bytes_written
            cold, _ = await call(ttft, clients[0], h + tokens(TURN_TOKENS))
            await call(ttft, clients[0], h)  # the history alone: its end is snapshotted at history - 1
            local, cached = await call(ttft, clients[0], h + tokens(TURN_TOKENS))
            assert cached >= history - 1, f"expected a local hit, got {cached} cached tokens"
            await routers[0].engine.redis_cache.tier.drain()
            session_bytes = routers[0].engine.redis_cache.tier.counters.bytes_written - written
            remote, cached = await call(ttft, clients[1], h + tokens(TURN_TOKENS))
            # Redis finds the deepest snapshot on the turn's own chain: the history's last block boundary
            # (a tail ending mid-block is found by the local tier only; see docs/cache.md)
            assert cached >= history // 64 * 64, f"expected a Redis hit, got {cached} cached tokens"
            print(f"{history:>8} {cold:>8.3f} {local:>8.3f} {remote:>8.3f} {local / cold:>8.3f} {remote / cold:>8.3f} "
                  f"{session_bytes / 2**20:>12.1f}")

        def conversation(i: int) -> tuple[int, int]:
            client, history, prompt_tokens, cached_tokens = clients[i % 2], tokens(args.first_turn), 0, 0
            for _ in range(args.turns):
                prompt = history + tokens(TURN_TOKENS)
                got = client.generate(prompt, max_tokens=args.reply_tokens, temperature=0, ignore_eos=True)
                prompt_tokens, cached_tokens = prompt_tokens + got.prompt_tokens, cached_tokens + got.cached_tokens
                history = prompt + got.token_ids
            return prompt_tokens, cached_tokens

        start = time.perf_counter()
        with ThreadPoolExecutor(args.sessions) as pool:
            results = await asyncio.gather(*[loop.run_in_executor(pool, conversation, i) for i in range(args.sessions)])
        prompt_tokens, cached_tokens = map(sum, zip(*results))
        print(f"multi-turn: {args.sessions} sessions x {args.turns} turns over 2 routers in "
              f"{time.perf_counter() - start:.1f} s: hit ratio {cached_tokens / prompt_tokens:.3f} "
              f"({cached_tokens} of {prompt_tokens} prompt tokens cached)")
    finally:
        for c in clients:
            c.close()
        for r in routers:
            await r.stop(0)
        await worker.stop(0)
        if redis_process is not None:
            redis_process.kill()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--history", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kv-cache-memory", default="0.5", help="the router's --kv-cache-memory (default 0.5)")
    p.add_argument("--url", default=None, help="a Redis to use instead of a loopback redis-server")
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--first-turn", type=int, default=512, help="tokens of each conversation's first prompt")
    p.add_argument("--reply-tokens", type=int, default=32)
    asyncio.run(main(p.parse_args()))
