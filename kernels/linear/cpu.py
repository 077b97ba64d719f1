"""Dense projections on the CPU: oneDNN's bf16 matmul with the weight reordered once, not per call.

F.linear in bf16 hands oneDNN a plain row-major weight, which it reorders into its blocked layout on
every call: at decode sizes that copy, not the arithmetic, is most of the time (bench/kernels_linear.py
measures both). `prepack` keeps the reordered copy beside the weight, and `linear` uses it while the
weight is unchanged (same storage, same version counter: an in-place load or a replaced `.data`
makes it repack). The products are oneDNN's bf16 products with fp32 accumulation either way.

Costs one more copy of every packed weight (bf16), so only weights the serving path reads are packed,
and only where the CPU has native bf16 (AVX512-BF16 or AMX); elsewhere `linear` is F.linear.

Past PACKED_MAX_ROWS rows the packed copy is not used. oneDNN builds a primitive for every new
(rows, weight shape) pair, F.linear's and the packed copy's alike, and that costs 1-9 ms at the
small preset's shapes: a prefill's row count is the batch's token count, new nearly every time,
so there the products go to aten's matmul (`x @ w.t()`), which builds nothing per shape and is
within ~30% of the packed copy's warm time at 2048 rows (bench/kernels_linear.py prints both). Decode row
counts are the batch sizes, few and recurring, so their primitives stay cached: up to 64 row counts
times a layer's ~10 projection shapes stays inside oneDNN's default cache of 1024 primitives.
"""
from __future__ import annotations

import torch

from .naive import linear as reference_linear

# The batch size oneDNN picks the blocked layout for; one layout serves every row count. 16 was the
# fastest hint at 1, 16 and 128 rows on the small preset's shapes (bench/kernels_linear.py).
PACKING_ROWS = 16
PACKED_MAX_ROWS = 64
_ATTRIBUTE = "_nextserve_onednn"


def packing_supported() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _key(weight: torch.Tensor) -> tuple[int, int]:
    return weight.data_ptr(), weight._version


def prepack(weight: torch.Tensor, row_order: torch.Tensor | None = None) -> bool:
    """Keep a reordered copy of `weight` (bf16, CPU; a weight of more dims as its rows flattened), its
    rows permuted by `row_order` if given (see `linear`). Returns whether it did; other weights are
    left to F.linear."""
    if (weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() < 2 or weight.numel() == 0
            or not packing_supported()):
        return False  # (oneDNN has no primitive for an empty weight: a router that holds no experts)
    with torch.no_grad():
        rows = weight.detach().flatten(0, -2)
        rows = (rows if row_order is None else rows.index_select(0, row_order)).contiguous()
        packed = torch.ops.mkldnn._reorder_linear_weight(rows, PACKING_ROWS)
    # the plain rows in order too, for products of more than PACKED_MAX_ROWS rows (see the docstring);
    # without a row order that is the weight itself, so only reordered weights cost a second copy
    setattr(weight, _ATTRIBUTE, (_key(weight), packed, row_order, rows))
    return True


def _entry(weight: torch.Tensor, row_order: torch.Tensor | None):
    entry = getattr(weight, _ATTRIBUTE, None)
    if entry is None or entry[2] is not row_order:
        return None
    if entry[0] != _key(weight):
        prepack(weight, row_order)
        entry = getattr(weight, _ATTRIBUTE)
    return entry


def packed_weight(weight: torch.Tensor, row_order: torch.Tensor | None = None):
    """The reordered copy of a weight prepacked with this row order (the same tensor), refreshed if the
    weight changed since; else None."""
    entry = _entry(weight, row_order)
    return None if entry is None else entry[1]


def linear(x: torch.Tensor, weight: torch.Tensor, row_order: torch.Tensor | None = None) -> torch.Tensor:
    """ops.linear: the packed weight when there is one and no gradient is wanted, else F.linear. With
    row_order, F.linear(x, weight)[..., row_order]: a copy packed in that order computes it directly."""
    entry = _entry(weight, row_order) if x.dtype == torch.bfloat16 else None
    if entry is None or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        y = reference_linear(x, weight)
        return y if row_order is None else y.index_select(-1, row_order)
    if x.numel() > PACKED_MAX_ROWS * x.shape[-1]:
        return x @ entry[3].t()
    return torch.ops.mkldnn._linear_pointwise(x, entry[1], None, "none", [], "")
