"""``vident fit-filter``: solve a MOST checkpoint's scale-1 restoration filter by least squares.

Writes a run folder (``OUT/last.safetensors``) that ``vident ship`` and ``vident train --init-from``
take like any training run. Fit on a training split, never on the test split::

    vident synth --out data/fit --split train --sequences 12 --frames 6
    vident fit-filter models/checkpoints/most-nss.safetensors --data data/fit --out runs/most-nss-filter
"""

from __future__ import annotations

import argparse
from pathlib import Path


def fit_source(args: argparse.Namespace) -> Path | None:
    """The checkpoint to fit (a path or a shipped name), or None after saying why not; shared by the
    ``fit-*`` commands, which all refuse the test split (fitting on it would make the cards lie)."""
    from models.checkpoints import shipped_checkpoint

    weights = Path(args.weights)
    if weights.suffix != ".safetensors":
        weights = shipped_checkpoint(args.weights) or weights
    if not weights.is_file():
        print(f"no checkpoint {args.weights}: give a .safetensors file or a shipped model name")
        return None
    if args.data.resolve() == Path("data/test").resolve():
        print("refusing to fit on data/test, the split the cards are measured on: fit on a training split")
        return None
    return weights


def run(args: argparse.Namespace) -> int:
    from models.data.format import DataFormatError
    from models.training.filter_fit import fit_restoration_filter, load_for_fit, save_fitted

    weights = fit_source(args)
    if weights is None:
        return 2
    try:
        model, meta = load_for_fit(weights, args.kernel)
        fit = fit_restoration_filter(model, args.data, frames=args.frames, holdout=args.holdout,
                                     subsample=args.subsample, progress=not args.quiet)  # fmt: skip
    except (ValueError, DataFormatError, FileNotFoundError) as exc:
        print(f"cannot fit: {exc}")
        return 2
    out = save_fitted(model, meta, args.out, filter_fit=fit)
    held = (f"; {fit.holdout_sequences} held-out sequences {fit.holdout_psnr_before:.2f} -> "
            f"{fit.holdout_psnr_after:.2f} dB" if fit.holdout_psnr_before is not None else "")  # fmt: skip
    print(f"{fit.kernel}x{fit.kernel} filter fitted on {fit.fit_sequences} sequences x {fit.frames} frames "
          f"({fit.pixels} pixels): PSNR {fit.fit_psnr_before:.2f} -> {fit.fit_psnr_after:.2f} dB{held}")
    print(f"wrote {out}: `vident ship {args.out} --name NAME` ships it with a measured card")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit-filter", help="least-squares fit of a MOST checkpoint's scale-1 restoration filter")
    p.add_argument("weights", help="MOST checkpoint (.safetensors) or shipped model name")
    p.add_argument("--data", type=Path, required=True,
                   help="labelled training sequences (`vident synth --split train`)")
    p.add_argument("--out", type=Path, required=True, help="run folder to write last.safetensors to")
    p.add_argument("--kernel", type=int,
                   help="filter side (default: the checkpoint's, 5 for checkpoints without filters)")
    p.add_argument("--frames", type=int, default=6, help="frames streamed per sequence (default 6)")
    p.add_argument("--holdout", type=int, default=2, help="last N sequences kept out of the fit, to report on")
    p.add_argument("--subsample", type=int, default=4, help="every Nth pixel enters the fit (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
