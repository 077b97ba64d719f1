"""GPU benchmark of the paged-KV and state-pool kernels at Qwen3-Next 80B-A3B shapes (not a test).

Rows, each timed with triton.testing.do_bench (median) beside its baseline, checked against it
(max abs difference), with bandwidth and roofline floor as in kernels_dense.py:
- paged_attn (paged_attention): prefill, chunked prefill after cached blocks, and decode at several batch
  sizes, with K/V in 64-token blocks handed out in shuffled order; the baseline ("ref") is the
  contiguous Triton attention kernel on the same keys, so "speedup" < 1 is the cost of paging.
- cache_write (reshape_and_cache): the slot-mapping scatter of one step's new keys and values; baseline an
  index_put into the same caches.
- gdn_slots: one decode step of the fused recurrent gated delta rule reading and writing
  a state pool by slot; baseline the same kernel on states gathered from the pool and scattered
  back (the stack/scatter the pool removes).

    python bench/kernels_paged.py                          # everything, bf16
    python bench/kernels_paged.py --only paged --decode-batches 1,16,64 --context 8192

It needs a CUDA device; on a machine without one it says so and exits 2.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from kernels_dense import HEAD_DIM, HKV, HQ, PEAKS, VALUE_DIM, VALUE_HEADS, Report  # same folder

BLOCK = 64            # tokens per KV block (the DeltaNet chunk)
KEY_HEADS = 16        # linear_num_key_heads
SECTIONS = ("paged", "cache", "slots")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--prefill", type=int, default=4096, help="prefill tokens (default 4096)")
    p.add_argument("--chunk", type=int, default=512, help="chunked-prefill queries after --context cached keys "
                                                          "(default 512)")
    p.add_argument("--context", type=int, default=4096, help="cached keys per sequence (default 4096)")
    p.add_argument("--decode-batches", default="1,4,16,64", help="decode batch sizes (default 1,4,16,64)")
    p.add_argument("--pool-slots", type=int, default=256, help="state pool size for recurrent_slots (default 256)")
    p.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s for the roofline (default: by device)")
    p.add_argument("--peak-gbps", type=float, help="peak memory GB/s for the roofline (default: by device)")
    return p.parse_args(argv)


def paged_copy(k: torch.Tensor, v: torch.Tensor, lengths: list[int], gen: torch.Generator):
    """k, v [sum(lengths), Hkv, D] written into caches of shuffled 64-token blocks.
    Returns (k_cache, v_cache, block_tables [N, max_blocks] int32, seq_lens_k [N] int32)."""
    from nextserve.kernels.attention import triton_attention
    n_blocks = [math.ceil(L / BLOCK) for L in lengths]
    order = torch.randperm(sum(n_blocks), generator=gen).cuda()
    tables = torch.zeros(len(lengths), max(n_blocks), dtype=torch.int32, device="cuda")
    slots, used = [], 0
    for n, (L, nb) in enumerate(zip(lengths, n_blocks)):
        ids = order[used:used + nb]
        used += nb
        tables[n, :nb] = ids.to(torch.int32)
        pos = torch.arange(L, device="cuda")
        slots.append(ids[pos // BLOCK] * BLOCK + pos % BLOCK)
    shape = (sum(n_blocks), BLOCK, k.shape[1], k.shape[2])
    k_cache = torch.zeros(shape, dtype=k.dtype, device="cuda")
    v_cache = torch.zeros(shape, dtype=v.dtype, device="cuda")
    triton_attention.reshape_and_cache(k, v, k_cache, v_cache, torch.cat(slots))
    return k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32, device="cuda")


def cu(lengths):
    return torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)


def bench_paged(report, dtype, prefill, chunk, context, batches, gen):
    from nextserve.kernels.attention import triton_attention
    size = torch.tensor([], dtype=dtype).element_size()
    scale = HEAD_DIM ** -0.5

    def case(label, Lq, Lk):
        q, gate = (torch.randn(sum(Lq), HQ, HEAD_DIM, dtype=dtype, device="cuda") for _ in range(2))
        k, v = (torch.randn(sum(Lk), HKV, HEAD_DIM, dtype=dtype, device="cuda") for _ in range(2))
        k_cache, v_cache, tables, seq_lens_k = paged_copy(k, v, Lk, gen)
        cu_q, cu_k = cu(Lq), cu(Lk)
        # causal pairs: query i of a sequence sees Lk - Lq + i + 1 keys
        pairs = sum(lq * (lk - lq) + lq * (lq + 1) // 2 for lq, lk in zip(Lq, Lk))
        report.row("paged_attn", label,
                   lambda: triton_attention.paged_attention(q, k_cache, v_cache, tables, cu_q, seq_lens_k,
                                                            scale=scale, gate=gate),
                   lambda: triton_attention.attention(q, k, v, cu_q, cu_k, scale=scale, gate=gate),
                   bytes_moved=(3 * q.numel() + 2 * k.numel()) * size, flops=4 * HQ * HEAD_DIM * pairs)

    case(f"prefill L={prefill}", [prefill], [prefill])
    case(f"chunk Lq={chunk} ctx={context}", [chunk], [context + chunk])
    for B in batches:
        case(f"decode B={B} ctx={context}", [1] * B, [context] * B)


def bench_cache(report, dtype, prefill, context, batches, gen):
    from nextserve.kernels.attention import triton_attention
    size = torch.tensor([], dtype=dtype).element_size()
    num_blocks = max(batches) * math.ceil(context / BLOCK) + math.ceil(prefill / BLOCK)
    # one pair of caches per side, so that row() compares what each wrote
    caches = [[torch.zeros(num_blocks, BLOCK, HKV, HEAD_DIM, dtype=dtype, device="cuda") for _ in range(2)]
              for _ in range(2)]
    for T in sorted({*batches, prefill}):
        k, v = (torch.randn(T, HKV, HEAD_DIM, dtype=dtype, device="cuda") for _ in range(2))
        slot_mapping = torch.randperm(num_blocks * BLOCK, generator=gen)[:T].cuda()

        def scatter(k_cache=caches[0][0], v_cache=caches[0][1]):
            triton_attention.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
            return k_cache, v_cache

        def index_put(k_cache=caches[1][0], v_cache=caches[1][1]):
            k_cache.view(-1, HKV, HEAD_DIM)[slot_mapping] = k
            v_cache.view(-1, HKV, HEAD_DIM)[slot_mapping] = v
            return k_cache, v_cache

        report.row("cache_write", f"T={T} {HKV}x{HEAD_DIM}", scatter, index_put,
                   bytes_moved=4 * k.numel() * size + T * 8, flops=0)


def bench_slots(report, dtype, batches, pool_slots, gen):
    from nextserve.kernels.gated_delta_rule import fused_recurrent_gated_delta_rule
    K = V = VALUE_DIM
    pool = torch.randn(pool_slots, VALUE_HEADS, K, V, device="cuda") * 0.1
    A_log = torch.rand(VALUE_HEADS, device="cuda")
    dt_bias = torch.randn(VALUE_HEADS, device="cuda") * 0.5
    for B in batches:
        if B > pool_slots:
            continue
        slots = torch.randperm(pool_slots, generator=gen)[:B].cuda()
        q, k = (torch.randn(1, B, KEY_HEADS, K, dtype=dtype, device="cuda") for _ in range(2))
        v = torch.randn(1, B, VALUE_HEADS, V, dtype=dtype, device="cuda")
        a, b = (torch.randn(1, B, VALUE_HEADS, dtype=dtype, device="cuda") for _ in range(2))
        cu_b = cu([1] * B)
        # each side advances its own copy of the pool, so their first calls (the ones row()
        # compares) start from the same states
        pool_a, pool_b = pool.clone(), pool.clone()

        def by_slot():
            return fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, initial_state=pool_a,
                                                    state_slots=slots, cu_seqlens=cu_b)[0]

        def stacked():
            o, final, _ = fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias,
                                                           initial_state=pool_b[slots], cu_seqlens=cu_b)
            pool_b[slots] = final
            return o

        state_bytes = 2 * B * VALUE_HEADS * K * V * 4
        report.row("gdn_slots", f"decode B={B} {VALUE_HEADS}x{K}x{V}", by_slot, stacked,
                   bytes_moved=state_bytes, flops=6 * B * VALUE_HEADS * K * V)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_paged: no CUDA device; this benchmark times GPU kernels and has nothing to do on the CPU "
              "(tests/kernels/test_paged_attention.py and test_state_slots.py check correctness there).",
              file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        print(f"kernels_paged: unknown --only entries {sorted(only - set(SECTIONS))}", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name()
    flops_half, flops_fp32, bw = next((v for k, v in PEAKS.items() if k in name), (None, None, None))
    flops = flops_fp32 if dtype == torch.float32 else flops_half
    flops = args.peak_tflops * 1e12 if args.peak_tflops else flops
    bw = args.peak_gbps * 1e9 if args.peak_gbps else bw
    if flops is None or bw is None:
        print(f"kernels_paged: no peak figures known for {name!r}; pass --peak-tflops and --peak-gbps", file=sys.stderr)
        return 2
    print(f"# {name}, {args.dtype}; roofline peaks {flops / 1e12:.0f} TFLOP/s, {bw / 1e9:.0f} GB/s; "
          f"'ref' is the baseline each row names in this script's docstring")
    batches = [int(b) for b in args.decode_batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    report = Report(flops, bw, skip_reference=False)
    with torch.no_grad():
        if "paged" in only:
            bench_paged(report, dtype, args.prefill, args.chunk, args.context, batches, gen)
        if "cache" in only:
            bench_cache(report, dtype, args.prefill, args.context, batches, gen)
        if "slots" in only:
            bench_slots(report, dtype, batches, args.pool_slots, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
