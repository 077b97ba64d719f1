"""Torch references for the sparse MoE block: router top-k and the routed experts of one shard.

`moe_route` is transformers' Qwen3NextTopKRouter after the logits; `expert_ffn` computes what
Qwen3NextExperts computes (expert by expert in increasing id, weight applied after the down
projection, index_add into the output) but accumulates in fp32 and skips ids of -1, the experts
another shard holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True):
    """Softmax over all E experts in fp32, top-k, optionally renormalised to sum 1.

    Args:
        router_logits: [T, E].
        top_k: experts per token (10 in Qwen3-Next), <= E.
        renormalize: divide the k weights by their sum (Qwen3-Next's norm_topk_prob).

    Returns:
        (weights [T, top_k] fp32, expert_ids [T, top_k] int64), in descending weight order.
    """
    if router_logits.dim() != 2 or not 0 < top_k <= router_logits.shape[1]:
        raise ValueError(f"moe_route: router_logits {tuple(router_logits.shape)} must be [T, E] with "
                         f"0 < top_k={top_k} <= E")
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_ffn(hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
               w13: torch.Tensor, w2: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * down_e(silu(gate_e h_t) * up_e h_t) over the slots j whose expert is local.

    Token slots are sorted by expert once, so each active expert costs one pair of matmuls over
    exactly the tokens routed to it. The matmuls run in hidden.dtype (as transformers runs them);
    the weighted sum accumulates in fp32.

    Args:
        hidden: [T, H].
        expert_ids: [T, k] int, local expert indices into w13/w2; -1 marks an expert held elsewhere.
        expert_weights: [T, k] fp32 routing weights.
        w13: [E_local, 2*I, H], gate_proj rows then up_proj rows.
        w2: [E_local, H, I].
        out_dtype: dtype of the result (default hidden.dtype); torch.float32 returns the fp32 sum unrounded.

    Returns:
        [T, H] in out_dtype.
    """
    check_expert_ffn_args(hidden, expert_ids, expert_weights, w13, w2)
    T, H = hidden.shape
    E = w13.shape[0]
    flat_ids = expert_ids.reshape(-1).long()
    if flat_ids.numel() and int(flat_ids.max()) >= E:
        raise ValueError(f"expert_ffn: expert id {int(flat_ids.max())} out of range for E_local={E}")
    slots = (flat_ids >= 0).nonzero().squeeze(1)
    slots = slots[torch.argsort(flat_ids[slots], stable=True)]
    counts = torch.bincount(flat_ids[slots], minlength=E).tolist()
    k = expert_ids.shape[1]
    tokens = hidden[slots // k]  # [slots, H], grouped by expert
    outputs = []
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        # x @ w.t() is F.linear's product; on the CPU it skips the oneDNN primitive F.linear builds for
        # every new row count (milliseconds, and each expert's count changes with every batch)
        gate, up = (tokens[start:start + count] @ w13[e].t()).chunk(2, dim=-1)
        outputs.append((F.silu(gate) * up) @ w2[e].t())
        start += count
    # One scatter into per-slot rows, then a fixed-order sum over k: far fewer small ops than an
    # index_add per expert, and deterministic.
    per_slot = torch.zeros(T * k, H, dtype=torch.float32, device=hidden.device)
    if outputs:
        weighted = torch.cat(outputs).float() * expert_weights.reshape(-1)[slots, None].float()
        per_slot.index_copy_(0, slots, weighted)
    out = per_slot.view(T, k, H).sum(1)
    return out.to(out_dtype or hidden.dtype)


def check_expert_ffn_args(hidden, expert_ids, expert_weights, w13, w2):
    if hidden.dim() != 2:
        raise ValueError(f"expert_ffn: hidden {tuple(hidden.shape)} must be [T, H]")
    T, H = hidden.shape
    if expert_ids.dim() != 2 or expert_ids.shape[0] != T or expert_weights.shape != expert_ids.shape:
        raise ValueError(f"expert_ffn: expert_ids {tuple(expert_ids.shape)} and expert_weights "
                         f"{tuple(expert_weights.shape)} must both be [T={T}, k]")
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2:
        raise ValueError(f"expert_ffn: w13 {tuple(w13.shape)} must be [E_local, 2*I, H={H}]")
    E, I = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (E, H, I):
        raise ValueError(f"expert_ffn: w2 {tuple(w2.shape)} must be [E_local, H, I] = {(E, H, I)}")
