"""What a router and its workers compare before serving together: checkpoint fingerprint, shard, dtype.

Two processes may only cooperate on the same weights in the same dtype: a worker built from another
checkpoint would return plausible numbers and silently wrong text, and one computing in another dtype
would break the promise that distributed serving equals in-process serving. `check_worker_identity`
is the one place that compares them. The fingerprint hashes what is cheap to read and differs between
checkpoints: the config, every tensor's name and shape, and the bytes of the tensors
that decide routing (each MoE layer's router gate) and the final norm. It reads those few tensors
only (~100 MB on the 80B model), never the experts.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from nextserve.model.checkpoint import CheckpointReader, load_config, resolve_dtype


class FingerprintMismatch(Exception):
    """A worker serves another checkpoint, another shard of the plan, or another dtype than the router expects."""


_HASHED_TENSORS = re.compile(r"^(model\.norm\.weight|model\.layers\.\d+\.mlp\.gate\.weight)$")


def checkpoint_fingerprint(path: str | Path, length: int = 16) -> str:
    config = load_config(path)
    digest = hashlib.sha256()
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    with CheckpointReader(path) as reader:
        shapes = reader.shapes()
        for name in sorted(shapes):
            digest.update(f"{name}:{list(shapes[name])};".encode())
        for name in sorted(n for n in shapes if _HASHED_TENSORS.match(n)):
            tensor = reader.get(name).contiguous()
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]


def dtype_name(dtype: torch.dtype | str) -> str:
    """The dtype as both sides spell it in the handshake: "float32", "bfloat16" or "float16"."""
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def check_worker_identity(info, *, address: str, fingerprint: str, shard: int, experts: tuple[int, ...],
                          dtype: torch.dtype | str) -> None:
    """Raise FingerprintMismatch, naming both sides, unless the worker's `InfoResponse` matches the router:
    its checkpoint fingerprint, the plan's experts for `shard`, and its serving dtype (hidden states go
    out in it and the worker must compute in it)."""
    if info.fingerprint != fingerprint:
        raise FingerprintMismatch(
            f"worker {address} (shard {shard}) serves checkpoint fingerprint {info.fingerprint}, "
            f"but the router's checkpoint has fingerprint {fingerprint}: point both at the same checkpoint")
    if info.shard != shard or tuple(info.expert_ids) != tuple(experts):
        raise FingerprintMismatch(
            f"worker {address} reports shard {info.shard} with {len(info.expert_ids)} experts, but the "
            f"router's plan gives shard {shard} {len(experts)} experts: the plans differ")
    if info.dtype != dtype_name(dtype):
        raise FingerprintMismatch(
            f"worker {address} (shard {shard}) computes in {info.dtype}, but the router serves "
            f"{dtype_name(dtype)}: start both with the same --dtype")
