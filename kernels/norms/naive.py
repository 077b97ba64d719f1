"""Torch references for the two RMSNorm conventions of Qwen3-Next.

Both follow transformers' `Qwen3NextRMSNorm` / `Qwen3NextRMSNormGated` op for op (same fp32
upcasts, same casts back), so in fp32 they agree with it bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_rms_norm_args(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    """The shape contract of rms_norm, shared by every implementation of it."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree on H")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")


def check_gated_rms_norm_args(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor) -> None:
    """The shape contract of gated_rms_norm, shared by every implementation of it."""
    if z.shape != x.shape:
        raise ValueError(f"gated_rms_norm: z {tuple(z.shape)} != x {tuple(x.shape)}")
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"gated_rms_norm: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree on V")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, zero_centered: bool = True,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dim, computed in fp32 and cast back to x.dtype.

    Args:
        x: [..., H].
        weight: [H].
        eps: added to the mean square.
        zero_centered: y = x_hat * (1 + w) (Qwen3-Next's layer norms, weights start at 0);
            otherwise y = x_hat * w. Either way the weight multiplies in fp32, before the cast.
        residual: [..., H] or None. When given, x = x + residual first (in x.dtype, as the
            decoder layer adds it) and that sum is returned too: it is the new residual stream.

    Returns:
        y [..., H] in x.dtype, or (y, x + residual) when `residual` is given.
    """
    check_rms_norm_args(x, weight, residual)
    if residual is not None:
        x = x + residual
    x_f = x.float()
    y = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + eps)
    y = y * (1.0 + weight.float()) if zero_centered else y * weight.float()
    y = y.type_as(x)
    return y if residual is None else (y, x)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(w * rmsnorm(x).to(dtype)) * silu(z) over the last dim: the DeltaNet output norm.

    The normalised x is cast to x.dtype BEFORE the (plain, not 1 + w) weight multiplies it and the
    gate is applied in fp32, exactly as transformers does; the result is cast to x.dtype.

    Args:
        x: [..., V] (V = 128 per value head in Qwen3-Next).
        z: [..., V], the gate.
        weight: [V].

    Returns:
        [..., V] in x.dtype.
    """
    check_gated_rms_norm_args(x, z, weight)
    dtype = x.dtype
    x_f = x.float()
    y = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * y.to(dtype)
    y = y * F.silu(z.float())
    return y.to(dtype)
