"""Gated attention: fused q/k norm + partial NeoX RoPE, varlen GQA attention; torch references in `naive`."""
from .triton_attention import attention, qk_norm_rope

__all__ = ["qk_norm_rope", "attention"]
