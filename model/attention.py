"""Gated attention: the softmax-attention mixer of every fourth Qwen3-Next layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextserve.kernels import ops

from .config import Qwen3NextConfig
from .layers import Linear, RMSNorm
from .packed import PackedRows
from .state import ForwardBatch


class GatedAttention(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.rotary_dim, self.rope_theta, self.eps = config.rotary_dim, config.rope_theta, config.rms_norm_eps
        h = config.hidden_size
        # q_proj yields, per head, the query and an output gate of the same size
        self.q_proj = Linear(h, self.num_heads * self.head_dim * 2)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim)
        self.o_proj = Linear(self.num_heads * self.head_dim, h)
        self.qkv_proj = PackedRows(self.q_proj, self.k_proj, self.v_proj)  # all three read x: one matmul
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def write_kv(self, x: torch.Tensor, batch: ForwardBatch) -> None:
        """Only the keys and values of these tokens, into the cache: what `forward` writes, nothing else
        (x [T, H] already normed)."""
        T = x.shape[0]
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        # the op normalises and rotates a (q, k) pair: keys alone go in as both
        _, k = ops.qk_norm_rope(k, k, self.k_norm.weight, self.k_norm.weight, batch.positions,
                                rotary_dim=self.rotary_dim, theta=self.rope_theta, eps=self.eps)
        k_cache, v_cache = batch.pools.kv[self.layer_idx]
        ops.reshape_and_cache(k, v, k_cache, v_cache, batch.slot_mapping)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, last_only: bool = False) -> torch.Tensor:
        """x [T, H] -> [T, H]; last_only: [N, H], the output at each sequence's last new token only
        (every token still writes its keys and values)."""
        T = x.shape[0]
        q_gate, k, v = ops.linear(x, self.qkv_proj.weight()).split(self.qkv_proj.sizes, dim=-1)
        q, gate = q_gate.view(T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)  # [T, Hq, D] each
        k, v = k.view(T, self.num_kv_heads, self.head_dim), v.view(T, self.num_kv_heads, self.head_dim)
        q, k = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, batch.positions,
                                rotary_dim=self.rotary_dim, theta=self.rope_theta, eps=self.eps)

        # Scatter the new keys into the sequences' blocks, then attend through the block tables.
        k_cache, v_cache = batch.pools.kv[self.layer_idx]
        ops.reshape_and_cache(k, v, k_cache, v_cache, batch.slot_mapping)
        cu_seqlens_q = batch.cu_seqlens
        if last_only:  # one query per sequence, its last: queries are the last positions (bottom-right causal)
            last = batch.last_token_indices()
            q, gate = q[last], gate[last]
            cu_seqlens_q = torch.arange(len(batch.seq_lens) + 1, dtype=torch.int32, device=q.device)
        o = ops.paged_attention(q, k_cache, v_cache, batch.block_tables, cu_seqlens_q, batch.seq_lens_k,
                                scale=self.head_dim ** -0.5, gate=gate)
        return self.o_proj(o.reshape(q.shape[0], self.num_heads * self.head_dim))
