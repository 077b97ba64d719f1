"""The prefill causal conv1d in one C++ op: cpu_fused.cpp, built on first use.

cpu.py's torch form runs each of the W taps as a gather and a multiply-add over the whole chunk in
fp32 (~20 ops, W passes); this is one op and one pass, reading the states from the pool by slot and
writing the new ones back (cpu_fused.cpp says how its sums follow naive.py). Built where it runs
(kernels/cpu_extensions.py); where it cannot be built, `available()` is False and cpu.py keeps its
torch form.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import cpu_extensions

__all__ = ["available", "takes", "causal_conv1d"]

_KERNEL = cpu_extensions.CppKernel("nextserve_conv_cpu_fused", Path(__file__).with_name("cpu_fused.cpp"),
                                   "the fused conv kernel")
available = _KERNEL.available


def takes(x, weight, pool=None) -> bool:
    """Whether this conv can run here: fp32 or bf16 inputs, the pool (if the states live in one) a
    contiguous tensor of their dtype, no gradient wanted, the op built."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if pool is not None and (pool.dtype != x.dtype or not pool.is_contiguous()):
        return False
    return not cpu_extensions.needs_backward(x, weight, *(() if pool is None else (pool,))) and available()


def causal_conv1d(x, weight, pool, state_slots, cu_seqlens, activation):
    """x [T, C], weight [C, W], the pool [S, C, W - 1] updated in place at state_slots [N], cu_seqlens
    [N + 1] or None (one sequence). Returns y [T, C] in x.dtype."""
    offsets = (torch.tensor([0, x.shape[0]]) if cu_seqlens is None
               else cu_seqlens.to(device="cpu", dtype=torch.int64))
    slots = state_slots.to(device="cpu", dtype=torch.int64)
    return _KERNEL.module().causal_conv1d(x, weight, pool, slots, offsets, activation in ("silu", "swish"))
