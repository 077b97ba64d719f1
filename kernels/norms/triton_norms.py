"""Triton RMSNorm (optionally with the residual add fused in) and gated RMSNorm: one program per row.

A row of Qwen3-Next is at most 2048 wide (hidden) or 128 (one value head), so it fits one block:
each program loads its row once, reduces in fp32 and writes it back; no second pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def rms_norm_kernel(
    x, residual, weight, y, residual_out,
    stride_x, stride_r, stride_y, stride_ro,
    H, eps,
    BH: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_h = tl.arange(0, BH)
    m_h = o_h < H
    # Every load is upcast to fp32 at once: arithmetic happens in fp32 only.
    b_x = tl.load(x + i_t * stride_x + o_h, mask=m_h, other=0.).to(tl.float32)
    if HAS_RESIDUAL:
        # The sum is rounded to x.dtype before the norm sees it, as the decoder layer does in torch.
        b_x += tl.load(residual + i_t * stride_r + o_h, mask=m_h, other=0.).to(tl.float32)
        b_x = b_x.to(residual_out.dtype.element_ty)
        tl.store(residual_out + i_t * stride_ro + o_h, b_x, mask=m_h)
        b_x = b_x.to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=0) / H + eps)
    b_w = tl.load(weight + o_h, mask=m_h, other=0.).to(tl.float32)
    if ZERO_CENTERED:
        b_w = 1. + b_w
    tl.store(y + i_t * stride_y + o_h, (b_x * b_rstd * b_w).to(y.dtype.element_ty), mask=m_h)


@triton.jit
def gated_rms_norm_kernel(
    x, z, weight, y,
    stride_x, stride_z, stride_y,
    H, eps,
    BH: tl.constexpr,
    PRODUCT_DTYPE: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_h = tl.arange(0, BH)
    m_h = o_h < H
    b_x = tl.load(x + i_t * stride_x + o_h, mask=m_h, other=0.).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=0) / H + eps)
    # Rounding points follow the torch reference: the normalised row is cast to x.dtype, the
    # weight product is rounded to the promoted dtype of (weight, x), the gate multiplies in fp32.
    b_n = (b_x * b_rstd).to(x.dtype.element_ty).to(tl.float32)
    b_w = tl.load(weight + o_h, mask=m_h, other=0.).to(tl.float32)
    b_n = (b_w * b_n).to(PRODUCT_DTYPE).to(tl.float32)
    b_z = tl.load(z + i_t * stride_z + o_h, mask=m_h, other=0.).to(tl.float32)
    b_y = b_n * (b_z * tl.sigmoid(b_z))
    tl.store(y + i_t * stride_y + o_h, b_y.to(y.dtype.element_ty), mask=m_h)


def _rows(t: torch.Tensor, H: int) -> torch.Tensor:
    """[..., H] -> [R, H] with a unit stride along H (a view when the layout allows)."""
    t = t.reshape(-1, H)
    return t if t.stride(1) == 1 else t.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, zero_centered: bool = True,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dim in fp32, optionally after adding `residual`.

    Args:
        x: [..., H], fp32/bf16/fp16.
        weight: [H] (zero-centred: the scale is 1 + w).
        residual: [..., H] like x, or None.

    Returns:
        y [..., H] in x.dtype, or (y, x + residual) when `residual` is given.
    """
    H = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != H:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree on H")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    x2 = _rows(x, H)
    R = x2.shape[0]
    y = torch.empty(R, H, dtype=x.dtype, device=x.device)
    r2 = _rows(residual.to(x.dtype), H) if residual is not None else None
    r_out = torch.empty(R, H, dtype=x.dtype, device=x.device) if residual is not None else None
    if R:
        rms_norm_kernel[(R,)](
            x2, r2, weight.contiguous(), y, r_out,
            x2.stride(0), r2.stride(0) if r2 is not None else 0,
            y.stride(0), r_out.stride(0) if r_out is not None else 0,
            H, eps,
            BH=triton.next_power_of_2(H),
            ZERO_CENTERED=zero_centered,
            HAS_RESIDUAL=residual is not None,
        )
    y = y.view(x.shape)
    return y if residual is None else (y, r_out.view(x.shape))


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(w * rmsnorm(x).to(dtype)) * silu(z) over the last dim.

    Args:
        x: [..., V]; z: [..., V]; weight: [V] (plain weight, no 1 + w).

    Returns:
        [..., V] in x.dtype.
    """
    if z.shape != x.shape:
        raise ValueError(f"gated_rms_norm: z {tuple(z.shape)} != x {tuple(x.shape)}")
    V = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != V:
        raise ValueError(f"gated_rms_norm: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree on V")
    x2, z2 = _rows(x, V), _rows(z, V)
    R = x2.shape[0]
    y = torch.empty(R, V, dtype=x.dtype, device=x.device)
    if R:
        gated_rms_norm_kernel[(R,)](
            x2, z2, weight.contiguous(), y,
            x2.stride(0), z2.stride(0), y.stride(0),
            V, eps,
            BH=triton.next_power_of_2(V),
            PRODUCT_DTYPE=_TORCH_TO_TL[torch.promote_types(weight.dtype, x.dtype)],
        )
    return y.view(x.shape)
