"""The CPU path of the gated attention layer: naive.py's numerics in fewer ops and no host sync.

- `qk_norm_rope`: one C++ op (cpu_fused.py) where built: naive.py's products and roundings, its sums
  of squares in another order and cos and sin from the C library, so it agrees with naive.py to
  the tolerance of an fp32 sum over D, rounded to the activation dtype. Otherwise each norm as one
  F.rms_norm (as kernels/norms/cpu.py) and q and k rotated together: rotate_half(x) * sin is
  computed as roll(x) * (sin with its first half negated), the same products since negation is
  exact, so bit for bit naive.py's result.
- `paged_attention` for a few queries per sequence (decode, speculative verification): each query
  reads its sequence's whole block-table row through one gather, keys past its position masked,
  instead of naive.py's per-sequence loop around lengths read on the host. Scores, softmax and the
  weighted sum run in fp32 as in naive.py; the softmax then sums over a longer row with zeros in
  it, so results agree with naive.py to fp32 rounding, not to the bit. Longer query runs
  (prefill) are naive.py's.
- `reshape_and_cache`: one index_copy_ per cache; padding slots are redirected so that nothing
  needs their count on the host (see the function).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cpu_extensions import needs_backward
from . import cpu_fused, naive
from .naive import check_cache_args, check_paged_attention_args

__all__ = ["qk_norm_rope", "attention", "paged_attention", "reshape_and_cache"]

attention = naive.attention

# Queries per sequence up to which paged_attention gathers per query: a decode step has 1, a
# speculative verification step 1 + its drafts (at most 4). Each query gathers its sequence's
# keys, where naive.py gathers them once per sequence but copies them once per query head
# (repeat_interleave over Hq / Hkv, 4 in the small preset, 8 in 80B-A3B): up to that many queries
# the per-query gather holds no more keys than the reference does; past 8 it would hold more.
PER_QUERY_MAX_QUERIES = 8

_inv_freq: dict[tuple, torch.Tensor] = {}


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # .float() on an fp32 tensor is still a dispatched op; at decode sizes each one counts
    return x if x.dtype == torch.float32 else x.float()


def _rope_inv_freq(rotary_dim: int, theta: float, device) -> torch.Tensor:
    """naive.rope_inv_freq's [rotary_dim / 2] fp32 values, computed once per shape and device."""
    key = (rotary_dim, theta, device)
    if key not in _inv_freq:
        with torch.inference_mode(False):  # cached across calls, inside and outside inference mode
            _inv_freq[key] = naive.rope_inv_freq(rotary_dim, theta).to(device)
    return _inv_freq[key]


