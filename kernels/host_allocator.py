"""glibc malloc settings for a CPU serving process: large temporaries reused, not mapped afresh.

glibc serves an allocation above M_MMAP_THRESHOLD with a fresh mmap and unmaps it on free (the
threshold starts at 128 KiB and only creeps up as blocks are freed), and gives the top of the heap
back to the OS past M_TRIM_THRESHOLD. A forward pass on the CPU makes many such temporaries (a
2048-token prefill's per-slot expert outputs are 32 MiB), and each then pays a page fault per 4 KiB
page on first touch, which is most of the cost of the big elementwise ops of a long prefill. vLLM's
CPU backend gets the same effect by preloading tcmalloc.

The price: memory freed by the process stays mapped to it, up to the trim threshold, so its
resident size sits at its peak. The KV and state pools are allocated up front anyway.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 2**30                        # above any temporary of a forward pass
TRIM_THRESHOLD = 2**31 - 1                    # mallopt takes an int

_applied: bool | None = None


def reuse_large_allocations() -> bool:
    """Apply the settings once per process (glibc on Linux; elsewhere nothing). Returns whether they hold."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
