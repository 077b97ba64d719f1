"""Tensors on the wire: `nextserve.v1.Tensor` <-> torch, as raw little-endian bytes.

Repeated float fields would cost a varint tag and a copy per element; raw bytes cost one memcpy
each way, and every platform nextserve runs on is little-endian (checked once, below). Decoding
copies nothing: the tensor is a view of the bytes object that protobuf hands out for the field.
"""
from __future__ import annotations

import sys
import warnings

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
_ELEMENT_SIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _TO_WIRE}

# torch.frombuffer warns (once per process) that a bytes object is not writable. Every access to a
# protobuf bytes field returns a fresh bytes object that only the decoded tensor refers to, so the
# view is as private as a copy would be: take the one warning here, where it says nothing.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)


def to_wire(t: torch.Tensor) -> experts_pb2.Tensor:
    if t.dtype not in _TO_WIRE:
        raise ValueError(f"dtype {t.dtype} has no wire encoding; use one of {list(_TO_WIRE)}")
    data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return experts_pb2.Tensor(data=data, dtype=_TO_WIRE[t.dtype], shape=list(t.shape))


def rows_to_wire(t: torch.Tensor, rows: torch.Tensor | None = None) -> experts_pb2.Tensor:
    """`to_wire(t[rows])` for a host tensor t [N, ...] (rows [R] int64; None: all of them), with the rows
    picked from t's bytes rather than gathered into a tensor first: a layer's requests are many
    small tensors, and every torch op skipped is a few microseconds off the round trip."""
    if t.dtype not in _TO_WIRE:
        raise ValueError(f"dtype {t.dtype} has no wire encoding; use one of {list(_TO_WIRE)}")
    data = t.detach().contiguous().view(torch.uint8).numpy()  # [N, bytes per row]
    if rows is not None:
        data = data[rows.numpy()]
    return experts_pb2.Tensor(data=data.tobytes(), dtype=_TO_WIRE[t.dtype], shape=[len(data), *t.shape[1:]])


def from_wire(msg: experts_pb2.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode and check that the byte count matches dtype and shape (raises ValueError otherwise).
    On the CPU the tensor shares the field's bytes (no copy); on another device it is copied there."""
    dtype = _FROM_WIRE.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"unknown wire dtype {msg.dtype}")
    shape = tuple(msg.shape)
    numel = 1
    for s in shape:
        if s < 0:
            raise ValueError(f"negative dimension in shape {list(shape)}")
        numel *= s
    data = msg.data
    expected = numel * _ELEMENT_SIZE[dtype]
    if len(data) != expected:
        raise ValueError(f"tensor of shape {list(shape)} and dtype {dtype} needs {expected} bytes, got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    tensor = torch.frombuffer(data, dtype=dtype).view(shape)
    return tensor if torch.device(device).type == "cpu" else tensor.to(device)
