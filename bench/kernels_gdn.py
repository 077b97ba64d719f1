"""GPU benchmark of the Gated DeltaNet kernels at Qwen3-Next 80B-A3B shapes (not a test).

Per case it reports the median time (triton.testing.do_bench), the achieved bandwidth and FLOP/s
from a byte and FLOP model, the roofline floor those imply on this GPU, and the same for the
torch reference and, when importable, flash-linear-attention.

Cost models, per layer (bf16 activations, fp32 states; Hk=16, Hv=32, K=V=128):
- bytes: what the op must move at least: q, k, v, gates in, o out, and every state read or
  written once (initial, final, chunk checkpoints). The kernels' own intermediates (w, u, v_new,
  per-chunk states) are extra traffic the floor does not count.
- FLOPs of the chunked form per chunk of BT tokens and value head: K K^T, w, u, Q K^T and the
  intra-chunk product (2 BT^2 (3K + 2V)), the triangular solve (BT^3 / 3), and the three state
  products w S, K^T v_new, Q S (6 BT K V). Decode: 8 K V per token and head.

    python bench/kernels_gdn.py                    # everything
    python bench/kernels_gdn.py --only prefill --no-reference
"""
from __future__ import annotations

import argparse
import sys

HK, HV, K, V = 16, 32, 128, 128
BT = 64
CONV_CHANNELS, CONV_WIDTH = 2 * HK * K + HV * V, 4
# (HBM bytes/s, dense bf16 FLOP/s) by device name; --peak-bandwidth / --peak-tflops override
PEAKS = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12), "H20": (4.0e12, 148e12), "A100": (2.0e12, 312e12)}


def parse_args(argv=None):
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["prefill", "decode", "conv"], action="append",
                   help="run only these groups (repeatable); default all")
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[4096, 16384],
                   help="single-sequence prefill lengths (default 4096 16384)")
    p.add_argument("--varlen", type=int, nargs=2, default=[16, 16384], metavar=("N", "TOTAL"),
                   help="varlen prefill batch: N sequences of random lengths summing to TOTAL (default 16 16384)")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256],
                   help="decode batch sizes, one token per sequence (default 1 8 32 64 128 256)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--no-reference", action="store_true", help="skip the torch reference (slow at long T)")
    p.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention even if importable")
    p.add_argument("--peak-bandwidth", type=float, help="HBM bandwidth in TB/s (default: by device name)")
    p.add_argument("--peak-tflops", type=float, help="dense 16-bit tensor TFLOP/s (default: by device name)")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms (default 200)")
    return p.parse_args(argv)


