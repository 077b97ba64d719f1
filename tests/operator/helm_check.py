"""Run Helm's own engine (helm-sdkpy) on the chart; invoked by test_chart.py with the
Python 3.12 environment in .venv-helm (helm-sdkpy needs Python >= 3.12).

usage: helm_check.py lint CHART
       helm_check.py install CHART RELEASE NAMESPACE VALUES_JSON   (KUBECONFIG, HELM_DRIVER=memory)
Prints one JSON document on stdout; exits 1 with the error on stderr when Helm fails.
"""

import asyncio
import json
import sys

import helm_sdkpy


async def main(argv: list[str]) -> dict:
    if argv[0] == "lint":
        config = helm_sdkpy.Configuration(namespace="default")
        return await helm_sdkpy.Lint(config).run(argv[1])
    if argv[0] == "install":
        chart, release, namespace, values = argv[1], argv[2], argv[3], json.loads(argv[4])
        config = helm_sdkpy.Configuration(namespace=namespace)
        return await helm_sdkpy.Install(config).run(release, chart, values=values, wait=False, timeout=60)
    raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    try:
        result = asyncio.run(main(sys.argv[1:]))
    except helm_sdkpy.HelmError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1)
    json.dump(result, sys.stdout, default=str)
