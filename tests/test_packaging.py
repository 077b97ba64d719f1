"""The built wheel carries every component under `nextserve.` and nothing at the top level
(a top-level `operator` would shadow the standard library's)."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = {"cli", "client", "kernels", "model", "operator", "proto", "router", "telemetry", "worker"}


def test_wheel_maps_components_under_nextserve(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("nextserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"nextserve"}, f"unexpected top-level entries {sorted(top)}"
    components = {n.split("/")[1] for n in names if n.startswith("nextserve/") and n.count("/") >= 2}
    assert components == COMPONENTS
    assert "nextserve/operator/__init__.py" not in names  # a namespace package, on purpose
    assert "nextserve/kernels/gated_delta_rule/chunk.py" in names
    assert "nextserve/proto/v1/serving_pb2_grpc.py" in names
    assert "nextserve/router/cache/keys.py" in names  # subpackages are listed one by one in pyproject.toml
