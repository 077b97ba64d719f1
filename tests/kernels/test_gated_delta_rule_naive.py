"""The torch references of the gated delta rule: recurrent vs chunked vs transformers' oracle."""


import pytest
import torch
import torch.nn.functional as F

from nextserve.kernels.gated_delta_rule.naive import (
    gdn_gating,
    naive_chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule_from_gates,
)


def recurrence_chain(T: int, K: int) -> int:
    """Accumulation behind an output of the recurrence: S^T k and S^T q over K per step, and the state
    carries all T steps."""
    return T + 2 * K


def chunk_chain(T: int, K: int, chunk: int = 64) -> int:
    """The chunked form adds the in-chunk products and the triangular solve, each over a chunk."""
    return recurrence_chain(T, K) + 2 * chunk


def make_inputs(B, T, Hk, Hv, K, V, *, dtype=torch.float32, seed=0, with_state=False, N=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hk, K, generator=gen).to(dtype)
    k = torch.randn(B, T, Hk, K, generator=gen).to(dtype)
    v = torch.randn(B, T, Hv, V, generator=gen).to(dtype)
    # log decays spread over realistic magnitudes (exp(g) from ~0.2 to ~1)
    g = -torch.rand(B, T, Hv, generator=gen) * 1.5
    beta = torch.rand(B, T, Hv, generator=gen)
    h0 = torch.randn(N or B, Hv, K, V, generator=gen) if with_state else None
    return q, k, v, g, beta, h0


def explicit_recurrence(q, k, v, g, beta, h0, scale, normalize=True):
    """The model-facts recurrence written out per head and token, for one sequence, in fp64.

    q, k: [T, Hk, K]; v: [T, Hv, V]; g, beta: [T, Hv]; h0: [Hv, K, V] or None.
    """
    T, Hk, K = k.shape
    Hv, V = v.shape[1:]
    o = torch.zeros(T, Hv, V, dtype=torch.float64)
    S_all = torch.zeros(Hv, K, V, dtype=torch.float64) if h0 is None else h0.double().clone()
    for j in range(Hv):
        S = S_all[j]
        for t in range(T):
            q_t = q[t, j // (Hv // Hk)].double()
            k_t = k[t, j // (Hv // Hk)].double()
            if normalize:
                q_t = q_t / torch.sqrt((q_t * q_t).sum() + 1e-6)
                k_t = k_t / torch.sqrt((k_t * k_t).sum() + 1e-6)
            q_t = q_t * scale
            S = torch.exp(g[t, j].double()) * S
            delta = beta[t, j].double() * (v[t, j].double() - S.T @ k_t)
            S = S + torch.outer(k_t, delta)
            o[t, j] = S.T @ q_t
        S_all[j] = S
    return o, S_all


@pytest.mark.parametrize("Hk,Hv,K,V", [(2, 2, 16, 16), (1, 3, 24, 20), (2, 4, 32, 16)],
                         ids=["Hk2-Hv2-K16", "Hk1-Hv3-K24-V20", "Hk2-Hv4-K32-V16"])
def test_recurrent_matches_explicit_recurrence(Hk, Hv, K, V, rms_close):
    q, k, v, g, beta, h0 = make_inputs(1, 20, Hk, Hv, K, V, with_state=True)
    o, s, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    o_ref, s_ref = explicit_recurrence(q[0], k[0], v[0], g[0], beta[0], h0[0], K ** -0.5)
    rms_close(o[0], o_ref, reduction=recurrence_chain(20, K), what="o")
    rms_close(s[0], s_ref, reduction=recurrence_chain(20, K), what="state")


def test_recurrent_matches_transformers_oracle(rms_close):
    from transformers.models.qwen3_next import modeling_qwen3_next as modeling
    q, k, v, g, beta, h0 = make_inputs(2, 37, 2, 4, 32, 16, with_state=True)
    o_ref, s_ref = modeling.torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                                             output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, s, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    rms_close(o, o_ref, reduction=recurrence_chain(37, 32), what="o")
    rms_close(s, s_ref, reduction=recurrence_chain(37, 32), what="state")
    o_c, s_c, _ = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    rms_close(o_c, o_ref, reduction=chunk_chain(37, 32), what="chunk o")
    rms_close(s_c, s_ref, reduction=chunk_chain(37, 32), what="chunk state")


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_chunk_matches_recurrent(T, with_state, rms_close):
    q, k, v, g, beta, h0 = make_inputs(2, T, 2, 4, 32, 16, with_state=with_state, seed=T)
    o_r, s_r, all_r = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_all_states=True)
    o_c, s_c, cs = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_chunk_states=True)
    rms_close(o_c, o_r, reduction=chunk_chain(T, 32), what="o")
    rms_close(s_c, s_r, reduction=chunk_chain(T, 32), what="state")
    # chunk states: per sequence, the states after tokens 63, 127, ...
    n_full = T // 64
    assert cs.shape == (2 * n_full, 4, 32, 16)
    if n_full:
        expect = torch.stack([all_r[b, 64 * (c + 1) - 1] for b in range(2) for c in range(n_full)])
        rms_close(cs, expect, reduction=chunk_chain(T, 32), what="chunk states")
    assert o_c.dtype == v.dtype and s_c.dtype == torch.float32 and all_r.shape == (2, T, 4, 32, 16)


