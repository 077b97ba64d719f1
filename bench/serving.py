"""Serving benchmark: in-process generation vs router + 2 expert workers on loopback, same run.

    python bench/serving.py [--checkpoint checkpoints/small] [--concurrency 1 8 32] [--max-tokens 32]
                            [--dtype float32|bfloat16] [--micro-batches 1|2]

Reports, per concurrency: output tokens/s, time to first token (TTFT) and inter-token latency (ITL)
p50/p99; for the router also the per-MoE-layer dispatch latency p50/p99 and bytes on the wire per
generated token, sent (requests: hidden states in the serving dtype) and received (responses: fp32
partial sums) on the expert streams. Makes the `small` checkpoint if missing.
Workers run as subprocesses (like pods); the router and the in-process model run in this process.
Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_LEN = 64


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, vocab: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(PROMPT_LEN)] for i in range(n)]


def bench_in_process(model, concurrency: int, max_tokens: int, eos: int) -> dict:
    """generate_stream over all prompts at once: one static batch, the reference with no network."""
    from nextserve.model import SamplingParams, generate_stream

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    batch = prompts(concurrency, model.config.vocab_size)
    start = time.perf_counter()
    last: dict[int, float] = {}
    ttft, itl = [], []
    for i, _, _ in generate_stream(model, batch, [params] * concurrency, eos):
        now = time.perf_counter()
        (itl.append(now - last[i]) if i in last else ttft.append(now - start))
        last[i] = now
    elapsed = time.perf_counter() - start
    return dict(tok_s=concurrency * max_tokens / elapsed, ttft=ttft, itl=itl)


async def bench_router(address: str, concurrency: int, max_tokens: int, vocab: int) -> dict:
    from nextserve.client import AsyncClient

    async with AsyncClient(address, timeout=600) as client:
        ttft, itl = [], []

        async def one(prompt):
            start = last = time.perf_counter()
            first = True
            async for chunk in client.generate_stream(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
                now = time.perf_counter()
                if chunk.token_ids:
                    (ttft.append(now - start) if first else itl.append(now - last))
                    first, last = False, now

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts(concurrency, vocab)))
        elapsed = time.perf_counter() - start
    return dict(tok_s=concurrency * max_tokens / elapsed, ttft=ttft, itl=itl)


def row(name: str, c: int, r: dict, extra: str = "") -> str:
    ms = lambda v: f"{v * 1e3:8.1f}"  # noqa: E731
    return (f"{name:<30}{c:>4} {r['tok_s']:>9.1f} {ms(percentile(r['ttft'], 50))} {ms(percentile(r['ttft'], 99))} "
            f"{ms(percentile(r['itl'], 50))} {ms(percentile(r['itl'], 99))} {extra}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / 3)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="serving dtype of the in-process model, the router and the workers (default float32)")
    parser.add_argument("--micro-batches", type=int, default=1, choices=[1, 2],
                        help="the router's --micro-batches: 2 ping-pongs two micro-batches (default 1)")
    args = parser.parse_args()

    import torch

    from nextserve.model import Qwen3NextForCausalLM
    from nextserve.model.checkpoint import load_config
    from nextserve.model.make_checkpoint import make_checkpoint
    from nextserve.model.tokenizer import load_tokenizer
    from nextserve.router.server import RouterOptions, start_router
    from nextserve.worker.plan import ExpertPlan

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, "small", seed=0)
    config = load_config(checkpoint)
    threads = args.threads or max(1, (os.cpu_count() or 1) // 3)
    torch.set_num_threads(threads)
    eos = load_tokenizer(checkpoint).eos_token_id

    plan = ExpertPlan.contiguous(config.num_experts, 2)
    tmp = Path(tempfile.mkdtemp(prefix="nextserve-bench-"))
    (tmp / "plan.json").write_text(plan.to_json())
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    ports = [free_port(), free_port()]
    workers = [subprocess.Popen([sys.executable, "-m", "nextserve.cli.main", "worker", "--checkpoint", str(checkpoint),
                                 "--plan", str(tmp / "plan.json"), "--shard", str(s), "--port", str(ports[s]),
                                 "--host", "127.0.0.1", "--dtype", args.dtype, "--device", "cpu"],
                                stdout=open(tmp / f"worker-{s}.log", "wb"), stderr=subprocess.STDOUT, env=env)
               for s in range(2)]
    try:
        model = Qwen3NextForCausalLM.from_pretrained(checkpoint, dtype=args.dtype)
        print(f"{checkpoint} ({config.num_experts} experts, top-{config.num_experts_per_tok}, hidden "
              f"{config.hidden_size}), prompt {PROMPT_LEN} tokens, {args.max_tokens} generated, greedy, "
              f"{args.dtype} on cpu, {threads} torch threads per process, {os.cpu_count()} cores")
        print(f"{'':<30}{'conc':>4} {'tok/s':>9} {'TTFT p50':>8} {'TTFT p99':>8} {'ITL p50':>8} {'ITL p99':>8}  (ms)")
        bench_in_process(model, 1, 4, eos)  # warm-up
        for c in args.concurrency:
            print(row("in-process", c, bench_in_process(model, c, args.max_tokens, eos)), flush=True)
        del model

        async def run_router():
            router = await start_router(RouterOptions(
                checkpoint=str(checkpoint), plan=plan, workers={0: [f"127.0.0.1:{ports[0]}"], 1: [f"127.0.0.1:{ports[1]}"]},
                host="127.0.0.1", port=0, dtype=args.dtype, device="cpu", max_batch_tokens=4096,
                micro_batches=args.micro_batches))
            deadline = time.monotonic() + 120
            while not router.pool.healthy:
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not come up; see " + str(tmp))
                await asyncio.sleep(0.2)
            address = f"127.0.0.1:{router.port}"
            await bench_router(address, 1, 4, config.vocab_size)  # warm-up
            pool = router.pool
            for c in args.concurrency:
                pool.stats.latencies.clear()
                pool.stats.bytes_sent = pool.stats.bytes_received = 0
                pool.record_stats = True
                result = await bench_router(address, c, args.max_tokens, config.vocab_size)
                pool.record_stats = False
                lat = pool.stats.latencies
                per_token = c * args.max_tokens * 1024
                sent, received = pool.stats.bytes_sent / per_token, pool.stats.bytes_received / per_token
                print(row(f"router + 2 workers{' ping-pong' if args.micro_batches == 2 else ''}", c, result,
                          f" dispatch/layer p50 {percentile(lat, 50) * 1e3:.2f} ms p99 {percentile(lat, 99) * 1e3:.2f} ms,"
                          f" wire {sent:.1f} KiB sent + {received:.1f} KiB received per token (prefill included)"),
                      flush=True)
            await router.stop(0)

        asyncio.run(run_router())
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
