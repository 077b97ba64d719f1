"""GPU benchmark of the dense-layer kernels at Qwen3-Next 80B-A3B shapes (not a test).

For each kernel and shape: the median time (triton.testing.do_bench), the bandwidth and FLOP/s it
achieves, the roofline floor max(bytes / peak bandwidth, FLOPs / peak FLOP/s) and how close the
kernel gets to it, and the torch reference timed in the same run (plus torch SDPA for attention
and vLLM's fused_moe when vLLM is importable). Every Triton result is also checked against the
reference, and the max abs difference printed.

    python bench/kernels_dense.py                    # everything, bf16
    python bench/kernels_dense.py --only moe,attention --decode-batches 1,8,64
"""
from __future__ import annotations

import argparse
import sys

import torch

# (bf16/fp16 dense tensor-core FLOP/s, fp32 non-tensor-core FLOP/s, HBM bytes/s) by device name,
# SXM parts; --peak-* overrides. The fp32 kernels use exact ("ieee") dots, hence the second figure.
PEAKS = {"H200": (989e12, 67e12, 4.8e12), "H100": (989e12, 67e12, 3.35e12), "A100": (312e12, 19.5e12, 2.0e12)}

HIDDEN, NUM_EXPERTS, TOP_K, MOE_I = 2048, 512, 10, 512
HQ, HKV, HEAD_DIM, ROTARY_DIM = 16, 2, 256, 64
VALUE_HEADS, VALUE_DIM = 32, 128


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="norms,route,moe,rope,attention",
                   help="comma-separated subset of: norms, route, moe, rope, attention")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--prefill", type=int, default=4096, help="prefill tokens (default 4096)")
    p.add_argument("--context", type=int, default=4096, help="decode context length (default 4096)")
    p.add_argument("--decode-batches", default="1,2,4,8,16,32,64", help="decode batch sizes")
    p.add_argument("--experts-per-worker", type=int, default=64, help="E_local of one expert shard (default 64)")
    p.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s for the roofline (default: by device)")
    p.add_argument("--peak-gbps", type=float, help="peak memory GB/s for the roofline (default: by device)")
    p.add_argument("--skip-reference", action="store_true", help="time only the Triton kernels")
    return p.parse_args(argv)


class Report:
    def __init__(self, peak_flops: float, peak_bw: float, skip_reference: bool):
        self.peak_flops, self.peak_bw, self.skip_reference = peak_flops, peak_bw, skip_reference
        print(f"{'kernel':<15}{'shape':<30}{'ms':>9}{'GB/s':>8}{'TFLOP/s':>9}{'floor ms':>10}{'%floor':>8}"
              f"{'ref ms':>9}{'speedup':>9}{'max err':>10}  other")

    def row(self, name, shape, fn, ref, *, bytes_moved, flops, others=()):
        from triton.testing import do_bench
        got = fn()
        err = _max_err(got, ref()) if ref is not None else float("nan")
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        ref_ms = float("nan")
        if ref is not None and not self.skip_reference:
            ref_ms = do_bench(ref, warmup=5, rep=20, return_mode="median")
        floor_ms = max(bytes_moved / self.peak_bw, flops / self.peak_flops) * 1e3
        extra = []
        for label, other in others:
            try:
                extra.append(f"{label} {do_bench(other, warmup=10, rep=50, return_mode='median'):.3f} ms")
            except Exception as exc:  # an optional baseline must not end the run
                extra.append(f"{label} failed ({type(exc).__name__}: {exc})"[:120])
        print(f"{name:<15}{shape:<30}{ms:9.3f}{bytes_moved / ms / 1e6:8.0f}{flops / ms / 1e9:9.1f}{floor_ms:10.3f}"
              f"{100 * floor_ms / ms:7.0f}%{ref_ms:9.3f}{ref_ms / ms:8.1f}x{err:10.2e}  {'; '.join(extra)}", flush=True)


def _max_err(a, b):
    """Max abs difference over the floating outputs (expert ids may legitimately differ on ties)."""
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b) if x.is_floating_point())


