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

_NAME = "nextserve_conv_cpu_fused"
_SOURCE = Path(__file__).with_name("cpu_fused.cpp")


def available() -> bool:
    """Whether the extension is built (building it now if it has not been tried)."""
    return cpu_extensions.load(_NAME, _SOURCE) is not None


def takes(x, weight, pool) -> bool:
    """Whether this conv can run here: fp32 or bf16 inputs, a contiguous pool of their dtype, no
    gradient wanted (the op has no backward), the op built."""
    if x.dtype not in (torch.float32, torch.bfloat16) or pool.dtype != x.dtype or not pool.is_contiguous():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, pool)):
        return False
    return available()


def causal_conv1d(x, weight, pool, state_slots, cu_seqlens, activation):
    """x [T, C], weight [C, W], the pool [S, C, W - 1] updated in place at state_slots [N], cu_seqlens
    [N + 1] or None (one sequence). Returns y [T, C] in x.dtype."""
    extension = cpu_extensions.load(_NAME, _SOURCE)
    if extension is None:
        raise RuntimeError(f"the fused conv kernel is not built: {cpu_extensions.failure(_NAME)}")
    offsets = (torch.tensor([0, x.shape[0]]) if cu_seqlens is None
               else cu_seqlens.to(device="cpu", dtype=torch.int64))
    slots = state_slots.to(device="cpu", dtype=torch.int64)
    return extension.causal_conv1d(x, weight, pool, slots, offsets, activation in ("silu", "swish"))
