"""The gated delta rule for a few tokens per sequence in one C++ op: cpu_fused.cpp, built on first use.

The CPU path's torch form of a decode step (cpu.py) is ~40 dispatched ops per layer, and a
speculative verification of T tokens ~40 per token; this is one, reading each sequence's state once
from the pool and writing it back in place (cpu_fused.cpp says
how its arithmetic follows naive.py). Built where it runs (kernels/cpu_extensions.py); where it
cannot be built, `available()` is False and cpu.py keeps its torch form.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import cpu_extensions

__all__ = ["available", "recurrent_steps"]

_KERNEL = cpu_extensions.CppKernel("nextserve_gdn_cpu_fused", Path(__file__).with_name("cpu_fused.cpp"),
                                   "the fused delta-rule kernel")
available = _KERNEL.available


def recurrent_steps(q, k, v, a, b, A_log, dt_bias, pool, slots, *, scale=None, use_qk_l2norm=True,
                    output_all_states=False):
    """T tokens per sequence: q, k [N, T, Hk, K]; v [N, T, Hv, V]; a, b [N, T, Hv]; the fp32 pool
    [S, Hv, K, V] updated in place at `slots` (a range of consecutive slots or an int tensor [N]) to the
    state after each sequence's last token. Returns (o [N, T, Hv, V] in v.dtype, the state after every
    token [N, T, Hv, K, V] fp32 with output_all_states, else None)."""
    if isinstance(slots, range):
        slots = torch.arange(slots.start, slots.stop, dtype=torch.int64, device=q.device)
    elif slots.dtype != torch.int64:
        slots = slots.long()
    K = q.shape[-1]
    o, all_states = _KERNEL.module().recurrent_steps(q, k, v, a, b, A_log, dt_bias, pool, slots,
                                                     K ** -0.5 if scale is None else scale, use_qk_l2norm,
                                                     output_all_states)
    o = o if o.dtype == v.dtype else o.to(v.dtype)
    return o, (all_states if output_all_states else None)
