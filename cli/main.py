"""`nextserve`: one command for every part of the system."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each subcommand lives in its own module with `add_parser(subparsers)`; the module is imported
# only to register flags, so `nextserve --help` stays quick and torch-free where it can.
SUBCOMMANDS = ["generate", "checkpoint", "train", "worker", "router", "up", "operator"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextserve",
        description="Expert-parallel serving for Qwen3-Next: make or train checkpoints, generate text, "
                    "run the router and expert workers, or run the Kubernetes operator.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"nextserve.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"nextserve.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
