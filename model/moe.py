"""Sparse mixture of experts: top-k routed experts plus a gated shared expert.

The block is split where expert parallelism splits it. `route()` and the shared expert are the
router's dense work; `experts` is anything with `dispatch(hidden, expert_ids, weights)`: the local
`Experts` below in-process, or a dispatcher that sends the tokens to the workers holding them.
`dispatch` starts the routed work and returns a function that waits for its result, so the block
computes the shared expert while the routed tokens are away.

Numerics, the same in-process and distributed: the routed experts return their weighted sum in
fp32 (a worker's partial is never rounded), the block adds the shared expert to it in fp32 and
rounds once to the activation dtype. With all experts in one place the routed sum is one fp32
partial; over N shards it is N fp32 partials added in shard order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nextserve.kernels import ops

from .config import Qwen3NextConfig
from .layers import Linear, SwiGLU
from .packed import PackedRows


class RoutedExperts(Protocol):
    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start sum_j weights[t, j] * expert_{ids[t, j]}(hidden[t]); the returned function waits for it.

        hidden [T, H]; expert_ids [T, k] global; weights [T, k] fp32. The result is [T, H] fp32."""


class Experts(nn.Module):
    """The routed experts one process holds, stacked for a grouped GEMM.

    w13[e] = [gate_proj; up_proj] of global expert `expert_ids[e]`, w2[e] its down_proj.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 expert_ids: Iterable[int] | None = None):
        super().__init__()
        held = sorted(set(range(num_experts) if expert_ids is None else expert_ids))
        if held and not (0 <= held[0] and held[-1] < num_experts):
            raise ValueError(f"expert ids must lie in [0, {num_experts}), got {held[0]}..{held[-1]}")
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.expert_ids = held
        self.w13 = nn.Parameter(torch.empty(len(held), 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(len(held), hidden_size, intermediate_size))
        self._local_index: torch.Tensor | None = None

    def local_index(self, device) -> torch.Tensor:
        """[num_experts]: global expert id -> row of w13/w2, -1 where another process holds it.
        Built lazily (not a buffer) so that a model materialised from the meta device gets it right."""
        if self._local_index is None or self._local_index.device != torch.device(device):
            local = torch.full((self.num_experts,), -1, dtype=torch.int64)
            local[self.expert_ids] = torch.arange(len(self.expert_ids))
            self._local_index = local.to(device)
        return self._local_index

    def prepack(self) -> bool:
        """Keep w13 in the CPU path's matmul layout too: the dense form multiplies every token by all
        of it as one [E * 2I, H] projection (kernels/moe/cpu.py); on a CPU without native bf16, w13
        and w2 in fp32, which the grouped form's batched matmuls read. The fused decode kernel is
        built here too, so that no request waits for its compiler."""
        ops.prepare_expert_ffn(self.w13)
        packed = ops.prepack_linear(self.w13)
        if ops.kept_in_fp32(self.w13):  # no native bf16: the grouped form's second matmul reads w2 in fp32 too
            ops.prepack_linear(self.w2)
        return packed

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # hidden: [T, H]; expert_ids: [T, k] global ids; weights: [T, k] fp32 -> [T, H] fp32, unrounded
        local_ids = self.local_index(hidden.device)[expert_ids]
        return ops.expert_ffn(hidden, local_ids, weights, self.w13, self.w2, out_dtype=torch.float32)

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        # Local experts have nothing to overlap with: compute now.
        out = self(hidden, expert_ids, weights)
        return lambda: out


class SparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen3NextConfig, expert_ids: Iterable[int] | None = None):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts)
        self.experts: RoutedExperts = Experts(config.num_experts, config.hidden_size,
                                              config.moe_intermediate_size, expert_ids)
        self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size, pack_gate_up=False)
        self.shared_expert_gate = Linear(config.hidden_size, 1)
        # the router gate, the shared expert's gate and its gate and up projections all read x: one matmul
        self.in_proj = PackedRows(self.gate, self.shared_expert_gate, self.shared_expert.gate_proj,
                                  self.shared_expert.up_proj)
        # called with each forward's router logits [T, E] when set (training's load-balancing loss):
        # the gate runs inside the packed matmul above, so a hook on it would never fire
        self.on_router_logits: Callable[[torch.Tensor], None] | None = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(router logits [T, E], shared-expert gate [T, 1], its gate and up projections [T, S] each)."""
        return ops.linear(x, self.in_proj.weight()).split(self.in_proj.sizes, dim=-1)

    def route(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] fp32, expert ids [T, k]): softmax over all experts, top-k, renormalised."""
        logits = self.project(x)[0] if logits is None else logits
        if self.on_router_logits is not None:
            self.on_router_logits(logits)
        return ops.moe_route(logits, self.top_k, renormalize=self.norm_topk_prob)

    def shared(self, x: torch.Tensor, projected: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        _, shared_gate, gate, up = self.project(x) if projected is None else projected
        return F.sigmoid(shared_gate) * self.shared_expert.down(gate, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.project(x)
        weights, ids = self.route(x, projected[0])
        routed = self.experts.dispatch(x, ids, weights)  # on the workers, if remote, while the shared expert runs
        shared = self.shared(x, projected)
        return (routed() + shared.float()).to(x.dtype)
