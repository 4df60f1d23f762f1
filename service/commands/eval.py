"""``vident eval``: a model against the baseline and classical comparators on a labelled data set.

Prints a table in the form of the dissertation's Table 6.4 and writes the numbers as JSON. The
model runs through the same streaming pipeline as the service (``service.evaluation``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

FORMATS = {
    "psnr": "{:.2f}", "psnr_aligned": "{:.2f}", "ssim": "{:.4f}", "iou": "{:.3f}", "mace": "{:.2f}",
    "ew": "{:.5f}", "fps": "{:.1f}",
}  # fmt: skip
HEADERS = {
    "psnr": "PSNR ↑", "psnr_aligned": "PSNR c.a. ↑", "ssim": "SSIM ↑", "iou": "IoU ↑", "mace": "MACE ↓",
    "ew": "E(W) ↓", "fps": "FPS ↑",
}  # fmt: skip


def _clean(value: object) -> object:
    """JSON has no NaN/inf: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_report_json(report: object, path: Path) -> None:
    """The ``--json`` file of ``vident eval`` (also written by ``vident ship``): NaN/inf become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report.to_json()), indent=2) + "\n")  # type: ignore[attr-defined]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.panel import Panel
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from models.data.format import DataFormatError
    from service.evaluation import count_frames, evaluate

    console = Console()
    try:
        total = count_frames(args.data, args.max_sequences, args.max_frames)
    except DataFormatError as exc:
        console.print("[red]data set problem:[/]")
        console.print(str(exc), markup=False, soft_wrap=True)
        return 2
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"eval {args.model}", total=total)
        report = evaluate(
            args.model,
            args.data,
            backend=args.backend,
            device=args.device,
            max_sequences=args.max_sequences,
            max_frames=args.max_frames,
            comparators=not args.no_comparators,
            on_frame=lambda: progress.advance(task),
        )
    if report.random_weights:
        console.print(
            Panel(
                f"[bold]{report.model} has no trained checkpoint: these are RANDOMLY INITIALISED weights.[/]\n"
                "Its row measures the pipeline, not the method. Pass a trained .safetensors to --model.",
                title="random weights",
                border_style="red",
            )
        )
    title = f"{report.model} on {report.data}: {len(report.sequences)} sequences, {report.frames} frames"
    table = Table(title=title, show_edge=False)
    table.add_column("method")
    for key in FORMATS:
        table.add_column(HEADERS[key], justify="right")
    for name, values in report.rows.items():
        cells = ["-" if values.get(k) is None else FORMATS[k].format(values[k]) for k in FORMATS]
        label = f"{name} [red](random weights)[/]" if name == report.model and report.random_weights else name
        table.add_row(label, *cells)
    console.print(table)
    for name, note in report.notes.items():
        console.print(f"[dim]{name}: {note}[/]")
    console.print(
        "[dim]E(W): squared RGB warping error in [0,1] units over teeth stable between frames (the whole valid "
        "warp where a sequence has no teeth labels; Lai et al. 2018); "
        "PSNR c.a.: colour-aligned PSNR, after the per-channel gain and offset that best fit the target; "
        "FPS: per-frame wall time through the service pipeline (model) or the OpenCV call (comparators).[/]"
    )
    if args.json is not None:
        write_report_json(report, args.json)
        console.print(f"wrote {args.json}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model against baselines on a labelled data set")
    p.add_argument("--model", required=True, help="registered model name or a checkpoint .safetensors")
    p.add_argument("--data", required=True, type=Path, help="data set folder (docs/data.md), e.g. from vident synth")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--backend", default="torch", help="inference backend (default torch)")
    p.add_argument("--device", default="cpu", help="device (default cpu)")
    p.add_argument("--max-sequences", type=int, help="only the first N sequences")
    p.add_argument("--max-frames", type=int, help="only the first N frames of each sequence")
    p.add_argument("--no-comparators", action="store_true", help="skip the OpenCV rows (faster)")
    p.set_defaults(func=run)
