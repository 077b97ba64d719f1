"""`nextserve operator [--namespace NS ... | --all-namespaces]`: run the operator.

Credentials are found the way kopf finds them: the in-cluster service account when
running in a pod, otherwise the current kubeconfig context.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

# kopf and the handlers are imported when the operator runs, not when flags are
# registered: `nextserve --help` stays quick.
DEFAULT_RESYNC_SECONDS = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextserve operator", description="Run the Qwen3NextDeployment operator.")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The operator's flags, for `nextserve operator` or this module's own parser."""
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; globs like 'serving-*' work)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    parser.add_argument("--peering", default=os.environ.get("NEXTSERVE_PEERING", ""), metavar="NAME",
                        help="kopf peering object (ClusterKopfPeering, or KopfPeering in each --namespace) through "
                             "which several operator replicas agree that one works; it must exist. Empty (the "
                             "default): this operator runs alone and needs no peering object")
    parser.add_argument("--priority", type=int, default=None, metavar="N",
                        help="peering priority; the live replica with the highest one works (default: derived "
                             "from the pod name in $POD_ID, else from the host and process, so replicas differ)")
    parser.add_argument("--resync-seconds", type=float,
                        default=float(os.environ.get("NEXTSERVE_RESYNC_SECONDS", DEFAULT_RESYNC_SECONDS)),
                        help="how often each deployment's children are re-checked (default: %(default)s)")
    parser.add_argument("--liveness", default=os.environ.get("NEXTSERVE_LIVENESS", "http://0.0.0.0:8080/healthz"),
                        metavar="URL", help="health endpoint for the liveness probe; its JSON says whether this "
                                            "replica works or stands by and what keeps it from working; '' "
                                            "disables it (default: %(default)s)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every API call and handler step")


async def operate(args: argparse.Namespace, *, stop_flag: Any = None, ready_flag: Any = None) -> None:
    """Run until stopped (flags: asyncio/threading events or futures, as kopf accepts)."""
    import kopf

    from nextserve.operator import handlers

    from nextserve.operator.health import priority_of

    clusterwide = not args.namespace
    # kopf names this process in the peering object by $POD_ID (the chart sets the pod name).
    identity = os.environ.get("POD_ID") or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
    peering = handlers.Peering(
        name=args.peering or None, identity=identity,
        priority=args.priority if args.priority is not None else priority_of(identity),
        namespaces=tuple(args.namespace), clusterwide=clusterwide)
    settings = kopf.OperatorSettings()
    handlers.configure(settings, peering)
    await kopf.operator(
        registry=handlers.build_registry(peering, args.resync_seconds),
        settings=settings,
        identity=identity,
        clusterwide=clusterwide,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        memo=kopf.Memo(),
    )


def run(argv: Sequence[str] | None = None) -> int:
    """`nextserve operator ARGS...` as a function: parse argv and run until stopped."""
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run with flags already parsed by a parser that add_arguments() filled."""
    import kopf

    # kopf's own logging setup covers the operator's loggers too (one handler on the root).
    kopf.configure(verbose=args.verbose)
    asyncio.run(operate(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
