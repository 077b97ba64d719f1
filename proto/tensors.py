"""Tensors on the wire: `nextserve.v1.Tensor` <-> torch, as raw little-endian bytes.

Repeated float fields would cost a varint tag and a copy per element; raw bytes cost one memcpy
each way, and every platform nextserve runs on is little-endian (checked once, below).
"""
from __future__ import annotations

import sys

import torch

from nextserve.proto.v1 import experts_pb2

if sys.byteorder != "little":  # the wire format is little-endian; a big-endian host would need swaps
    raise ImportError("nextserve's tensor wire format requires a little-endian host")

_TO_WIRE = {
    torch.float32: experts_pb2.DTYPE_FLOAT32,
    torch.bfloat16: experts_pb2.DTYPE_BFLOAT16,
    torch.float16: experts_pb2.DTYPE_FLOAT16,
    torch.int32: experts_pb2.DTYPE_INT32,
}
_FROM_WIRE = {wire: dtype for dtype, wire in _TO_WIRE.items()}


def to_wire(t: torch.Tensor) -> experts_pb2.Tensor:
    if t.dtype not in _TO_WIRE:
        raise ValueError(f"dtype {t.dtype} has no wire encoding; use one of {list(_TO_WIRE)}")
    data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return experts_pb2.Tensor(data=data, dtype=_TO_WIRE[t.dtype], shape=list(t.shape))


def from_wire(msg: experts_pb2.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode and check that the byte count matches dtype and shape (raises ValueError otherwise)."""
    if msg.dtype not in _FROM_WIRE:
        raise ValueError(f"unknown wire dtype {msg.dtype}")
    dtype = _FROM_WIRE[msg.dtype]
    shape = tuple(int(s) for s in msg.shape)
    numel = 1
    for s in shape:
        if s < 0:
            raise ValueError(f"negative dimension in shape {list(shape)}")
        numel *= s
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != expected:
        raise ValueError(f"tensor of shape {list(shape)} and dtype {dtype} needs {expected} bytes, got {len(msg.data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    # bytearray: torch.frombuffer wants a writable buffer; the copy is the one the wire costs anyway
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape).to(device)
