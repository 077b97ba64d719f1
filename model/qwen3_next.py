"""Qwen3-Next: decoder layers, the model, the LM head and the multi-token-prediction module.

Module attribute names equal the checkpoint's tensor names, so loading is a name lookup
(`loader.py`); the only packing is the routed experts, stacked per layer.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .attention import GatedAttention
from .config import Qwen3NextConfig
from .deltanet import GatedDeltaNet
from .layers import Linear, LMHead, RMSNorm, SwiGLU
from .moe import SparseMoeBlock
from .state import CachePools, ForwardBatch, StaticCache


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer_idx: int, expert_ids: Iterable[int] | None = None):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = GatedAttention(config, layer_idx)
        self.mlp = (SparseMoeBlock(config, expert_ids) if config.is_moe_layer(layer_idx)
                    else SwiGLU(config.hidden_size, config.intermediate_size))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.layer_type == "linear_attention" else self.self_attn

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, last_only: bool = False):
        """last_only (an attention layer): only each sequence's last new token goes on past the mixer, the
        others just leave their keys and values (outputs [N, H])."""
        # pre-norm residual stream: x += mixer(norm(x)); x += mlp(norm(x))
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        if last_only:
            x, residual = self.self_attn(x, batch, last_only=True), residual[batch.last_token_indices()]
        else:
            x = self.mixer(x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Qwen3NextModel(nn.Module):
    def __init__(self, config: Qwen3NextConfig, expert_ids: Iterable[int] | None = None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, expert_ids) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # input_ids: [T] packed; returns final-normed hidden states [T, H]
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, batch)
        x, _ = self.norm(x, residual)
        return x


class MultiTokenPredictor(nn.Module):
    """The MTP head: drafts token t+2 from the hidden state at t and the embedding of token t+1.

    fc(concat(norm_e(embed(next_token)), norm_h(hidden))) -> one full-attention decoder layer -> norm;
    the caller applies the shared lm_head. Its attention layer keeps its own KV cache, stored in the
    sequence state after the main model's layers.
    """

    def __init__(self, config: Qwen3NextConfig, expert_ids: Iterable[int] | None = None):
        super().__init__()
        h = config.hidden_size
        self.fc = Linear(2 * h, h)
        self.pre_fc_norm_embedding = RMSNorm(h, config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(h, config.rms_norm_eps)
        mtp_config = Qwen3NextConfig.from_dict({**config.to_dict(), "num_hidden_layers": 1,
                                                "layer_types": ["full_attention"]})
        self.layers = nn.ModuleList([DecoderLayer(mtp_config, 0, expert_ids)])
        self.layers[0].self_attn.layer_idx = config.num_hidden_layers  # its KV pool's key in CachePools
        self.norm = RMSNorm(h, config.rms_norm_eps)

    def forward(self, token_embeds: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch,
                last_only: bool = False) -> torch.Tensor:
        """token_embeds, hidden: [T, H] -> [T, H]; last_only: [N, H], the output at each sequence's last
        new position only (a draft needs no other; the rest only fill the attention layer's cache)."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(token_embeds), self.pre_fc_norm_hidden(hidden)], -1))
        x, residual = self.layers[0](x, None, batch, last_only=last_only)
        x, _ = self.norm(x, residual)
        return x

    def write_kv(self, token_embeds: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> None:
        """Only the attention layer's keys and values at these positions, as `forward` would write them:
        what keeps the head's cache whole while no draft is wanted (a fraction of the layer's work)."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(token_embeds), self.pre_fc_norm_hidden(hidden)], -1))
        layer = self.layers[0]
        layer.self_attn.write_kv(layer.input_layernorm(x), batch)


class Qwen3NextForCausalLM(nn.Module):
    """`m(input_ids)` -> logits [B, S, V], as transformers' class of the same name; plus the
    stateful `forward_batch` that serving uses for prefill, continuation and decode."""

    def __init__(self, config: Qwen3NextConfig, expert_ids: Iterable[int] | None = None, with_mtp: bool = False):
        super().__init__()
        self.config = config
        self.model = Qwen3NextModel(config, expert_ids)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        self.mtp = MultiTokenPredictor(config, expert_ids) if with_mtp else None

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str = torch.bfloat16, device="cpu",
                        expert_ids: Iterable[int] | None = None, with_mtp: bool = False) -> "Qwen3NextForCausalLM":
        """Load an HF checkpoint. `expert_ids` limits the routed experts held (None: all; []: none,
        for a router that dispatches them)."""
        from .loader import load_model
        return load_model(cls, path, dtype=dtype, device=device, expert_ids=expert_ids, with_mtp=with_mtp)

    def allocate_pools(self, num_blocks: int, num_slots: int) -> CachePools:
        """KV block pools (MTP's included) and DeltaNet state pools, in the weights' dtype and device
        (recurrent states in fp32). Not zeroed: zero a slot (`zero_slots`) before a sequence uses it."""
        w = self.lm_head.weight
        return CachePools(self.config, num_blocks, num_slots, w.dtype, w.device, with_mtp=self.mtp is not None)

    @torch.inference_mode()
    def forward_batch(self, input_ids: torch.Tensor, batch: ForwardBatch, *, all_logits: bool = False):
        """Run the new tokens of every sequence in `batch` (packed [T]), writing their K/V and DeltaNet
        states into the batch's pools.

        Returns (logits, hidden): logits of the last new token of each sequence [N, V] (or of every
        token [T, V] with all_logits), and the final hidden states [T, H] (the MTP head's input).
        """
        hidden = self.model(input_ids, batch)
        # decode: every token is its sequence's last, so nothing to pick
        picked = hidden if all_logits or batch.is_decode else hidden[batch.last_token_indices()]
        return self.lm_head(picked).float(), hidden

    @torch.inference_mode()
    def mtp_logits(self, next_token_ids: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Draft logits for the token after next: next_token_ids [T] (the token that follows each
        position), hidden [T, H] from `forward_batch` on the same `batch`. Returns [T, V] fp32."""
        if self.mtp is None:
            raise ValueError("this model was loaded without its MTP head (from_pretrained(..., with_mtp=True))")
        return self.lm_head(self.mtp(self.model.embed_tokens(next_token_ids), hidden, batch)).float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, S] -> logits [B, S, V] (fp32), every sequence from an empty state
        B, S = input_ids.shape
        batch = StaticCache(self, B, S).batch(list(range(B)), [S] * B)
        logits, _ = self.forward_batch(input_ids.reshape(-1), batch, all_logits=True)
        return logits.view(B, S, -1)
