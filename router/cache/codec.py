"""What is stored at a cache key, and how a read proves it is the value that key names.

A value is the safetensors serialisation of its tensors (the payload) behind a header:

    head = MAGIC "NXSV" | u32 header length | header JSON | BLAKE2b-128(header JSON) | inline payload

The header names the format version, the namespace (checkpoint fingerprint and serving dtype), the
value's kind ("state" or "kv"), its chain key and position, every tensor's dtype and shape, and the
BLAKE2b-256 checksum and size of the payload. A payload above `part_bytes` is not inline: it is split
into parts, each stored under its own key (listed in the header, named after the payload checksum so
that two writers of the same key never mix their parts).

`read_header` and `decode` verify everything on every read; whatever fails is `Unusable` with a
`MissReason`, and the caller treats it as a miss: a value is used only when it is exactly the one its
key names, in this model's layout.
"""
from __future__ import annotations

import enum
import hashlib
import json
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .keys import BlockKey, CacheNamespace
from .layout import KINDS, TensorSpec

MAGIC = b"NXSV"
_U32 = struct.Struct("<I")
_HEADER_DIGEST = 16
DEFAULT_PART_BYTES = 8 * 2**20  # large Redis values stall its single thread; 8 MiB parts keep each GET short
MAX_HEADER_BYTES = 2**20


class MissReason(enum.StrEnum):
    ABSENT = "absent"                # no value at the key (never written, expired, evicted, flushed)
    MALFORMED = "malformed"          # not a value of this cache (bad magic, unparsable header)
    TRUNCATED = "truncated"          # shorter or longer than its header says
    CHECKSUM = "checksum"            # header or payload bytes differ from their checksum
    VERSION = "version"              # another cache format version
    FINGERPRINT = "fingerprint"      # written for another checkpoint or serving dtype
    KEY = "key"                      # the header names another key, kind or position
    MISSING_PART = "missing_part"    # a part of a split value is gone (evicted, expired)
    LAYOUT = "layout"                # tensors are not the ones this model's cache holds


