"""``vident train``: train a network on synthetic or on-disk data, optionally with Neural Scale Search."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.commands.common import frame_size, prefixes, share, weight


def task_factor(text: str) -> tuple[str, float]:
    """``homography=2`` -> ("homography", 2.0), for --emphasis."""
    task, sep, factor = text.partition("=")
    try:
        value = float(factor)
    except ValueError:
        value = float("nan")
    if not sep or not task or not value > 0:
        raise argparse.ArgumentTypeError(f"expected TASK=FACTOR with a positive factor, got {text!r}")
    return task, value


def content_mix(text: str):  # noqa: ANN201 - ContentMix, imported lazily with the training code
    from models.data.dataset import ContentMix

    try:
        return ContentMix.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    from models.checkpoints import read_metadata
    from models.training.run import neural_scale_search, train
    from models.training.trainer import TrainConfig

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            built = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            print(f"cannot train on --device {args.device}: {built} (install a CUDA build of torch on a GPU "
                  "machine; `--device cpu` trains here)")  # fmt: skip
            return 2
    if args.minutes is not None and (args.search or not args.minutes > 0):
        print("--minutes must be positive and applies to one run, not to --search's three phases")
        return 2
    if args.search and (args.aligned_loss or args.colour_loss):
        print("--aligned-loss and --colour-loss apply to a plain run; Neural Scale Search (--search) weighs its "
              "own gated errors")  # fmt: skip
        return 2
    if args.mix is not None:
        try:
            args.mix.check_split("train")
        except ValueError as exc:
            print(exc)
            return 2
    if args.train_only:
        from models.registry import create_model
        from models.training.trainer import trained_parameters

        try:
            trained_parameters(create_model(args.model), args.train_only, args.model)
        except ValueError as exc:
            print(exc)
            return 2
    height, width = args.size
    cfg = TrainConfig(
        model=args.model, out=args.out, steps=args.steps, batch=args.batch, clip_length=args.clip_length,
        height=height, width=width, lr=args.lr, balancing=args.balancing, seed=args.seed, device=args.device,
        amp=args.amp, checkpoint_every=args.checkpoint_every, gate_tau=args.tau,
        perceptual_weights=args.perceptual_weights, init_from=args.init_from, emphasis=dict(args.emphasis),
        train_only=args.train_only, aligned_loss=args.aligned_loss, colour_loss=args.colour_loss,
    )  # fmt: skip
    if args.search:
        path = neural_scale_search(cfg, args.pretrain_steps, args.search_steps, args.steps, data=args.data,
                                   noise=args.noise, workers=args.workers)  # fmt: skip
        print(f"structure: {args.out / 'structure.json'}")
    else:
        path = train(cfg, resume=args.resume, data=args.data, noise=args.noise, workers=args.workers,
                     validate_every=args.validate_every, stop_at=args.stop_at, motion=args.motion,
                     validate_sequences=args.validate_sequences, render_size=args.render_size,
                     keep_best=args.keep_best, whole_every=args.whole_every,
                     whole_batch=args.whole_batch, keep_validated=args.keep_validated, mix=args.mix,
                     degradation=args.degradation, minutes=args.minutes,
                     recipe_share=args.recipe_share, recipe_codec=args.recipe_codec)  # fmt: skip
        steps = int(read_metadata(path).get("steps", "0")) if args.minutes is not None else args.steps
        if steps < min(args.steps, args.stop_at or args.steps):
            print(f"stopped at step {steps} of {args.steps}: the {args.minutes:g}-minute budget ran out "
                  "(--resume goes on)")  # fmt: skip
    print(f"weights: {path}\nlog: {path.parent / 'log.jsonl'}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from models.data.synth import DEGRADATIONS, MIXED_RECIPE_SHARE

    p = subparsers.add_parser("train", help="train a network (resumable; synthetic data by default)")
    p.add_argument("--model", default="most-nss", help="registered name (default most-nss)")
    p.add_argument("--out", type=Path, required=True, help="run folder: weights, resume state, log.jsonl")
    p.add_argument("--steps", type=int, default=2000, help="optimisation steps (the retrain phase with --search)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--clip-length", type=int, default=3, help="frames per clip, run in streaming form")
    p.add_argument("--size", type=frame_size, default=(128, 160), help="training crop HxW (default 128x160)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--balancing", choices=("atb", "ls", "dwa", "rwl"), default="atb", help="MOST task weighting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision (auto: bf16 where the CPU/GPU has it)")  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--validate-every", type=int, default=200, help="validation metrics into the log (0: never)")
    p.add_argument("--validate-sequences", type=int, default=2,
                   help="validation sequences of 8 frames (2: quick, too few to track MACE; use 8+)")  # fmt: skip
    p.add_argument("--render-size", type=frame_size, default=None,
                   help="render synthetic clips at HxW (e.g. 320x416) and train on --size crops of them, so the "
                   "scene keeps the test's scale (default: render at --size)")  # fmt: skip
    p.add_argument("--whole-every", type=int, default=0, metavar="N",
                   help="with --render-size: every Nth step trains on --whole-batch whole render-size frames "
                   "instead of crops (the test's field of view, for the homography); validation then uses whole "
                   "frames (default 0: crops only)")  # fmt: skip
    p.add_argument("--whole-batch", type=int, default=2, help="clips per whole-frame step (default 2)")
    p.add_argument("--emphasis", type=task_factor, action="append", default=[], metavar="TASK=FACTOR",
                   help="MOST: multiply a task's balanced weight, e.g. homography=2 (repeatable)")
    p.add_argument("--keep-best", choices=("psnr", "iou", "mace"), default=None,
                   help="also keep best.safetensors, the weights best on this validation metric "
                   "(validate on 8+ sequences; ship it with `vident ship --best`)")
    p.add_argument("--keep-validated", action="store_true",
                   help="also keep the weights of every validated step as validated/step-N.safetensors "
                   "(to compare the candidates on the test split afterwards)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step, keeping the --steps schedule (resume later to go on)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget: stop after the step in progress once this many minutes of training "
                   "have passed, with a checkpoint, keeping the --steps schedule (resume later to go on)")
    p.add_argument("--data", type=Path, default=None, help="on-disk data set (docs/data.md) instead of synthetic")
    p.add_argument("--noise", choices=("low", "moderate", "severe", "mixed"), default="mixed",
                   help="the recipe's noise level (with --degradation wide, noise is drawn per clip instead)")
    p.add_argument("--mix", type=content_mix, default=None, metavar="CONTENT=W,...",
                   help="scene content drawn per clip, e.g. dental=0.5,dead-leaves=0.3,photos=0.2 (contents: "
                   "dental, dead-leaves, photos; default: dental only). Clips without teeth skip the mask loss")
    p.add_argument("--degradation", choices=DEGRADATIONS, default="recipe",
                   help="recipe: the dissertation's fixed camera; wide: exposure, defocus, noise, colour response "
                   "and JPEG/H.264 drawn per clip over the ranges in docs/data.md; mixed: either, drawn per "
                   "clip (keeps the recipe's camera while learning the wide ones)")
    p.add_argument("--recipe-share", type=share, default=MIXED_RECIPE_SHARE,
                   help="with --degradation mixed: the odds that a clip keeps the recipe's camera (default 0.5)")
    p.add_argument("--recipe-codec", type=share, default=0.0,
                   help="the odds that a clip under the recipe's camera is compressed by the client (JPEG or "
                   "H.264 over docs/data.md's ranges; default 0, the dissertation's uncompressed recipe)")
    p.add_argument("--motion", type=float, default=1.0,
                   help="synthetic camera speed multiplier (2.5 at 128x160 matches the pixel motion at 320x416)")
    p.add_argument("--workers", type=int, default=1, help="data loader processes")
    p.add_argument("--init-from", type=Path, default=None, help="start from these .safetensors weights")
    p.add_argument("--train-only", type=prefixes, default=(),
                   metavar="PREFIX,...",
                   help="train only the parameters under these module prefixes (e.g. decoder.1,restoration_heads.1); "
                   "the rest stays frozen, batch norms included (default: everything)")  # fmt: skip
    p.add_argument("--aligned-loss", type=share, default=0.0, metavar="SHARE",
                   help="the share of the restoration loss (R2-D4: of each stage's loss) taken after a "
                   "per-channel gain/offset fit to the target, as colour-aligned PSNR judges it (trains noise and "
                   "blur, leaves colour to the least-squares colour map; default 0, the dissertation's loss)")
    p.add_argument("--colour-loss", type=weight, default=0.0, metavar="WEIGHT",
                   help="weight of a loss on the output's 8x8-pixel block means against the target's (its colour "
                   "and shading, not its noise or detail), added to the restoration loss (R2-D4: to each stage's); "
                   "holds the colour that --aligned-loss leaves free (default 0)")
    p.add_argument("--perceptual-weights", type=Path, default=None, help="R2-D4: VGG-19 .safetensors")
    p.add_argument("--search", action="store_true", help="Neural Scale Search: pretrain -> search -> retrain")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--search-steps", type=int, default=1000)
    p.add_argument("--tau", type=float, default=5.0, help="Gumbel-softmax temperature for --search")
    p.set_defaults(func=run)
