"""The reference of every dense projection: F.linear, no bias (Qwen3-Next's projections have none)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, row_order: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] W [out, in] -> [..., out]. A weight of more dims is its rows flattened: experts'
    w13 [E, 2I, H] as one [E * 2I, H] projection (every expert on every row). row_order [out] int64:
    the output columns in that order."""
    y = F.linear(x, weight if weight.dim() == 2 else weight.flatten(0, -2))
    return y if row_order is None else y.index_select(-1, row_order)
