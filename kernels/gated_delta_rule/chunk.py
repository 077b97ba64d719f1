"""Chunked gated delta rule in Triton: the prefill kernel.

The sequence is cut into chunks of BT = 64 tokens and computed in three passes, following the
decomposition of flash-linear-attention (see `naive.naive_chunk_gated_delta_rule` for the math):

1. `chunk_gdn_prepare_kernel`, one program per (chunk, value head): the chunk-local cumulative
   sum G of the log decays; the strictly lower matrix A = diag(beta) (K K^T ⊙ exp(G_i - G_j));
   the inverse (I + A)^-1 by blocked forward substitution (16x16 diagonal blocks, then the
   blocks below them), all of it as tensor-core dots; then w = (I + A)^-1 (beta ⊙ K ⊙ e^G) and
   u = (I + A)^-1 (beta ⊙ V). Nothing here depends on the state, so all chunks run in parallel.
2. `chunk_gdn_fwd_h_kernel`, one program per (sequence, value head, V block): the only
   sequential pass. It walks the chunks keeping the state S [K, BV] in registers, writes the
   state at each chunk start (for pass 3), v_new = u - w S, and, when asked, the state after
   every full chunk (the prefix-cache checkpoint) and the final state.
3. `chunk_gdn_fwd_o_kernel`, one program per (V block, chunk, value head):
   o = (Q ⊙ e^G) S + causal(Q K^T ⊙ Γ) v_new, again parallel over chunks.

q and k are L2-normalised (and q scaled) on load in every pass, in fp32, so no normalised copy
is ever written. Key head `i_h // (H // Hk)` serves value head i_h. Inputs may be fp32, fp16 or
bf16; accumulation is fp32 throughout. For half-precision inputs the tensor-core operands and the
stored intermediates (w, u, v_new, per-chunk states) are in the input dtype, as in
flash-linear-attention (the triangular solve itself runs on fp32 operands in TF32); for fp32
inputs everything stays fp32 and every dot uses full fp32 precision. The returned final state and
chunk states are always fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .utils import check_gdn_inputs

__all__ = ["chunk_gated_delta_rule"]

BT = 64  # tokens per chunk; the prefix cache checkpoints at multiples of it


@triton.jit
def _chunk_coords(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN: tl.constexpr):
    """(sequence, chunk within it, first token, length) of global chunk i_c."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int32)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        i_n = i_c // NT
        i_t = i_c % NT
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    # 64-bit token offsets: T * H * D passes 2^31 at long contexts
    return i_n, i_t, bos, (eos - bos).to(tl.int32)


