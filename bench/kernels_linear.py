"""CPU micro-benchmark of the dense projections: F.linear against the layout kernels/linear/cpu.py keeps.

F.linear in bf16 hands oneDNN a row-major weight, which it reorders into its blocked layout on every
call; kernels/linear/cpu.py keeps the reordered copy. For each projection shape of a preset (as the
model multiplies them: packed rows included) and row count, the best time of repeated runs of F.linear,
of aten's matmul (`x @ w.t()`), of the packed copy for each layout hint, and the max |difference|
between packed and F.linear (both are bf16 products accumulated in fp32, so it is at most an output
rounding). Then what a row count costs the first time it is seen: the median first call at five row
counts just above `rows` that nothing ran before. oneDNN builds a primitive per row count for F.linear
and the packed copy (milliseconds), aten's matmul does not; a prefill's row count is new nearly every
time, which is why kernels/linear/cpu.py hands products past PACKED_MAX_ROWS rows to the matmul.

On a CPU without native bf16 (AVX2), kernels/linear/cpu.py keeps an fp32 copy of each weight instead
and multiplies a few rows with its own kernel (kernels/linear/cpu_fused.cpp): then the table is
F.linear in bf16 against that copy's product (fp32 on the widened rows, rounded once to bf16), the
few-rows kernel, and what `linear` picks, with its max |difference| from F.linear.

    python bench/kernels_linear.py                          # small preset, rows 1 16 128, 2 threads
    python bench/kernels_linear.py --rows 1 3 16 128 2048 --hints 1 16 128

Numbers are only meaningful on an otherwise idle machine (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_moe import best_ms  # noqa: E402

from nextserve.kernels.linear import cpu as linear_cpu  # noqa: E402
from nextserve.model.presets import PRESETS  # noqa: E402


def projection_shapes(preset: str) -> dict[str, tuple[int, int]]:
    """[out, in] of each matmul one decoder layer (and the LM head) runs, packed rows as one."""
    p = PRESETS[preset]
    H, E, I, S = p["hidden_size"], p["num_experts"], p["moe_intermediate_size"], p["shared_expert_intermediate_size"]
    key = p["linear_num_key_heads"] * p["linear_key_head_dim"]
    value = p["linear_num_value_heads"] * p["linear_value_head_dim"]
    q = p["num_attention_heads"] * p["head_dim"]
    kv = p["num_key_value_heads"] * p["head_dim"]
    return {
        "deltanet in_proj (qkvz + ba)": (2 * key + 2 * value + 2 * p["linear_num_value_heads"], H),
        "deltanet out_proj": (H, value),
        "attention qkv (q + gate, k, v)": (2 * q + 2 * kv, H),
        "attention o_proj": (H, q),
        "router gate": (E, H),
        "shared expert gate_up": (2 * S, H),
        "shared expert down": (H, S),
        "routed experts w13, dense form": (E * 2 * I, H),
        "lm_head": (p["vocab_size"], H),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--hints", type=int, nargs="+", default=[1, 16],
                        help="row counts oneDNN is asked to pick the packed layout for")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not linear_cpu.packing_supported():
        without_native_bf16(args)
        return
    print(f"{args.preset} preset, bf16, {torch.get_num_threads()} threads; ms per call, best of repeated runs")
    gen = torch.Generator().manual_seed(0)
    header = f"{'projection':<32}{'[out, in]':>14}{'rows':>6}{'F.linear':>10}{'matmul':>10}" + "".join(
        f"{'hint ' + str(h):>10}" for h in args.hints) + f"{'max |diff|':>12}" + "".join(
        f"{'new: ' + name:>16}" for name in ("F.linear", "packed", "matmul"))
    print(header)
    row_counts_seen = set()
    with torch.inference_mode():
        for name, (out_f, in_f) in projection_shapes(args.preset).items():
            weight = torch.randn(out_f, in_f, generator=gen).bfloat16()
            packed = {h: torch.ops.mkldnn._reorder_linear_weight(weight, h) for h in args.hints}
            for rows in args.rows:
                x = torch.randn(rows, in_f, generator=gen).bfloat16()
                reference = F.linear(x, weight)
                times = [best_ms(lambda: F.linear(x, weight)), best_ms(lambda: x @ weight.t())]
                diff = 0.0
                for h in args.hints:
                    def run(p=packed[h]):
                        return torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                    times.append(best_ms(run))
                    diff = max(diff, (run().float() - reference.float()).abs().max().item())
                first = first_call_ms(weight, packed[args.hints[0]], rows, row_counts_seen, gen)
                print(f"{name:<32}{str([out_f, in_f]):>14}{rows:>6}" + "".join(f"{t:>10.3f}" for t in times)
                      + f"{diff:>12.3g}" + "".join(f"{first[k]:>16.3f}" for k in ("F.linear", "packed", "matmul")))


def without_native_bf16(args) -> None:
    print(f"{args.preset} preset, bf16 weights on a CPU without native bf16, {torch.get_num_threads()} threads; "
          f"ms per call, best of repeated runs; `linear` takes the few-rows kernel up to "
          f"{linear_cpu.FEW_ROWS_MAX} rows, the fp32 copy past")
    print(f"{'projection':<32}{'[out, in]':>14}{'rows':>6}{'F.linear':>10}{'fp32 copy':>11}{'few rows':>10}"
          f"{'linear':>9}{'speed-up':>10}{'max |diff|':>12}")
    gen = torch.Generator().manual_seed(0)
    for name, (out_f, in_f) in projection_shapes(args.preset).items():
        weight = torch.randn(out_f, in_f, generator=gen).bfloat16()  # outside inference mode, as a model's are
        assert linear_cpu.prepack(weight)
        copy = linear_cpu.packed_weight(weight)
        with torch.inference_mode():
            for rows in args.rows:
                x = torch.randn(rows, in_f, generator=gen).bfloat16()
                plain = best_ms(lambda: F.linear(x, weight))
                from_copy = best_ms(lambda: linear_cpu._from_fp32_copy(x, copy))
                few = best_ms(lambda: linear_cpu.cpu_fused.few_rows_linear(x, weight)) \
                    if linear_cpu.cpu_fused.available() else float("nan")
                kept = best_ms(lambda: linear_cpu.linear(x, weight))
                diff = (linear_cpu.linear(x, weight).float() - F.linear(x, weight).float()).abs().max().item()
                print(f"{name:<32}{str([out_f, in_f]):>14}{rows:>6}{plain:>10.3f}{from_copy:>11.3f}{few:>10.3f}"
                      f"{kept:>9.3f}{plain / kept:>9.1f}x{diff:>12.3g}")


def first_call_ms(weight, packed, rows: int, seen: set, gen) -> dict[str, float]:
    """Median time of the first call at five row counts above `rows` that no call of this shape made
    before (each product gets its own counts, so no primitive is cached for it yet)."""
    products = {"F.linear": lambda x: F.linear(x, weight),
                "packed": lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                "matmul": lambda x: x @ weight.t()}
    out = {}
    for name, product in products.items():
        times, count = [], rows
        while len(times) < 5:
            count += 1
            if (name, weight.shape, count) in seen:
                continue
            seen.add((name, weight.shape, count))
            x = torch.randn(count, weight.shape[1], generator=gen).bfloat16()
            t0 = time.perf_counter()
            product(x)
            times.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(times)
    return out


if __name__ == "__main__":
    main()
