"""Argument checks shared by the op families."""
from __future__ import annotations

import torch


def num_sequences(cu_seqlens: torch.Tensor | None, default: int) -> int:
    """N for packed sequences delimited by cu_seqlens [N + 1] (int32/int64); `default` without them.
    Raises ValueError naming what is wrong."""
    if cu_seqlens is None:
        return default
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens {tuple(cu_seqlens.shape)} must be 1-D [N + 1] with N >= 1")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    return cu_seqlens.numel() - 1
