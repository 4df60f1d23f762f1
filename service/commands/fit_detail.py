"""``vident fit-detail``: solve a MOST or R2-D4 checkpoint's per-frame detail return by least squares, last (it
reads the output of the filter and the colour map), on a training split; the arguments and the run
folder it writes are ``vident fit-colour``'s (docs/training.md). "No gate" is one of the choices.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from service.commands.fit_colour import add_fit_arguments, run_fit

if TYPE_CHECKING:
    from models.training.detail_fit import DetailFit


def run(args: argparse.Namespace) -> int:
    from models.training.detail_fit import fit_detail_return, load_for_detail_fit

    return run_fit(args, load_for_detail_fit, fit_detail_return, "detail_fit", fit_summary)


def fit_summary(fit: DetailFit) -> str:
    """One line: what the fit did on the training sequences and where the ridge was chosen."""
    where = "the held-out sequences" if fit.chosen_on is None else fit.chosen_on
    before = fit.holdout_psnr_before if fit.chosen_on is None else fit.chosen_psnr_before
    if not fit.kept:
        return (f"detail return not kept: every ridge lowered PSNR on {where} (from {before:.2f} dB), so the gate "
                "stays zero and the file computes what the network did without it")  # fmt: skip
    after = fit.holdout_psnr_after if fit.chosen_on is None else fit.chosen_psnr_after
    return (f"detail gate fitted on {fit.fit_sequences} sequences x {fit.frames} frames: PSNR "
            f"{fit.fit_psnr_before:.2f} -> {fit.fit_psnr_after:.2f} dB; on {where} {before:.2f} -> {after:.2f} dB, "
            f"mean share {fit.mean_share:.2f} (ridge {fit.ridge:g})")  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit-detail", help="least-squares fit of the per-frame detail return")
    add_fit_arguments(p, "MOST or R2-D4")
    p.set_defaults(func=run)
