"""Gated attention: fused q/k norm + partial NeoX RoPE, varlen GQA attention over packed or paged
(64-token block) KV, and the slot-mapping scatter that fills the paged caches; torch references in `naive`."""
from .triton_attention import attention, paged_attention, qk_norm_rope, reshape_and_cache

__all__ = ["qk_norm_rope", "attention", "paged_attention", "reshape_and_cache"]
