"""The fused form of the routed experts on the CPU: cpu_fused.cpp, built on first use.

One op reads each active expert's bf16 weight rows once, straight from w13 [E, 2I, H] and w2 [E, H, I],
and computes every slot routed to it (cpu_fused.cpp says how its roundings follow naive.py). The torch
forms in cpu.py cannot do that at decode sizes: the gathered form copies each slot's expert weights
before its batched matmul, the loop runs ~5 ops per active expert.

The extension is built where it runs (kernels/cpu_extensions.py); a serving process builds it at load
time (ops.prepare_expert_ffn) so no request waits for the compiler. Where it cannot be built, `available()` is
False and cpu.py keeps to its torch forms.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import cpu_extensions
from .naive import check_expert_ffn_args

__all__ = ["available", "expert_ffn"]

_KERNEL = cpu_extensions.CppKernel("nextserve_moe_cpu_fused", Path(__file__).with_name("cpu_fused.cpp"),
                                   "the fused expert kernel")
available = _KERNEL.available


def expert_ffn(hidden, expert_ids, expert_weights, w13, w2, *, out_dtype=None):
    """naive.expert_ffn's contract (bf16 hidden and weights only) in one pass over the active experts."""
    check_expert_ffn_args(hidden, expert_ids, expert_weights, w13, w2)
    if hidden.dtype != torch.bfloat16 or w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
        raise ValueError(f"the fused expert kernel takes bf16 hidden states and weights, got {hidden.dtype}, "
                         f"{w13.dtype}, {w2.dtype}")
    extension = _KERNEL.module()
    ids = expert_ids if expert_ids.dtype == torch.int64 else expert_ids.long()
    weights = expert_weights if expert_weights.dtype == torch.float32 else expert_weights.float()
    out = extension.expert_ffn(hidden, ids, weights, w13, w2)
    dtype = out_dtype or hidden.dtype
    return out if dtype == torch.float32 else out.to(dtype)