def bench_norms(report, dtype, tokens):
    from nextserve.kernels.norms import naive, triton_norms
    size = torch.tensor([], dtype=dtype).element_size()
    for T in tokens:
        x, r = (torch.randn(T, HIDDEN, dtype=dtype, device="cuda") for _ in range(2))
        w = torch.randn(HIDDEN, dtype=dtype, device="cuda") * 0.1
        report.row("rms_norm+res", f"T={T} H={HIDDEN}",
                   lambda: triton_norms.rms_norm(x, w, 1e-6, residual=r),
                   lambda: naive.rms_norm(x, w, 1e-6, residual=r),
                   bytes_moved=4 * T * HIDDEN * size, flops=4 * T * HIDDEN)
        xv, z = (torch.randn(T, VALUE_HEADS, VALUE_DIM, dtype=dtype, device="cuda") for _ in range(2))
        wv = torch.ones(VALUE_DIM, dtype=dtype, device="cuda")
        report.row("gated_rms_norm", f"T={T} {VALUE_HEADS}x{VALUE_DIM}",
                   lambda: triton_norms.gated_rms_norm(xv, z, wv, 1e-6),
                   lambda: naive.gated_rms_norm(xv, z, wv, 1e-6),
                   bytes_moved=3 * xv.numel() * size, flops=8 * xv.numel())


def bench_route(report, dtype, tokens):
    from nextserve.kernels.moe import naive, triton_moe
    size = torch.tensor([], dtype=dtype).element_size()
    for T in tokens:
        logits = torch.randn(T, NUM_EXPERTS, dtype=dtype, device="cuda")
        report.row("moe_route", f"T={T} E={NUM_EXPERTS} k={TOP_K}",
                   lambda: triton_moe.moe_route(logits, TOP_K),
                   lambda: naive.moe_route(logits, TOP_K),
                   bytes_moved=T * NUM_EXPERTS * size + T * TOP_K * 12, flops=T * NUM_EXPERTS * (5 + TOP_K))


def _vllm_fused_experts():
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
        return fused_experts
    except Exception:
        return None


def bench_moe(report, dtype, tokens, experts_per_worker):
    from nextserve.kernels.moe import naive, triton_moe
    size = torch.tensor([], dtype=dtype).element_size()
    fused_experts = _vllm_fused_experts()
    for E_local in sorted({experts_per_worker, NUM_EXPERTS}):
        w13 = torch.randn(E_local, 2 * MOE_I, HIDDEN, dtype=dtype, device="cuda") * HIDDEN ** -0.5
        w2 = torch.randn(E_local, HIDDEN, MOE_I, dtype=dtype, device="cuda") * MOE_I ** -0.5
        expert_map = torch.full((NUM_EXPERTS,), -1, dtype=torch.int32, device="cuda")
        expert_map[:E_local] = torch.arange(E_local, dtype=torch.int32, device="cuda")
        for T in tokens:
            hidden = torch.randn(T, HIDDEN, dtype=dtype, device="cuda")
            weights, global_ids = naive.moe_route(torch.randn(T, NUM_EXPERTS, device="cuda"), TOP_K)
            # This worker holds experts [0, E_local): other slots are -1, as the router sends them.
            ids = torch.where(global_ids < E_local, global_ids, -1)
            local = ids[ids >= 0]
            n_active, n_slots = local.unique().numel(), local.numel()
            bytes_moved = n_active * 3 * MOE_I * HIDDEN * size + 2 * T * HIDDEN * size
            others = []
            if fused_experts is not None:
                others.append(("vllm", lambda: fused_experts(hidden, w13, w2, weights, global_ids.to(torch.int32),
                                                            global_num_experts=NUM_EXPERTS, expert_map=expert_map)))
            report.row("expert_ffn", f"T={T} E_local={E_local} slots={n_slots}",
                       lambda: triton_moe.expert_ffn(hidden, ids, weights, w13, w2),
                       lambda: naive.expert_ffn(hidden, ids, weights, w13, w2),
                       bytes_moved=bytes_moved, flops=6 * n_slots * HIDDEN * MOE_I, others=others)
        del w13, w2


def bench_rope(report, dtype, tokens):
    from nextserve.kernels.attention import naive, triton_attention
    size = torch.tensor([], dtype=dtype).element_size()
    for T in tokens:
        q = torch.randn(T, HQ, HEAD_DIM, dtype=dtype, device="cuda")
        k = torch.randn(T, HKV, HEAD_DIM, dtype=dtype, device="cuda")
        wq, wk = (torch.randn(HEAD_DIM, dtype=dtype, device="cuda") * 0.1 for _ in range(2))
        pos = torch.arange(T, device="cuda") + 100
        kw = dict(rotary_dim=ROTARY_DIM, theta=1e7, eps=1e-6)
        report.row("qk_norm_rope", f"T={T} {HQ}+{HKV}x{HEAD_DIM}",
                   lambda: triton_attention.qk_norm_rope(q, k, wq, wk, pos, **kw),
                   lambda: naive.qk_norm_rope(q, k, wq, wk, pos, **kw),
                   bytes_moved=2 * (q.numel() + k.numel()) * size, flops=10 * (q.numel() + k.numel()))


