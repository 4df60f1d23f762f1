"""``vident bench``: steady-state streaming FPS, latency and memory of one or several backends.

Thin: measuring is :mod:`service.benchmark`; this parses, prints one table and writes JSON/PNG.
A missing runtime prints its one-line reason and exits 2 (with ``--compare`` the row says
"unavailable" and the others still run; exit 2 only when none ran).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.commands.common import frame_size

EXIT_UNAVAILABLE = 2


def _targets(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(backend, precision) pairs: ``--compare torch,openvino:bf16`` or the single --backend/--precision."""
    if not args.compare:
        return [(args.backend, args.precision)]
    pairs = []
    for item in args.compare.split(","):
        backend, _, precision = item.strip().partition(":")
        pairs.append((backend, precision or args.precision))
    return pairs


def _table(results: list, title: str) -> Table:  # results: list[BenchResult]
    table = Table(title=title, show_edge=False)
    for column in (
        "backend",
        "device",
        "precision",
        "FPS",
        "x first",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "peak MB",
        "GFLOP/s",
        "CPU s/frame",
    ):
        table.add_column(column, justify="left" if column in ("backend", "device", "precision") else "right")
    baseline = next((r.fps for r in results if r.error is None), None)
    for r in results:
        if r.error is not None:
            table.add_row(r.backend, r.device, r.precision, "[red]unavailable[/]", "", "", "", "", "", "")
            continue
        lat = r.latency_ms
        table.add_row(
            r.backend, r.device, r.precision, f"{r.fps:.2f}", f"{r.fps / baseline:.2f}",
            f"{lat['p50']:.1f}", f"{lat['p95']:.1f}", f"{lat['p99']:.1f}",
            f"{r.peak_memory_mb:.0f} ({'RSS' if r.memory_kind == 'rss' else 'CUDA'})", f"{r.achieved_gflops_s:.1f}",
            f"{r.cpu_seconds_per_frame:.3f}",
        )  # fmt: skip
    return table


def _profile_table(result, rows: int = 14) -> Table:  # result: BenchResult
    table = Table(title=f"{result.backend} {result.precision}: layer time by network part", show_edge=False)
    for column in ("part", "ms/frame", "share", "kernels", "kernel types"):
        table.add_column(column, justify="right" if column in ("ms/frame", "share", "kernels") else "left")
    for group in result.extra["profile"][:rows]:
        table.add_row(
            group["name"], f"{group['ms_per_frame']:.1f}", f"{100 * group['share']:.1f}%", str(group["kernels"]),
            escape(group["precisions"]),
        )  # fmt: skip
    return table


def run(args: argparse.Namespace) -> int:
    from export.runtime import BackendUnavailable
    from service.benchmark import BenchResult, plot, report, run_benchmark

    console = Console(width=None if sys.stdout.isatty() else 140)  # logs and pipes get the whole table
    height, width = args.size
    results: list[BenchResult] = []
    for backend, precision in _targets(args):
        try:
            result = run_benchmark(
                args.model, backend, args.device, precision, args.size, args.batch, args.frames, args.warmup,
                args.checkpoint, args.profile, args.parity,
            )  # fmt: skip
        except BackendUnavailable as exc:
            if not args.compare:
                print(f"vident bench: {exc}", file=sys.stderr)
                return EXIT_UNAVAILABLE
            result = BenchResult(
                args.model, backend, args.device, precision, args.batch, height, width, 0, 0, 0.0, {}, 0.0, "",
                0.0, 0.0, 0.0, 0.0, True, error=str(exc),
            )  # fmt: skip
        results.append(result)
    ran = [r for r in results if r.error is None]
    if ran and ran[0].random_weights:
        console.print("[yellow]random weights[/] (no checkpoint): speed is representative, outputs are not")
    console.print(_table(results, f"{args.model} {height}x{width} batch {args.batch}, {args.frames} frames"))
    for r in results:
        if r.error is not None:
            console.print(f"[red]{r.backend} unavailable:[/] {escape(r.error)}")
        if "parity" in r.extra:
            console.print(f"parity: {r.extra['parity']['summary']}")  # type: ignore[index]
        if "profile" in r.extra:
            console.print(_profile_table(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report(results), indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if args.plot:
        console.print(f"wrote {plot(results, args.plot)}")
    return 0 if ran else EXIT_UNAVAILABLE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="most-nss", help="registered model name or .safetensors (default most-nss)")
    p.add_argument("--checkpoint", default=None, help="weights for --model (default: shipped or random)")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "openvino", "tensorrt"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8"))
    p.add_argument("--size", type=frame_size, default=(320, 416), help="HxW, multiples of 8 (default 320x416)")
    p.add_argument("--batch", type=int, default=1, help="streams per call (default 1)")
    p.add_argument("--frames", type=int, default=30, help="timed frames after warm-up (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--json", default=None, help="write the results here (schema in docs/performance.md)")
    p.add_argument("--plot", default=None, help="write a PNG bar chart here")
    p.add_argument("--parity", type=int, default=0, metavar="FRAMES", help="also compare with torch fp32 over N frames")
    p.add_argument("--profile", action="store_true", help="openvino: also time the layers, grouped by network part")
    p.add_argument(
        "--compare", default=None, help="several runtimes in one process: e.g. torch,onnxruntime,openvino:bf16"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="streaming FPS, latency, memory and GFLOP/s of a backend")
    add_arguments(p)
    p.set_defaults(func=run)
