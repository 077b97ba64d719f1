"""Causal depthwise conv1d in Triton: prefill over packed sequences, and the one-token decode update.

Conventions as in `naive.py`: weight [C, W]; the conv state of a sequence is its last W - 1
inputs, oldest first; positions before a sequence's first token read its initial state (or
zeros). Accumulation is fp32, outputs and returned states are in x.dtype. W is a compile-time
constant (4 in Qwen3-Next), so the taps unroll.

With `state_slots`, the state argument is a pool [S, C, W - 1] and the kernels read and write row
state_slots[n] of it themselves. Writing in place means a program may overwrite state another of
its threads still has to read, so the kernels that write states load everything first and pass a
barrier before storing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import check_conv_inputs, check_conv_update_inputs

__all__ = ["causal_conv1d", "causal_conv1d_update"]


@triton.jit
def causal_conv1d_fwd_kernel(
    x, weight, h0, y, seq_ids, cu_seqlens, state_slots, T, C,
    stride_x_t, stride_h_n, stride_h_c, stride_h_w,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, USE_SILU: tl.constexpr, HAS_SLOTS: tl.constexpr,
):
    i_c, i_t = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t = o_t < T
    m_c = o_c < C
    # a block of tokens may straddle sequences: each token looks up its own sequence start
    if IS_VARLEN:
        i_n = tl.load(seq_ids + o_t, mask=m_t, other=0)
        bos = tl.load(cu_seqlens + i_n, mask=m_t, other=0)
    else:
        i_n = tl.zeros([BT], dtype=tl.int32)
        bos = tl.zeros([BT], dtype=tl.int32)
    p = o_t - bos  # position within the sequence
    if HAS_SLOTS:
        i_s = tl.load(state_slots + i_n, mask=m_t, other=0).to(tl.int64)
    else:
        i_s = i_n.to(tl.int64)

    b_y = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        b_w = tl.load(weight + o_c * W + j, mask=m_c, other=0).to(tl.float32)
        i_p = p - (W - 1) + j  # the input this tap reads; negative: from the conv state
        m_x = (m_t & (i_p >= 0))[:, None] & m_c[None, :]
        b_x = tl.load(x + (o_t - (W - 1) + j).to(tl.int64)[:, None] * stride_x_t + o_c[None, :], mask=m_x,
                      other=0).to(tl.float32)
        if USE_INITIAL_STATE:
            m_s = (m_t & (i_p < 0))[:, None] & m_c[None, :]
            p_s = h0 + i_s[:, None] * stride_h_n + o_c[None, :] * stride_h_c + (W - 1 + i_p)[:, None] * stride_h_w
            b_x += tl.load(p_s, mask=m_s, other=0).to(tl.float32)
        b_y += b_x * b_w[None, :]
    if USE_SILU:
        b_y = b_y * tl.sigmoid(b_y)
    tl.store(y + o_t.to(tl.int64)[:, None] * C + o_c[None, :], b_y.to(y.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


@triton.jit
def causal_conv1d_final_state_kernel(
    x, h0, ht, cu_seqlens, state_slots, T, C,
    stride_x_t, stride_h_n, stride_h_c, stride_h_w, stride_t_n, stride_t_c, stride_t_w,
    W: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_SLOTS: tl.constexpr,
):
    i_c, i_n = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    o_w = tl.arange(0, BW)
    m_c = o_c < C
    m_w = o_w < W - 1
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        L = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = tl.zeros([], dtype=tl.int64)
        L = tl.zeros([], dtype=tl.int64) + T
    if HAS_SLOTS:
        i_s = tl.load(state_slots + i_n).to(tl.int64)
    else:
        i_s = i_n.to(tl.int64)
    # column j of the new state is the input at position L - (W - 1) + j: from the sequence, or,
    # for a sequence shorter than W - 1, from the old state
    i_p = L - (W - 1) + o_w
    m_x = m_c[:, None] & (m_w & (i_p >= 0))[None, :]
    b_x = tl.load(x + (bos + i_p)[None, :] * stride_x_t + o_c[:, None], mask=m_x, other=0)
    if USE_INITIAL_STATE:
        m_s = m_c[:, None] & (m_w & (i_p < 0))[None, :]
        p_s = h0 + i_s * stride_h_n + o_c[:, None] * stride_h_c + (W - 1 + i_p)[None, :] * stride_h_w
        b_x += tl.load(p_s, mask=m_s, other=0).to(b_x.dtype)
    if HAS_SLOTS:
        tl.debug_barrier()  # ht is h0: every old column is read before any is overwritten
    p_t = ht + i_s * stride_t_n + o_c[:, None] * stride_t_c + o_w[None, :] * stride_t_w
    tl.store(p_t, b_x.to(ht.dtype.element_ty), mask=m_c[:, None] & m_w[None, :])


@triton.jit
def causal_conv1d_update_kernel(
    x, conv_state, weight, y, state_slots, C,
    stride_x_n, stride_s_n, stride_s_c, stride_s_w,
    W: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, USE_SILU: tl.constexpr, HAS_SLOTS: tl.constexpr,
):
    i_c, i_n = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    o_w = tl.arange(0, BW)
    m_c = o_c < C
    m_w = o_w < W - 1
    if HAS_SLOTS:
        i_s = tl.load(state_slots + i_n).to(tl.int64)
    else:
        i_s = i_n.to(tl.int64)
    p_s = conv_state + i_s * stride_s_n + o_c[:, None] * stride_s_c
    b_x = tl.load(x + i_n.to(tl.int64) * stride_x_n + o_c, mask=m_c, other=0)
    b_s = tl.load(p_s + o_w[None, :] * stride_s_w, mask=m_c[:, None] & m_w[None, :], other=0)
    b_w = tl.load(weight + o_c[:, None] * W + o_w[None, :], mask=m_c[:, None] & m_w[None, :], other=0)
    b_y = tl.sum(b_s.to(tl.float32) * b_w.to(tl.float32), axis=1)
    b_y += b_x.to(tl.float32) * tl.load(weight + o_c * W + (W - 1), mask=m_c, other=0).to(tl.float32)
    # the state rolled left by one: column j takes old column j + 1, the last column the new input
    m_next = m_c[:, None] & (o_w + 1 < W - 1)[None, :]
    b_next = tl.load(p_s + (o_w + 1)[None, :] * stride_s_w, mask=m_next, other=0)
    b_next = tl.where((o_w == W - 2)[None, :], b_x[:, None].to(b_next.dtype), b_next)
    tl.debug_barrier()  # the state is rewritten in place: all of it is read first
    tl.store(p_s + o_w[None, :] * stride_s_w, b_next, mask=m_c[:, None] & m_w[None, :])
    if USE_SILU:
        b_y = b_y * tl.sigmoid(b_y)
    tl.store(y + i_n.to(tl.int64) * C + o_c, b_y.to(y.dtype.element_ty), mask=m_c)


def causal_conv1d(x, weight, *, initial_state=None, state_slots=None, cu_seqlens=None, activation="silu"):
    """Prefill: causal depthwise conv over packed sequences, then the activation.

    x: [T, C] (rows may be strided, channels contiguous); weight: [C, W];
    initial_state: [N, C, W - 1] (any strides) or None (zeros); cu_seqlens: [N + 1] or None (one
    sequence); activation: "silu" / "swish" or None.
    state_slots: [N] int32/int64 on x's device, or None. With it, initial_state is the pool
    [S, C, W - 1] (any strides): sequence n starts from pool[state_slots[n]] and its final state
    is written back there (slots are not range-checked here: that would cost a host sync).
    Returns (y [T, C] in x.dtype, final_state [N, C, W - 1] in x.dtype, or None with state_slots).

    Example, two sequences of 5 and 2 tokens:
        y, state = causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 5, 7], dtype=torch.int32, device="cuda"))
    """
    T, C, W, N = check_conv_inputs(x, weight, initial_state, cu_seqlens, activation, state_slots)
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    device = x.device
    y = torch.empty(T, C, dtype=x.dtype, device=device)
    has_slots = state_slots is not None
    final_state = initial_state if has_slots else torch.empty(N, C, W - 1, dtype=x.dtype, device=device)
    is_varlen = cu_seqlens is not None
    seq_ids = None
    if is_varlen:
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        # output_size keeps this free of a host sync
        seq_ids = torch.repeat_interleave(torch.arange(N, dtype=torch.int32, device=device), cu_seqlens.diff(),
                                          output_size=T)
    h_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    # a [16, 64] tile keeps the unrolled taps' pointers and values in registers (no spills on sm_90)
    BT, BC = 16, min(64, max(16, triton.next_power_of_2(C)))
    use_h0, use_silu = initial_state is not None, activation in ("silu", "swish")
    if T > 0:
        causal_conv1d_fwd_kernel[(triton.cdiv(C, BC), triton.cdiv(T, BT))](
            x, weight, initial_state, y, seq_ids, cu_seqlens, state_slots, T, C, x.stride(0), *h_strides,
            W=W, BT=BT, BC=BC, USE_INITIAL_STATE=use_h0, IS_VARLEN=is_varlen, USE_SILU=use_silu,
            HAS_SLOTS=has_slots)
    if W > 1:
        # after the conv launch, which still reads the pool's old states
        causal_conv1d_final_state_kernel[(triton.cdiv(C, BC), N)](
            x, initial_state, final_state, cu_seqlens, state_slots, T, C, x.stride(0), *h_strides,
            *final_state.stride(), W=W, BC=BC, BW=triton.next_power_of_2(W - 1),
            USE_INITIAL_STATE=use_h0, IS_VARLEN=is_varlen, HAS_SLOTS=has_slots)
    return y, (None if has_slots else final_state)


def causal_conv1d_update(x, conv_state, weight, *, state_slots=None, activation="silu"):
    """Decode: one new token per sequence; conv_state is rolled in place.

    x: [N, C] (channels contiguous); conv_state: [N, C, W - 1] (any strides, e.g. rows of a
    larger cache), oldest input first; weight: [C, W].
    state_slots: [N] int32/int64 on x's device, or None. With it, conv_state is the pool
    [S, C, W - 1] and sequence n rolls row state_slots[n] (not range-checked: no host sync).
    Returns y [N, C] in x.dtype.
    """
    N, C, W = check_conv_update_inputs(x, conv_state, weight, activation, state_slots)
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    y = torch.empty(N, C, dtype=x.dtype, device=x.device)
    if W == 1:
        # no state to roll: a per-channel scale
        y.copy_(causal_conv1d(x, weight, activation=activation)[0])
        return y
    BC = min(256, max(16, triton.next_power_of_2(C)))
    causal_conv1d_update_kernel[(triton.cdiv(C, BC), N)](
        x, conv_state, weight, y, state_slots, C, x.stride(0), *conv_state.stride(),
        W=W, BC=BC, BW=triton.next_power_of_2(W - 1), USE_SILU=activation in ("silu", "swish"),
        HAS_SLOTS=state_slots is not None)
    return y