class Unusable(Exception):
    """A value that must not be used; `reason` says why (a MissReason), the message gives the detail."""

    def __init__(self, reason: MissReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ValueHeader:
    kind: str
    position: int
    tensors: dict[str, TensorSpec]
    checksum: str
    size: int
    parts: tuple[str, ...]        # Redis keys of the parts, in order; empty when the payload is inline
    part_sizes: tuple[int, ...]
    inline: bytes                 # the payload when it has no parts


@dataclass(frozen=True, slots=True)
class EncodedValue:
    redis_key: str
    head: bytes
    parts: tuple[tuple[str, bytes], ...]  # (redis key, bytes) of each part

    @property
    def nbytes(self) -> int:
        return len(self.head) + sum(len(b) for _, b in self.parts)


def value_key(namespace: CacheNamespace, kind: str, key: BlockKey) -> str:
    """The Redis key of the head of the `kind` value at `key`."""
    if kind not in KINDS:
        raise ValueError(f"value kind {kind!r} is not one of {KINDS}")
    return f"{namespace.redis_prefix}:{kind}:{key.hex}"


def payload_checksum(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=32).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def specs_of(tensors: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {name: (_dtype_name(t.dtype), tuple(t.shape)) for name, t in sorted(tensors.items())}


def layout_mismatch(actual: dict[str, TensorSpec], expected: dict[str, TensorSpec]) -> str | None:
    if actual.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
        return f"tensors differ from the model's layout (missing {missing[:4]}, unexpected {extra[:4]})"
    for name, spec in expected.items():
        if tuple(actual[name][1]) != tuple(spec[1]) or actual[name][0] != spec[0]:
            return f"{name} is {actual[name][0]} {list(actual[name][1])}, the model's layout has {spec[0]} {list(spec[1])}"
    return None


def encode(namespace: CacheNamespace, kind: str, key: BlockKey, tensors: dict[str, torch.Tensor], *,
           part_bytes: int = DEFAULT_PART_BYTES, inline_bytes: int | None = None,
           expected: dict[str, TensorSpec] | None = None) -> EncodedValue:
    """Serialise `tensors` (CPU) as the `kind` value at `key`: inline when the payload is at most
    `inline_bytes` (default `part_bytes`), else in parts of `part_bytes`. Raises ValueError on tensors
    that are not CPU tensors or, with `expected` (from ModelLayout.expected), not the model's layout."""
    inline_bytes = part_bytes if inline_bytes is None else inline_bytes
    if part_bytes < 1 or inline_bytes < 0:
        raise ValueError(f"need part_bytes >= 1 and inline_bytes >= 0, got {part_bytes}, {inline_bytes}")
    if not tensors:
        raise ValueError("a cache value needs at least one tensor")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            raise ValueError(f"cache value tensor {name!r} must be a CPU torch.Tensor (copy it off the device first)")
    specs = specs_of(tensors)
    if expected is not None and (problem := layout_mismatch(specs, expected)):
        raise ValueError(f"cache {kind} value at position {key.position}: {problem}")
    payload = save_safetensors({n: t.contiguous() for n, t in tensors.items()})
    checksum = payload_checksum(payload)
    rkey = value_key(namespace, kind, key)
    chunks = [payload[i:i + part_bytes] for i in range(0, len(payload), part_bytes)] if len(payload) > inline_bytes else []
    parts = tuple((f"{rkey}:part:{checksum[:16]}:{i}", chunk) for i, chunk in enumerate(chunks))
    header = json.dumps({
        "format": namespace.format_version, "fingerprint": namespace.fingerprint, "dtype": namespace.dtype,
        "kind": kind, "key": key.hex, "position": key.position,
        "tensors": {n: [d, list(s)] for n, (d, s) in specs.items()},
        "checksum": checksum, "size": len(payload),
        "parts": [k for k, _ in parts], "part_sizes": [len(c) for c in chunks],
    }, sort_keys=True, separators=(",", ":")).encode()
    head = b"".join([MAGIC, _U32.pack(len(header)), header, hashlib.blake2b(header, digest_size=_HEADER_DIGEST).digest(),
                     b"" if parts else payload])
    return EncodedValue(rkey, head, parts)


def read_header(raw: bytes | None, namespace: CacheNamespace, kind: str, key: BlockKey) -> ValueHeader:
    """Parse and verify the head stored at value_key(namespace, kind, key). Raises Unusable."""
    if raw is None:
        raise Unusable(MissReason.ABSENT, f"no {kind} value at position {key.position}")
    if raw[:4] != MAGIC:
        raise Unusable(MissReason.MALFORMED, f"{kind} value at position {key.position} does not start with {MAGIC!r}")
    if len(raw) < 8:
        raise Unusable(MissReason.TRUNCATED, f"{kind} value at position {key.position} ends inside its length field")
    (length,) = _U32.unpack_from(raw, 4)
    if length > MAX_HEADER_BYTES:
        raise Unusable(MissReason.MALFORMED, f"{kind} value at position {key.position} claims a {length}-byte header")
    header_end = 8 + length + _HEADER_DIGEST
    if len(raw) < header_end:
        raise Unusable(MissReason.TRUNCATED, f"{kind} value at position {key.position} ends inside its header")
    header_bytes = raw[8:8 + length]
    if hashlib.blake2b(header_bytes, digest_size=_HEADER_DIGEST).digest() != raw[8 + length:header_end]:
        raise Unusable(MissReason.CHECKSUM, f"{kind} value at position {key.position}: header checksum mismatch")
    try:
        h = json.loads(header_bytes)
        fmt, fingerprint, dtype = h["format"], h["fingerprint"], h["dtype"]
        tensors = {str(n): (str(d), tuple(int(x) for x in s)) for n, (d, s) in h["tensors"].items()}
        parts, part_sizes = tuple(str(p) for p in h["parts"]), tuple(int(s) for s in h["part_sizes"])
        size, checksum, position, hkey, hkind = int(h["size"]), str(h["checksum"]), h["position"], h["key"], h["kind"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Unusable(MissReason.MALFORMED, f"{kind} value at position {key.position}: bad header ({e!r})") from None
    if fmt != namespace.format_version:
        raise Unusable(MissReason.VERSION, f"{kind} value at position {key.position} has cache format {fmt}, "
                                           f"this router reads format {namespace.format_version}")
    if (fingerprint, dtype) != (namespace.fingerprint, namespace.dtype):
        raise Unusable(MissReason.FINGERPRINT, f"{kind} value at position {key.position} was written for checkpoint "
                                               f"{fingerprint} in {dtype}, this router serves {namespace.fingerprint} "
                                               f"in {namespace.dtype}")
    if (hkey, hkind, position) != (key.hex, kind, key.position):
        raise Unusable(MissReason.KEY, f"value at {kind} position {key.position} names {hkind} key {hkey} "
                                       f"at position {position}")
    inline = raw[header_end:]
    held = sum(part_sizes) if parts else len(inline)
    if len(parts) != len(part_sizes) or (parts and inline) or held != size:
        raise Unusable(MissReason.TRUNCATED, f"{kind} value at position {key.position} holds {held} payload "
                                             f"bytes in {len(parts)} parts, its header says {size}")
    return ValueHeader(kind, key.position, tensors, checksum, size, parts, part_sizes, inline)


def decode(header: ValueHeader, parts: list[bytes | None] | None = None, *,
           expected: dict[str, TensorSpec] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a verified header, from its inline payload or its `parts` (bytes read at
    header.parts, None where absent). Raises Unusable; returns tensors only when every check passes."""
    where = f"{header.kind} value at position {header.position}"
    if header.parts:
        parts = list(parts or [])
        if len(parts) != len(header.parts):
            raise Unusable(MissReason.MISSING_PART, f"{where}: {len(parts)} of {len(header.parts)} parts read")
        for i, (part, size) in enumerate(zip(parts, header.part_sizes)):
            if part is None:
                raise Unusable(MissReason.MISSING_PART, f"{where}: part {i} of {len(header.parts)} is gone")
            if len(part) != size:
                raise Unusable(MissReason.TRUNCATED, f"{where}: part {i} holds {len(part)} bytes, expected {size}")
        payload = b"".join(parts)
    else:
        payload = header.inline
    if payload_checksum(payload) != header.checksum:
        raise Unusable(MissReason.CHECKSUM, f"{where}: payload checksum mismatch")
    try:
        tensors = load_safetensors(payload)
    except Exception as e:  # a payload with the right checksum but not safetensors: written by a broken encoder
        raise Unusable(MissReason.MALFORMED, f"{where}: payload is not safetensors ({e})") from None
    specs = specs_of(tensors)
    if (problem := layout_mismatch(specs, header.tensors)) is not None:
        raise Unusable(MissReason.LAYOUT, f"{where}: payload differs from its header: {problem}")
    if expected is not None and (problem := layout_mismatch(specs, expected)) is not None:
        raise Unusable(MissReason.LAYOUT, f"{where}: {problem}")
    return tensors
