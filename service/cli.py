"""The ``vident`` command. Thin: it parses arguments and calls the packages that do the work.

Each subcommand is a small module in ``service.commands`` that exposes ``add_parser(subparsers)``, which
registers its arguments and sets ``func``; this module only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that provide a subcommand, in the order `vident --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "service.commands.info",
    "service.commands.process",
    "service.commands.synth",
    "service.commands.eval",
    "service.commands.train",
    "service.commands.fit_filter",
    "service.commands.fit_homography",
    "service.commands.fit_colour",
    "service.commands.fit_detail",
    "service.commands.ship",
    "service.commands.serve",
    "service.commands.worker",
    "service.commands.stream",
    "service.commands.export",
    "service.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vident", description="Real-time multi-task video enhancement for dental microcameras."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
