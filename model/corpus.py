"""The training corpus of the shipped model: the Python standard library's own `*.py` sources.

Every machine that runs nextserve has it, so training needs no download. The text is the
interpreter's: a different Python version has a different standard library, which is why a
training run records the version and a digest of the files it read (`CorpusFiles.digest`).
License: the Python Software Foundation License (PSF-2.0), under which CPython ships these files.

The train/validation split is by file, decided by a hash of the file's path relative to the
library root: the same file falls on the same side on every machine and in every Python version
that has it, and a validation file is never seen in training, not even in part.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

VALIDATION_PER_MILLE = 20  # 2% of the files, chosen by path hash


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative_path: str, per_mille: int = VALIDATION_PER_MILLE) -> bool:
    """Whether the file at `relative_path` (POSIX form) belongs to the validation split."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < per_mille


@dataclass(frozen=True)
class CorpusFiles:
    root: Path
    train: list[str]       # relative POSIX paths, sorted
    validation: list[str]

    def texts(self, split: str) -> list[str]:
        names = {"train": self.train, "validation": self.validation}[split]
        return [_read(self.root / name) for name in names]

    @cached_property
    def digest(self) -> str:
        """sha256 over every file's path and bytes, in order: two runs read the same corpus iff equal."""
        h = hashlib.sha256()
        for name in sorted(self.train + self.validation):
            h.update(name.encode("utf-8") + b"\0" + (self.root / name).read_bytes() + b"\0")
        return h.hexdigest()


def find_corpus(root: str | Path | None = None, per_mille: int = VALIDATION_PER_MILLE) -> CorpusFiles:
    """The `*.py` files under `root` (default: the standard library, without site-packages) that
    are valid UTF-8, split into train and validation. Raises ValueError if either split is empty."""
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise ValueError(f"corpus directory {root} does not exist")
    names = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if "site-packages" in relative.parts or "dist-packages" in relative.parts or not path.is_file():
            continue
        try:
            _read(path)
        except UnicodeDecodeError:
            continue  # a few test fixtures are deliberately in other encodings
        names.append(relative.as_posix())
    train = [n for n in names if not is_validation(n, per_mille)]
    validation = [n for n in names if is_validation(n, per_mille)]
    if not train or not validation:
        raise ValueError(f"{root}: {len(train)} training and {len(validation)} validation files among "
                         f"{len(names)} *.py files; need at least one of each")
    return CorpusFiles(root, train, validation)


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8")


def token_stream(texts: list[str], encode_batch, separator_id: int) -> torch.Tensor:
    """One long int64 token sequence: every document, each followed by `separator_id` (end-of-text),
    so the model learns where a file ends. `encode_batch(texts) -> list[list[int]]`."""
    ids: list[int] = []
    for doc in encode_batch(texts):
        ids.extend(doc)
        ids.append(separator_id)
    return torch.tensor(ids, dtype=torch.int64)
