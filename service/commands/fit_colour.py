"""``vident fit-colour``: solve a MOST or R2-D4 checkpoint's per-frame colour map by least squares.

Writes a run folder (``OUT/last.safetensors``) that ``vident ship`` and ``vident train --init-from``
take like any training run. Fit it after the restoration filter, on a training split, never on the
test split::

    vident synth --out data/fit --split train --sequences 64 --frames 6 --mix ... --degradation mixed
    vident fit-colour runs/most-nss-filter/last.safetensors --data data/fit --out runs/most-nss-colour

``--choose-on`` lets validation splits choose the ridge instead of the held-out training sequences.
"No map" is one of the choices: where every ridge lowers PSNR on them, the map stays zero.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from models.training.colour_fit import ColourFit


def run(args: argparse.Namespace) -> int:
    from models.training.colour_fit import fit_colour_transform, load_for_colour_fit

    return run_fit(args, load_for_colour_fit, fit_colour_transform, "colour_fit", fit_summary)


def run_fit(
    args: argparse.Namespace,
    load: Callable[[Path], tuple[torch.nn.Module, dict[str, str]]],
    fit_in_place: Callable[..., object],
    record: str,
    summary: Callable[[Any], str],
) -> int:
    """What ``fit-colour`` and ``fit-detail`` share: load the checkpoint with the part to fit, solve it in
    place on ``args.data`` (the ridge chosen on the held-out sequences or ``args.choose_on``), save the run
    folder with the fit's record under ``record`` and print ``summary(fit)``."""
    from models.data.format import DataFormatError
    from models.training.filter_fit import save_fitted
    from service.commands.fit_filter import fit_source

    weights = fit_source(args)
    if weights is None:
        return 2
    try:
        model, meta = load(weights)
        fit = fit_in_place(model, args.data, frames=args.frames, holdout=args.holdout,
                           progress=not args.quiet, choose_on=args.choose_on)  # fmt: skip
    except (ValueError, DataFormatError, FileNotFoundError) as exc:
        print(f"cannot fit: {exc}")
        return 2
    out = save_fitted(model, meta, args.out, **{record: fit})
    print(summary(fit))
    print(f"wrote {out}: `vident ship {args.out} --name NAME` ships it with a measured card")
    return 0


def fit_summary(fit: ColourFit) -> str:
    """One line: what the fit did on the training sequences and on the data that chose the ridge;
    when every ridge lowered PSNR there, that the map stays zero (the network without it)."""
    where = "the held-out sequences" if fit.chosen_on is None else fit.chosen_on
    if not fit.kept:
        before = fit.holdout_psnr_before if fit.chosen_on is None else fit.chosen_psnr_before
        best = fit.best_ridge_psnr
        return (f"colour map not kept: every ridge lowered PSNR on {where} ({before:.2f} -> {best:.2f} dB at the "
                "best one), so the map stays zero and the file computes what the network did without it")  # fmt: skip
    chosen = ("chosen on them" if fit.chosen_on is None else f"chosen on {fit.chosen_on}: PSNR "
              f"{fit.chosen_psnr_before:.2f} -> {fit.chosen_psnr_after:.2f} dB there")  # fmt: skip
    return (f"colour map fitted on {fit.fit_sequences} sequences x {fit.frames} frames: PSNR "
            f"{fit.fit_psnr_before:.2f} -> {fit.fit_psnr_after:.2f} dB; {fit.holdout_sequences} held-out sequences "
            f"{fit.holdout_psnr_before:.2f} -> {fit.holdout_psnr_after:.2f} dB (ridge {fit.ridge:g}, "
            f"{chosen})")  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit-colour", help="least-squares fit of a network's per-frame colour map (MOST, R2-D4)")
    add_fit_arguments(p, "MOST or R2-D4")
    p.set_defaults(func=run)


def add_fit_arguments(p: argparse.ArgumentParser, families: str) -> None:
    """The arguments ``fit-colour`` and ``fit-detail`` share."""
    p.add_argument("weights", help=f"{families} checkpoint (.safetensors) or shipped model name")
    p.add_argument("--data", type=Path, required=True,
                   help="labelled training sequences (`vident synth --split train`)")
    p.add_argument("--out", type=Path, required=True, help="run folder to write last.safetensors to")
    p.add_argument("--frames", type=int, default=6, help="frames streamed per sequence (default 6)")
    p.add_argument("--holdout", type=int, default=4,
                   help="last N sequences kept out of the fit: they report, and choose the ridge (default 4)")
    p.add_argument("--choose-on", type=Path, nargs="+", default=[], metavar="VAL",
                   help="validation splits (`vident synth --split val`) that choose the ridge instead")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
