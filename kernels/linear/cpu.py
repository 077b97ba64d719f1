"""Dense projections on the CPU: oneDNN's bf16 matmul with the weight reordered once, not per call.

F.linear in bf16 hands oneDNN a plain row-major weight, which it reorders into its blocked layout on
every call: at decode sizes that copy, not the arithmetic, is most of the time (bench/kernels_linear.py
measures both). `prepack` keeps the reordered copy beside the weight, and `linear` uses it while the
weight is unchanged (same storage, same version counter: an in-place load or a replaced `.data`
makes it repack). The products are oneDNN's bf16 products with fp32 accumulation either way.

Costs one more copy of every packed weight (bf16), so only weights the serving path reads are packed,
and only where the CPU has native bf16 (AVX512-BF16 or AMX); elsewhere `linear` is F.linear.
"""
from __future__ import annotations

import torch

from .naive import linear as reference_linear

# The batch size oneDNN picks the blocked layout for; one layout serves every row count. 16 was the
# fastest hint at 1, 16 and 128 rows on the small preset's shapes (bench/kernels_linear.py).
PACKING_ROWS = 16
_ATTRIBUTE = "_nextserve_onednn"


def packing_supported() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _key(weight: torch.Tensor) -> tuple[int, int]:
    return weight.data_ptr(), weight._version


def prepack(weight: torch.Tensor) -> bool:
    """Keep a reordered copy of `weight` (bf16, CPU; a weight of more dims as its rows flattened).
    Returns whether it did; other weights are left to F.linear."""
    if (weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() < 2 or weight.numel() == 0
            or not packing_supported()):
        return False  # (oneDNN has no primitive for an empty weight: a router that holds no experts)
    with torch.no_grad():
        rows = weight.detach().flatten(0, -2).contiguous()
        packed = torch.ops.mkldnn._reorder_linear_weight(rows, PACKING_ROWS)
    setattr(weight, _ATTRIBUTE, (_key(weight), packed))
    return True


def packed_weight(weight: torch.Tensor):
    """The reordered copy of a prepacked weight, refreshed if the weight changed since; else None."""
    entry = getattr(weight, _ATTRIBUTE, None)
    if entry is None:
        return None
    if entry[0] != _key(weight):
        prepack(weight)
        entry = getattr(weight, _ATTRIBUTE)
    return entry[1]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ops.linear: the packed weight when there is one and no gradient is wanted, else F.linear."""
    packed = packed_weight(weight) if x.dtype == torch.bfloat16 else None
    if packed is None or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return reference_linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
