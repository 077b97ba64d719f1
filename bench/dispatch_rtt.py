"""Dispatch micro-benchmark: one MoE layer's round trip from the router's model thread to 2 expert
workers on loopback, and where the time goes.

    python bench/dispatch_rtt.py [--checkpoint checkpoints/small] [--tokens 1 8 32] [--rounds 8]
                                 [--per-round 40] [--dtype float32|bfloat16] [--baseline GIT_REF]

A variant is a router-side process that holds a `ShardPool` (what the router dispatches through)
and calls `dispatch(...).result()` from a model thread, plus its own 2 worker processes started as
bench/serving.py starts them. The variants are this working tree and, with --baseline, the same
code at a git ref (unpacked into a temporary directory that goes first on PYTHONPATH, for the
variant's workers too). Rounds interleave the variants, in ABBA order, so that whatever else runs
on the machine loads every variant alike. Makes the `small` checkpoint if missing.

Per variant and layer size (tokens):
  round trip p50/p99   dispatch() to result() returning, back to back on the model thread
  dispatch()           cut the tokens between workers, encode the requests, hand them over
  result()             wait for both answers, decode them, add the partials
  worker forward       mean of the workers' own forward timings (their /metrics)
  decode+add           the model thread's share of result(): decoding both answers and adding them,
                       timed apart on answers of the same size
  wire + wake-ups      result() p50 - worker forward - decode+add: sending, the worker reading and
                       encoding, the answer's way back and every thread wake-up on the way
  CPU per dispatch     CPU time of the router-side process and of both workers (from /proc) per round
                       trip: what the other work on the same cores pays for it
Not a test: the numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from serving import free_port, percentile  # bench/serving.py: stdlib-only helpers shared by the serving benches

REPO = Path(__file__).resolve().parent.parent


# -- the router side (a child process per variant; imports nextserve from the variant's code) ------------

def dense_work(seconds: float, hidden: "torch.Tensor", weight: "torch.Tensor") -> None:
    """Matmuls on the model thread for `seconds`, standing in for the dense layers between two MoE layers."""
    import torch

    end = time.perf_counter() + seconds
    x = hidden.float()
    while time.perf_counter() < end:
        x = torch.tanh(x @ weight) @ weight.T


def measure(pool, config, dtype, tokens: int, n: int, seed: int, gap: float) -> dict:
    """n round trips of one layer of `tokens` tokens, cycling through the MoE layers, with `gap`
    seconds of dense work on the model thread after each."""
    import torch

    from nextserve.proto import tensors
    from nextserve.proto.v1 import experts_pb2
    from nextserve.router.dispatch import add_partials

    g = torch.Generator().manual_seed(seed)
    H, E, k = config.hidden_size, config.num_experts, config.num_experts_per_tok
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    inputs = []
    for _ in range(n):
        logits = torch.randn(tokens, E, generator=g)
        weights, ids = logits.softmax(-1).topk(k)
        inputs.append((torch.randn(tokens, H, generator=g).to(dtype), ids, weights / weights.sum(-1, keepdim=True)))
    weight = torch.randn(H, 4 * H, generator=g) / H ** 0.5
    rtt, dispatch, result, dense_cpu = [], [], [], 0.0
    cpu = time.process_time()
    for i, (hidden, ids, weights) in enumerate(inputs):
        t0 = time.perf_counter()
        layer = pool.dispatch(layers[i % len(layers)], hidden, ids, weights)
        t1 = time.perf_counter()
        layer.result()
        t2 = time.perf_counter()
        rtt.append(t2 - t0)
        dispatch.append(t1 - t0)
        result.append(t2 - t1)
        before = time.thread_time()
        dense_work(gap, hidden, weight)
        dense_cpu += time.thread_time() - before
    cpu = time.process_time() - cpu - dense_cpu
    # The model thread's part of result(): decode two answers of this size and add them.
    answers = [experts_pb2.ExpertResponse.FromString(experts_pb2.ExpertResponse(
        output=tensors.to_wire(torch.randn(tokens, H, generator=g))).SerializeToString()) for _ in range(2)]
    parts = layer.requests if len(layer.requests) == 2 else None
    decode = []
    if parts is not None:
        for _ in range(n):
            t0 = time.perf_counter()
            add_partials(tokens, H, [(p, tensors.from_wire(a.output)[:len(p.rows)]) for (p, _), a in zip(parts, answers)])
            decode.append(time.perf_counter() - t0)
    return dict(rtt=rtt, dispatch=dispatch, result=result, decode=decode, cpu=cpu)


def run_client(args) -> int:
    import torch

    from nextserve.model.checkpoint import load_config
    from nextserve.router.shards import ShardPool
    from nextserve.worker.fingerprint import checkpoint_fingerprint
    from nextserve.worker.plan import ExpertPlan

    torch.set_num_threads(args.threads)
    config = load_config(args.checkpoint)
    workers = {int(s): [a] for s, a in (spec.split("=") for spec in args.workers.split(","))}
    dtype = getattr(torch, args.dtype)

    async def main() -> None:
        from concurrent.futures import ThreadPoolExecutor

        pool = ShardPool(ExpertPlan.contiguous(config.num_experts, len(workers)), workers,
                         checkpoint_fingerprint(args.checkpoint), args.dtype)
        await pool.start(first_contact_timeout=60)
        deadline = time.monotonic() + 120
        while not pool.healthy:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not come up: " + "; ".join(pool.down_shards()))
            await asyncio.sleep(0.1)
        where = Path(sys.modules[ShardPool.__module__].__file__).resolve().parents[1]
        print(json.dumps(dict(ready=str(where))), flush=True)
        loop = asyncio.get_running_loop()
        model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            out = await loop.run_in_executor(model_thread, measure, pool, config, dtype, command["tokens"],
                                             command["n"], command["seed"], command["gap"])
            print(json.dumps(out), flush=True)
        await pool.close()

    asyncio.run(main())
    return 0


# -- the orchestrator -------------------------------------------------------------------------------------

def unpack(ref: str, into: Path) -> Path:
    """The repository at `ref`, as an importable `nextserve` package under `into`."""
    package = into / "nextserve"
    package.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(package, filter="data")
    return into


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def forward_seconds(port: int) -> tuple[float, float]:
    """(sum of seconds, count) of the worker's nextserve_worker_forward_seconds histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = float(re.search(r"^nextserve_worker_forward_seconds_sum\{[^}]*\} (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^nextserve_worker_forward_seconds_count\{[^}]*\} (\S+)$", text, re.M).group(1))
    return total, count


