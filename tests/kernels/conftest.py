"""Kernel tests run the Triton kernels through Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, i.e. before the
kernel modules are imported; test modules in this folder are imported after this file.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from contextlib import ExitStack, contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@contextmanager
def _poisoned_empty():
    """torch.empty / empty_like return NaN-filled (integers: -7) buffers, so an element a kernel
    forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


@pytest.fixture
def poisoned_empty():
    """`with poisoned_empty(): ...` poisons fresh buffers inside the block."""
    return _poisoned_empty


@pytest.fixture
def poison_empty():
    """`poison_empty()` poisons fresh buffers for the rest of the test."""
    with ExitStack() as stack:
        yield lambda: stack.enter_context(_poisoned_empty())
