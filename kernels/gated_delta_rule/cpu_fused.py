"""The gated delta rule in C++ ops (cpu_fused.cpp, built on first use): a few tokens per sequence, and
the chunked prefill.

The CPU path's torch form of a decode step (cpu.py) is ~40 dispatched ops per layer, and a
speculative verification of T tokens ~40 per token; `recurrent_steps` is one, reading each
sequence's state once from the pool and writing it back in place. naive.py's chunked form is a few
dozen ops over gathered, padded [chunks, heads, 64, 64] tensors, two batched triangular solves
among them; `chunk_steps` runs the same math per (sequence, head) on blocks that stay in cache.
cpu_fused.cpp says how the arithmetic of each follows naive.py. Built where it runs
(kernels/cpu_extensions.py); where it cannot be built, `available()` is False and cpu.py keeps
the torch forms.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import cpu_extensions

__all__ = ["available", "chunk_steps", "recurrent_steps"]

CHUNK = 64  # the chunk cpu_fused.cpp is written for: the model's, and the KV block's

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


def chunk_steps(q, k, v, g, beta, cu_seqlens, pool, slots, *, scale=None, use_qk_l2norm=True,
                output_chunk_states=False):
    """N sequences packed along T: q, k [T, Hk, K]; v [T, Hv, V]; g, beta [T, Hv] (gdn_gating's);
    cu_seqlens [N + 1]; the fp32 pool [S, Hv, K, V] read at and updated in place at `slots` (an int
    tensor [N] of distinct rows). Returns (o [T, Hv, V] in v.dtype, the state after every full 64-token
    chunk [sum_n L_n // 64, Hv, K, V] fp32 with output_chunk_states, else None)."""
    K = q.shape[-1]
    o, chunk_states = _KERNEL.module().chunk_steps(q, k, v, g, beta, cu_seqlens.long(), pool, slots.long(),
                                                   K ** -0.5 if scale is None else scale, use_qk_l2norm,
                                                   output_chunk_states)
    o = o if o.dtype == v.dtype else o.to(v.dtype)
    return o, (chunk_states if output_chunk_states else None)