class Variant:
    """A router-side process and its 2 workers, all running `pythonpath`'s nextserve (None: this tree)."""

    def __init__(self, name: str, pythonpath: Path | None, args, plan_file: Path, logs: Path):
        self.name = name
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ports = [free_port(), free_port()]
        self.metrics_ports = [free_port(), free_port()]
        self.workers = [subprocess.Popen(
            [sys.executable, "-m", "nextserve.cli.main", "worker", "--checkpoint", args.checkpoint, "--plan",
             str(plan_file), "--shard", str(s), "--port", str(ports[s]), "--host", "127.0.0.1", "--dtype", args.dtype,
             "--device", "cpu", "--metrics-port", str(self.metrics_ports[s])],
            stdout=open(logs / f"{name}-worker-{s}.log", "wb"), stderr=subprocess.STDOUT, env=env) for s in range(2)]
        self.client = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--client", "--checkpoint", args.checkpoint, "--dtype",
             args.dtype, "--threads", str(args.threads), "--workers", f"0=127.0.0.1:{ports[0]},1=127.0.0.1:{ports[1]}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(logs / f"{name}-router.log", "wb"), env=env,
            text=True)
        self.samples: dict[int, dict[str, list[float]]] = {}

    def wait_ready(self) -> str:
        line = self.client.stdout.readline()
        if not line:
            raise RuntimeError(f"variant {self.name} did not start; see its logs")
        return json.loads(line)["ready"]

    def block(self, tokens: int, n: int, seed: int, gap: float, keep: bool = True) -> None:
        before_cpu = [cpu_seconds(w.pid) for w in self.workers]
        before_fwd = [forward_seconds(p) for p in self.metrics_ports]
        self.client.stdin.write(json.dumps(dict(tokens=tokens, n=n, seed=seed, gap=gap)) + "\n")
        self.client.stdin.flush()
        out = json.loads(self.client.stdout.readline())
        if not keep:
            return
        after_fwd = [forward_seconds(p) for p in self.metrics_ports]
        worker_cpu = sum(cpu_seconds(w.pid) for w in self.workers) - sum(before_cpu)
        s = self.samples.setdefault(tokens, dict(rtt=[], dispatch=[], result=[], decode=[], router_cpu=[0.0],
                                                 worker_cpu=[0.0], forward=[0.0, 0.0]))
        for key in ("rtt", "dispatch", "result", "decode"):
            s[key] += out[key]
        s["router_cpu"][0] += out["cpu"]
        s["worker_cpu"][0] += worker_cpu
        s["forward"][0] += sum(a[0] - b[0] for a, b in zip(after_fwd, before_fwd))
        s["forward"][1] += sum(a[1] - b[1] for a, b in zip(after_fwd, before_fwd))

    def stop(self) -> None:
        if self.client.poll() is None:
            self.client.stdin.close()
            try:
                self.client.wait(20)
            except subprocess.TimeoutExpired:
                self.client.kill()
        for w in self.workers:
            w.terminate()
        for w in self.workers:
            w.wait(10)


