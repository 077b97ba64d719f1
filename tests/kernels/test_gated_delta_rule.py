"""Triton gated-delta-rule kernels (run by Triton's CPU interpreter) against the torch references.

Tolerances are relative RMS errors (fla's `assert_close` measure) from the shared rounding rule in
tests/conftest.py: the chunked form accumulates over the sequence, the head dim and the 64-token chunk.
Half-precision inputs keep tensor-core operands and intermediates in their dtype, as
flash-linear-attention does: about three roundings to that dtype on the way (the interpreter also
rounds fp32 -> bf16 toward zero where a GPU rounds to nearest).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from nextserve.kernels import ops
from nextserve.kernels.gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    gdn_gating,
    naive_chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule_from_gates,
)

HALF_PRECISION_ROUNDINGS = 3


def chain(T: int, K: int) -> int:
    """Accumulation behind an output: the state carries T steps, S^T k and S^T q run over K, and the
    chunked form adds its in-chunk products and triangular solve over 64 tokens."""
    return T + 2 * K + 2 * 64


def make_inputs(B, T, Hk, Hv, K, V, *, dtype=torch.float32, N=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hk, K, generator=gen).to(dtype)
    k = torch.randn(B, T, Hk, K, generator=gen).to(dtype)
    v = torch.randn(B, T, Hv, V, generator=gen).to(dtype)
    # raw gate projections as the model produces them, and the fp32 gates they give
    a = (torch.randn(B, T, Hv, generator=gen) * 2).to(dtype)
    b = (torch.randn(B, T, Hv, generator=gen) * 2).to(dtype)
    A_log = torch.rand(Hv, generator=gen) * 2 - 1
    dt_bias = torch.randn(Hv, generator=gen) * 0.5
    h0 = torch.randn(N or B, Hv, K, V, generator=gen)
    return q, k, v, a, b, A_log, dt_bias, h0


def cu_seqlens_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# --- chunk -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "B,T,Hk,Hv,K,V,dtype",
    [
        (1, 1, 2, 4, 16, 16, torch.float32),
        (2, 63, 2, 4, 32, 16, torch.float32),
        (1, 65, 1, 2, 24, 20, torch.float32),
        (2, 100, 2, 2, 16, 32, torch.float32),
        (1, 130, 2, 4, 32, 32, torch.bfloat16),
        (1, 100, 1, 2, 32, 32, torch.float16),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_chunk_matches_reference(B, T, Hk, Hv, K, V, dtype, rms_close):
    q, k, v, a, b, A_log, dt_bias, h0 = make_inputs(B, T, Hk, Hv, K, V, dtype=dtype, seed=T)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    ref = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_chunk_states=True)
    out = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_chunk_states=True)
    # states are fp32, but computed from operands and intermediates held in `dtype`
    reduction, roundings = chain(T, K), 1 if dtype == torch.float32 else HALF_PRECISION_ROUNDINGS
    assert out[0].dtype == dtype and out[1].dtype == out[2].dtype == torch.float32
    rms_close(out[0], ref[0], reduction=reduction, dtype=dtype, roundings=roundings, what="o")
    rms_close(out[1], ref[1], reduction=reduction, dtype=dtype, roundings=roundings, what="final_state")
    assert out[2].shape == (B * (T // 64), Hv, K, V)
    if T >= 64:
        rms_close(out[2], ref[2], reduction=reduction, dtype=dtype, roundings=roundings, what="chunk_states")


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_chunk_varlen_matches_per_sequence_recurrence(with_state, poison_empty, rms_close):
    lengths = (1, 64, 70, 15)
    q, k, v, a, b, A_log, dt_bias, h0 = make_inputs(1, sum(lengths), 2, 4, 16, 16, N=len(lengths))
    h0 = h0 if with_state else None
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    cu = cu_seqlens_of(lengths)
    reduction = chain(max(lengths), 16)
    expected = []
    for n in range(len(lengths)):
        sl = (slice(None), slice(cu[n].item(), cu[n + 1].item()))
        expected.append(naive_recurrent_gated_delta_rule(q[sl], k[sl], v[sl], g[sl], beta[sl],
                                                         initial_state=None if h0 is None else h0[n:n + 1],
                                                         output_all_states=True))
    poison_empty()
    o, state, chunk_states = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                                                    output_chunk_states=True)
    rms_close(o, torch.cat([e[0] for e in expected], 1), reduction=reduction, what="o")
    rms_close(state, torch.cat([e[1] for e in expected]), reduction=reduction, what="final_state")
    # one checkpoint per full 64-token chunk: after token 63 of sequences 1 and 2
    rms_close(chunk_states, torch.stack([expected[1][2][0, 63], expected[2][2][0, 63]]), reduction=reduction,
              what="chunk_states")


def test_chunk_without_l2norm_with_scale_and_no_state_outputs(rms_close):
    q, k, v, a, b, A_log, dt_bias, h0 = make_inputs(1, 70, 2, 4, 16, 16)
    # unnormalised keys must keep |k| < 1 for the delta rule to stay stable
    q, k = F.normalize(q, dim=-1) * 0.8, F.normalize(k, dim=-1) * 0.9
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    kwargs = dict(scale=0.3, use_qk_l2norm=False, initial_state=h0)
    ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    o, state, chunk_states = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=False, **kwargs)
    assert state is None and chunk_states is None
    rms_close(o, ref[0], reduction=chain(70, 16), what="o")


def test_chunk_rejects_bad_shapes():
    q, k, v, a, b, A_log, dt_bias, h0 = make_inputs(1, 8, 2, 4, 16, 16)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0[:, :3])
    with pytest.raises(ValueError, match="K=300"):
        qk = torch.randn(1, 8, 2, 300)
        chunk_gated_delta_rule(qk, qk, v, g, beta)


# --- fused recurrent -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "B,T,Hk,Hv,K,V,dtype",
    [
        (3, 1, 2, 4, 32, 16, torch.float32),
        (2, 7, 2, 4, 16, 64, torch.float32),
        (1, 5, 1, 3, 24, 20, torch.float32),
        (4, 1, 2, 4, 32, 32, torch.bfloat16),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_fused_recurrent_matches_reference(B, T, Hk, Hv, K, V, dtype, poison_empty, rms_close):
    q, k, v, a, b, A_log, dt_bias, h0 = make_inputs(B, T, Hk, Hv, K, V, dtype=dtype, seed=B * T)
    ref = naive_recurrent_gated_delta_rule_from_gates(q, k, v, a, b, A_log, dt_bias, initial_state=h0,
                                                      output_all_states=True)
    poison_empty()
    out = fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, initial_state=h0, output_all_states=True)
    # the recurrence runs in fp32 either way: only the output's final rounding differs in bf16
    rms_close(out[0], ref[0], reduction=chain(T, K), what="o")
    rms_close(out[1], ref[1], reduction=chain(T, K), what="final_state")
    rms_close(out[2], ref[2], reduction=chain(T, K), what="all_states")


def test_fused_recurrent_varlen_no_initial_state(poison_empty, rms_close):
    lengths = (1, 6, 3)
    q, k, v, a, b, A_log, dt_bias, _ = make_inputs(1, sum(lengths), 2, 4, 16, 16)
    cu = cu_seqlens_of(lengths)
    ref = naive_recurrent_gated_delta_rule_from_gates(q, k, v, a, b, A_log, dt_bias, cu_seqlens=cu,
                                                      output_all_states=True)
    poison_empty()
    out = fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, cu_seqlens=cu, output_all_states=True)
    reduction = chain(max(lengths), 16)
    for name, x, y in zip(("o", "final_state", "all_states"), ref, out):
        rms_close(y, x, reduction=reduction, what=name)


def test_fused_recurrent_inplace_state_and_extreme_gates(rms_close):
    q, k, v, a, b, A_log, dt_bias, h0 = make_inputs(2, 3, 2, 4, 16, 16)
    # softplus past its linear threshold and deep in its exponential tail
    a[0, 0], a[1, 1] = 40.0, -40.0
    ref = naive_recurrent_gated_delta_rule_from_gates(q, k, v, a, b, A_log, dt_bias, initial_state=h0)
    state = h0.clone()
    o, final, all_states = fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, initial_state=state,
                                                            inplace_final_state=True)
    assert final is state and all_states is None
    reduction = chain(3, 16)
    rms_close(o, ref[0], reduction=reduction, what="o")
    rms_close(state, ref[1], reduction=reduction, what="final_state")
    with pytest.raises(ValueError, match="inplace_final_state"):
        fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, inplace_final_state=True)


def test_prefill_then_decode_equals_one_recurrence(rms_close):
    """Chunked prefill, then token-by-token decode from its final state: the serving path."""
    q, k, v, a, b, A_log, dt_bias, h0 = make_inputs(2, 72, 2, 4, 16, 32, seed=7)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    ref_o, ref_state, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    P = 67
    o_p, state, _ = chunk_gated_delta_rule(q[:, :P], k[:, :P], v[:, :P], g[:, :P], beta[:, :P], initial_state=h0)
    outs = [o_p]
    for t in range(P, 72):
        step = slice(t, t + 1)
        o_t, state, _ = fused_recurrent_gated_delta_rule(q[:, step], k[:, step], v[:, step], a[:, step], b[:, step],
                                                         A_log, dt_bias, initial_state=state)
        outs.append(o_t)
    reduction = chain(72, 16)
    rms_close(torch.cat(outs, 1), ref_o, reduction=reduction, what="o")
    rms_close(state, ref_state, reduction=reduction, what="final_state")


# --- dispatch through kernels.ops --------------------------------------------------------------

def test_ops_dispatch_to_triton_matches_torch(monkeypatch, rms_close):
    q, k, v, a, b, A_log, dt_bias, h0 = make_inputs(1, 66, 2, 4, 16, 16, N=2)
    cu = cu_seqlens_of((40, 26))
    g, beta = ops.gdn_gating(a, b, A_log, dt_bias)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NEXTSERVE_KERNELS", backend)
        assert ops.kernel_backend(q.device) == backend
        results[backend] = (
            ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu),
            ops.fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, initial_state=h0, cu_seqlens=cu),
        )
    reduction = chain(40, 16)
    for (ref_o, ref_s, _), (o, s, _) in zip(results["torch"], results["triton"]):
        rms_close(o, ref_o, reduction=reduction, what="o")
        rms_close(s, ref_s, reduction=reduction, what="final_state")
