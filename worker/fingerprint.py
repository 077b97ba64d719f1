"""The checkpoint fingerprint that a router and its workers compare before serving together.

Two processes may only cooperate on the same weights: a worker built from another checkpoint would
return plausible numbers and silently wrong text. The fingerprint hashes what is cheap to read and
differs between checkpoints: the config, every tensor's name and shape, and the bytes of the tensors
that decide routing (each MoE layer's router gate) and the final norm. It reads those few tensors
only (~100 MB on the 80B model), never the experts.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from nextserve.model.checkpoint import CheckpointReader, load_config

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