def report(variants: list[Variant], tokens: list[int]) -> None:
    ms = 1e3
    print(f"{'variant':<14}{'tokens':>6}  {'RTT p50':>7} {'RTT p99':>7}  {'dispatch()':>10} {'result()':>8}  "
          f"{'worker fwd':>10} {'decode+add':>10} {'wire+wake':>9}  {'CPU/dispatch: router':>20} {'workers':>7}  (ms, p50)")
    for t in tokens:
        for v in variants:
            s = v.samples[t]
            n = len(s["rtt"])
            forward = s["forward"][0] / s["forward"][1] if s["forward"][1] else float("nan")
            decode = percentile(s["decode"], 50)
            rest = percentile(s["result"], 50) - forward - decode
            print(f"{v.name:<14}{t:>6}  {percentile(s['rtt'], 50) * ms:>7.2f} {percentile(s['rtt'], 99) * ms:>7.2f}  "
                  f"{percentile(s['dispatch'], 50) * ms:>10.2f} {percentile(s['result'], 50) * ms:>8.2f}  "
                  f"{forward * ms:>10.2f} {decode * ms:>10.2f} {rest * ms:>9.2f}  "
                  f"{s['router_cpu'][0] / n * ms:>20.2f} {s['worker_cpu'][0] / n * ms:>7.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/small")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32], help="tokens per layer (default 1 8 32)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    parser.add_argument("--per-round", type=int, default=40, help="round trips per variant, size and round (default 40)")
    parser.add_argument("--gap-ms", type=float, default=2.0,
                        help="dense work on the model thread after each round trip, as between two MoE layers of "
                             "the small model at batch 1 (default 2; 0: back to back)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / 3)")
    parser.add_argument("--baseline", metavar="GIT_REF", help="also measure the code at this git ref, interleaved")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # a variant's router side
    parser.add_argument("--workers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // 3)
    if args.client:
        return run_client(args)
    if args.rounds < 1 or args.per_round < 1 or min(args.tokens) < 1 or args.gap_ms < 0:
        parser.error("--rounds, --per-round and every --tokens must be at least 1, --gap-ms at least 0")

    from nextserve.model.checkpoint import load_config
    from nextserve.model.make_checkpoint import make_checkpoint
    from nextserve.worker.plan import ExpertPlan

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, "small", seed=0)
    config = load_config(checkpoint)
    tmp = Path(tempfile.mkdtemp(prefix="nextserve-dispatch-"))
    plan_file = tmp / "plan.json"
    plan_file.write_text(ExpertPlan.contiguous(config.num_experts, 2).to_json())
    sources = [("this tree", None)]
    if args.baseline:
        sources.append((args.baseline, unpack(args.baseline, tmp / "baseline")))
    variants = []
    try:
        for name, path in sources:
            variants.append(Variant(name, path, args, plan_file, tmp))
        print(f"{checkpoint} ({config.num_experts} experts, top-{config.num_experts_per_tok}, hidden "
              f"{config.hidden_size}), {args.dtype} on cpu, 2 workers on loopback, {args.threads} torch threads per "
              f"process, {os.cpu_count()} cores; {args.rounds} rounds x {args.per_round} round trips per variant and "
              f"size, interleaved, {args.gap_ms:g} ms of dense work after each; logs in {tmp}")
        for v in variants:
            print(f"  {v.name}: nextserve from {v.wait_ready()}")
        for t in args.tokens:  # warm-up, not kept
            for v in variants:
                v.block(t, 20, seed=0, gap=args.gap_ms / 1e3, keep=False)
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for t in args.tokens:
                for v in order:
                    v.block(t, args.per_round, seed=r + 1, gap=args.gap_ms / 1e3)
        report(variants, args.tokens)
    finally:
        for v in variants:
            v.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
