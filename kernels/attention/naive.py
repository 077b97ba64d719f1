"""Torch references for the gated attention layer: q/k norm with partial RoPE, and varlen attention.

`qk_norm_rope` follows transformers' Qwen3NextRMSNorm, Qwen3NextRotaryEmbedding and
apply_rotary_pos_emb op for op, so in fp32 it agrees with them bit for bit. `attention` loops over
the packed sequences and computes softmax(q k^T * scale) v in fp32.
"""
from __future__ import annotations

import torch

from ..norms.naive import rms_norm


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """[rotary_dim // 2] fp32 inverse frequencies, computed on the CPU exactly as transformers does."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin: [T, rotary_dim] in `dtype` for positions [T]; angles in fp32, both halves repeated (NeoX)."""
    inv_freq = rope_inv_freq(rotary_dim, theta).to(positions.device)
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                 positions: torch.Tensor, *, rotary_dim: int, theta: float, eps: float):
    """Zero-centred RMSNorm of q and k over each head's D dims, then NeoX RoPE on the first rotary_dim dims.

    The rotation runs in q.dtype with cos/sin cast to q.dtype, as transformers does it; the last
    D - rotary_dim dims pass through normalised but unrotated.

    Args:
        q: [T, Hq, D]; k: [T, Hkv, D].
        q_norm_weight, k_norm_weight: [D] (zero-centred: the scale is 1 + w).
        positions: [T] int absolute positions.
        rotary_dim: even, <= D (64 of 256 in Qwen3-Next).
        theta: RoPE base (1e7 in Qwen3-Next).

    Returns:
        (q [T, Hq, D], k [T, Hkv, D]) in the input dtypes.
    """
    _check_qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, rotary_dim)
    q = rms_norm(q, q_norm_weight, eps)
    k = rms_norm(k, k_norm_weight, eps)
    cos, sin = rope_cos_sin(positions, rotary_dim, theta, q.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x):
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)

    return rotate(q), rotate(k)


