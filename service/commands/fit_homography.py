"""``vident fit-homography``: solve a MOST checkpoint's homography readout by least squares.

Writes a run folder (``OUT/last.safetensors``) that ``vident fit-filter``, ``vident ship`` and
``vident train --init-from`` take like any training run. Fit on a training split, never on the test
split; refit the restoration filter afterwards (finer scales warp by the new estimate)::

    vident synth --out data/hfit --split train --sequences 64
    vident fit-homography models/checkpoints/most-nss.safetensors --data data/hfit --out runs/most-nss-hfit
    vident fit-filter runs/most-nss-hfit/last.safetensors --data data/fit --out runs/most-nss-fitted
"""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from models.checkpoints import load_model, read_metadata
    from models.data.format import DataFormatError
    from models.most import MostNet
    from models.training.filter_fit import save_fitted
    from models.training.homography_fit import fit_homography_readout
    from service.commands.fit_filter import fit_source

    weights = fit_source(args)
    if weights is None:
        return 2
    try:
        model, _ = load_model(str(weights))
        if not isinstance(model, MostNet):
            raise ValueError(f"{weights}: not a MOST checkpoint (only MOST networks estimate homographies)")
        meta = read_metadata(weights)
        fit = fit_homography_readout(model, args.data, frames=args.frames, holdout=args.holdout,
                                     progress=not args.quiet)  # fmt: skip
    except (ValueError, DataFormatError, FileNotFoundError) as exc:
        print(f"cannot fit: {exc}")
        return 2
    out = save_fitted(model, meta, args.out, homography_fit=fit)
    held = (f"; {fit.holdout_sequences} held-out sequences {fit.holdout_mace_before:.3f} -> "
            f"{fit.holdout_mace_after:.3f} (identity {fit.holdout_mace_identity:.3f})"
            if fit.holdout_mace_before is not None else "")  # fmt: skip
    print(
        f"scale-{fit.scale} homography readout fitted on {fit.fit_sequences} sequences ({fit.pairs} frame pairs, "
        f"ridge {fit.ridge:g}, cross-validated MACE {fit.cv_mace:.3f}): MACE {fit.fit_mace_before:.3f} -> "
        f"{fit.fit_mace_after:.3f} px (identity {fit.fit_mace_identity:.3f}){held}"
    )
    if "filter_fit" in meta:
        print("note: the restoration filter was fitted for the previous homography; refit it with `vident fit-filter`")
    print(f"wrote {out}: `vident ship {args.out} --name NAME` ships it with a measured card")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit-homography", help="least-squares fit of a MOST checkpoint's homography readout")
    p.add_argument("weights", help="MOST checkpoint (.safetensors) or shipped model name")
    p.add_argument(
        "--data", type=Path, required=True, help="labelled training sequences (`vident synth --split train`)"
    )
    p.add_argument("--out", type=Path, required=True, help="run folder to write last.safetensors to")
    p.add_argument("--frames", type=int, help="first N frames streamed per sequence (default: all)")
    p.add_argument("--holdout", type=int, default=4, help="last N sequences kept out of the fit, to report on")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