def test_chunk_handles_non_power_of_two_dims_and_custom_scale(rms_close):
    q, k, v, g, beta, h0 = make_inputs(1, 70, 3, 6, 24, 20, with_state=True)
    o_r, s_r, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, scale=0.3)
    o_c, s_c, _ = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, scale=0.3)
    rms_close(o_c, o_r, reduction=chunk_chain(70, 24), what="o")
    rms_close(s_c, s_r, reduction=chunk_chain(70, 24), what="state")


def test_without_l2norm(rms_close):
    q, k, v, g, beta, _ = make_inputs(1, 40, 2, 2, 16, 16)
    # unnormalised keys make the delta rule unstable: keep their norm below 1 instead
    q, k = F.normalize(q, dim=-1) * 0.7, F.normalize(k, dim=-1) * 0.9
    o_r, s_r, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=False)
    o_c, s_c, _ = naive_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=False, chunk_size=16)
    o_ref, s_ref = explicit_recurrence(q[0], k[0], v[0], g[0], beta[0], None, 0.25, normalize=False)
    rms_close(o_r[0], o_ref, reduction=recurrence_chain(40, 16), what="o")
    rms_close(s_r[0], s_ref, reduction=recurrence_chain(40, 16), what="state")
    rms_close(o_c, o_r, reduction=chunk_chain(40, 16, chunk=16), what="chunk o")
    rms_close(s_c, s_r, reduction=chunk_chain(40, 16, chunk=16), what="chunk state")