def chunk_cost(lengths, dtype_bytes):
    """(bytes, flops) floor of one chunked prefill over sequences of `lengths`, with initial and final states."""
    T = sum(lengths)
    n_chunks = sum(-(-L // BT) for L in lengths)
    n_checkpoints = sum(L // BT for L in lengths)
    io = T * (2 * HK * K + 2 * HV * V) * dtype_bytes + T * HV * 2 * 4
    states = (2 * len(lengths) + n_checkpoints) * HV * K * V * 4
    flops = n_chunks * HV * (2 * BT * BT * (3 * K + 2 * V) + BT ** 3 / 3 + 6 * BT * K * V)
    return io + states, flops


def decode_cost(batch, dtype_bytes):
    """(bytes, flops) floor of one decode step: the state read and written once, plus the token's vectors."""
    io = batch * ((2 * HK * K + 2 * HV * V) * dtype_bytes + 2 * HV * dtype_bytes)
    return io + 2 * batch * HV * K * V * 4, batch * HV * 8 * K * V


def conv_cost(T, N, dtype_bytes):
    C, W = CONV_CHANNELS, CONV_WIDTH
    return (2 * T * C + 2 * N * C * (W - 1) + C * W) * dtype_bytes, 2 * T * C * W


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("kernels_gdn.py benchmarks CUDA kernels and needs a CUDA GPU; none is visible "
              "(the kernels' correctness tests run on the CPU: pytest tests/kernels).", file=sys.stderr)
        return 2
    import triton

    from nextserve.kernels.conv import naive as conv_naive
    from nextserve.kernels.conv import triton_conv
    from nextserve.kernels.gated_delta_rule import (
        chunk_gated_delta_rule,
        fused_recurrent_gated_delta_rule,
        gdn_gating,
        naive_chunk_gated_delta_rule,
        naive_recurrent_gated_delta_rule_from_gates,
    )

    fla = None
    if not args.no_fla:
        try:
            from fla.ops import gated_delta_rule as fla
        except ImportError:
            print("flash-linear-attention not importable: comparing with the torch reference only")

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak_bw, peak_flops = next((v for key, v in PEAKS.items() if key in name), (None, None))
    peak_bw = args.peak_bandwidth * 1e12 if args.peak_bandwidth else peak_bw
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops
    if peak_bw is None or peak_flops is None:
        print(f"unknown peaks for {name!r}: pass --peak-bandwidth and --peak-tflops", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    dtype_bytes = 2
    groups = set(args.only or ["prefill", "decode", "conv"])
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"{name}: roofline peaks {peak_bw / 1e12:.2f} TB/s, {peak_flops / 1e12:.0f} TFLOP/s; {args.dtype}; "
          f"Hk={HK} Hv={HV} K={K} V={V}")
    print(f"{'case':<34} {'impl':<12} {'median ms':>10} {'TB/s':>7} {'TFLOP/s':>8} {'floor ms':>9} {'x floor':>8}")

    def report(case, impl, fn, nbytes, flops):
        try:
            ms = triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median")
        except Exception as e:  # a comparison that cannot run (e.g. out of memory) must not stop the rest
            print(f"{case:<34} {impl:<12} failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
            torch.cuda.empty_cache()
            return
        floor = max(nbytes / peak_bw, flops / peak_flops) * 1e3
        print(f"{case:<34} {impl:<12} {ms:>10.4f} {nbytes / ms / 1e9:>7.2f} {flops / ms / 1e9:>8.1f} "
              f"{floor:>9.4f} {ms / floor:>8.1f}")

    def gdn_inputs(B, T, N):
        q = torch.randn(B, T, HK, K, device=device, dtype=dtype, generator=gen)
        k = torch.randn(B, T, HK, K, device=device, dtype=dtype, generator=gen)
        v = torch.randn(B, T, HV, V, device=device, dtype=dtype, generator=gen)
        a = torch.randn(B, T, HV, device=device, dtype=dtype, generator=gen)
        b = torch.randn(B, T, HV, device=device, dtype=dtype, generator=gen)
        A_log = torch.rand(HV, device=device, generator=gen)
        dt_bias = torch.randn(HV, device=device, generator=gen) * 0.5
        h0 = torch.randn(N, HV, K, V, device=device, generator=gen) * 0.1
        return q, k, v, a, b, A_log, dt_bias, h0

    if "prefill" in groups:
        cases = [(f"prefill T={T}", [T]) for T in args.prefill_lengths]
        n_var, total = args.varlen
        cuts = torch.randperm(total - 1, generator=torch.Generator().manual_seed(0))[:n_var - 1].add(1).sort().values
        bounds = [0, *cuts.tolist(), total]
        cases.append((f"prefill varlen N={n_var} T={total}", [bounds[i + 1] - bounds[i] for i in range(n_var)]))
        for case, lengths in cases:
            T, N = sum(lengths), len(lengths)
            q, k, v, a, b, A_log, dt_bias, h0 = gdn_inputs(1, T, N)
            g, beta = gdn_gating(a, b, A_log, dt_bias)
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
            nbytes, flops = chunk_cost(lengths, dtype_bytes)
            report(case, "nextserve", lambda: chunk_gated_delta_rule(
                q, k, v, g, beta, initial_state=h0, cu_seqlens=cu, output_chunk_states=True), nbytes, flops)
            if not args.no_reference:
                report(case, "torch", lambda: naive_chunk_gated_delta_rule(
                    q, k, v, g, beta, initial_state=h0, cu_seqlens=cu, output_chunk_states=True), nbytes, flops)
            if fla is not None:
                report(case, "fla", _fla_chunk(fla, q, k, v, g, beta, h0, cu), nbytes, flops)
            del q, k, v, a, b, h0, g, beta
            torch.cuda.empty_cache()

    if "decode" in groups:
        for B in args.decode_batches:
            case = f"decode B={B}"
            q, k, v, a, b, A_log, dt_bias, h0 = gdn_inputs(B, 1, B)
            nbytes, flops = decode_cost(B, dtype_bytes)
            state = h0.clone()
            report(case, "nextserve", lambda: fused_recurrent_gated_delta_rule(
                q, k, v, a, b, A_log, dt_bias, initial_state=state, inplace_final_state=True), nbytes, flops)
            if not args.no_reference:
                report(case, "torch", lambda: naive_recurrent_gated_delta_rule_from_gates(
                    q, k, v, a, b, A_log, dt_bias, initial_state=h0), nbytes, flops)
            if fla is not None:
                g, beta = gdn_gating(a, b, A_log, dt_bias)
                report(case, "fla", _fla_recurrent(fla, q, k, v, g, beta, h0), nbytes, flops)

    if "conv" in groups:
        C, W = CONV_CHANNELS, CONV_WIDTH
        weight = torch.randn(C, W, device=device, dtype=dtype, generator=gen)
        for T in args.prefill_lengths:
            x = torch.randn(T, C, device=device, dtype=dtype, generator=gen)
            nbytes, flops = conv_cost(T, 1, dtype_bytes)
            case = f"conv prefill T={T} C={C}"
            report(case, "nextserve", lambda: triton_conv.causal_conv1d(x, weight), nbytes, flops)
            if not args.no_reference:
                report(case, "torch", lambda: conv_naive.causal_conv1d(x, weight), nbytes, flops)
        for B in args.decode_batches:
            x = torch.randn(B, C, device=device, dtype=dtype, generator=gen)
            state = torch.randn(B, C, W - 1, device=device, dtype=dtype, generator=gen)
            nbytes, flops = conv_cost(B, B, dtype_bytes)
            report(f"conv decode B={B} C={C}", "nextserve",
                   lambda: triton_conv.causal_conv1d_update(x, state, weight), nbytes, flops)
            if not args.no_reference:
                report(f"conv decode B={B} C={C}", "torch",
                       lambda: conv_naive.causal_conv1d_update(x, state, weight), nbytes, flops)
    return 0


def _fla_chunk(fla, q, k, v, g, beta, h0, cu):
    """fla's chunk kernel on the same inputs; key heads are repeated up front where its version
    does not take fewer key heads than value heads (the repeat is outside the timed call)."""
    kwargs = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu.long(), use_qk_l2norm_in_kernel=True)
    try:
        fla.chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)
    except Exception:
        q, k = (x.repeat_interleave(HV // HK, dim=2) for x in (q, k))
    return lambda: fla.chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)


def _fla_recurrent(fla, q, k, v, g, beta, h0):
    kwargs = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    try:
        fla.fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    except Exception:
        q, k = (x.repeat_interleave(HV // HK, dim=2) for x in (q, k))
    return lambda: fla.fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
