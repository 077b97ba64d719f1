"""The grouped form's sort, SwiGLU and weighted sum in C++ ops (cpu_grouped.cpp, built on first use).

cpu.py's grouped form spends four fifths of a 2048-token prefill's expert time outside its two
batched matmuls: the argsort, gathers, casts, SwiGLU and the weighted sum, a dozen torch ops over
millions of elements. Here they are three ops of one pass each around the same two bmm calls, with
naive.py's roundings (cpu_grouped.cpp says how). Built where it runs (kernels/cpu_extensions.py, at
load with the fused kernel: ops.prepare_expert_ffn); where it cannot be built, `available()` is
False and cpu.py keeps the torch ops.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import cpu_extensions
from ..linear import cpu as linear_cpu

__all__ = ["available", "expert_ffn"]

_KERNEL = cpu_extensions.CppKernel("nextserve_moe_cpu_grouped", Path(__file__).with_name("cpu_grouped.cpp"),
                                   "the grouped experts' data movement")
available = _KERNEL.available


def expert_ffn(hidden, expert_ids, expert_weights, w13, w2, width: int, *, out_dtype=None):
    """The grouped form on [E, width, H] batches: expert_ids [T, k] int64 (-1: another shard's slot)
    with no expert given more than `width` slots. Returns [T, H] in out_dtype (default hidden's)."""
    ops = _KERNEL.module()
    E, _, H = w13.shape
    rows, place = ops.gather_by_expert(hidden, expert_ids, E, width)
    gate_up = linear_cpu.batched(rows, w13)                  # [E, width, 2I]
    down = linear_cpu.batched(ops.swiglu(gate_up), w2)       # [E, width, H]
    weights = expert_weights if expert_weights.dtype == torch.float32 else expert_weights.float()
    dtype = out_dtype or hidden.dtype
    out = ops.combine(down.view(E * width, H), place, weights, torch.float32 if dtype != down.dtype else dtype)
    return out if out.dtype == dtype else out.to(dtype)
