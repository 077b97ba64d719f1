"""Dense projections on the CPU: bf16 weights multiplied from a layout kept beside them, not per call.

Where the CPU has native bf16 (AVX512-BF16 or AMX): F.linear in bf16 hands oneDNN a plain row-major
weight, which it reorders into its blocked layout on every call; at decode sizes that copy, not the
arithmetic, is most of the time (bench/kernels_linear.py measures both). `prepack` keeps the
reordered copy (bf16) beside the weight.

Where it has not (AVX2 machines): torch's bf16 matmul has no fast kernel there, and its time grows
with the row count as if each row were a separate pass over the weight (4-5x an fp32 product at 16
rows, 5-8x at a prefill's 2048, bench/kernels_linear.py). Up to FEW_ROWS_MAX rows (decode steps,
speculative verifications) the product is cpu_fused.cpp's, one pass over the bf16 weight for all
rows; past that `prepack`'s fp32 copy of the weight serves, multiplied by fp32's GEMM on the
widened activations and rounded once to bf16.

Either way `linear` uses the kept copy while the weight is unchanged (same storage, same version
counter: an in-place load or a replaced `.data` makes it repack), and the products are bf16 values
multiplied exactly and summed in fp32, rounded once to bf16: F.linear's contract. Each packed weight
costs one more copy (bf16, or fp32 where there is no native bf16: twice the weight's own bytes), so
only weights the serving path reads are packed.

Past PACKED_MAX_ROWS rows oneDNN's copy is not used: oneDNN builds a primitive for every new
(rows, weight shape) pair, F.linear's and the packed copy's alike, and that costs 1-9 ms at the
small preset's shapes: a prefill's row count is the batch's token count, new nearly every time,
so there the products go to aten's matmul (`x @ w.t()`), which builds nothing per shape and is
within ~30% of the packed copy's warm time at 2048 rows (bench/kernels_linear.py prints both). Decode row
counts are the batch sizes, few and recurring, so their primitives stay cached: up to 64 row counts
times a layer's ~10 projection shapes stays inside oneDNN's default cache of 1024 primitives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_fused
from .naive import linear as reference_linear

# The batch size oneDNN picks the blocked layout for; one layout serves every row count. 16 was the
# fastest hint at 1, 16 and 128 rows on the small preset's shapes (bench/kernels_linear.py).
PACKING_ROWS = 16
PACKED_MAX_ROWS = 64
# Without native bf16, up to this many rows the fp32 copy's product runs as W x^T (see _from_fp32_copy):
# as fast as MKL's GEMM at a 512-wide weight and up to 2.5x faster at the 4096- and 8192-row ones
FP32_MM_MAX_ROWS = 64
# Without native bf16, up to this many rows go to cpu_fused.cpp's one pass over the bf16 weight: 1.5-5x
# the fp32 copy's speed at 1 to 12 rows on an AVX2 machine, even at 16, where its dot products rather
# than the weight's bytes bound it (bench/kernels_linear.py)
FEW_ROWS_MAX = 12
_ATTRIBUTE = "_nextserve_kept_layout"


def packing_supported() -> bool:
    """Whether oneDNN's bf16 layout is kept (native bf16); else the copy kept is fp32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _key(weight: torch.Tensor) -> tuple[int, int]:
    return weight.data_ptr(), weight._version


def prepack(weight: torch.Tensor, row_order: torch.Tensor | None = None) -> bool:
    """Keep a copy of `weight` (bf16, CPU; a weight of more dims as its rows flattened) in the layout its
    products run from here (oneDNN's, or fp32 rows), its rows permuted by `row_order` if given (see
    `linear`). Returns whether it did; other weights are left to F.linear."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() < 2 or weight.numel() == 0:
        return False  # (oneDNN has no primitive for an empty weight: a router that holds no experts)
    with torch.no_grad():
        rows = weight.detach().flatten(0, -2)
        rows = (rows if row_order is None else rows.index_select(0, row_order)).contiguous()
        if packing_supported():
            packed = torch.ops.mkldnn._reorder_linear_weight(rows, PACKING_ROWS)
        else:
            packed = rows.float()
    # the plain bf16 rows in order too, for products of more than PACKED_MAX_ROWS rows (see the
    # docstring) or of up to FEW_ROWS_MAX without native bf16; without a row order that is the weight
    # itself, so only reordered weights cost a second copy
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


def _wants_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A step that trains: the product must be of the weight itself, so its gradient flows."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def fp32_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """The fp32 copy of a weight prepacked without a row order on a CPU without native bf16, in the
    weight's own shape (refreshed if the weight changed since); else None. The routed experts' batched
    matmuls read it (kernels/moe/cpu.py)."""
    kept = packed_weight(weight)
    return kept.view(weight.shape) if kept is not None and kept.dtype == torch.float32 else None


def batched(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows [E, width, in] times each expert's weight [E, out, in] transposed, in rows' dtype (the routed
    experts' batched matmuls, kernels/moe). A bf16 weight with an fp32 copy (a CPU without native bf16,
    where torch's bf16 bmm is several times slower than fp32's) multiplies from the copy: the same
    exact products summed in fp32, rounded once."""
    kept = fp32_copy(weight) if rows.dtype == torch.bfloat16 and not _wants_grad(rows, weight) else None
    if kept is None:
        return torch.bmm(rows, weight.transpose(1, 2))
    return torch.bmm(rows.float(), kept.transpose(1, 2)).to(rows.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, row_order: torch.Tensor | None = None) -> torch.Tensor:
    """ops.linear: the packed weight when there is one and no gradient is wanted, else F.linear. With
    row_order, F.linear(x, weight)[..., row_order]: a copy packed in that order computes it directly."""
    entry = _entry(weight, row_order) if x.dtype == torch.bfloat16 else None
    if entry is None or _wants_grad(x, weight):
        return _reference(x, weight, row_order)
    packed, rows = entry[1], entry[3]
    if packed.dtype == torch.float32:
        return _without_native_bf16(x, packed, rows, weight, row_order)
    if x.numel() > PACKED_MAX_ROWS * x.shape[-1]:
        return x @ rows.t()
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _reference(x: torch.Tensor, weight: torch.Tensor, row_order: torch.Tensor | None) -> torch.Tensor:
    y = reference_linear(x, weight)
    return y if row_order is None else y.index_select(-1, row_order)


def _without_native_bf16(x, rows32, rows, weight, row_order) -> torch.Tensor:
    """rows32, rows: the fp32 copy and the bf16 rows, both in row order."""
    n = x.numel() // x.shape[-1]
    if n <= FEW_ROWS_MAX and cpu_fused.available():
        return cpu_fused.few_rows_linear(x, rows)
    if n == 1:  # (no kernel) bf16's own product reads half the fp32 copy's bytes
        return _reference(x, weight, row_order)
    return _from_fp32_copy(x, rows32)


def _from_fp32_copy(x: torch.Tensor, rows32: torch.Tensor) -> torch.Tensor:
    """A CPU without native bf16: the product of two rows or more from the fp32 copy, rounded once to
    bf16. Up to FP32_MM_MAX_ROWS rows go as W x^T, which streams the weight once where a GEMM of a
    few dozen rows repacks it (see model.layers.LMHead)."""
    n = x.numel() // x.shape[-1]
    x32 = x.reshape(n, x.shape[-1]).float()
    if n <= FP32_MM_MAX_ROWS:
        y = torch.mm(rows32, x32.t()).t().to(torch.bfloat16, memory_format=torch.contiguous_format)
    else:
        y = F.linear(x32, rows32).to(torch.bfloat16)
    return y.view(*x.shape[:-1], rows32.shape[0])