def _rope_tables(positions, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin-with-its-first-half-negated, [T, 1, rotary_dim] in `dtype`: naive.rope_cos_sin's
    values (cos is even and sin odd, so the angles (-f, f) give cos(f), cos(f) and -sin(f), sin(f))."""
    freqs = positions.float().view(-1, 1, 1) * _rope_inv_freq(rotary_dim, theta, positions.device)  # [T, 1, r / 2]
    angles = torch.cat((-freqs, freqs), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))


def qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, *, rotary_dim: int, theta: float, eps: float):
    """naive.qk_norm_rope: returns (q [T, Hq, D], k [T, Hkv, D]), views of one tensor."""
    naive._check_qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, rotary_dim)
    if q.dtype != k.dtype:
        return naive.qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, rotary_dim=rotary_dim,
                                  theta=theta, eps=eps)
    if (q.dtype in (torch.float32, torch.bfloat16) and not needs_backward(q, k, q_norm_weight, k_norm_weight)
            and cpu_fused.available()):
        return cpu_fused.qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions,
                                      _rope_inv_freq(rotary_dim, theta, q.device), eps=eps)
    Hq, D = q.shape[1], q.shape[2]
    # both norms in fp32 (as naive.py computes them), cast once: [T, Hq + Hkv, D]
    normed = [F.rms_norm(_fp32(x), (D,), 1.0 + _fp32(w), eps) for x, w in ((q, q_norm_weight), (k, k_norm_weight))]
    qk = torch.cat(normed, dim=1)
    qk = qk if qk.dtype == q.dtype else qk.to(q.dtype)
    cos, sin = _rope_tables(positions, rotary_dim, theta, qk.dtype)
    # rotate the first rotary_dim dims in place (qk is this function's own tensor): rotate_half(x) * sin
    # is roll(x) * sin with its first half negated, the same products since negation is exact
    x_rot = qk[..., :rotary_dim]
    x_rot.copy_(x_rot * cos + x_rot.roll(rotary_dim // 2, dims=-1) * sin)
    return qk.split([Hq, qk.shape[1] - Hq], dim=1)


def _fused_takes(q, gate, k_cache, v_cache) -> bool:
    """Whether cpu_fused.py's attention op runs this call: no gradient wanted, caches in q's dtype and
    contiguous, the op built."""
    return (not needs_backward(q, gate, k_cache, v_cache) and k_cache.dtype == v_cache.dtype == q.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous() and cpu_fused.available())


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, *, scale: float, gate=None):
    """ops.paged_attention (naive.paged_attention's contract). Block-table entries are not
    range-checked on this path (a host sync); entries past a sequence's blocks may hold anything."""
    N = check_paged_attention_args(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, gate)
    Tq, Hq, D = q.shape
    if _fused_takes(q, gate, k_cache, v_cache):
        return cpu_fused.paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale=scale,
                                         gate=gate)
    if Tq > PER_QUERY_MAX_QUERIES * N or Tq == 0:
        return naive.paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k,
                                     scale=scale, gate=gate)
    num_blocks, block_size, Hkv = k_cache.shape[:3]
    group, device = Hq // Hkv, q.device
    keys = block_tables.shape[1] * block_size

    # query t belongs to sequence n = seq[t] and sits at position Lk_n - (cu[n + 1] - t)
    t = torch.arange(Tq, device=device)
    cu = cu_seqlens_q.to(device=device, dtype=torch.int64)
    seq = torch.searchsorted(cu[1:], t, right=True)
    position = seq_lens_k.to(device=device, dtype=torch.int64)[seq] - (cu[seq + 1] - t)
    hidden = torch.arange(keys, device=device) > position.view(Tq, 1)                   # [Tq, keys]

    # every slot of the query's block-table row; entries past its blocks are clamped to a real
    # block, read and masked out. The caches are gathered as rows of D values in head-major order,
    # so K and V arrive as contiguous [Tq, Hkv, keys, D]: the products below take K transposed as a
    # view, and neither needs a permuted copy (which cost more than the gather itself).
    tables = block_tables.to(device=device, dtype=torch.int64).index_select(0, seq).clamp_(0, num_blocks - 1)
    slots = (tables[:, :, None] * block_size + torch.arange(block_size, device=device)).view(Tq, keys)
    # Keys a query may not see may be unwritten (NaN, and 0 * NaN is NaN): they read the query's own
    # slot instead, written before attention runs, so every gathered value is finite and their zero
    # softmax weights contribute exact zeros (masking the gathered V instead cost more than the gather).
    slots = torch.where(hidden, slots.gather(1, position.view(Tq, 1)), slots)
    rows = (slots.view(Tq, 1, keys) * Hkv + torch.arange(Hkv, device=device).view(1, Hkv, 1)).view(-1)
    k = k_cache.reshape(-1, D).index_select(0, rows).view(Tq, Hkv, keys, D)
    v = v_cache.reshape(-1, D).index_select(0, rows).view(Tq, Hkv, keys, D)

    scores = q.float().reshape(Tq, Hkv, group, D) @ k.float().transpose(-1, -2)         # [Tq, Hkv, group, keys]
    scores = (scores * scale).masked_fill(hidden.view(Tq, 1, 1, keys), float("-inf"))
    o = (torch.softmax(scores, dim=-1) @ v.float()).view(Tq, Hq, D)
    o = o if o.dtype == q.dtype else o.to(q.dtype)
    return o if gate is None else o * torch.sigmoid(gate)


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """naive.reshape_and_cache: token t's K/V into slot slot_mapping[t]; negative slots are padding.

    Skipping the padding would need its count on the host. Instead each padding token writes what
    the first real token writes, to the same slot: a duplicate index with the same row, harmless
    whichever write lands last. When every token is padding, they rewrite slot 0 with its own row.
    Slots past the cache raise torch's index error (naive.py's ValueError would need a host sync).
    """
    check_cache_args(k, v, k_cache, v_cache, slot_mapping)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):  # the flat views below must alias the caches
        return naive.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    if not needs_backward(k, v) and cpu_fused.available():
        return cpu_fused.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    real = slot_mapping >= 0
    # [1]-shaped indices throughout: indexing with a 0-dim tensor would read it on the host
    first = real.to(torch.uint8).argmax(dim=0, keepdim=True)   # the first real token (0 when there is none)
    stand_in = slot_mapping.index_select(0, first).clamp(min=0)
    slots = torch.where(real, slot_mapping, stand_in)
    slots = slots if slots.dtype == torch.int64 else slots.long()  # index_copy_ takes int64 only
    any_real, real = real.index_select(0, first).view(1, 1, 1), real.view(-1, 1, 1)
    for src, cache in ((k, k_cache), (v, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])
        src = src if src.dtype == cache.dtype else src.to(cache.dtype)
        fill = torch.where(any_real, src.index_select(0, first), flat.index_select(0, stand_in))
        flat.index_copy_(0, slots, torch.where(real, src, fill))