def _check_qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, rotary_dim):
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"qk_norm_rope: expected q [T, Hq, D] and k [T, Hkv, D], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    D = q.shape[2]
    if tuple(q_norm_weight.shape) != (D,) or tuple(k_norm_weight.shape) != (D,):
        raise ValueError(f"qk_norm_rope: q_norm_weight {tuple(q_norm_weight.shape)} and k_norm_weight "
                         f"{tuple(k_norm_weight.shape)} must be [D={D}]")
    if tuple(positions.shape) != (q.shape[0],):
        raise ValueError(f"qk_norm_rope: positions {tuple(positions.shape)} must be [T={q.shape[0]}]")
    if rotary_dim % 2 or not 0 < rotary_dim <= D:
        raise ValueError(f"qk_norm_rope: rotary_dim={rotary_dim} must be even and in (0, D={D}]")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
              cu_seqlens_k: torch.Tensor, *, scale: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention over packed sequences, bottom-right aligned, optionally gated.

    Sequence n owns queries cu_seqlens_q[n]:cu_seqlens_q[n+1] (Lq_n of them) and keys
    cu_seqlens_k[n]:cu_seqlens_k[n+1] (Lk_n >= Lq_n); query i sits at position Lk_n - Lq_n + i and
    sees keys 0..Lk_n - Lq_n + i. Query head h reads KV head h // (Hq // Hkv).
    Scores, softmax and the weighted sum run in fp32; the result is cast to q.dtype and then,
    as transformers does, multiplied by sigmoid(gate) in that dtype.

    Args:
        q: [Tq, Hq, D]; k: [Tk, Hkv, D]; v: [Tk, Hkv, Dv].
        cu_seqlens_q, cu_seqlens_k: [N+1] int, starting at 0, ending at Tq and Tk.
        scale: softmax scale (D ** -0.5 in Qwen3-Next).
        gate: [Tq, Hq, Dv] or None.

    Returns:
        o [Tq, Hq, Dv] in q.dtype.
    """
    cu_q, cu_k = check_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, gate)
    Hq, Hkv = q.shape[1], k.shape[1]
    o = q.new_empty(q.shape[0], Hq, v.shape[2])
    for n in range(len(cu_q) - 1):
        bos_q, eos_q, bos_k, eos_k = cu_q[n], cu_q[n + 1], cu_k[n], cu_k[n + 1]
        Lq, Lk = eos_q - bos_q, eos_k - bos_k
        if Lq == 0:
            continue
        b_q = q[bos_q:eos_q].float().transpose(0, 1)                                        # [Hq, Lq, D]
        b_k = k[bos_k:eos_k].float().transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)    # [Hq, Lk, D]
        b_v = v[bos_k:eos_k].float().transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)    # [Hq, Lk, Dv]
        b_s = torch.matmul(b_q, b_k.transpose(1, 2)) * scale
        i_q = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
        i_k = torch.arange(Lk, device=q.device)[None, :]
        b_s = b_s.masked_fill(i_k > i_q, float("-inf"))
        b_o = torch.matmul(torch.softmax(b_s, dim=-1), b_v)
        o[bos_q:eos_q] = b_o.transpose(0, 1).to(q.dtype)
    if gate is not None:
        o = o * torch.sigmoid(gate)
    return o


def check_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, gate):
    """Validate shapes; returns cu_seqlens_q and cu_seqlens_k as Python lists (one host sync)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"attention: expected q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] != q.shape[2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if gate is not None and tuple(gate.shape) != (q.shape[0], q.shape[1], v.shape[2]):
        raise ValueError(f"attention: gate {tuple(gate.shape)} must be [Tq, Hq, Dv] = "
                         f"{(q.shape[0], q.shape[1], v.shape[2])}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.numel() < 2:
        raise ValueError(f"attention: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must both be [N+1], N >= 1")
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if cu_q[0] != 0 or cu_k[0] != 0 or cu_q[-1] != q.shape[0] or cu_k[-1] != k.shape[0]:
        raise ValueError(f"attention: cu_seqlens_q {cu_q} / cu_seqlens_k {cu_k} must run from 0 to "
                         f"Tq={q.shape[0]} / Tk={k.shape[0]}")
    for n in range(len(cu_q) - 1):
        Lq, Lk = cu_q[n + 1] - cu_q[n], cu_k[n + 1] - cu_k[n]
        if Lq < 0 or Lk < Lq:
            raise ValueError(f"attention: sequence {n} has Lq={Lq}, Lk={Lk}; need 0 <= Lq <= Lk")
    return cu_q, cu_k


# --- paged KV cache -------------------------------------------------------------------------
# A cache is [num_blocks, block_size, Hkv, D]: token p of a sequence lives in block
# block_tables[n, p // block_size] at offset p % block_size, i.e. at slot
# block_id * block_size + offset of the cache seen as [num_blocks * block_size, Hkv, D].

def check_cache_args(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Shapes of `reshape_and_cache` (no host sync). Raises ValueError naming the bad tensor."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"reshape_and_cache: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [T, Hkv, D]")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != tuple(k.shape[1:]):
        raise ValueError(f"reshape_and_cache: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                         f"must both be [num_blocks, block_size, Hkv, D] with (Hkv, D) = {tuple(k.shape[1:])}")
    if slot_mapping.dim() != 1 or slot_mapping.numel() != k.shape[0]:
        raise ValueError(f"reshape_and_cache: slot_mapping {tuple(slot_mapping.shape)} must be [T] = ({k.shape[0]},)")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"reshape_and_cache: slot_mapping must be int32 or int64, got {slot_mapping.dtype}")


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Write new keys and values into the paged caches, in place: token t goes to slot slot_mapping[t]
    (block slot // block_size, offset slot % block_size); a negative slot is padding, not written.

    Args:
        k, v: [T, Hkv, D].
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] (values are cast to the cache dtype).
        slot_mapping: [T] int64 (or int32).
    """
    check_cache_args(k, v, k_cache, v_cache, slot_mapping)
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if slots.numel() and int(slots.max()) >= num_blocks * block_size:
        raise ValueError(f"reshape_and_cache: slot {int(slots.max())} is outside the cache's "
                         f"{num_blocks} x {block_size} slots")
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def check_paged_attention_args(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, gate) -> int:
    """Shapes of `paged_attention` (no host sync); returns N. Raises ValueError naming the bad tensor."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_attention: expected q [Tq, Hq, D] and k_cache, v_cache [num_blocks, block_size, "
                         f"Hkv, D], got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree on D")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_attention: Hq={q.shape[1]} is not a multiple of Hkv={k_cache.shape[2]}")
    if gate is not None and gate.shape != q.shape:
        raise ValueError(f"paged_attention: gate {tuple(gate.shape)} must be [Tq, Hq, D] = {tuple(q.shape)}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 2:
        raise ValueError(f"paged_attention: cu_seqlens_q {tuple(cu_seqlens_q.shape)} must be [N+1], N >= 1")
    N = cu_seqlens_q.numel() - 1
    if tuple(seq_lens_k.shape) != (N,):
        raise ValueError(f"paged_attention: seq_lens_k {tuple(seq_lens_k.shape)} must be [N] = ({N},)")
    if block_tables.dim() != 2 or block_tables.shape[0] != N:
        raise ValueError(f"paged_attention: block_tables {tuple(block_tables.shape)} must be [N={N}, max_blocks]")
    for name, t in (("block_tables", block_tables), ("cu_seqlens_q", cu_seqlens_q), ("seq_lens_k", seq_lens_k)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"paged_attention: {name} must be int32 or int64, got {t.dtype}")
    return N


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens_k: torch.Tensor, *, scale: float,
                    gate: torch.Tensor | None = None) -> torch.Tensor:
    """`attention` with keys and values read from paged caches through each sequence's block table.

    Sequence n has queries cu_seqlens_q[n]:cu_seqlens_q[n+1] (Lq_n) and seq_lens_k[n] = Lk_n >= Lq_n
    keys, its new ones included (already written by `reshape_and_cache`); its queries are the last
    Lq_n positions. The reference gathers the sequences' keys through the block tables in one
    index and runs `attention` on them; entries of block_tables past cdiv(Lk_n, block_size) are
    never read.

    Args:
        q: [Tq, Hq, D]; gate: [Tq, Hq, D] or None.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D].
        block_tables: [N, max_blocks] int32; cu_seqlens_q: [N+1] int32; seq_lens_k: [N] int32.

    Returns:
        o [Tq, Hq, D] in q.dtype.
    """
    N = check_paged_attention_args(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, gate)
    num_blocks, block_size = k_cache.shape[:2]
    lengths = seq_lens_k.long()
    lk = lengths.tolist()
    max_blocks = block_tables.shape[1]
    for n, L in enumerate(lk):
        if not 0 <= L <= max_blocks * block_size:
            raise ValueError(f"paged_attention: sequence {n} has {L} keys; its block table row holds at most "
                             f"{max_blocks} x {block_size}")
    # position p of sequence n -> slot block_tables[n, p // block_size] * block_size + p % block_size
    seq = torch.repeat_interleave(torch.arange(N, device=q.device), lengths.to(q.device))
    cu_k = torch.zeros(N + 1, dtype=torch.int64, device=q.device)
    cu_k[1:] = lengths.to(q.device).cumsum(0)
    pos = torch.arange(int(cu_k[-1]), device=q.device) - cu_k[seq]
    blocks = block_tables.to(q.device).long()[seq, pos // block_size]
    if blocks.numel() and not bool(((blocks >= 0) & (blocks < num_blocks)).all()):
        raise ValueError(f"paged_attention: block_tables name blocks outside the cache's [0, {num_blocks})")
    slots = blocks * block_size + pos % block_size
    k = k_cache.flatten(0, 1)[slots]
    v = v_cache.flatten(0, 1)[slots]
    return attention(q, k, v, cu_seqlens_q, cu_k, scale=scale, gate=gate)
