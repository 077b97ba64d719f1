"""Sparse MoE: router top-k, the token permutation by expert, the grouped expert GEMMs; torch references in `naive`."""
from .triton_moe import expert_ffn, moe_align_block_size, moe_route

__all__ = ["moe_route", "moe_align_block_size", "expert_ffn"]
