"""Triton MoE: router top-k, the token permutation by expert, and the grouped expert GEMMs.

expert_ffn runs in four launches, in the manner of vLLM's fused_moe:
  1. moe_align_block_size: the T*k token slots (slot s = token s // k, choice s % k) are sorted
     by local expert, each expert's group padded to a multiple of BM; every BM-row block then
     belongs to one expert (`block_expert`, -1 for blocks past the end).
  2. moe_gate_up_kernel: per block, h = silu(x W_gate^T) * (x W_up^T), the SwiGLU fused in the
     epilogue so the [.., 2I] gate/up product never reaches memory; h is written per slot.
  3. moe_down_kernel: per block, y = h W_down^T times the slot's routing weight, written per slot.
  4. moe_sum_kernel: out[t] = sum over the k slots of token t whose expert is local. A fixed order,
     no atomics: the result is deterministic.
Nothing needs the host: every grid is sized from static upper bounds, so the launch sequence has
no device-to-host sync (a decode step can be captured in a CUDA graph).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import check_expert_ffn_args


def _interpreted() -> bool:
    # The interpreter keeps bf16 as raw 16-bit integers and tl.dot multiplies those bits as
    # integers, so interpreted kernels upcast dot operands to fp32 first; compiled kernels feed
    # bf16 straight to the tensor cores.
    return bool(triton.knobs.runtime.interpret)


# --- routing ----------------------------------------------------------------------------------

@triton.jit
def moe_route_kernel(
    logits, weights, ids,
    stride_l, E,
    TOPK: tl.constexpr,
    BE: tl.constexpr,
    BTOPK: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_l = tl.load(logits + i_t * stride_l + o_e, mask=m_e, other=float("-inf")).to(tl.float32)
    b_p = tl.exp(b_l - tl.max(b_l, axis=0))
    b_p = b_p / tl.sum(b_p, axis=0)
    # Padding lanes sit below every probability (even one that underflowed to 0), so the
    # arg-max never picks them.
    b_p = tl.where(m_e, b_p, -1.)
    o_k = tl.arange(0, BTOPK)
    b_w = tl.zeros([BTOPK], dtype=tl.float32)
    b_i = tl.zeros([BTOPK], dtype=tl.int32)
    # k arg-max passes over at most 512 values beat a sort for k <= ~16.
    for j in tl.static_range(TOPK):
        i_max = tl.argmax(b_p, axis=0)
        b_w = tl.where(o_k == j, tl.max(b_p, axis=0), b_w)
        b_i = tl.where(o_k == j, i_max, b_i)
        b_p = tl.where(o_e == i_max, -2., b_p)
    if RENORMALIZE:
        b_w = b_w / tl.sum(b_w, axis=0)
    m_k = o_k < TOPK
    tl.store(weights + i_t * TOPK + o_k, b_w, mask=m_k)
    tl.store(ids + i_t * TOPK + o_k, b_i.to(tl.int64), mask=m_k)


def moe_route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True):
    """Softmax over all E experts in fp32, top-k, optional renormalisation; one program per token.

    Args:
        router_logits: [T, E], any float dtype, E <= 4096 (Qwen3-Next: 512).
        top_k: 0 < top_k <= min(E, 32) (Qwen3-Next: 10).

    Returns:
        (weights [T, top_k] fp32, expert_ids [T, top_k] int64), in descending weight order.
    """
    if router_logits.dim() != 2 or not 0 < top_k <= router_logits.shape[1]:
        raise ValueError(f"moe_route: router_logits {tuple(router_logits.shape)} must be [T, E] with "
                         f"0 < top_k={top_k} <= E")
    T, E = router_logits.shape
    if E > 4096 or top_k > 32:
        raise ValueError(f"moe_route: E={E} > 4096 or top_k={top_k} > 32 does not fit one program per token")
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=router_logits.device)
    if T:
        moe_route_kernel[(T,)](
            router_logits, weights, ids, router_logits.stride(0), E,
            TOPK=top_k, BE=triton.next_power_of_2(E), BTOPK=triton.next_power_of_2(top_k),
            RENORMALIZE=renormalize,
        )
    return weights, ids


# --- permutation ------------------------------------------------------------------------------

@triton.jit
def moe_count_kernel(expert_ids, counts, N_SLOTS, BS: tl.constexpr):
    # One program per expert scans all slots: E * T * k compares, a few microseconds even for
    # 512 experts and a 4k-token prefill, and no cross-program communication.
    i_e = tl.program_id(0)
    b_c = tl.zeros([BS], dtype=tl.int32)
    for i_s in range(0, N_SLOTS, BS):
        o_s = i_s + tl.arange(0, BS)
        b_id = tl.load(expert_ids + o_s, mask=o_s < N_SLOTS, other=-1)
        b_c += (b_id == i_e).to(tl.int32)
    tl.store(counts + i_e, tl.sum(b_c, axis=0))


@triton.jit
def moe_place_kernel(
    expert_ids, counts, sorted_slots, block_expert,
    N_SLOTS, E,
    BM: tl.constexpr,
    BS: tl.constexpr,
    BE: tl.constexpr,
):
    i_e = tl.program_id(0)
    o_e = tl.arange(0, BE)
    b_n = tl.load(counts + o_e, mask=o_e < E, other=0)
    b_padded = (b_n + BM - 1) // BM * BM
    # Expert i_e's group starts after the padded groups of all lower experts.
    i_start = tl.sum(tl.where(o_e < i_e, b_padded, 0), axis=0)
    n_e = tl.sum(tl.where(o_e == i_e, b_n, 0), axis=0)
    n_padded = (n_e + BM - 1) // BM * BM
    # Slots keep their original order inside the group (a stable sort).
    i_pos = i_start
    for i_s in range(0, N_SLOTS, BS):
        o_s = i_s + tl.arange(0, BS)
        b_hit = tl.load(expert_ids + o_s, mask=o_s < N_SLOTS, other=-1) == i_e
        b_rank = tl.cumsum(b_hit.to(tl.int32), axis=0) - 1
        tl.store(sorted_slots + i_pos + b_rank, o_s.to(tl.int32), mask=b_hit)
        i_pos += tl.sum(b_hit.to(tl.int32), axis=0)
    # Padding rows point one past the last slot, which every consumer masks out.
    o_m = tl.arange(0, BM)
    tl.store(sorted_slots + i_start + n_e + o_m, N_SLOTS, mask=n_e + o_m < n_padded)
    for i_b in range(0, n_padded // BM, BS):
        o_b = i_b + tl.arange(0, BS)
        tl.store(block_expert + i_start // BM + o_b, i_e, mask=o_b < n_padded // BM)


def moe_align_block_size(expert_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort the token slots by expert and pad each expert's group to a multiple of block_m.

    Args:
        expert_ids: [T, k] int, local expert ids; ids outside [0, num_experts) (-1: held by
            another shard) are left out.
        num_experts: E_local, any positive number (not necessarily a power of two).
        block_m: the row-block size of the grouped GEMM, a power of two.

    Returns:
        sorted_slots: [T*k + E*(block_m-1)] int32. Expert 0's slots (s = t*k + j, increasing),
            padded with T*k to a multiple of block_m, then expert 1's, ...; entries past the last
            group are unspecified.
        block_expert: [cdiv(T*k, block_m) + E] int32, the expert of each block_m rows of
            sorted_slots, -1 past the last group.
    """
    if expert_ids.dim() != 2:
        raise ValueError(f"moe_align_block_size: expert_ids {tuple(expert_ids.shape)} must be [T, k]")
    if num_experts <= 0 or block_m <= 0 or block_m & (block_m - 1):
        raise ValueError(f"moe_align_block_size: num_experts={num_experts} must be > 0 and "
                         f"block_m={block_m} a power of two")
    n_slots = expert_ids.numel()
    flat_ids = expert_ids.reshape(-1)
    if not flat_ids.is_contiguous():
        flat_ids = flat_ids.contiguous()
    device = expert_ids.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(n_slots + num_experts * (block_m - 1), dtype=torch.int32, device=device)
    block_expert = torch.full((triton.cdiv(n_slots, block_m) + num_experts,), -1, dtype=torch.int32, device=device)
    BS = min(1024, max(16, triton.next_power_of_2(n_slots)))
    moe_count_kernel[(num_experts,)](flat_ids, counts, n_slots, BS=BS)
    moe_place_kernel[(num_experts,)](
        flat_ids, counts, sorted_slots, block_expert, n_slots, num_experts,
        BM=block_m, BS=BS, BE=triton.next_power_of_2(num_experts),
    )
    return sorted_slots, block_expert


