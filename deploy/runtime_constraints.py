"""Print the runtime dependencies of nextserve, as installed in this environment, one `name==version` a line.

`make constraints` writes them to deploy/constraints.txt; both Dockerfiles install with
`-c deploy/constraints.txt`, and tests/operator/test_images.py checks that the file matches
the environment the tests ran in: an image holds the versions CI verified. Local version
labels are dropped (torch's `+cpu` in CI): a GPU image takes the CUDA build of the same release.
"""
from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str = "nextserve") -> dict[str, str]:
    """{canonical name: installed version} for every package `root` needs at run time (no extras)."""
    seen: dict[str, str] = {}
    todo = [root]
    while todo:
        dist = metadata.distribution(todo.pop())
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonical(req.name)
            if name not in seen:
                seen[name] = metadata.version(req.name).split("+")[0]
                todo.append(req.name)
    return dict(sorted(seen.items()))


def render() -> str:
    lines = ["# Runtime dependencies as CI tested them; regenerate with `make constraints`."]
    lines += [f"{name}=={version}" for name, version in runtime_closure().items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
