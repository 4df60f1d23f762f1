"""``vident ship``: a training run -> a shipped fp16 checkpoint, measured, with its model card.

One command so that every card in ``models/checkpoints/`` is made the same way: the fp16 file is
written first and the evaluation runs on that very file, so the card's numbers include the rounding.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from models.checkpoints import CHECKPOINT_DIR, read_metadata
    from models.evaluation import evaluate
    from models.training.card import best_checkpoint_text, ship_checkpoint, write_card
    from service.commands.eval import write_report_json

    weights = args.run / ("best.safetensors" if args.best else "last.safetensors")
    if not weights.is_file():
        how = f"vident train --out {args.run}" + (" --keep-best METRIC" if args.best else "")
        print(f"no weights in {args.run}: expected {weights.name} (from `{how}`)")
        return 2
    meta = read_metadata(weights)
    name = args.name or meta["model"]
    directory = args.checkpoint_dir or CHECKPOINT_DIR
    shipped = ship_checkpoint(weights, name, directory)
    chosen = best_checkpoint_text(meta)
    print(f"shipped {shipped} (step {meta.get('steps')}{', ' + chosen if chosen else ''})")
    report = evaluate(str(shipped), args.data, max_sequences=args.max_sequences, comparators=not args.no_comparators)
    eval_json = args.eval_json or (args.run / f"eval-{name}.json")
    write_report_json(report, eval_json)
    command = ["vident", "eval", "--model", name, "--data", str(args.data), "--json", f"eval-{name}.json"]
    if args.max_sequences:
        command += ["--max-sequences", str(args.max_sequences)]
    if args.no_comparators:
        command.append("--no-comparators")
    status = args.status.read_text() if args.status is not None else None
    eval_command = (
        f"vident synth --out {args.data} --split test   # the fixed test split\n{shlex.join(command)}"
    )
    real_json, real_command = None, None
    if args.real_data is not None:
        real = evaluate(str(shipped), args.real_data, comparators=not args.no_comparators)
        real_json = eval_json.with_name(f"eval-{name}-real.json")
        write_report_json(real, real_json)
        command = ["vident", "eval", "--model", name, "--data", str(args.real_data), "--json", real_json.name]
        if args.no_comparators:
            command.append("--no-comparators")
        real_command = (f"vident synth --out {args.real_data} --split real --frames 16   # the real-content split\n"
                        f"{shlex.join(command)}")  # fmt: skip
    card = write_card(shipped, eval_json, eval_command, status=status, noise=args.noise, real_json=real_json,
                      real_command=real_command)  # fmt: skip
    print(f"card {card}\neval {eval_json}")
    for row_name, values in report.rows.items():
        print({"name": row_name, **{k: values.get(k) for k in ("psnr", "iou", "mace")}})
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ship", help="ship a training run as an fp16 checkpoint with a measured model card")
    p.add_argument("run", type=Path, help="run folder of `vident train --out` (its last.safetensors)")
    p.add_argument("--best", action="store_true",
                   help="ship the run's best.safetensors (`vident train --keep-best`) instead of its last")
    p.add_argument("--name", help="shipped name (default: the run's model name)")
    p.add_argument("--data", type=Path, default=Path("data/test"), help="labelled test split (default data/test)")
    p.add_argument("--real-data", type=Path, default=None,
                   help="also evaluate on the real-content split (`vident synth --split real`) and print the "
                   "generalisation targets on the card")
    p.add_argument("--max-sequences", type=int, help="evaluate on the first N sequences only")
    p.add_argument("--no-comparators", action="store_true", help="skip the OpenCV rows (faster)")
    p.add_argument("--status", type=Path, help="a Markdown paragraph put first on the card")
    p.add_argument("--noise", help="training noise level, for runs whose metadata predates recording it")
    p.add_argument("--eval-json", type=Path, help="where the evaluation JSON goes (default: in the run folder)")
    p.add_argument("--checkpoint-dir", type=Path, help="write here instead of models/checkpoints (tests)")
    p.set_defaults(func=run)