# --- grouped expert GEMMs ---------------------------------------------------------------------

@triton.jit
def moe_gate_up_kernel(
    x, w13, h, sorted_slots, block_expert,
    stride_xt, stride_xh,
    stride_we, stride_wn, stride_wh,
    stride_hs,
    N_SLOTS, H, I,
    TOPK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Consecutive programs share one row block and walk its N tiles: the gathered rows stay in L2.
    i_n_tiles = tl.cdiv(I, BN)
    i_m, i_n = tl.program_id(0) // i_n_tiles, tl.program_id(0) % i_n_tiles
    i_e = tl.load(block_expert + i_m).to(tl.int64)
    if i_e < 0:
        return
    b_slot = tl.load(sorted_slots + i_m * BM + tl.arange(0, BM))
    m_m = b_slot < N_SLOTS
    o_t = (b_slot // TOPK).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < I
    p_x = x + o_t[:, None] * stride_xt
    p_g = w13 + i_e * stride_we + o_n[None, :] * stride_wn
    p_u = p_g + I * stride_wn
    b_gate = tl.zeros([BM, BN], dtype=tl.float32)
    b_up = tl.zeros([BM, BN], dtype=tl.float32)
    for i_k in range(0, H, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < H
        b_x = tl.load(p_x + o_k[None, :] * stride_xh, mask=m_m[:, None] & m_k[None, :], other=0.)
        b_wg = tl.load(p_g + o_k[:, None] * stride_wh, mask=m_k[:, None] & m_n[None, :], other=0.)
        b_wu = tl.load(p_u + o_k[:, None] * stride_wh, mask=m_k[:, None] & m_n[None, :], other=0.)
        if UPCAST:
            b_x, b_wg, b_wu = b_x.to(tl.float32), b_wg.to(tl.float32), b_wu.to(tl.float32)
        b_gate = tl.dot(b_x, b_wg, b_gate, input_precision=PRECISION)
        b_up = tl.dot(b_x, b_wu, b_up, input_precision=PRECISION)
    b_h = b_gate * tl.sigmoid(b_gate) * b_up
    tl.store(h + b_slot[:, None].to(tl.int64) * stride_hs + o_n[None, :], b_h.to(h.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def moe_down_kernel(
    h, w2, weights, y, sorted_slots, block_expert,
    stride_hs,
    stride_we, stride_wn, stride_wi,
    stride_ys,
    N_SLOTS, H, I,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_n_tiles = tl.cdiv(H, BN)
    i_m, i_n = tl.program_id(0) // i_n_tiles, tl.program_id(0) % i_n_tiles
    i_e = tl.load(block_expert + i_m).to(tl.int64)
    if i_e < 0:
        return
    b_slot = tl.load(sorted_slots + i_m * BM + tl.arange(0, BM))
    m_m = b_slot < N_SLOTS
    o_s = b_slot.to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < H
    p_h = h + o_s[:, None] * stride_hs
    p_w = w2 + i_e * stride_we + o_n[None, :] * stride_wn
    b_y = tl.zeros([BM, BN], dtype=tl.float32)
    for i_k in range(0, I, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < I
        b_h = tl.load(p_h + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.)
        b_w = tl.load(p_w + o_k[:, None] * stride_wi, mask=m_k[:, None] & m_n[None, :], other=0.)
        if UPCAST:
            b_h, b_w = b_h.to(tl.float32), b_w.to(tl.float32)
        b_y = tl.dot(b_h, b_w, b_y, input_precision=PRECISION)
    b_y *= tl.load(weights + o_s, mask=m_m, other=0.).to(tl.float32)[:, None]
    tl.store(y + o_s[:, None] * stride_ys + o_n[None, :], b_y.to(y.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def moe_sum_kernel(y, expert_ids, out, H, E, TOPK: tl.constexpr, BH: tl.constexpr):
    i_t, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_h = i_h * BH + tl.arange(0, BH)
    m_h = o_h < H
    b_o = tl.zeros([BH], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        i_e = tl.load(expert_ids + i_t * TOPK + j)
        # Slots of experts held elsewhere were never written: masked, not read as zeros.
        b_o += tl.load(y + (i_t * TOPK + j) * H + o_h, mask=m_h & (i_e >= 0) & (i_e < E), other=0.).to(tl.float32)
    tl.store(out + i_t * H + o_h, b_o.to(out.dtype.element_ty), mask=m_h)


def _gemm_config(n_slots: int, num_experts: int):
    """(BM, BN, BK, num_warps, num_stages) from the mean number of slots per expert.

    Decode sends a handful of tokens to each expert: BM = 16 wastes least padding there, and the
    kernel is bound by streaming expert weights. Prefill fills larger row blocks.
    """
    per_expert = n_slots / num_experts
    if per_expert <= 16:
        return 16, 64, 128, 4, 4
    if per_expert <= 64:
        return 32, 64, 64, 4, 4
    return 64, 128, 64, 8, 3


def expert_ffn(hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
               w13: torch.Tensor, w2: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * down_e(silu(gate_e h_t) * up_e h_t) over the slots j whose expert is local.

    The SwiGLU intermediate and each slot's weighted output are rounded to hidden.dtype (as the
    reference rounds each matmul output); matmuls accumulate in fp32, and so does the final sum.

    Args:
        hidden: [T, H] fp32/bf16/fp16.
        expert_ids: [T, k] int, local expert ids; ids outside [0, E_local) (-1: another shard
            holds the expert) contribute nothing.
        expert_weights: [T, k] fp32.
        w13: [E_local, 2*I, H], gate_proj rows then up_proj rows, dtype of hidden.
        w2: [E_local, H, I], dtype of hidden.
        out_dtype: dtype of the result (default hidden.dtype); torch.float32 stores the fp32 sum unrounded.

    Returns:
        [T, H] in out_dtype.
    """
    check_expert_ffn_args(hidden, expert_ids, expert_weights, w13, w2)
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"expert_ffn: w13 {w13.dtype} and w2 {w2.dtype} must have hidden's dtype {hidden.dtype}")
    T, H = hidden.shape
    k = expert_ids.shape[1]
    E, I = w13.shape[0], w13.shape[1] // 2
    device = hidden.device
    out = torch.empty(T, H, dtype=out_dtype or hidden.dtype, device=device)
    if T == 0 or k == 0:
        return out.zero_()
    expert_ids = expert_ids.contiguous()
    weights = expert_weights.reshape(-1).float().contiguous()
    n_slots = T * k
    BM, BN, BK, num_warps, num_stages = _gemm_config(n_slots, E)
    sorted_slots, block_expert = moe_align_block_size(expert_ids, E, BM)
    n_blocks = block_expert.numel()
    upcast = _interpreted()
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"

    h = torch.empty(n_slots, I, dtype=hidden.dtype, device=device)
    BN1, BK1 = min(BN, max(16, triton.next_power_of_2(I))), min(BK, max(16, triton.next_power_of_2(H)))
    moe_gate_up_kernel[(n_blocks * triton.cdiv(I, BN1),)](
        hidden, w13, h, sorted_slots, block_expert,
        hidden.stride(0), hidden.stride(1),
        w13.stride(0), w13.stride(1), w13.stride(2),
        h.stride(0),
        n_slots, H, I,
        TOPK=k, BM=BM, BN=BN1, BK=BK1, UPCAST=upcast, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    y = torch.empty(n_slots, H, dtype=hidden.dtype, device=device)
    BN2, BK2 = min(BN, max(16, triton.next_power_of_2(H))), min(BK, max(16, triton.next_power_of_2(I)))
    moe_down_kernel[(n_blocks * triton.cdiv(H, BN2),)](
        h, w2, weights, y, sorted_slots, block_expert,
        h.stride(0),
        w2.stride(0), w2.stride(1), w2.stride(2),
        y.stride(0),
        n_slots, H, I,
        BM=BM, BN=BN2, BK=BK2, UPCAST=upcast, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    BH = min(1024, triton.next_power_of_2(H))
    moe_sum_kernel[(T, triton.cdiv(H, BH))](y, expert_ids, out, H, E, TOPK=k, BH=BH)
    return out
