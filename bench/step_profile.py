"""Ops and host syncs of one decode step, counted with the torch profiler.

On a GPU every op is a kernel launch and every host sync (a `.item()`, `.tolist()`, `nonzero`, a
data-dependent shape) stalls the launch queue; on the CPU they are dispatcher and Python overhead.
At the small preset's size that overhead, not bandwidth, bounds decode, so these two numbers are
the ones to cut.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

# aten ops that copy a device value to the host, or whose output shape depends on data
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique2",
            "aten::masked_select", "aten::equal", "aten::repeat_interleave")  # item() is _local_scalar_dense


def count_step(step) -> dict:
    """Run `step()` once under the profiler; top-level aten ops (as dispatched from Python) and syncs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    syncs = Counter(e.name for e in events if e.name in SYNC_OPS)
    return {"ops": len(top), "aten_calls": len(events), "host_syncs": sum(syncs.values()),
            "sync_ops": dict(syncs.most_common())}
