"""Building the CPU path's C++ kernels (kernels/*/cpu_fused.cpp) where they run.

torch.utils.cpp_extension compiles each source once per machine into torch's extension cache
(g++ and ninja; -march=native, so a build serves the CPU it was built on), and loads it from there
afterwards. A source that cannot be built (no compiler) is said once in the log and reported as
unavailable; the callers then keep to their torch forms. Shared by every fused CPU kernel so that
they build with the same flags and fail the same way.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

_log = logging.getLogger(__name__)
# -ffp-contract=off: a*b + c stays a rounded product then a rounded sum, as torch's elementwise ops
# compute it, unless a kernel asks for a fused multiply-add explicitly; -fopenmp: at::parallel_for
# runs on torch's OpenMP threads only when the extension is compiled with it
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
_built: dict[str, object] = {}
_failed: dict[str, str] = {}


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a venv's interpreter run by path has the pip-installed one (a
    dependency) off PATH, so put its folder there."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def cpu_tag() -> str:
    """A short digest of this CPU's instruction-set flags. -march=native builds for the CPU at hand, and
    torch keys its extension cache by name and flags only: with the tag in the name, a cache shared by
    machines of different CPUs (a home directory on a network volume) never loads another CPU's build."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def load(name: str, source: Path):
    """The extension built from `source` (building it on first use), or None where it cannot be."""
    if name not in _built and name not in _failed:
        try:
            _ninja_on_path()
            from torch.utils.cpp_extension import load as build
            _built[name] = build(name=f"{name}_{cpu_tag()}", sources=[str(source)], extra_cflags=FLAGS,
                                 extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as error:  # no compiler, no headers: the torch forms serve instead
            _failed[name] = f"{type(error).__name__}: {error}"
            _log.warning("the CPU kernel %s could not be built, using the torch forms: %s", name, _failed[name])
    return _built.get(name)


def failure(name: str) -> str | None:
    """Why `name` could not be built, if it could not."""
    return _failed.get(name)


def needs_backward(*tensors) -> bool:
    """Whether a call on these tensors is to be differentiated: the C++ ops have no backward, so such
    a call keeps to the torch forms."""
    import torch
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class CppKernel:
    """One cpu_fused.cpp beside its family's torch forms: built on first use, or reported unbuildable."""

    def __init__(self, name: str, source: Path, what: str):
        self.name, self.source, self.what = name, source, what

    def available(self) -> bool:
        """Whether the extension is built (building it now if it has not been tried)."""
        return load(self.name, self.source) is not None

    def module(self):
        """The built extension; RuntimeError naming why where it could not be built."""
        extension = load(self.name, self.source)
        if extension is None:
            raise RuntimeError(f"{self.what} is not built: {failure(self.name)}")
        return extension
