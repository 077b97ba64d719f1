"""Token-by-token gated delta rule in Triton, gating fused in: the decode kernel.

One program per (sequence, value head, V block) keeps its [K, BV] slice of the state in
registers and walks the sequence's few tokens. Per token it computes the gates from the raw
projections (g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)), L2-normalises q and k,
and applies

    S <- exp(g) S;   delta = beta (v - S^T k);   S <- S + k delta^T;   o = S^T q

in fp32. The V blocks of one head are independent (every column of S evolves on its own), so
splitting V costs only re-reading q and k. A decode step with T = 1 reads the state once and
writes it once: the kernel is bound by state bandwidth.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_gdn_inputs

__all__ = ["fused_recurrent_gated_delta_rule"]


@triton.jit
def fused_recurrent_gdn_fwd_kernel(
    q, k, v, a, b, A_log, dt_bias, o, h0, ht, all_states, cu_seqlens, state_slots, scale, T,
    H: tl.constexpr, Hk: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr, STORE_ALL_STATES: tl.constexpr, HAS_SLOTS: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // Hk)
    # 64-bit offsets: all_states holds T * H * K * V elements
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]

    # the state of sequence i_n is row i_n of h0/ht, or with slots row state_slots[i_n] of the pool
    if HAS_SLOTS:
        i_sh = tl.load(state_slots + i_n).to(tl.int64) * H + i_h
    else:
        i_sh = i_nh.to(tl.int64)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + i_sh * K * V + o_h, mask=m_h, other=0).to(tl.float32)
    b_A = -tl.exp(tl.load(A_log + i_h).to(tl.float32))
    b_dt_bias = tl.load(dt_bias + i_h).to(tl.float32)

    for t in range(bos, eos):
        b_q = tl.load(q + (t * Hk + i_hk) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_k = tl.load(k + (t * Hk + i_hk) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        b_q = b_q * scale

        # softplus as torch computes it: the identity above 20, where log(1 + e^x) == x in fp32
        b_x = tl.load(a + t * H + i_h).to(tl.float32) + b_dt_bias
        b_softplus = tl.where(b_x > 20.0, b_x, tl.log(1.0 + tl.exp(tl.minimum(b_x, 20.0))))
        b_g = b_A * b_softplus
        b_beta = tl.sigmoid(tl.load(b + t * H + i_h).to(tl.float32))

        b_h = b_h * tl.exp(b_g)
        b_delta = b_beta * (b_v - tl.sum(b_h * b_k[:, None], axis=0))
        b_h = b_h + b_k[:, None] * b_delta[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        if STORE_ALL_STATES:
            tl.store(all_states + (t * H + i_h) * K * V + o_h, b_h, mask=m_h)

    if STORE_FINAL_STATE:
        if HAS_SLOTS:
            tl.debug_barrier()  # ht is h0: the whole tile was read before any of it is overwritten
        tl.store(ht + i_sh * K * V + o_h, b_h, mask=m_h)


def fused_recurrent_gated_delta_rule_fwd(q, k, v, a, b, A_log, dt_bias, scale, initial_state, output_final_state,
                                         cu_seqlens, output_all_states, use_qk_l2norm, N, final_state=None,
                                         state_slots=None):
    """Allocate and launch. Inputs contiguous, shapes validated; `final_state` may be a preallocated
    [N, H, K, V] fp32 buffer (it may alias `initial_state`: each program reads its slice before writing it).
    With state_slots [N], initial_state and final_state are both the pool [S, H, K, V], indexed by slot.

    Returns (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] fp32 or None, all_states [B, T, H, K, V] fp32 or None).
    """
    B, T, Hk, K = k.shape
    H, V = v.shape[2], v.shape[3]
    BK = triton.next_power_of_2(K)
    # small V blocks give a decode step at batch 1 enough programs (H * V / BV) to spread over the SMs
    BV = min(32, triton.next_power_of_2(V))
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)
    if output_final_state and final_state is None:
        final_state = torch.empty(N, H, K, V, dtype=torch.float32, device=v.device)
    elif not output_final_state:
        final_state = None
    all_states = (torch.empty(B, T, H, K, V, dtype=torch.float32, device=v.device)
                  if output_all_states else None)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=v.device, dtype=torch.int32)
    fused_recurrent_gdn_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, a, b, A_log, dt_bias, o, initial_state, final_state, all_states, cu_seqlens, state_slots, scale, T,
        H=H, Hk=Hk, K=K, V=V, BK=BK, BV=BV, USE_QK_L2NORM=use_qk_l2norm, IS_VARLEN=cu_seqlens is not None,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=final_state is not None,
        STORE_ALL_STATES=all_states is not None, HAS_SLOTS=state_slots is not None,
        num_warps=4 if BK * BV >= 4096 else 2)
    return o, final_state, all_states


def fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, *, scale=None, initial_state=None,
                                     output_final_state=True, cu_seqlens=None, output_all_states=False,
                                     use_qk_l2norm=True, inplace_final_state=False, state_slots=None):
    """The gated delta rule token by token, with the gates computed inside (decode, short continuations).

    q, k: [B, T, Hk, K]; v: [B, T, Hv, V] with Hv a multiple of Hk; a, b: [B, T, Hv] raw gate
    projections; A_log, dt_bias: [Hv]. initial_state: [N, Hv, K, V] fp32 or None (zeros).
    cu_seqlens: [N + 1] offsets of N sequences packed along T (then B == 1), or None (N = B).
    scale defaults to K ** -0.5. inplace_final_state: write the final state into `initial_state`
    (which must then be a contiguous fp32 tensor) instead of a new tensor: a decode step updates
    its state cache without a copy.
    state_slots: [N] int32/int64 on the inputs' device, or None. With it, initial_state is the
    contiguous fp32 pool [S, Hv, K, V]: sequence n starts from pool[state_slots[n]] and its final
    state is written back there (slots are not range-checked here: that would cost a host sync).
    Returns (o [B, T, Hv, V] in v.dtype, final_state [N, Hv, K, V] fp32 or None (None with
    state_slots), all_states [B, T, Hv, K, V] fp32 or None: the state after every token).

    Example, one decode step for 8 sequences, updating their states in place:
        o, state, _ = fused_recurrent_gated_delta_rule(q, k, v, a, b, A_log, dt_bias,
                                                       initial_state=state, inplace_final_state=True)
        # q: [8, 1, Hk, K]; v: [8, 1, Hv, V]; state: [8, Hv, K, V]
    """
    shapes = check_gdn_inputs(q, k, v, (a, b), ("a", "b"), initial_state, cu_seqlens, state_slots)
    if tuple(A_log.shape) != (shapes.Hv,) or tuple(dt_bias.shape) != (shapes.Hv,):
        raise ValueError(f"A_log {tuple(A_log.shape)} and dt_bias {tuple(dt_bias.shape)} must be [Hv] = "
                         f"({shapes.Hv},)")
    if shapes.K > 256 or shapes.V > 256:
        raise ValueError(f"head dims K={shapes.K}, V={shapes.V} must be <= 256: the state slice stays in registers")
    final_state = None
    if state_slots is not None:
        if not initial_state.is_contiguous():
            raise ValueError("the state pool (initial_state with state_slots) must be contiguous: it is updated "
                             "in place")
        q, k, v, a, b, A_log, dt_bias = (x.contiguous() for x in (q, k, v, a, b, A_log, dt_bias))
        o, _, all_states = fused_recurrent_gated_delta_rule_fwd(
            q, k, v, a, b, A_log, dt_bias, shapes.K ** -0.5 if scale is None else float(scale), initial_state, True,
            cu_seqlens, output_all_states, use_qk_l2norm, shapes.N, final_state=initial_state, state_slots=state_slots)
        return o, None, all_states
    if inplace_final_state:
        if initial_state is None or initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            raise ValueError("inplace_final_state needs initial_state as a contiguous fp32 [N, Hv, K, V] tensor")
        final_state = initial_state
    elif initial_state is not None:
        initial_state = initial_state.float().contiguous()
    q, k, v, a, b, A_log, dt_bias = (x.contiguous() for x in (q, k, v, a, b, A_log, dt_bias))
    return fused_recurrent_gated_delta_rule_fwd(q, k, v, a, b, A_log, dt_bias,
                                                shapes.K ** -0.5 if scale is None else float(scale),
                                                initial_state, output_final_state or inplace_final_state, cu_seqlens,
                                                output_all_states, use_qk_l2norm, shapes.N, final_state=final_state)
