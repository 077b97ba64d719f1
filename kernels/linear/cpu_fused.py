"""A bf16 projection of a few rows in one C++ op (cpu_fused.cpp, built on first use), for CPUs
without native bf16.

There, torch's bf16 matmul has no fast kernel and the fp32 copy's product (cpu.py) reads twice the
weight's bytes and costs 2-3x one row's time at 3 to 16 rows; this reads the bf16 weight once for
every row (cpu_fused.cpp says how its arithmetic follows naive.py). Built where it runs
(kernels/cpu_extensions.py); where it cannot be built, `available()` is False and cpu.py keeps its
torch forms.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import cpu_extensions

__all__ = ["available", "few_rows_linear"]

_KERNEL = cpu_extensions.CppKernel("nextserve_linear_cpu_fused", Path(__file__).with_name("cpu_fused.cpp"),
                                   "the few-rows projection kernel")
available = _KERNEL.available


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for bf16 x [..., K] and a contiguous bf16 weight [N, K], as naive.linear
    computes it (fp32 sums, one rounding), in x's leading shape."""
    y = _KERNEL.module().few_rows_linear(x.reshape(-1, x.shape[-1]), weight)
    return y.view(*x.shape[:-1], weight.shape[0])