@triton.jit
def _tile(row0, n_rows, stride, col0, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """Element offsets and in-bounds mask of the [BR, BC] tile at (row0, col0) of a [n_rows, n_cols]
    matrix whose rows are `stride` elements apart."""
    o_r = row0 + tl.arange(0, BR)
    o_c = col0 + tl.arange(0, BC)
    return o_r[:, None] * stride + o_c[None, :], (o_r < n_rows)[:, None] & (o_c < n_cols)[None, :]


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. Operands arrive already rounded to the storage dtype; DOT_FP32
    widens them first, which the launcher asks for when Triton's CPU interpreter runs bf16 inputs
    (its bf16 dot multiplies raw bit patterns): the result is the same as a bf16 tensor-core dot."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _load_normalized(p_x, m_x, USE_QK_L2NORM: tl.constexpr):
    """A [BT, BK] tile of q or k in fp32, L2-normalised per row when asked (x * rsqrt(sum x^2 + 1e-6))."""
    b_x = tl.load(p_x, mask=m_x, other=0).to(tl.float32)
    if USE_QK_L2NORM:
        b_x = b_x * tl.rsqrt(tl.sum(b_x * b_x, axis=1) + 1e-6)[:, None]
    return b_x


@triton.jit
def chunk_gdn_prepare_kernel(
    k, v, g, beta, g_cum, w, u, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, Hk: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_QK_L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, SOLVE_PRECISION: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, L = _chunk_coords(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    i_hk = i_h // (H // Hk)
    dt = w.dtype.element_ty

    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < L
    # positions past the sequence end read g = beta = k = v = 0: they neither decay nor update
    b_g = tl.load(g + (bos + i_t * BT + o_i) * H + i_h, mask=m_t, other=0).to(tl.float32)
    b_beta = tl.load(beta + (bos + i_t * BT + o_i) * H + i_h, mask=m_t, other=0).to(tl.float32)
    b_G = tl.cumsum(b_g, axis=0)
    tl.store(g_cum + (bos + i_t * BT + o_i) * H + i_h, b_G, mask=m_t)

    o_k, m_k = _tile(i_t * BT, L, Hk * K, 0, K, BT, BK)
    b_k = _load_normalized(k + (bos * Hk + i_hk) * K + o_k, m_k, USE_QK_L2NORM)

    # A = strictly_lower(diag(beta) (K K^T ⊙ exp(G_i - G_j))); the exponent is zeroed above the
    # diagonal first so that exp never overflows there
    m_lower = o_i[:, None] > o_i[None, :]
    b_A = _dot(b_k.to(dt), tl.trans(b_k).to(dt), DOT_FP32, DOT_PRECISION)
    b_A = b_A * b_beta[:, None] * tl.exp(tl.where(m_lower, b_G[:, None] - b_G[None, :], 0))
    b_A = tl.where(m_lower, b_A, 0)

    # (I + A)^-1 by blocked forward substitution, written with [BT, BT] dots and row masks so that
    # nothing indexes into registers. First the BT/16 diagonal 16x16 blocks, all at once: rows not
    # yet reached hold -A (restricted to their block), and row i of a block becomes r + r @ X with
    # r = -A_i, which is forward substitution because r is zero from column i on and rows above are
    # final (X = inverse - I there).
    o_b = o_i // 16
    b_X = tl.where(o_b[:, None] == o_b[None, :], -b_A, 0)
    for i in range(1, 16):
        m_row = (o_i % 16 == i)[:, None]
        b_R = tl.where(m_row, b_X, 0)
        b_X = tl.where(m_row, b_R + tl.dot(b_R, b_X, input_precision=SOLVE_PRECISION), b_X)
    b_Y = b_X + tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    # then the blocks below the diagonal, block row by block row: Y_IJ = -Y_II sum_{J<=K<I} A_IK Y_KJ
    b_A_below = tl.where(o_b[:, None] > o_b[None, :], b_A, 0)
    for i_b in tl.static_range(1, BT // 16):
        m_row = (o_b == i_b)[:, None]
        b_S = tl.dot(tl.where(m_row, b_A_below, 0), b_Y, input_precision=SOLVE_PRECISION)
        b_Y_ii = tl.where(m_row & (o_b == i_b)[None, :], b_Y, 0)
        b_Y = tl.where(m_row & (o_b < i_b)[None, :], -tl.dot(b_Y_ii, b_S, input_precision=SOLVE_PRECISION), b_Y)
    b_X = b_Y.to(dt)

    b_kb = b_k * (b_beta * tl.exp(b_G))[:, None]
    o_w, m_w = _tile(i_t * BT, L, H * K, 0, K, BT, BK)
    tl.store(w + (bos * H + i_h) * K + o_w, _dot(b_X, b_kb.to(dt), DOT_FP32, DOT_PRECISION).to(dt), mask=m_w)
    for i_v in range(tl.cdiv(V, BV)):
        o_v, m_v = _tile(i_t * BT, L, H * V, i_v * BV, V, BT, BV)
        b_vb = tl.load(v + (bos * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32) * b_beta[:, None]
        tl.store(u + (bos * H + i_h) * V + o_v, _dot(b_X, b_vb.to(dt), DOT_FP32, DOT_PRECISION).to(dt), mask=m_v)


@triton.jit
def chunk_gdn_fwd_h_kernel(
    k, w, u, g_cum, h, v_new, h0, ht, chunk_states, cu_seqlens, chunk_offsets, state_offsets, state_slots, T,
    H: tl.constexpr, Hk: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_QK_L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, STORE_CHUNK_STATES: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // Hk)
    dt = w.dtype.element_ty
    # 64-bit offsets: tokens * H * K and chunks * H * K * V pass 2^31 at long contexts
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        L = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        boc = tl.load(chunk_offsets + i_n).to(tl.int64)
        bsc = tl.load(state_offsets + i_n).to(tl.int64)
    else:
        bos, L = i_n.to(tl.int64) * T, T
        boc = i_n.to(tl.int64) * tl.cdiv(T, BT)
        bsc = i_n.to(tl.int64) * (T // BT)
    NT = tl.cdiv(L, BT)
    o_i = tl.arange(0, BT)
    # this program's [BK, BV] tile, at the same place in every [K, V] state
    o_s, m_s = _tile(0, K, V, i_v * BV, V, BK, BV)

    # the state of sequence i_n is row i_n of h0/ht, or with slots row state_slots[i_n] of the pool
    if HAS_SLOTS:
        i_sh = tl.load(state_slots + i_n).to(tl.int64) * H + i_h
    else:
        i_sh = i_nh.to(tl.int64)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + i_sh * K * V + o_s, mask=m_s, other=0).to(tl.float32)

    for i_t in range(NT):
        # the state at the chunk start, read by the output pass
        tl.store(h + ((boc + i_t) * H + i_h) * K * V + o_s, b_h.to(dt), mask=m_s)

        o_w, m_w = _tile(i_t * BT, L, H * K, 0, K, BT, BK)
        o_v, m_v = _tile(i_t * BT, L, H * V, i_v * BV, V, BT, BV)
        b_w = tl.load(w + (bos * H + i_h) * K + o_w, mask=m_w, other=0)
        b_u = tl.load(u + (bos * H + i_h) * V + o_v, mask=m_v, other=0).to(tl.float32)
        b_v = b_u - _dot(b_w, b_h.to(dt), DOT_FP32, DOT_PRECISION)
        tl.store(v_new + (bos * H + i_h) * V + o_v, b_v.to(dt), mask=m_v)

        # decay to the chunk's last real token; padded rows of k are zero and add nothing
        i_last = tl.minimum((i_t + 1) * BT, L) - 1
        b_G_last = tl.load(g_cum + (bos + i_last) * H + i_h)
        m_t = i_t * BT + o_i < L
        b_G = tl.load(g_cum + (bos + i_t * BT + o_i) * H + i_h, mask=m_t, other=0)
        o_k, m_k = _tile(i_t * BT, L, Hk * K, 0, K, BT, BK)
        b_k = _load_normalized(k + (bos * Hk + i_hk) * K + o_k, m_k, USE_QK_L2NORM)
        b_k = b_k * tl.exp(b_G_last - b_G)[:, None]
        b_h = b_h * tl.exp(b_G_last) + _dot(tl.trans(b_k).to(dt), b_v.to(dt), DOT_FP32, DOT_PRECISION)

        if STORE_CHUNK_STATES:
            if (i_t + 1) * BT <= L:
                tl.store(chunk_states + ((bsc + i_t) * H + i_h) * K * V + o_s, b_h, mask=m_s)

    if STORE_FINAL_STATE:
        if HAS_SLOTS:
            tl.debug_barrier()  # ht is h0: the whole tile was read before any of it is overwritten
        tl.store(ht + i_sh * K * V + o_s, b_h, mask=m_s)


@triton.jit
def chunk_gdn_fwd_o_kernel(
    q, k, v_new, h, g_cum, o, cu_seqlens, chunk_indices, scale, T, NT,
    H: tl.constexpr, Hk: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_QK_L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_t, bos, L = _chunk_coords(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    i_hk = i_h // (H // Hk)
    dt = v_new.dtype.element_ty

    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < L
    b_G = tl.load(g_cum + (bos + i_t * BT + o_i) * H + i_h, mask=m_t, other=0)
    o_k, m_k = _tile(i_t * BT, L, Hk * K, 0, K, BT, BK)
    b_q = (_load_normalized(q + (bos * Hk + i_hk) * K + o_k, m_k, USE_QK_L2NORM) * scale).to(dt)
    b_k = _load_normalized(k + (bos * Hk + i_hk) * K + o_k, m_k, USE_QK_L2NORM).to(dt)

    # inter-chunk part, from the state at the chunk start: global chunk i_c is chunk i_t of its
    # sequence because chunk ids run sequence by sequence
    o_s, m_s = _tile(0, K, V, i_v * BV, V, BK, BV)
    b_h = tl.load(h + (i_c.to(tl.int64) * H + i_h) * K * V + o_s, mask=m_s, other=0)
    b_o = _dot(b_q, b_h, DOT_FP32, DOT_PRECISION) * tl.exp(b_G)[:, None]

    # intra-chunk part: causal(Q K^T ⊙ Γ) v_new; rows past the sequence end (G = 0 there) are
    # masked too, or exp(G_i - G_j) could overflow in them
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    b_A = _dot(b_q, tl.trans(b_k), DOT_FP32, DOT_PRECISION)
    b_A = tl.where(m_A, b_A * tl.exp(tl.where(m_A, b_G[:, None] - b_G[None, :], 0)), 0)
    o_v, m_v = _tile(i_t * BT, L, H * V, i_v * BV, V, BT, BV)
    b_vn = tl.load(v_new + (bos * H + i_h) * V + o_v, mask=m_v, other=0)
    b_o += _dot(b_A.to(dt), b_vn, DOT_FP32, DOT_PRECISION)
    tl.store(o + (bos * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_sizes(K: int, V: int) -> tuple[int, int, int]:
    """(BK, BV of the prepare and state passes, BV of the output pass).

    tl.dot needs every block dimension >= 16; K is held whole so that rows can be normalised on
    load. At K = V = 128 with bf16 inputs these sizes (all three kernels with 8 warps) compile for
    sm_90 without register spills; BV = 32 in the state pass also gives a single sequence
    H * V / 32 programs to spread over the SMs in the one sequential pass."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, max(16, min(32, triton.next_power_of_2(V))), max(16, min(64, triton.next_power_of_2(V)))


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                               output_chunk_states, use_qk_l2norm, N, state_slots=None):
    """Allocate, build the chunk tables and launch the three passes. Inputs contiguous, shapes validated.
    With state_slots [N], initial_state is the pool [S, H, K, V]: read and written in place by slot
    (the returned final_state is then None).

    Returns (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] fp32 or None,
    chunk_states [sum_n floor(L_n / BT), H, K, V] fp32 or None).
    """
    B, T, Hk, K = k.shape
    H, V = v.shape[2], v.shape[3]
    device = v.device
    BK, BV_h, BV_o = _block_sizes(K, V)
    # fp32 inputs: keep fp32 operands at full precision; half inputs: tensor-core operands in their dtype
    dt = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.float32
    # (the flag only matters for fp32 operands; None keeps Triton's default for half ones)
    precision = "ieee" if dt == torch.float32 else None

    is_varlen = cu_seqlens is not None
    if is_varlen:
        lengths = cu_seqlens.to(device).diff()
        n_chunks = (lengths + BT - 1) // BT
        chunk_offsets = torch.zeros(N + 1, dtype=torch.int32, device=device)
        chunk_offsets[1:] = n_chunks.cumsum(0)
        state_offsets = torch.zeros(N + 1, dtype=torch.int32, device=device)
        state_offsets[1:] = (lengths // BT).cumsum(0)
        # one host sync: the grid needs the number of chunks
        NC, n_states = (int(x) for x in torch.stack([chunk_offsets[-1], state_offsets[-1]]).tolist())
        seq = torch.repeat_interleave(torch.arange(N, device=device), n_chunks.long(), output_size=NC)
        chunk_indices = torch.stack([seq, torch.arange(NC, device=device) - chunk_offsets[seq]], 1)
        chunk_indices = chunk_indices.to(torch.int32).contiguous()
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        NT = 0
    else:
        NT = triton.cdiv(T, BT)
        NC, n_states = B * NT, B * (T // BT)
        chunk_offsets = state_offsets = chunk_indices = None

    g_cum = torch.empty(B, T, H, dtype=torch.float32, device=device)
    w = torch.empty(B, T, H, K, dtype=dt, device=device)
    u = torch.empty(B, T, H, V, dtype=dt, device=device)
    v_new = torch.empty(B, T, H, V, dtype=dt, device=device)
    h = torch.empty(NC, H, K, V, dtype=dt, device=device)
    o = torch.empty(B, T, H, V, dtype=v.dtype, device=device)
    if state_slots is not None:
        final_state = initial_state
    else:
        final_state = torch.empty(N, H, K, V, dtype=torch.float32, device=device) if output_final_state else None
    chunk_states = (torch.empty(n_states, H, K, V, dtype=torch.float32, device=device)
                    if output_chunk_states else None)
    if NC == 0:
        # no tokens at all: the state passes through unchanged (a pool already holds it)
        if state_slots is not None:
            return o, None, chunk_states
        if final_state is not None:
            final_state.copy_(initial_state if initial_state is not None else torch.zeros_like(final_state))
        return o, final_state, chunk_states

    common = dict(H=H, Hk=Hk, K=K, V=V, BT=BT, BK=BK, USE_QK_L2NORM=use_qk_l2norm, IS_VARLEN=is_varlen,
                  DOT_FP32=dt == torch.bfloat16 and _interpreting(), DOT_PRECISION=precision)
    chunk_gdn_prepare_kernel[(NC, H)](k, v, g, beta, g_cum, w, u, cu_seqlens, chunk_indices, T, NT, BV=BV_h,
                                      SOLVE_PRECISION="ieee" if dt == torch.float32 else "tf32", **common,
                                      num_warps=8)
    chunk_gdn_fwd_h_kernel[(triton.cdiv(V, BV_h), N * H)](
        k, w, u, g_cum, h, v_new, initial_state, final_state, chunk_states, cu_seqlens, chunk_offsets,
        state_offsets, state_slots, T, BV=BV_h, **common, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=final_state is not None, STORE_CHUNK_STATES=chunk_states is not None,
        HAS_SLOTS=state_slots is not None, num_warps=8)
    chunk_gdn_fwd_o_kernel[(triton.cdiv(V, BV_o), NC, H)](q, k, v_new, h, g_cum, o, cu_seqlens, chunk_indices, scale,
                                                          T, NT, BV=BV_o, **common, num_warps=8)
    return o, (None if state_slots is not None else final_state), chunk_states


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=True,
                           cu_seqlens=None, output_chunk_states=False, use_qk_l2norm=True, state_slots=None):
    """The chunked gated delta rule (prefill), chunk size 64.

    q, k: [B, T, Hk, K]; v: [B, T, Hv, V] with Hv a multiple of Hk; g (log decay), beta: [B, T, Hv]
    (fp32 preferred). initial_state: [N, Hv, K, V] or None (zeros). cu_seqlens: [N + 1] int32/int64
    offsets of N sequences packed along T (then B == 1), or None (N = B sequences of length T).
    scale defaults to K ** -0.5. K is held in one block: K <= 256.
    state_slots: [N] int32/int64 on the inputs' device, or None. With it, initial_state is the
    contiguous fp32 pool [S, Hv, K, V]: sequence n starts from pool[state_slots[n]] and its final
    state is written back there (slots are not range-checked here: that would cost a host sync).
    Returns (o [B, T, Hv, V] in v.dtype, final_state [N, Hv, K, V] fp32 or None (None with
    state_slots), chunk_states [sum_n floor(L_n / 64), Hv, K, V] fp32 or None: the state after each full chunk,
    sequence by sequence in order of position).

    Example, two sequences of 100 and 30 tokens:
        cu = torch.tensor([0, 100, 130], dtype=torch.int32, device="cuda")
        o, s, cs = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, output_chunk_states=True)
        # q: [1, 130, Hk, K]; s: [2, Hv, K, V]; cs: [1, Hv, K, V] (the state after token 63 of sequence 0)
    """
    shapes = check_gdn_inputs(q, k, v, (g, beta), ("g", "beta"), initial_state, cu_seqlens, state_slots)
    if shapes.K > 256:
        raise ValueError(f"key head dim K={shapes.K} (k {tuple(k.shape)}) must be <= 256: it is held in one block")
    if not (q.device == k.device == v.device == g.device == beta.device):
        raise ValueError("q, k, v, g and beta must be on one device")
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if state_slots is not None:
        if not initial_state.is_contiguous():
            raise ValueError("the state pool (initial_state with state_slots) must be contiguous: it is updated "
                             "in place")
    elif initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return chunk_gated_delta_rule_fwd(q, k, v, g, beta, shapes.K ** -0.5 if scale is None else float(scale),
                                      initial_state, output_final_state, cu_seqlens, output_chunk_states,
                                      use_qk_l2norm, shapes.N, state_slots=state_slots)
