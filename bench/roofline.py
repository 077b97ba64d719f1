"""How close a decode step is to the memory-bandwidth roofline.

A decode step must at least read, once: every weight it uses (the dense weights, the lm_head,
and the routed experts its tokens picked), the K/V of every attention layer up to each
sequence's length, and every DeltaNet layer's recurrent and conv state. Bytes / step time is the
bandwidth the step achieved; divided by the machine's measured stream bandwidth, the fraction of
the roofline. At the small preset's size per-step overhead (op launches, Python), not bandwidth,
dominates, which is what a low fraction shows.
"""
from __future__ import annotations

import time

import torch


def stream_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of a sum over a `megabytes` fp32 tensor (best of `repeats`): the read roofline."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    x.sum()  # page in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


class ExpertsTouched:
    """Counts the distinct routed experts each MoE layer's gate picks, per forward (forward pre-hooks
    that recompute the block's router logits: a counting pass, not a timed one)."""

    def __init__(self, model):
        self.distinct: list[int] = []
        self._handles = []
        for layer in model.model.layers:
            if hasattr(layer.mlp, "route"):
                self._handles.append(layer.mlp.register_forward_pre_hook(self._count))

    def _count(self, moe, args) -> None:
        _, ids = moe.route(args[0])
        self.distinct.append(int(ids.unique().numel()))

    def take(self) -> list[int]:
        out, self.distinct = self.distinct, []
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def decode_step_bytes(model, batch: int, mean_context: float, experts_per_layer: list[int]) -> dict:
    """Bytes one decode step of `batch` sequences (`mean_context` tokens of K/V each) must read."""
    c = model.config
    dense = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue  # the MTP head does not run in a plain decode step
        if ".experts." in name:
            continue
        if name.endswith("embed_tokens.weight") and p is not model.lm_head.weight:
            dense += batch * p.shape[1] * p.element_size()  # a lookup reads only the batch's rows (untied)
        else:
            dense += p.numel() * p.element_size()
    experts = next(layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    routed_per_expert = sum(p.numel() * p.element_size() for p in experts.parameters()) // experts.w13.shape[0]
    routed = routed_per_expert * sum(experts_per_layer)
    element = next(model.parameters()).element_size()
    attention = c.layer_types.count("full_attention")
    deltanet = c.layer_types.count("linear_attention")
    kv = attention * batch * mean_context * 2 * c.num_key_value_heads * c.head_dim * element
    state = deltanet * batch * (c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4
                                + c.linear_conv_dim * (c.linear_conv_kernel_dim - 1) * element)
    return {"weights_bytes": dense + routed, "kv_bytes": int(kv), "state_bytes": state,
            "total_bytes": int(dense + routed + kv + state)}
