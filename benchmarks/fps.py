"""``python -m benchmarks.fps``: steady-state streaming speed of one or several backends.

The same command as ``vident bench`` (same arguments, table and JSON); the measuring is
:mod:`service.benchmark`, documented in docs/performance.md.

    python -m benchmarks.fps --model most-nss --backend openvino --precision bf16 --size 320x416
"""

from __future__ import annotations

import argparse

from service.commands.bench import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fps", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
