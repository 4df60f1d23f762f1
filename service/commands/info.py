"""``vident info``: versions, runtimes and devices present, and every registered model's size."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform

from rich.console import Console
from rich.table import Table

from service.commands.common import frame_size

RUNTIME_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "av", "fastapi")


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return found


def run(args: argparse.Namespace) -> int:
    from models import create_model, list_models
    from models.complexity import measure_complexity

    console = Console()
    console.print(
        f"[bold]vident[/] {_version('vident') or 'dev'}  python {platform.python_version()}"
        f"  {platform.machine()}  {platform.processor() or ''}".rstrip()
    )
    versions = Table(title="Runtimes", show_edge=False)
    versions.add_column("package")
    versions.add_column("version")
    for package in RUNTIME_PACKAGES:
        versions.add_row(package, _version(package) or "[dim]not installed[/]")
    console.print(versions)
    console.print("devices: " + ", ".join(devices()))
    height, width = args.size
    table = Table(title=f"Models (streaming step at {height}x{width})", show_edge=False)
    for col in ("model", "parameters", "GFLOPs (MAC)", "outputs", "state tensors"):
        table.add_column(col, justify="right" if col in ("parameters", "GFLOPs (MAC)") else "left")
    for name in list_models(include_tiny=args.tiny):
        model = create_model(name)
        c = measure_complexity(model, height, width)
        spec = model.spec  # type: ignore[attr-defined]
        table.add_row(
            name,
            f"{c.parameters / 1e6:.3f} M",
            f"{c.gmacs:.1f}",
            ", ".join(o.name for o in spec.outputs),
            str(len(spec.states)),
        )
    console.print(table)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="versions, backends, devices and model sizes")
    p.add_argument("--size", type=frame_size, default=(320, 416), help="HxW for GFLOPs (default 320x416)")
    p.add_argument("--tiny", action="store_true", help="also list the tiny test variants")
    p.set_defaults(func=run)
