"""The images install what CI tested: the runtime constraints match this environment, and the
operator image's short dependency list is all the operator imports."""
from __future__ import annotations

import pathlib
import runpy
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The gRPC client (with its health stubs and the OpenTelemetry API it propagates trace context with)
# asks the routers about their cache.
OPERATOR_PACKAGES = ("kopf", "kubernetes_asyncio", "pyyaml", "grpcio", "grpcio-health-checking", "protobuf",
                     "opentelemetry-api")


def test_constraints_match_the_tested_environment():
    render = runpy.run_path(str(ROOT / "deploy" / "runtime_constraints.py"))["render"]
    committed = (ROOT / "deploy" / "constraints.txt").read_text()
    assert committed == render(), "deploy/constraints.txt is stale: run `make constraints` and commit it"
    for dockerfile in ("Dockerfile", "Dockerfile.operator"):
        assert "-c deploy/constraints.txt" in (ROOT / dockerfile).read_text(), dockerfile


def test_operator_image_dependencies_are_enough():
    text = (ROOT / "Dockerfile.operator").read_text()
    assert f"pip install -c deploy/constraints.txt {' '.join(OPERATOR_PACKAGES)}" in text
    # The operator's modules import with the serving stack blocked, as in its image.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'triton', 'numpy', 'safetensors', 'tokenizers', 'redis', 'fastapi'):\n"
        "            raise ImportError(f'{name} is not in the operator image')\n"
        "        if name.startswith('opentelemetry.sdk') or name.startswith('opentelemetry.exporter'):\n"
        "            raise ImportError(f'{name} is not in the operator image')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import nextserve.operator.handlers, nextserve.operator.main, nextserve.operator.router_probe\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
