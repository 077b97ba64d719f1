"""The fused form of the routed experts on the CPU: cpu_fused.cpp, built on first use.

One op reads each active expert's bf16 weight rows once, straight from w13 [E, 2I, H] and w2 [E, H, I],
and computes every slot routed to it (cpu_fused.cpp says how its roundings follow naive.py). The torch
forms in cpu.py cannot do that at decode sizes: the gathered form copies each slot's expert weights
before its batched matmul, the loop runs ~5 ops per active expert.

The extension is compiled by torch.utils.cpp_extension (g++ and ninja, -march=native: it runs where it
is built) into torch's extension cache, once per machine; a serving process builds it at load time
(`prepare`) so no request waits for the compiler. Where it cannot be built (no compiler), `available()`
says so once in the log and cpu.py keeps to its torch forms.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from .naive import check_expert_ffn_args

__all__ = ["available", "prepare", "expert_ffn"]

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("cpu_fused.cpp")
# -ffp-contract=off: a*b + c stays a rounded product then a rounded sum, as torch's weighted sum does
# it, rather than one fused multiply-add that g++ would otherwise form
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
_extension = None
_failed: str | None = None


def _build():
    global _extension, _failed
    if _extension is None and _failed is None:
        try:
            _ninja_on_path()
            from torch.utils.cpp_extension import load
            _extension = load(name="nextserve_moe_cpu_fused", sources=[str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                              verbose=False)
        except Exception as error:  # no compiler, no headers: the torch forms serve instead
            _failed = f"{type(error).__name__}: {error}"
            _log.warning("the fused CPU expert kernel could not be built, using the torch forms: %s", _failed)
    return _extension


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a venv's interpreter run by path has the pip-installed one (a
    dependency) off PATH, so put its folder there."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def available() -> bool:
    """Whether the extension is built (building it now if it has not been tried)."""
    return _build() is not None


def prepare() -> bool:
    """Build the extension ahead of the first request where the CPU path serves bf16 experts."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported() and available()


def expert_ffn(hidden, expert_ids, expert_weights, w13, w2, *, out_dtype=None):
    """naive.expert_ffn's contract (bf16 hidden and weights only) in one pass over the active experts."""
    check_expert_ffn_args(hidden, expert_ids, expert_weights, w13, w2)
    if hidden.dtype != torch.bfloat16 or w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
        raise ValueError(f"the fused expert kernel takes bf16 hidden states and weights, got {hidden.dtype}, "
                         f"{w13.dtype}, {w2.dtype}")
    extension = _build()
    if extension is None:
        raise RuntimeError(f"the fused expert kernel is not built: {_failed}")
    ids = expert_ids if expert_ids.dtype == torch.int64 else expert_ids.long()
    weights = expert_weights if expert_weights.dtype == torch.float32 else expert_weights.float()
    out = extension.expert_ffn(hidden, ids, weights, w13, w2)
    dtype = out_dtype or hidden.dtype
    return out if dtype == torch.float32 else out.to(dtype)
