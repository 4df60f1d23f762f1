"""``vident synth``: write a synthetic labelled data set (or a preview contact sheet) in the on-disk format.

Defaults per split make the fixed sets that model cards and benchmarks quote reproducible from
the command alone: ``vident synth --out data/test --split test`` is 8 sequences x 24 frames at
320x416, moderate noise, seed 2024; ``--split real`` writes the real-content evaluation split
(photographs from packages no training source uses, under drawn degradations; docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from service.commands.common import image_size, share
from service.commands.train import content_mix

SPLIT_DEFAULTS = {  # split -> (sequences, noise)
    "train": (64, "mixed"),
    "val": (8, "mixed"),
    "test": (8, "moderate"),
    "real": (12, "mixed"),  # the real-content evaluation split: noise is drawn per sequence
}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from models.data.format import write_sequence
    from models.data.preview import write_contact_sheet
    from models.data.synth import SynthConfig, real_content_sequence, render_sequence, sequence_seed

    console = Console(stderr=True)
    if args.out is None and args.preview is None:
        console.print("[red]nothing to do:[/] give --out DIR and/or --preview PNG")
        return 2
    sequences_default, noise_default = SPLIT_DEFAULTS[args.split]
    sequences = args.sequences if args.sequences is not None else sequences_default
    height, width = args.size
    if args.split == "real" and (args.mix is not None or args.degradation != "recipe"):
        console.print("[red]--split real has its own content and degradations[/] (drop --mix / --degradation)")
        return 2
    if args.mix is not None:
        try:
            args.mix.check_split(args.split)
        except ValueError as exc:
            console.print(f"[red]{exc}[/]")
            return 2
    cfg = SynthConfig(
        height=height, width=width, frames=args.frames, noise=args.noise or noise_default, motion=args.motion,
        degradation=args.degradation, recipe_share=args.recipe_share, recipe_codec=args.recipe_codec,
    )  # fmt: skip

    def render(cfg: SynthConfig, index: int):  # noqa: ANN202 - LabelledSequence
        if args.split == "real":
            return real_content_sequence(cfg, args.seed, index)
        if args.mix is not None:  # the same per-clip draw as training's stream (models.data.dataset)
            cfg = args.mix.for_clip(cfg, args.seed, args.split, index)
        return render_sequence(cfg, sequence_seed(args.seed, args.split, index))

    out = Path(args.out) if args.out is not None else None
    held = sorted(out.glob("seq_*")) if out is not None and out.is_dir() else []
    if out is not None and (held or (out / "dataset.json").exists()) and not args.overwrite:
        console.print(f"[red]{out} already holds a data set[/] ({len(held)} sequences): writing into it would mix "
                      "two; give another --out, or --overwrite to replace it")  # fmt: skip
        return 2
    if args.preview is not None:
        preview_cfg = SynthConfig(**{**asdict(cfg), "frames": max(cfg.frames, 5)})
        seq = render(preview_cfg, args.preview_index)
        write_contact_sheet(seq, str(args.preview))
        console.print(
            f"preview of {args.split} sequence {args.preview_index} ({seq.meta['noise']} noise) -> {args.preview}"
        )
    if out is None:
        return 0
    for folder in held:  # --overwrite: none of the old sequences may survive beside the new ones
        shutil.rmtree(folder)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"synth {args.split}", total=sequences)
        for index in range(sequences):
            seq = render(cfg, index)
            write_sequence(seq, out / f"seq_{index:03d}", {"split": args.split, "seed": args.seed, "index": index})
            progress.advance(task)
    seconds = time.perf_counter() - start
    info = {
        "generator": "vident synth",
        "split": args.split,
        "seed": args.seed,
        "sequences": sequences,
        "config": asdict(cfg),
        "content_mix": str(args.mix) if args.mix is not None else None,
        "seconds": round(seconds, 2),
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    frames = sequences * cfg.frames
    console.print(
        f"wrote {sequences} sequences x {cfg.frames} frames at {height}x{width} to {out} "
        f"in {seconds:.1f} s ({frames / seconds:.1f} frames/s including PNG writing)"
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from models.data.degrade import NOISE_CHOICES
    from models.data.synth import DEFAULT_SEED, DEGRADATIONS, MIXED_RECIPE_SHARE, SPLITS

    p = subparsers.add_parser("synth", help="write synthetic labelled dental video (or a preview sheet)")
    p.add_argument("--out", type=Path, help="output folder (one sub-folder per sequence)")
    p.add_argument("--split", choices=tuple(SPLITS), default="test", help="split (mixed into the seed)")
    p.add_argument("--sequences", type=int, help="number of sequences (default: train 64, val 8, test 8, real 12)")
    p.add_argument("--frames", type=int, default=24, help="frames per sequence (default 24)")
    p.add_argument("--size", type=image_size, default=(320, 416), help="HxW, 16x16 or more (default 320x416)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"base seed (default {DEFAULT_SEED})")
    p.add_argument(
        "--noise", choices=NOISE_CHOICES, help="noise level (default: test moderate, train/val mixed per sequence)"
    )
    p.add_argument(
        "--motion",
        type=float,
        default=1.0,
        help="camera speed multiplier (default 1; 2.5 at 128x160 gives the pixel motion of 320x416, as "
        "`vident train --motion 2.5`)",
    )
    p.add_argument("--mix", type=content_mix, default=None, metavar="CONTENT=W,...",
                   help="scene content drawn per sequence as `vident train --mix` draws it (default: dental)")
    p.add_argument("--degradation", choices=DEGRADATIONS, default="recipe",
                   help="recipe: the dissertation's camera; wide: drawn per sequence (docs/data.md); mixed: either, "
                   "per sequence (odds: --recipe-share)")
    p.add_argument("--recipe-share", type=share, default=MIXED_RECIPE_SHARE,
                   help="with --degradation mixed: the odds that a sequence keeps the recipe's camera (default 0.5)")
    p.add_argument("--recipe-codec", type=share, default=0.0,
                   help="the odds that a sequence under the recipe's camera is compressed by the client (JPEG or "
                   "H.264 over docs/data.md's ranges; default 0, the dissertation's uncompressed recipe)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the data set already in --out (by default such a folder is refused)")
    p.add_argument("--preview", type=Path, help="write a contact sheet PNG of one sequence")
    p.add_argument("--preview-index", type=int, default=0, help="which sequence the preview shows (default 0)")
    p.set_defaults(func=run)
