"""CPU micro-benchmark of the routed-expert forms (kernels/moe/cpu.py) against the per-expert loop.

For each preset shape and token count T: the median time of repeated runs of `loop` (naive.py: two matmuls per
active expert), `gathered` (w13[ids], w2[ids], one batched matmul per projection), `dense`
(every local expert on every token), `grouped` (slots sorted by expert into one padded batch) and, in
bf16, `fused` (kernels/moe/cpu_fused.cpp: one pass over the active experts' weights), each checked
against the loop (max |difference|), and the
form `kernels.moe.cpu.choose_form` picks for that shape. Routing is random top-k of random
logits, so the number of distinct experts is what real traffic gives, not the 8 of identical rows,
and every timed call gets routing of its own (drawn outside the timing), as every batch of real
traffic does: the per-expert row counts change from call to call, and a product whose shapes repeat
would time oneDNN's cached primitives rather than what serving pays.

    python bench/kernels_moe.py                       # small and tiny presets, bf16, 2 threads
    python bench/kernels_moe.py --presets small --tokens 1 4 16 64 --shards 1 2

Numbers are only meaningful on an otherwise idle machine (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nextserve.kernels.host_allocator import reuse_large_allocations
from nextserve.kernels.moe import cpu, cpu_fused, cpu_grouped, naive
from nextserve.model.presets import PRESETS


def best_ms(fn, *, min_repeats: int = 20, min_seconds: float = 0.3) -> float:
    """The fastest of repeated runs: on a shared machine the median measures the neighbours, the
    minimum what the code costs when it gets the cores."""
    fn()
    times, began = [], time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - began < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def best_ms_fresh(fn, draw, *, min_repeats: int = 20, min_seconds: float = 0.3) -> float:
    """The median time of fn(*draw()), each call on newly drawn inputs (the drawing is not timed). The
    median, not best_ms's minimum: with routing drawn afresh the work itself varies from call to call
    (a shard's share of the slots above all), and the minimum would time the luckiest draw."""
    fn(*draw())
    times, began = [], time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - began < min_seconds:
        inputs = draw()
        t0 = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def case(preset: str, T: int, shards: int, dtype: torch.dtype, generator: torch.Generator):
    """The expert weights of one shard and a function drawing fresh (hidden, ids, weights, w13, w2)."""
    p = PRESETS[preset]
    E, k, H, I = p["num_experts"], p["num_experts_per_tok"], p["hidden_size"], p["moe_intermediate_size"]
    E_local = E // shards
    w13 = (torch.randn(E_local, 2 * I, H, generator=generator) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E_local, H, I, generator=generator) * I ** -0.5).to(dtype)

    def draw():
        hidden = torch.randn(T, H, generator=generator).to(dtype)
        weights, ids = naive.moe_route(torch.randn(T, E, generator=generator), k)
        local = torch.where(ids < E_local, ids, -1)  # this shard holds the first E_local experts
        return hidden, local, weights, w13, w2
    return draw, E_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "tiny"], choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="experts split over this many shards")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forms", nargs="+", choices=sorted(cpu.FORMS), default=sorted(cpu.FORMS),
                        help="forms to time (the gathered form takes seconds per call past ~512 tokens)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reuse_large_allocations()  # as a serving process does (kernels/host_allocator.py)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, {args.dtype}")
    fused = dtype == torch.bfloat16 and cpu_fused.available()
    timed_forms = [n for n in cpu.FORMS if n in args.forms and (dtype == torch.bfloat16 or n not in cpu.BF16_ONLY)]
    others = [n for n in timed_forms if n != "loop"]
    print(f"{'preset':<8}{'E_local':>8}{'T':>6}{'T*k':>6}" + "".join(f"{n + ' ms':>12}" for n in timed_forms)
          + f"{'best':>10}{'picked':>10}  max |d| against the loop: " + ", ".join(others))
    for preset in args.presets:
        for shards in args.shards:
            for T in args.tokens:
                draw, E_local = case(preset, T, shards, dtype, g)
                inputs = draw()
                with torch.inference_mode():
                    ref = naive.expert_ffn(*inputs, out_dtype=torch.float32)
                    ms = {name: best_ms_fresh(lambda *a, f=cpu.FORMS[name]: f(*a, out_dtype=torch.float32), draw)
                          for name in timed_forms}
                    diffs = [(cpu.FORMS[n](*inputs, out_dtype=torch.float32) - ref).abs().max().item() for n in others]
                w13, w2 = inputs[3], inputs[4]
                picked = cpu.choose_form(T, inputs[1].shape[1], E_local,
                                         (w13[0].numel() + w2[0].numel()) * w13.element_size(), fused,
                                         cpu_grouped.available())
                print(f"{preset:<8}{E_local:>8}{T:>6}{inputs[1].numel():>6}" + "".join(f"{ms[n]:>12.3f}" for n in timed_forms)
                      + f"{min(ms, key=ms.get):>10}{picked:>10}  " + ", ".join(f"{d:.2g}" for d in diffs), flush=True)


if __name__ == "__main__":
    main()
