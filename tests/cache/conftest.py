"""Fixtures of the cache tests; the redis-server fixtures are in tests/conftest.py (the serving tests use them too)."""
from __future__ import annotations

import os

import pytest
import torch

from nextserve.router.cache.keys import CacheNamespace


@pytest.fixture
def namespace() -> CacheNamespace:
    return CacheNamespace(os.urandom(8).hex(), "bfloat16")


@pytest.fixture
def tensors_like():
    """Fresh random tensors with the given (dtype, shape) specs; bfloat16 and float32 as the model stores them."""
    def make(specs: dict) -> dict[str, torch.Tensor]:
        out = {}
        for name, (dtype, shape) in specs.items():
            out[name] = torch.randn(shape, dtype=torch.float32).to(getattr(torch, dtype))
        return out
    return make
