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
    from models.training.card import best_checkpoint_text, ship_checkpoint, write_card
    from service.commands.eval import write_report_json
    from service.evaluation import evaluate

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

    def measure(data: Path, json_path: Path, json_name: str, split: str, max_sequences: int | None,
                ) -> tuple[object, str]:  # fmt: skip
        """Evaluates the shipped file on ``data``, writes the JSON and returns the report and the card's
        reproduce lines (the split's synth command, then the eval command)."""
        measured = evaluate(str(shipped), data, max_sequences=max_sequences, comparators=not args.no_comparators)
        write_report_json(measured, json_path)
        command = ["vident", "eval", "--model", name, "--data", str(data), "--json", json_name]
        if max_sequences:
            command += ["--max-sequences", str(max_sequences)]
        if args.no_comparators:
            command.append("--no-comparators")
        return measured, f"vident synth --out {data} {split}\n{shlex.join(command)}"

    eval_json = args.eval_json or (args.run / f"eval-{name}.json")
    report, eval_command = measure(args.data, eval_json, f"eval-{name}.json", "--split test   # the fixed test split",
                                   args.max_sequences)  # fmt: skip
    status = args.status.read_text() if args.status is not None else None
    real_json, real_command = None, None
    if args.real_data is not None:
        real_json = eval_json.with_name(f"eval-{name}-real.json")
        _, real_command = measure(args.real_data, real_json, real_json.name,
                                  "--split real --frames 16   # the real-content split", None)  # fmt: skip
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
