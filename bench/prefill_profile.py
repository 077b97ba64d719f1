"""Where a batch prefill's time goes on the CPU: wall time per `kernels.ops` function, in-process engine.

    python bench/prefill_profile.py --checkpoint checkpoints/small                    # batch 16 x 128 tokens
    python bench/prefill_profile.py --checkpoint checkpoints/small --batch 1 --prompt-len 2048

Runs the batch's prefill (one forward_batch over every prompt, as bench/model_cpu.py times it)
`--repeats` times, each on prompts of its own (so routing, and with it the expert shapes, is new
every pass, as in serving) after a warm-up pass of the same shape, and reports per `kernels.ops`
function the median over the passes of its summed wall time, its calls per pass, and what ran
outside those functions (embedding, projections' reshapes, the model's own glue). On the CPU every
op is synchronous, so wall time around a call is the op's cost. Publish only numbers from an
otherwise idle machine (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict

import torch

import workload
from step_profile import wrapped_ops


def timed_ops(times: dict[str, float], calls: dict[str, int]):
    """Every public function of nextserve.kernels.ops wrapped to add its wall time and calls to
    `times` and `calls` (step_profile.wrapped_ops: restored on exit)."""
    def wrap(name, fn):
        @functools.wraps(fn)  # keeps the attributes the ops read from each other (takes_slot_range)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] += time.perf_counter() - t0
                calls[name] += 1
        return timed
    return wrapped_ops(wrap)


@torch.inference_mode()
def prefill(model, prompts: list[list[int]]) -> float:
    from nextserve.model import StaticCache
    B, P = len(prompts), len(prompts[0])
    cache = StaticCache(model, B, P + 1)
    batch = cache.batch(list(range(B)), [P] * B)
    ids = torch.tensor(prompts).reshape(-1)
    t0 = time.perf_counter()
    model.forward_batch(ids, batch)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=workload.PROMPT_LEN)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes, each on prompts of its own")
    args = parser.parse_args()
    print(workload.set_threads(args.threads), f"; dtype {args.dtype}", flush=True)

    from nextserve.model import Qwen3NextForCausalLM
    model = Qwen3NextForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype))
    vocab = workload.vocab_size(args.checkpoint)
    prefill(model, workload.warmup_prompts(vocab, args.batch, args.prompt_len))
    totals, per_op, calls = [], defaultdict(list), {}
    for r in range(args.repeats):
        generator = torch.Generator().manual_seed(3000 + r)
        prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=generator).tolist()
        times, counts = defaultdict(float), defaultdict(int)
        with timed_ops(times, counts):
            total = prefill(model, prompts)
        totals.append(total)
        per_op["(outside kernels.ops)"].append(total - sum(times.values()))
        for name, seconds in times.items():
            per_op[name].append(seconds)
        calls = dict(counts)
    total = statistics.median(totals)
    tokens = args.batch * args.prompt_len
    print(f"prefill of {args.batch} x {args.prompt_len} tokens: {1e3 * total:.1f} ms ({tokens / total:.0f} tok/s), "
          f"median of {args.repeats} passes")
    print(f"  {'kernels.ops function':<36}{'ms':>9}{'share':>8}{'calls':>7}")
    for name, samples in sorted(per_op.items(), key=lambda kv: -statistics.median(kv[1])):
        ms = 1e3 * statistics.median(samples)
        print(f"  {name:<36}{ms:>9.1f}{ms / (1e3 * total):>8.1%}{calls.get(name, ''):>7}")


if __name__ == "__main__":
    main()
