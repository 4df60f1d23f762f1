"""``vident fit-colour``: solve a MOST or R2-D4 checkpoint's per-frame colour map by least squares.

Writes a run folder (``OUT/last.safetensors``) that ``vident ship`` and ``vident train --init-from``
take like any training run. Fit it after the restoration filter, on a training split, never on the
test split::

    vident synth --out data/fit --split train --sequences 64 --frames 6 --mix ... --degradation mixed
    vident fit-colour runs/most-nss-filter/last.safetensors --data data/fit --out runs/most-nss-colour

``--choose-on`` lets validation splits choose the ridge instead of the held-out training sequences.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.training.colour_fit import ColourFit


def run(args: argparse.Namespace) -> int:
    from models.data.format import DataFormatError
    from models.training.colour_fit import fit_colour_transform, load_for_colour_fit
    from models.training.filter_fit import save_fitted
    from service.commands.fit_filter import fit_source

    weights = fit_source(args)
    if weights is None:
        return 2
    try:
        model, meta = load_for_colour_fit(weights)
        fit = fit_colour_transform(model, args.data, frames=args.frames, holdout=args.holdout,
                                   progress=not args.quiet, choose_on=args.choose_on)  # fmt: skip
    except (ValueError, DataFormatError, FileNotFoundError) as exc:
        print(f"cannot fit: {exc}")
        return 2
    out = save_fitted(model, meta, args.out, colour_fit=fit)
    chosen = ("chosen on them" if fit.chosen_on is None else f"chosen on {fit.chosen_on}: PSNR "
              f"{fit.chosen_psnr_before:.2f} -> {fit.chosen_psnr_after:.2f} dB there")  # fmt: skip
    print(f"colour map fitted on {fit.fit_sequences} sequences x {fit.frames} frames: PSNR "
          f"{fit.fit_psnr_before:.2f} -> {fit.fit_psnr_after:.2f} dB; {fit.holdout_sequences} held-out sequences "
          f"{fit.holdout_psnr_before:.2f} -> {fit.holdout_psnr_after:.2f} dB (ridge {fit.ridge:g}, {chosen})")
    print(f"wrote {out}: `vident ship {args.out} --name NAME` ships it with a measured card")
    warning = lowering_warning(fit, weights)
    if warning:
        print(warning)
    return 0


def lowering_warning(fit: ColourFit, weights: str) -> str | None:
    """The best ridge can still lower PSNR on the data that chose it; then the network without the
    map is the better file there, and shipping the map needs another reason."""
    if fit.chosen_on is None:
        before, after, where = fit.holdout_psnr_before, fit.holdout_psnr_after, "the held-out sequences"
    else:
        before, after, where = fit.chosen_psnr_before, fit.chosen_psnr_after, fit.chosen_on
    if after >= before:
        return None
    return (f"warning: the map lowers PSNR on {where} ({before:.2f} -> {after:.2f} dB) at every ridge tried: "
            f"there, {weights} without it is the better file")  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit-colour", help="least-squares fit of a network's per-frame colour map (MOST, R2-D4)")
    p.add_argument("weights", help="MOST or R2-D4 checkpoint (.safetensors) or shipped model name")
    p.add_argument("--data", type=Path, required=True,
                   help="labelled training sequences (`vident synth --split train`)")
    p.add_argument("--out", type=Path, required=True, help="run folder to write last.safetensors to")
    p.add_argument("--frames", type=int, default=6, help="frames streamed per sequence (default 6)")
    p.add_argument("--holdout", type=int, default=4,
                   help="last N sequences kept out of the fit: they report, and choose the ridge (default 4)")
    p.add_argument("--choose-on", type=Path, nargs="+", default=[], metavar="VAL",
                   help="validation splits (`vident synth --split val`) that choose the ridge instead")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