@pytest.mark.parametrize("lengths", [(1, 63, 65, 21), (64, 130), (5,)], ids=["ragged", "boundaries", "single"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_varlen_matches_per_sequence_loop(lengths, with_state, rms_close):
    T = sum(lengths)
    N = len(lengths)
    q, k, v, g, beta, h0 = make_inputs(1, T, 2, 4, 16, 32, with_state=with_state, N=N, seed=N)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    o_r, s_r, all_r = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                                                        output_all_states=True)
    o_c, s_c, cs = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                                                output_chunk_states=True)
    expected_chunk_states = []
    for n in range(N):
        lo, hi = cu[n].item(), cu[n + 1].item()
        h = None if h0 is None else h0[n:n + 1]
        sl = (slice(None), slice(lo, hi))
        o_n, s_n, all_n = naive_recurrent_gated_delta_rule(q[sl], k[sl], v[sl], g[sl], beta[sl], initial_state=h,
                                                           output_all_states=True)
        L = hi - lo
        rms_close(o_r[sl], o_n, reduction=recurrence_chain(L, 16), what=f"seq {n} o")
        rms_close(s_r[n], s_n[0], reduction=recurrence_chain(L, 16), what=f"seq {n} state")
        rms_close(all_r[sl], all_n, reduction=recurrence_chain(L, 16), what=f"seq {n} all states")
        rms_close(o_c[sl], o_n, reduction=chunk_chain(L, 16), what=f"seq {n} chunk o")
        rms_close(s_c[n], s_n[0], reduction=chunk_chain(L, 16), what=f"seq {n} chunk state")
        expected_chunk_states += [all_n[0, 64 * (c + 1) - 1] for c in range((hi - lo) // 64)]
    assert cs.shape[0] == len(expected_chunk_states)
    if expected_chunk_states:
        rms_close(cs, torch.stack(expected_chunk_states), reduction=chunk_chain(max(lengths), 16),
                  what="chunk states")


def test_chunked_continuation_equals_one_pass(rms_close):
    """Prefill in two pieces, carrying the state, equals one prefill: what prefix caching relies on."""
    q, k, v, g, beta, h0 = make_inputs(1, 150, 2, 4, 16, 16, with_state=True)
    o, s, _ = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    first = (slice(None), slice(0, 64))
    rest = (slice(None), slice(64, None))
    o1, s1, _ = naive_chunk_gated_delta_rule(q[first], k[first], v[first], g[first], beta[first], initial_state=h0)
    o2, s2, _ = naive_recurrent_gated_delta_rule(q[rest], k[rest], v[rest], g[rest], beta[rest], initial_state=s1)
    rms_close(torch.cat([o1, o2], 1), o, reduction=chunk_chain(150, 16), what="o")
    rms_close(s2, s, reduction=chunk_chain(150, 16), what="state")


def test_bf16_inputs_give_bf16_output_and_fp32_states(rms_close):
    q, k, v, g, beta, h0 = make_inputs(1, 70, 2, 4, 16, 16, dtype=torch.bfloat16, with_state=True)
    o_r, s_r, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    o_c, s_c, cs = naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_chunk_states=True)
    assert o_r.dtype == o_c.dtype == torch.bfloat16
    assert s_r.dtype == s_c.dtype == cs.dtype == torch.float32
    # both accumulate in fp32 and round the output to bf16 once
    rms_close(o_c, o_r, reduction=chunk_chain(70, 16), what="o")
    rms_close(s_c, s_r, reduction=chunk_chain(70, 16), what="state")


def test_optional_outputs_are_none():
    q, k, v, g, beta, _ = make_inputs(1, 10, 1, 1, 16, 16)
    assert naive_recurrent_gated_delta_rule(q, k, v, g, beta, output_final_state=False)[1:] == (None, None)
    assert naive_chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=False)[1:] == (None, None)


def test_gating_formula_and_fused_reference(close):
    gen = torch.Generator().manual_seed(3)
    # include large arguments where softplus switches to the identity
    a = torch.randn(1, 30, 4, generator=gen) * 12
    b = torch.randn(1, 30, 4, generator=gen) * 3
    A_log = torch.randn(4, generator=gen)
    dt_bias = torch.randn(4, generator=gen)
    g, beta = gdn_gating(a.bfloat16(), b.bfloat16(), A_log, dt_bias)
    a64, b64 = a.bfloat16().double(), b.bfloat16().double()
    assert g.dtype == beta.dtype == torch.float32
    # fp32 against float64: an add, a softplus, an exp and a product; a sigmoid
    close(g, -A_log.double().exp() * torch.log1p((a64 + dt_bias.double()).exp()), reduction=4, dtype=torch.float32)
    close(beta, 1 / (1 + (-b64).exp()), reduction=2, dtype=torch.float32)
    assert (g < 0).all()

    q, k, v, _, _, h0 = make_inputs(1, 30, 2, 4, 16, 16, with_state=True)
    out = naive_recurrent_gated_delta_rule_from_gates(q, k, v, a, b, A_log, dt_bias, initial_state=h0,
                                                      output_all_states=True)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_all_states=True)
    for x, y in zip(out, ref):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bad", ["v-heads", "gate-shape", "state-shape", "batched-varlen"])
def test_shape_errors_name_the_tensor(bad):
    q, k, v, g, beta, h0 = make_inputs(1, 8, 2, 4, 16, 16, with_state=True)
    kwargs = {}
    if bad == "v-heads":
        v, match = torch.randn(1, 8, 3, 16), "value heads"
        g, beta = g[..., :3], beta[..., :3]
    elif bad == "gate-shape":
        g, match = g[:, :7], "g "
    elif bad == "state-shape":
        kwargs["initial_state"], match = h0[:, :2], "initial_state"
    else:
        q, k, v, g, beta = (torch.cat([x, x]) for x in (q, k, v, g, beta))
        kwargs["cu_seqlens"], match = torch.tensor([0, 8], dtype=torch.int32), "cu_seqlens"
    for fn in (naive_recurrent_gated_delta_rule, naive_chunk_gated_delta_rule):
        with pytest.raises(ValueError, match=match):
            fn(q, k, v, g, beta, **kwargs)
