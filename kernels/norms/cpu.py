"""The CPU path of the two RMSNorms: one C++ op, or naive.py's arithmetic with the normalisation in one op.

Where it could be built, cpu_fused.py runs each norm as one op and one pass per row (fp32 or bf16,
no gradient wanted): naive.py's products and roundings, its sum of squares in another order, so it
agrees with naive.py to the tolerance of an fp32 sum over the row, rounded once.

Otherwise `torch.nn.functional.rms_norm` computes x * rsqrt(mean(x^2) + eps) * w in the same steps
as naive.py (square, mean, add eps, rsqrt, two multiplies) as one dispatched op, so the results
agree with naive.py bit for bit; the fp32 upcasts, the (1 + w) of the zero-centred form and the
casts back stay where naive.py has them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_fused
from .naive import check_gated_rms_norm_args, check_rms_norm_args

__all__ = ["rms_norm", "gated_rms_norm"]


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # .float() on an fp32 tensor is still a dispatched op; at decode sizes each one counts
    return x if x.dtype == torch.float32 else x.float()


def _cast(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y if y.dtype == dtype else y.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, zero_centered: bool = True,
             residual: torch.Tensor | None = None):
    """naive.rms_norm: y [..., H] in x.dtype, or (y, x + residual) with `residual`."""
    check_rms_norm_args(x, weight, residual)
    if cpu_fused.takes(x, weight, *(() if residual is None else (residual,))):
        return cpu_fused.rms_norm(x, weight, eps, zero_centered=zero_centered, residual=residual)
    if residual is not None:
        x = x + residual
    scale = 1.0 + _fp32(weight) if zero_centered else _fp32(weight)
    y = _cast(F.rms_norm(_fp32(x), (x.shape[-1],), scale, eps), x.dtype)
    return y if residual is None else (y, x)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """naive.gated_rms_norm: (w * rmsnorm(x).to(dtype)) * silu(z), in x.dtype."""
    check_gated_rms_norm_args(x, z, weight)
    if x.dtype == z.dtype and cpu_fused.takes(x, z, weight):
        return cpu_fused.gated_rms_norm(x, z, weight, eps)
    dtype = x.dtype
    y = weight * _cast(F.rms_norm(_fp32(x), (x.shape[-1],), None, eps), dtype)
    return _cast(y * F.silu(_fp32(z)), dtype)
