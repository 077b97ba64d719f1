"""Triton kernels of the gated attention layer: fused q/k norm + partial RoPE, and varlen attention.

attention is a flash-style kernel (online softmax in fp32) over packed sequences:
- GQA heads are folded into the row dimension: one program serves the G = Hq / Hkv query heads
  that share a KV head, so each K/V tile is loaded once for all of them (and a decode step,
  one query per sequence, still fills G rows of the tile).
- bottom-right causal: the Lq queries of a sequence are its last Lq positions, so prefill,
  continuation from a KV cache and decode are the same kernel.
- decode (about one query per sequence) splits each sequence's keys over several programs,
  whose partial results a second kernel merges: a batch of one request with 2 KV heads would
  otherwise run on 2 programs.
- the sigmoid gate multiplies in the epilogue.
- paged (PAGED): keys and values live in caches of fixed-size blocks, [num_blocks, block_size,
  Hkv, D], and each sequence's block table names its blocks in order. Key tiles are BN-aligned
  and BN divides the block size, so every tile sits in one block: one table lookup per tile,
  then the same loads as the packed layout at another base. Nothing is gathered.
Sequence boundaries stay on the device: the grid is sized from static upper bounds, programs map
themselves to (sequence, tile) by a binary search, and surplus programs return at once.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .naive import check_cache_args, check_paged_attention_args, rope_inv_freq


def _interpreted() -> bool:
    # The interpreter keeps bf16 as raw 16-bit integers and tl.dot multiplies those bits as
    # integers, so interpreted kernels upcast dot operands to fp32 first.
    return bool(triton.knobs.runtime.interpret)


# --- q/k RMSNorm + partial NeoX RoPE ----------------------------------------------------------

@triton.jit
def qk_norm_rope_kernel(
    q, k, q_out, k_out, q_weight, k_weight, positions, inv_freq,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    HQ, D, eps,
    ROT: tl.constexpr,
    BD: tl.constexpr,
):
    i_t, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    # Heads 0..HQ-1 are q's, the rest k's: one launch for both.
    if i_h < HQ:
        p_x, p_o, p_w = q + i_t * stride_qt + i_h * stride_qh, q_out + i_t * stride_qot + i_h * stride_qoh, q_weight
    else:
        p_x = k + i_t * stride_kt + (i_h - HQ) * stride_kh
        p_o = k_out + i_t * stride_kot + (i_h - HQ) * stride_koh
        p_w = k_weight
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_x = tl.load(p_x + o_d, mask=m_d, other=0.).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=0) / D + eps)
    # The rotate-half partner of dim d < ROT is d +- ROT/2; load it directly rather than
    # shuffling registers.
    HALF: tl.constexpr = ROT // 2
    m_rot = o_d < ROT
    o_p = tl.where(o_d < HALF, o_d + HALF, o_d - HALF)
    b_xp = tl.load(p_x + o_p, mask=m_rot, other=0.).to(tl.float32)
    # The normalised row is rounded to the input dtype before the rotation, as in the reference.
    dtype = p_o.dtype.element_ty
    b_n = (b_x * b_rstd * (1. + tl.load(p_w + o_d, mask=m_d, other=0.).to(tl.float32))).to(dtype).to(tl.float32)
    b_np = (b_xp * b_rstd * (1. + tl.load(p_w + o_p, mask=m_rot, other=0.).to(tl.float32))).to(dtype).to(tl.float32)
    # Angles in fp32 from host-computed inverse frequencies: bit-identical to the reference's.
    b_f = tl.load(inv_freq + tl.where(o_d < HALF, o_d, o_d - HALF), mask=m_rot, other=0.)
    b_angle = tl.load(positions + i_t).to(tl.float32) * b_f
    b_cos = tl.cos(b_angle).to(dtype).to(tl.float32)
    b_sin = tl.sin(b_angle).to(dtype).to(tl.float32)
    b_rot = b_n * b_cos + tl.where(o_d < HALF, -b_np, b_np) * b_sin
    tl.store(p_o + o_d, tl.where(m_rot, b_rot, b_n).to(dtype), mask=m_d)


@functools.lru_cache(maxsize=16)
def _inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return rope_inv_freq(rotary_dim, theta).to(device)


def _heads(t: torch.Tensor) -> torch.Tensor:
    """[T, H, D] with a unit stride along D (views from a fused projection pass as they are)."""
    return t if t.stride(2) == 1 else t.contiguous()


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                 positions: torch.Tensor, *, rotary_dim: int, theta: float, eps: float):
    """Zero-centred RMSNorm of each q and k head, then NeoX RoPE on its first rotary_dim dims.

    One program per (token, head) row. q and k may be strided views (e.g. the query half of
    q_proj's output); the results are new contiguous tensors.

    Args:
        q: [T, Hq, D]; k: [T, Hkv, D]; same dtype.
        q_norm_weight, k_norm_weight: [D] (the scale is 1 + w).
        positions: [T] int absolute positions (< 2^24, exact in fp32).
        rotary_dim: even, 0 < rotary_dim <= D.

    Returns:
        (q [T, Hq, D], k [T, Hkv, D]).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"qk_norm_rope: expected q [T, Hq, D] and k [T, Hkv, D], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise ValueError(f"qk_norm_rope: q {q.dtype} and k {k.dtype} differ")
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if tuple(q_norm_weight.shape) != (D,) or tuple(k_norm_weight.shape) != (D,):
        raise ValueError(f"qk_norm_rope: q_norm_weight {tuple(q_norm_weight.shape)} and k_norm_weight "
                         f"{tuple(k_norm_weight.shape)} must be [D={D}]")
    if tuple(positions.shape) != (T,):
        raise ValueError(f"qk_norm_rope: positions {tuple(positions.shape)} must be [T={T}]")
    if rotary_dim % 2 or not 0 < rotary_dim <= D:
        raise ValueError(f"qk_norm_rope: rotary_dim={rotary_dim} must be even and in (0, D={D}]")
    q, k = _heads(q), _heads(k)
    q_out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    k_out = torch.empty(T, Hkv, D, dtype=k.dtype, device=k.device)
    if T:
        qk_norm_rope_kernel[(T, Hq + Hkv)](
            # One pointer type for both weights: the kernel picks q's or k's at run time.
            q, k, q_out, k_out, q_norm_weight.contiguous(), k_norm_weight.to(q_norm_weight.dtype).contiguous(),
            positions.contiguous(),
            _inv_freq(rotary_dim, float(theta), q.device),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            Hq, D, eps,
            ROT=rotary_dim, BD=triton.next_power_of_2(D),
        )
    return q_out, k_out


# --- varlen gated attention -------------------------------------------------------------------

@triton.jit
def _key_tile_ptrs(p_k, p_v, i_k, o_rk, o_rv, i_n, block_tables, stride_bt, stride_kb, stride_kt, stride_vb, stride_vt,
                   PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr, BN: tl.constexpr):
    """Row pointers [BN] into k and v of the BN-aligned key tile starting at key i_k of sequence i_n.
    Paged, the tile lies in one block (it never straddles two): one table lookup gives its base
    and the rows follow at the loop-invariant offsets o_rk / o_rv."""
    if PAGED:
        i_blk = tl.load(block_tables + i_n.to(tl.int64) * stride_bt + i_k // BLOCK_SIZE).to(tl.int64)
        i_row = i_k % BLOCK_SIZE
        p_kt = p_k + (i_blk * stride_kb + i_row * stride_kt) + o_rk
        return p_kt, p_v + (i_blk * stride_vb + i_row * stride_vt) + o_rv
    o_k = i_k + tl.arange(0, BN)
    return p_k + o_k * stride_kt, p_v + o_k * stride_vt


@triton.jit
def attention_kernel(
    q, k, v, gate, o, o_partial, ml_partial,
    cu_seqlens_q, cu_seqlens_k, tile_offsets, block_tables,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_gt, stride_gh, stride_kb, stride_vb, stride_bt,
    N, HQ, D, DV, qk_scale,
    PAGED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    G: tl.constexpr,
    BQ: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_tile, i_kvh, i_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # The grid is an upper bound on the tile count: surplus programs leave at once.
    if i_tile >= tl.load(tile_offsets + N):
        return
    # The sequence owning this tile: the last n with tile_offsets[n] <= i_tile (binary search).
    i_lo, i_hi = tl.full([], 0, dtype=tl.int32), tl.full([], N - 1, dtype=tl.int32)
    while i_lo < i_hi:
        i_mid = (i_lo + i_hi + 1) // 2
        b_take = tl.load(tile_offsets + i_mid) <= i_tile
        i_lo = tl.where(b_take, i_mid, i_lo)
        i_hi = tl.where(b_take, i_hi, i_mid - 1)
    i_n = i_lo
    bos_q, eos_q = tl.load(cu_seqlens_q + i_n).to(tl.int64), tl.load(cu_seqlens_q + i_n + 1).to(tl.int64)
    Lq = eos_q - bos_q
    if PAGED:
        # cu_seqlens_k holds the key counts seq_lens_k [N]; the keys start at each block's base
        bos_k = tl.zeros([], dtype=tl.int64)
        Lk = tl.load(cu_seqlens_k + i_n).to(tl.int64)
    else:
        bos_k = tl.load(cu_seqlens_k + i_n).to(tl.int64)
        Lk = tl.load(cu_seqlens_k + i_n + 1).to(tl.int64) - bos_k
    i_q0 = (i_tile - tl.load(tile_offsets + i_n)) * BQ

    # Row r of the tile is query i_q0 + r // G of query head i_kvh * G + r % G.
    o_r = tl.arange(0, BM)
    o_q = i_q0 + o_r // G
    o_hq = i_kvh * G + o_r % G
    m_r = (o_r < BQ * G) & (o_q < Lq)
    o_pos = Lk - Lq + o_q   # the position a query sits at, and the last key it sees
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    b_q = tl.load(q + (bos_q + o_q)[:, None] * stride_qt + o_hq[:, None] * stride_qh + o_d[None, :],
                  mask=m_r[:, None] & m_d[None, :], other=0.)
    if UPCAST:
        b_q = b_q.to(tl.float32)

    # Keys [0, i_end) matter to this tile; those below i_diag are seen by every row (no mask).
    i_end = tl.minimum(Lk, Lk - Lq + i_q0 + BQ)
    i_diag = (Lk - Lq + i_q0) // BN * BN
    # Split s takes a BN-aligned share of [0, i_end).
    i_chunk = tl.cdiv(tl.cdiv(i_end, NUM_SPLITS), BN) * BN
    i_start, i_stop = i_split * i_chunk, tl.minimum(i_end, (i_split + 1) * i_chunk)

    p_k = k + bos_k * stride_kt + i_kvh * stride_kh
    p_v = v + bos_k * stride_vt + i_kvh * stride_vh
    o_rk, o_rv = tl.arange(0, BN) * stride_kt, tl.arange(0, BN) * stride_vt   # row offsets within a paged tile
    b_m = tl.full([BM], -1e30, dtype=tl.float32)   # finite: a row without keys yet stays NaN-free
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for i_k in range(i_start, tl.minimum(i_stop, i_diag), BN):
        p_kt, p_vt = _key_tile_ptrs(p_k, p_v, i_k, o_rk, o_rv, i_n, block_tables, stride_bt, stride_kb, stride_kt,
                                    stride_vb, stride_vt, PAGED, BLOCK_SIZE, BN)
        b_k = tl.load(p_kt[:, None] + o_d[None, :], mask=m_d[None, :], other=0.)
        b_v = tl.load(p_vt[:, None] + o_dv[None, :], mask=m_dv[None, :], other=0.)
        if UPCAST:
            b_k, b_v = b_k.to(tl.float32), b_v.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_alpha = tl.exp2(b_m - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=PRECISION)
        b_m = b_m_new
    for i_k in range(tl.maximum(i_start, i_diag), i_stop, BN):
        o_k = i_k + tl.arange(0, BN)
        m_k = o_k < Lk
        p_kt, p_vt = _key_tile_ptrs(p_k, p_v, i_k, o_rk, o_rv, i_n, block_tables, stride_bt, stride_kb, stride_kt,
                                    stride_vb, stride_vt, PAGED, BLOCK_SIZE, BN)
        b_k = tl.load(p_kt[:, None] + o_d[None, :], mask=m_k[:, None] & m_d[None, :], other=0.)
        b_v = tl.load(p_vt[:, None] + o_dv[None, :], mask=m_k[:, None] & m_dv[None, :], other=0.)
        if UPCAST:
            b_k, b_v = b_k.to(tl.float32), b_v.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_s = tl.where((o_k[None, :] <= o_pos[:, None]) & m_k[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_alpha = tl.exp2(b_m - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=PRECISION)
        b_m = b_m_new

    o_row = (bos_q + o_q) * HQ + o_hq   # row of [Tq * Hq]
    if NUM_SPLITS == 1:
        b_o = b_acc / tl.where(b_l > 0, b_l, 1.)[:, None]
        dtype = o.dtype.element_ty
        if HAS_GATE:
            # Rounding points of the reference: o cast to the dtype, sigmoid(gate) in the dtype.
            b_g = tl.load(gate + (bos_q + o_q)[:, None] * stride_gt + o_hq[:, None] * stride_gh + o_dv[None, :],
                          mask=m_r[:, None] & m_dv[None, :], other=0.).to(tl.float32)
            b_o = b_o.to(dtype).to(tl.float32) * tl.sigmoid(b_g).to(dtype).to(tl.float32)
        tl.store(o + o_row[:, None] * DV + o_dv[None, :], b_o.to(dtype), mask=m_r[:, None] & m_dv[None, :])
    else:
        # Unnormalised partials of this split: acc, running max, running sum (merged by
        # attention_merge_kernel).
        tl.store(o_partial + (o_row * NUM_SPLITS + i_split)[:, None] * DV + o_dv[None, :],
                 b_acc, mask=m_r[:, None] & m_dv[None, :])
        tl.store(ml_partial + (o_row * NUM_SPLITS + i_split) * 2, b_m, mask=m_r)
        tl.store(ml_partial + (o_row * NUM_SPLITS + i_split) * 2 + 1, b_l, mask=m_r)


@triton.jit
def attention_merge_kernel(
    o_partial, ml_partial, gate, o,
    stride_gt, stride_gh,
    HQ, DV,
    NUM_SPLITS: tl.constexpr,
    BS: tl.constexpr,
    BDV: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    i_t, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_row = i_t * HQ + i_h
    o_s = tl.arange(0, BS)
    m_s = o_s < NUM_SPLITS
    o_dv = tl.arange(0, BDV)
    m_dv = o_dv < DV
    b_m = tl.load(ml_partial + (i_row * NUM_SPLITS + o_s) * 2, mask=m_s, other=-1e30)
    b_l = tl.load(ml_partial + (i_row * NUM_SPLITS + o_s) * 2 + 1, mask=m_s, other=0.)
    b_acc = tl.load(o_partial + (i_row * NUM_SPLITS + o_s)[:, None] * DV + o_dv[None, :],
                    mask=m_s[:, None] & m_dv[None, :], other=0.)
    # Splits that saw no key carry m = -1e30 and l = 0: their weight is exactly 0.
    b_w = tl.exp2(b_m - tl.max(b_m, axis=0))
    b_o = tl.sum(b_acc * b_w[:, None], axis=0) / tl.sum(b_l * b_w, axis=0)
    dtype = o.dtype.element_ty
    if HAS_GATE:
        b_g = tl.load(gate + i_t * stride_gt + i_h * stride_gh + o_dv, mask=m_dv, other=0.).to(tl.float32)
        b_o = b_o.to(dtype).to(tl.float32) * tl.sigmoid(b_g).to(dtype).to(tl.float32)
    tl.store(o + i_row * DV + o_dv, b_o.to(dtype), mask=m_dv)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _attention_config(Tq: int, Tk: int, N: int, Hkv: int, G: int, D: int, device: torch.device):
    """(BM, BN, num_splits, num_warps, num_stages).

    The mean number of queries per sequence tells decode (about 1) from prefill; the sequence
    lengths themselves stay on the device. Decode splits the keys until there are about two
    programs per SM, each split still streaming at least 128 keys on average.
    """
    BN = 64 if D <= 128 else 32
    if Tq <= N:
        BM = max(16, triton.next_power_of_2(G))
        num_splits = min(triton.cdiv(2 * _num_sms(device), N * Hkv), max(1, Tk // N // 128), 64)
        return BM, BN, num_splits, 4, 3
    return 64, BN, 1, 4 if D <= 128 else 8, 3 if D <= 128 else 2


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
              cu_seqlens_k: torch.Tensor, *, scale: float, gate: torch.Tensor | None = None,
              num_splits: int | None = None) -> torch.Tensor:
    """Causal GQA attention over packed sequences, bottom-right aligned, optionally gated.

    Sequence n has queries cu_seqlens_q[n]:cu_seqlens_q[n+1] (Lq_n) and keys
    cu_seqlens_k[n]:cu_seqlens_k[n+1] (Lk_n >= Lq_n, not checked: that would cost a host sync);
    query i sits at position Lk_n - Lq_n + i. Example, a prefill of 5 tokens packed with a
    decode step over 9 cached tokens: cu_seqlens_q = [0, 5, 6], cu_seqlens_k = [0, 5, 15].

    Args:
        q: [Tq, Hq, D]; k: [Tk, Hkv, D]; v: [Tk, Hkv, Dv]; fp32/bf16/fp16, one dtype.
        cu_seqlens_q, cu_seqlens_k: [N+1] int32 (or int64), from 0 to Tq and Tk.
        scale: softmax scale.
        gate: [Tq, Hq, Dv] or None: o * sigmoid(gate).
        num_splits: key splits per tile, merged by a second kernel; None picks 1 for prefill and
            enough for decode to keep the GPU busy.

    Returns:
        o [Tq, Hq, Dv] in q.dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"attention: expected q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] != q.shape[2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q {q.dtype}, k {k.dtype}, v {v.dtype} must share a dtype")
    Tq, Hq, D = q.shape
    Tk, Hkv, Dv = v.shape
    if Hq % Hkv:
        raise ValueError(f"attention: Hq={Hq} is not a multiple of Hkv={Hkv}")
    if gate is not None and tuple(gate.shape) != (Tq, Hq, Dv):
        raise ValueError(f"attention: gate {tuple(gate.shape)} must be [Tq, Hq, Dv] = {(Tq, Hq, Dv)}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 2:
        raise ValueError(f"attention: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must both be [N+1], N >= 1")
    return _attention(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, None, scale, num_splits, Tk)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens_k: torch.Tensor, *, scale: float,
                    gate: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """`attention` with keys and values read from paged caches through each sequence's block table.

    Sequence n has queries cu_seqlens_q[n]:cu_seqlens_q[n+1] (Lq_n) and seq_lens_k[n] = Lk_n >= Lq_n
    keys, its new ones included (already written by `reshape_and_cache`); its queries are the
    last Lq_n positions. Key p of sequence n is row p % block_size of block
    block_tables[n, p // block_size]; table entries past cdiv(Lk_n, block_size) are never read.
    Nothing is checked against the data (that would cost host syncs): Lk_n within the table and
    block ids within the cache are the caller's contract; the torch reference checks them.

    Args:
        q: [Tq, Hq, D]; gate: [Tq, Hq, D] or None.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D], unit stride along D; block_size a power
            of two >= 16 (64 in nextserve).
        block_tables: [N, max_blocks] int32; cu_seqlens_q: [N+1] int32; seq_lens_k: [N] int32.
        num_splits: as in `attention`; None sizes decode splits from N * max_blocks * block_size,
            a static bound (the same launch for every step of a batch shape).

    Returns:
        o [Tq, Hq, D] in q.dtype.
    """
    N = check_paged_attention_args(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, gate)
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"paged_attention: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype} "
                         f"must share a dtype")
    block_size = k_cache.shape[1]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"paged_attention: block_size {block_size} (k_cache {tuple(k_cache.shape)}) must be a "
                         f"power of two >= 16")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("paged_attention: k_cache and v_cache need unit stride along D, block_tables along its rows")
    return _attention(q, k_cache, v_cache, gate, cu_seqlens_q, seq_lens_k, block_tables, scale, num_splits,
                      N * block_tables.shape[1] * block_size)


def _attention(q, k, v, gate, cu_seqlens_q, lens_k, block_tables, scale, num_splits, Tk):
    """Launch for both layouts. Packed: k, v [Tk, Hkv, D] and lens_k = cu_seqlens_k [N+1]. Paged
    (block_tables given): k, v [num_blocks, block_size, Hkv, D] and lens_k = seq_lens_k [N]; Tk
    is then an upper bound on the keys, used only to size decode splits."""
    paged = block_tables is not None
    Tq, Hq, D = q.shape
    Hkv, Dv = v.shape[-2:]
    N, G = cu_seqlens_q.numel() - 1, Hq // Hkv
    o = torch.empty(Tq, Hq, Dv, dtype=q.dtype, device=q.device)
    if Tq == 0:
        return o
    q, gate = _heads(q), _heads(gate) if gate is not None else None
    if not paged:
        k, v = _heads(k), _heads(v)

    BM, BN, auto_splits, num_warps, num_stages = _attention_config(Tq, Tk, N, Hkv, G, D, q.device)
    num_splits = num_splits or auto_splits
    if G > BM:
        BM = triton.next_power_of_2(G)
    block_size = k.shape[1] if paged else 1
    if paged:
        BN = min(BN, block_size)   # a key tile never straddles two blocks
    BQ = BM // G
    # Tiles of sequence n: cdiv(Lq_n, BQ); their prefix sums locate each program's sequence.
    lq = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    tile_offsets = torch.zeros(N + 1, dtype=torch.int32, device=q.device)
    tile_offsets[1:] = torch.cumsum(torch.div(lq + BQ - 1, BQ, rounding_mode="floor"), 0)
    max_tiles = triton.cdiv(Tq, BQ) + N   # sum_n cdiv(Lq_n, BQ) never exceeds this

    if num_splits > 1:
        o_partial = torch.empty(Tq * Hq * num_splits, Dv, dtype=torch.float32, device=q.device)
        ml_partial = torch.empty(Tq * Hq * num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        o_partial = ml_partial = None
    # [.., token, head, dim] strides of either layout; block strides only when paged
    attention_kernel[(max_tiles, Hkv, num_splits)](
        q, k, v, gate, o, o_partial, ml_partial,
        cu_seqlens_q, lens_k, tile_offsets, block_tables,
        q.stride(0), q.stride(1), k.stride(-3), k.stride(-2), v.stride(-3), v.stride(-2),
        gate.stride(0) if gate is not None else 0, gate.stride(1) if gate is not None else 0,
        k.stride(0) if paged else 0, v.stride(0) if paged else 0, block_tables.stride(0) if paged else 0,
        N, Hq, D, Dv, scale * math.log2(math.e),
        PAGED=paged, BLOCK_SIZE=block_size,
        G=G, BQ=BQ, BM=BM, BN=BN,
        BD=max(16, triton.next_power_of_2(D)), BDV=max(16, triton.next_power_of_2(Dv)),
        NUM_SPLITS=num_splits, HAS_GATE=gate is not None,
        UPCAST=_interpreted(), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        attention_merge_kernel[(Tq, Hq)](
            o_partial, ml_partial, gate, o,
            gate.stride(0) if gate is not None else 0, gate.stride(1) if gate is not None else 0,
            Hq, Dv,
            NUM_SPLITS=num_splits, BS=max(2, triton.next_power_of_2(num_splits)),
            BDV=triton.next_power_of_2(Dv), HAS_GATE=gate is not None,
        )
    return o


# --- paged KV cache: the slot-mapping scatter --------------------------------------------------

@triton.jit
def reshape_and_cache_kernel(
    k, v, k_cache, v_cache, slot_mapping,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    HKV, D, num_slots,
    BLOCK_SIZE: tl.constexpr,
    BD: tl.constexpr,
):
    i_t, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_slot = tl.load(slot_mapping + i_t).to(tl.int64)
    # negative: padding; past the cache: an engine bug, and a store there would corrupt memory
    if (i_slot < 0) | (i_slot >= num_slots):
        return
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_c = (i_slot // BLOCK_SIZE) * stride_cb + (i_slot % BLOCK_SIZE) * stride_cs + i_h * stride_ch + o_d
    b_k = tl.load(k + i_t * stride_kt + i_h * stride_kh + o_d, mask=m_d)
    b_v = tl.load(v + i_t * stride_vt + i_h * stride_vh + o_d, mask=m_d)
    tl.store(k_cache + o_c, b_k.to(k_cache.dtype.element_ty), mask=m_d)
    tl.store(v_cache + o_c, b_v.to(v_cache.dtype.element_ty), mask=m_d)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Write new keys and values into the paged caches, in place: token t goes to slot
    slot_mapping[t] (block slot // block_size, offset slot % block_size); a negative slot is
    padding. One program per (token, KV head) row. Slots past the cache are skipped rather than
    reported (reporting would cost a host sync; the torch reference raises).

    Args:
        k, v: [T, Hkv, D] (any strides with unit stride along D).
        k_cache, v_cache: [num_blocks, block_size, Hkv, D], contiguous along D, same strides.
        slot_mapping: [T] int64 (or int32).
    """
    check_cache_args(k, v, k_cache, v_cache, slot_mapping)
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(f"reshape_and_cache: k_cache strides {k_cache.stride()} and v_cache strides "
                         f"{v_cache.stride()} must be equal, with unit stride along D")
    T, Hkv, D = k.shape
    if T == 0:
        return
    k, v = _heads(k), _heads(v)
    num_blocks, block_size = k_cache.shape[:2]
    reshape_and_cache_kernel[(T, Hkv)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        Hkv, D, num_blocks * block_size,
        BLOCK_SIZE=block_size, BD=triton.next_power_of_2(D),
    )
