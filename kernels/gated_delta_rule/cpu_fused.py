"""One decode step of the gated delta rule in one C++ op: cpu_fused.cpp, built on first use.

The CPU path's torch form of a decode step (cpu.py) is ~40 dispatched ops per layer; this is one,
reading each sequence's state once from the pool and writing it back in place (cpu_fused.cpp says
how its arithmetic follows naive.py). Built where it runs (kernels/cpu_extensions.py); where it
cannot be built, `available()` is False and cpu.py keeps its torch form.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import cpu_extensions

__all__ = ["available", "recurrent_step"]

_NAME = "nextserve_gdn_cpu_fused"
_SOURCE = Path(__file__).with_name("cpu_fused.cpp")


def available() -> bool:
    """Whether the extension is built (building it now if it has not been tried)."""
    return cpu_extensions.load(_NAME, _SOURCE) is not None


def recurrent_step(q, k, v, a, b, A_log, dt_bias, pool, slots, *, scale=None, use_qk_l2norm=True):
    """One token per sequence: q, k [N, 1, Hk, K]; v [N, 1, Hv, V]; a, b [N, 1, Hv]; the fp32 pool
    [S, Hv, K, V] updated in place at `slots` (a range of consecutive slots or an int tensor [N]).
    Returns o [N, 1, Hv, V] in v.dtype."""
    extension = cpu_extensions.load(_NAME, _SOURCE)
    if extension is None:
        raise RuntimeError(f"the fused delta-rule kernel is not built: {cpu_extensions.failure(_NAME)}")
    N, T, Hk, K = q.shape
    if T != 1:
        raise ValueError(f"the fused delta-rule kernel runs one token per sequence, got T={T}")
    if isinstance(slots, range):
        slots = torch.arange(slots.start, slots.stop, dtype=torch.int64, device=q.device)
    elif slots.dtype != torch.int64:
        slots = slots.long()
    o = extension.recurrent_step(q.view(N, Hk, K), k.view(N, Hk, K), v.view(N, v.shape[2], v.shape[3]),
                                 a.view(N, -1), b.view(N, -1), A_log, dt_bias, pool, slots,
                                 K ** -0.5 if scale is None else scale, use_qk_l2norm)
    o = o.view(N, 1, *o.shape[1:])
    return o if o.dtype == v.dtype else o.to(v.dtype)