def bench_attention(report, dtype, prefill, context, batches):
    import torch.nn.functional as F

    from nextserve.kernels.attention import naive, triton_attention
    size = torch.tensor([], dtype=dtype).element_size()
    scale = HEAD_DIM ** -0.5

    def cu(lengths):
        return torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)

    # Prefill: one sequence of `prefill` tokens, causal.
    L = prefill
    q, gate = (torch.randn(L, HQ, HEAD_DIM, dtype=dtype, device="cuda") for _ in range(2))
    k, v = (torch.randn(L, HKV, HEAD_DIM, dtype=dtype, device="cuda") for _ in range(2))
    cu_L = cu([L])
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))   # [1, H, L, D]
    sdpa = lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
    report.row("attention", f"prefill L={L} {HQ}/{HKV}x{HEAD_DIM}",
               lambda: triton_attention.attention(q, k, v, cu_L, cu_L, scale=scale, gate=gate),
               lambda: naive.attention(q, k, v, cu_L, cu_L, scale=scale, gate=gate),
               bytes_moved=(3 * q.numel() + 2 * k.numel()) * size, flops=2 * HQ * HEAD_DIM * L * (L + 1),
               others=[("sdpa(no gate)", sdpa)])
    # Decode: B sequences, one new query each, over `context` cached keys.
    for B in batches:
        q, gate = (torch.randn(B, HQ, HEAD_DIM, dtype=dtype, device="cuda") for _ in range(2))
        k, v = (torch.randn(B * context, HKV, HEAD_DIM, dtype=dtype, device="cuda") for _ in range(2))
        cu_q, cu_k = cu([1] * B), cu([context] * B)
        kb, vb = (t.view(B, context, HKV, HEAD_DIM).transpose(1, 2) for t in (k, v))
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], kb, vb, scale=scale, enable_gqa=True)
        report.row("attention", f"decode B={B} ctx={context}",
                   lambda: triton_attention.attention(q, k, v, cu_q, cu_k, scale=scale, gate=gate),
                   lambda: naive.attention(q, k, v, cu_q, cu_k, scale=scale, gate=gate),
                   bytes_moved=(2 * k.numel() + 3 * q.numel()) * size, flops=4 * B * HQ * HEAD_DIM * context,
                   others=[("sdpa(no gate)", sdpa)])


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_dense: no CUDA device; this benchmark times GPU kernels and has nothing to do on the CPU "
              "(the interpreter-run tests in tests/kernels check correctness there).", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name()
    flops_bf16, flops_fp32, bw = next((v for k, v in PEAKS.items() if k in name), (None, None, None))
    flops = flops_fp32 if dtype == torch.float32 else flops_bf16
    flops = args.peak_tflops * 1e12 if args.peak_tflops else flops
    bw = args.peak_gbps * 1e9 if args.peak_gbps else bw
    if flops is None or bw is None:
        print(f"kernels_dense: no peak figures known for {name!r}; pass --peak-tflops and --peak-gbps", file=sys.stderr)
        return 2
    print(f"# {name}, {args.dtype}; roofline peaks {flops / 1e12:.0f} TFLOP/s, {bw / 1e9:.0f} GB/s")
    only = set(args.only.split(","))
    unknown = only - {"norms", "route", "moe", "rope", "attention"}
    if unknown:
        print(f"kernels_dense: unknown --only entries {sorted(unknown)}", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.decode_batches.split(",")]
    tokens = sorted({1, *batches, args.prefill})
    torch.manual_seed(0)
    report = Report(flops, bw, args.skip_reference)
    with torch.no_grad():
        if "norms" in only:
            bench_norms(report, dtype, tokens)
        if "route" in only:
            bench_route(report, dtype, tokens)
        if "moe" in only:
            bench_moe(report, dtype, tokens, args.experts_per_worker)
        if "rope" in only:
            bench_rope(report, dtype, tokens)
        if "attention" in only:
            bench_attention(report, dtype, args.prefill, args.context, batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
