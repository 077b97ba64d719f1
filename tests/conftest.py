"""Fixtures shared by every test package."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A `tiny` preset checkpoint (seed 0, float32, single file), made once per test session.
    Treat it as read-only: copy it before modifying anything."""
    from nextserve.model.make_checkpoint import make_checkpoint

    out = tmp_path_factory.mktemp("checkpoints") / "tiny"
    make_checkpoint(out, "tiny", seed=0, progress=False)
    return out
