"""The training objective: next-token loss, the MTP head's token-after-next loss, and the router's
load-balancing loss, all through the model's own (differentiable) torch reference path.

Multi-token prediction as DeepSeek-V3 and Qwen3-Next train it: at position t the MTP head sees the
main model's final hidden state h_t and the embedding of the true next token x_{t+1}, and predicts
x_{t+2}. The head shares the embedding and the LM head with the main model, so its loss also trains
them. A window of S + 2 tokens gives S positions for both losses:

    main:  x[0:S]                     -> targets x[1:S+1]
    mtp:   h[0:S], embed(x[1:S+1])    -> targets x[2:S+2]
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nextserve.kernels.ops import TORCH_BACKENDS, kernel_backend

from .moe import SparseMoeBlock
from .qwen3_next import Qwen3NextForCausalLM
from .state import StaticCache


@dataclass
class Losses:
    main: torch.Tensor    # mean cross-entropy of the next token (nats)
    mtp: torch.Tensor     # mean cross-entropy of the token after next, from the MTP head
    router: torch.Tensor  # load balance over all MoE layers; 1.0 when routing is uniform

    def total(self, mtp_weight: float, router_weight: float) -> torch.Tensor:
        return self.main + mtp_weight * self.mtp + router_weight * self.router


@contextlib.contextmanager
def captured_router_logits(model: torch.nn.Module):
    """Collect the router logits [T, E] of every MoE block (MTP layer included) during a forward."""
    logits: list[torch.Tensor] = []
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    for block in blocks:
        block.on_router_logits = logits.append
    try:
        yield logits
    finally:
        for block in blocks:
            block.on_router_logits = None


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-Transformer balance loss, averaged over layers: E * sum_e f_e * P_e, with f_e the share
    of the T * k routing slots that went to expert e and P_e its mean router probability. Equals 1
    when both are uniform; grows as routing collapses onto few experts (gradient flows through P)."""
    per_layer = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        E = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        share = torch.bincount(chosen.reshape(-1), minlength=E).float() / chosen.numel()
        per_layer.append(E * (share * probs.mean(0)).sum())
    return torch.stack(per_layer).mean()


def check_trainable(model: Qwen3NextForCausalLM, device: torch.device) -> None:
    """Training needs the MTP head and pure torch kernels, the references or the CPU path (the Triton
    kernels have no backward)."""
    if model.mtp is None:
        raise ValueError("the model has no MTP head: build it with with_mtp=True to train both losses")
    if kernel_backend(device) not in TORCH_BACKENDS:
        raise ValueError(f"training runs on the torch kernels, but {device} selects Triton: "
                         "set NEXTSERVE_KERNELS=cpu (or =torch, the plain references)")


def compute_losses(model: Qwen3NextForCausalLM, windows: torch.Tensor) -> Losses:
    """windows: [B, S + 2] token ids. Every sequence starts from an empty state (no cache is kept)."""
    B, L = windows.shape
    S = L - 2
    if S < 1:
        raise ValueError(f"windows {tuple(windows.shape)} must hold at least 3 tokens each")
    inputs, next_ids, after_next = windows[:, :S], windows[:, 1:S + 1], windows[:, 2:]
    batch = StaticCache(model, B, S).batch(list(range(B)), [S] * B)  # fresh pools: zero state, empty KV
    with captured_router_logits(model) as router_logits:
        hidden = model.model(inputs.reshape(-1), batch)  # [B*S, H], final-normed
        main = F.cross_entropy(model.lm_head(hidden).float(), next_ids.reshape(-1))
        drafted = model.mtp(model.model.embed_tokens(next_ids.reshape(-1)), hidden, batch)
        mtp = F.cross_entropy(model.lm_head(drafted).float(), after_next.reshape(-1))
    router = load_balancing_loss(router_logits, model.config.num_experts_per_tok)
    return Losses(main, mtp, router)
