"""Paged attention, the KV cache write and the q/k norm with RoPE in C++ ops (cpu_fused.cpp, built on
first use).

cpu.py's torch forms are ~50 ops (attention), ~20 (the cache write) and ~25 (norm and RoPE) per
attention layer per step, most of a decode step's attention time at this model size; naive.py's prefill attention
materialises each sequence's [Hq, Lq, Lk] scores. These are one op each, for decode, speculative
verification and prefill alike (cpu_fused.cpp says how the arithmetic follows naive.py). Built where
it runs (kernels/cpu_extensions.py, at load: ops.prepare_cpu_kernels); where it cannot be built,
`available()` is False and cpu.py keeps its torch forms.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import cpu_extensions

__all__ = ["available", "paged_attention", "qk_norm_rope", "reshape_and_cache"]

_KERNEL = cpu_extensions.CppKernel("nextserve_attention_cpu_fused", Path(__file__).with_name("cpu_fused.cpp"),
                                   "the fused attention kernel")
available = _KERNEL.available


def _long(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int64 else x.long()


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, *, scale: float, gate=None):
    """naive.paged_attention's contract, caches in q's dtype and contiguous; block-table entries a
    sequence reads are range-checked (RuntimeError naming the block)."""
    return _KERNEL.module().paged_attention(q, gate, k_cache, v_cache, _long(block_tables), _long(cu_seqlens_q),
                                            _long(seq_lens_k), scale)


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """naive.reshape_and_cache's contract, caches contiguous: negative slots are padding; a slot past
    the caches raises RuntimeError naming it."""
    _KERNEL.module().reshape_and_cache(k, v, k_cache, v_cache, _long(slot_mapping))


def qk_norm_rope(q, k, q_norm_weight, k_norm_weight, positions, inv_freq, *, eps: float):
    """naive.qk_norm_rope's contract for q and k in one dtype (fp32 or bf16), the rotary dims given by
    inv_freq [rotary_dim / 2] (naive.rope_inv_freq's): (q [T, Hq, D], k [T, Hkv, D]), views of one tensor."""
    out = _KERNEL.module().qk_norm_rope(q, k, q_norm_weight, k_norm_weight, _long(positions), inv_freq, eps)
    return out.split([q.shape[1], k.shape[1]], dim=1)
