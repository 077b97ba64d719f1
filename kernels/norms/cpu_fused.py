"""The two RMSNorms in one C++ op per call: cpu_fused.cpp, built on first use.

The torch form (cpu.py) is F.rms_norm plus the upcast, the weight's (1 + w), the residual add and
the casts: ~5 dispatched ops and several passes over the rows. This is one op and one pass per row
(cpu_fused.cpp says how its arithmetic follows naive.py). Built where it runs
(kernels/cpu_extensions.py); where it cannot be built, `available()` is False and cpu.py keeps its
torch form.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import cpu_extensions

__all__ = ["available", "takes", "rms_norm", "gated_rms_norm"]

_KERNEL = cpu_extensions.CppKernel("nextserve_norms_cpu_fused", Path(__file__).with_name("cpu_fused.cpp"),
                                   "the fused norm kernel")
available = _KERNEL.available


def takes(*tensors) -> bool:
    """Whether these activations can run here: fp32 or bf16, no gradient wanted, the op built."""
    if any(t.dtype not in (torch.float32, torch.bfloat16) for t in tensors):
        return False
    return not cpu_extensions.needs_backward(*tensors) and available()


def rms_norm(x, weight, eps: float, *, zero_centered: bool = True, residual=None):
    """naive.rms_norm's contract: y in x.dtype, or (y, x + residual) with `residual`."""
    out = _KERNEL.module().rms_norm(x, residual, weight, eps, zero_centered)
    return out[0] if residual is None else (out[0], out[1])


def gated_rms_norm(x, z, weight, eps: float):
    """naive.gated_rms_norm's contract: (w * rmsnorm(x).to(dtype)) * silu(z), in x.dtype."""
    return _KERNEL.module().gated_rms_norm(x, z, weight, eps)
