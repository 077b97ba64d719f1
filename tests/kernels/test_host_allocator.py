"""The CPU engine's malloc settings take effect where glibc runs (this project's Linux images)."""
import ctypes

from nextserve.kernels import host_allocator


def glibc_mallopt():
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def test_the_settings_hold_under_glibc_and_are_idempotent():
    mallopt = glibc_mallopt()
    if mallopt is None:   # not glibc: nothing to set, and the function says so
        assert host_allocator.reuse_large_allocations() is False
        return
    assert host_allocator.reuse_large_allocations() is True
    assert host_allocator.reuse_large_allocations() is True   # once per process, then remembered
