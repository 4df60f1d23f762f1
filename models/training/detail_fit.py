"""Least-squares fit of the per-frame detail return (``MostConfig.detail_return``, ``R2D4Config.detail_return``).

The output is ``r + a d`` with ``r`` the frame after the colour map, ``d = x~ - r`` what the network
removed from the input (``x~`` the input mapped onto ``r``'s colours, ``models.layers.input_matched``) and
``a = clamp(w . [f; 1], 0, 1)`` from the frame's two detail features ``f`` (the input's noise level, the
size of ``d``). A frame's squared error is exactly quadratic in its share ``a``: ``e0 + 2 a c + a^2 e``
with ``e0 = |r - y|^2``, ``c = <d, r - y>`` and ``e = |d|^2``. Without the clamp the total error is
quadratic in ``w``: normal equations with Gram matrix ``sum e [f; 1][f; 1]^T`` and right-hand side
``-sum c [f; 1]``. The clamped gate's error is then scored exactly on every frame, so the held-out
sequences (or validation splits, ``choose_on``) choose the ridge, and "no gate" is one of the choices.

The fit uses labelled training sequences (``vident synth --split train``), never the test split.
The gate reads only what the network already computed: the mask and the homography are unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.data.format import find_sequences, read_sequence
from models.layers import DETAIL_FEATURES, detail_features, input_matched
from models.streaming import stream_intermediates
from models.training.colour_fit import (
    FitRecord,
    Mapped,
    fit_record,
    load_with_zero_layer,
    split_fit_data,
    with_zero_layer,
)
from models.training.filter_fit import target_chw

RIDGES = (1e-6, 1e-4, 1e-2, 1.0)
UNKNOWNS = DETAIL_FEATURES + 1


@dataclass(frozen=True)
class DetailFit(FitRecord):
    """A detail gate's fit."""

    mean_share: float | None = None  # the gate's mean share where chosen


@dataclass(frozen=True)
class FrameStats:
    """One frame: its detail features (DETAIL_FEATURES,), ``e0``, ``c``, ``e`` (above) and the value count."""

    features: np.ndarray
    e0: float
    c: float
    e: float
    values: int

    def share(self, w: np.ndarray | None) -> float:
        return 0.0 if w is None else float(np.clip(w @ np.append(self.features, 1.0), 0.0, 1.0))

    def psnr(self, w: np.ndarray | None) -> float:
        a = self.share(w)
        mse = max((self.e0 + 2 * a * self.c + a * a * self.e) / self.values, 1e-12)
        return float(10 * np.log10(1.0 / mse))


def frame_stats(frame: torch.Tensor, restored: torch.Tensor, target: np.ndarray) -> FrameStats:
    """``frame`` and ``restored`` (1, 3, H, W), ``target`` (3, H, W), all in [0, 1]."""
    matched = input_matched(frame.float(), restored.float())
    features = detail_features(frame, matched, restored)[0].double().numpy()
    r = restored[0].double().numpy()
    d = matched[0].double().numpy() - r
    residual = r - target
    return FrameStats(features, float((residual**2).sum()), float((d * residual).sum()), float((d * d).sum()), r.size)


def with_detail_gate(model: Mapped) -> Mapped:
    """``model`` with a zero detail gate where it has none."""
    return with_zero_layer(model, "detail_return")


def load_for_detail_fit(weights: str | Path) -> tuple[Mapped, dict[str, str]]:
    """A MOST or R2-D4 checkpoint rebuilt with the detail gate (zero where it had none) and its metadata."""
    return load_with_zero_layer(weights, "detail_return", "detail return")


def sequence_stats(model: Mapped, path: Path, frames: int | None) -> list[FrameStats]:
    """Per frame of one labelled sequence, streamed with the state carried."""
    seq = read_sequence(path, count=frames)
    out = []
    with torch.no_grad():
        for t, (frame, _, found) in enumerate(stream_intermediates(model, seq.input)):
            out.append(frame_stats(frame, found["restored_before_detail"], target_chw(seq, t)))
    return out


def solve(frames: list[FrameStats], ridge: float) -> np.ndarray:
    """The unclamped least-squares gate (UNKNOWNS,) over ``frames``; ``ridge`` relative to the mean diagonal."""
    rows = np.array([np.append(s.features, 1.0) for s in frames])
    e = np.array([s.e for s in frames])
    c = np.array([s.c for s in frames])
    gram = (rows * e[:, None]).T @ rows
    gram += ridge * np.trace(gram) / UNKNOWNS * np.eye(UNKNOWNS)
    return np.linalg.solve(gram, -(rows * c[:, None]).sum(axis=0))


def mean_psnr(stats: list[FrameStats], w: np.ndarray | None) -> float:
    return float(np.mean([s.psnr(w) for s in stats]))


def fit_detail_return(
    model: Mapped,
    data: Path,
    frames: int = 6,
    holdout: int = 4,
    progress: bool = True,
    choose_on: Sequence[Path] = (),
) -> DetailFit:
    """Solve the detail gate in place; returns the fit's record. ``choose_on``: validation splits
    (``vident synth --split val``, all their frames) whose sequences choose the ridge instead of the
    held-out ones."""
    if model.detail_gate is None:
        raise ValueError("the network has no detail gate: load it with load_for_detail_fit")
    fit_paths, holdout_paths = split_fit_data(data, holdout, choose_on)
    fit = [s for p in tqdm(fit_paths, desc="fit clips", disable=not progress) for s in sequence_stats(model, p, frames)]
    held = [s for p in holdout_paths for s in sequence_stats(model, p, frames)]
    chooser = [s for v in choose_on for p in find_sequences(v) for s in sequence_stats(model, p, None)] or held
    gates = {r: solve(fit, r) for r in RIDGES}
    scores = {r: mean_psnr(chooser, w) for r, w in gates.items()}
    without = mean_psnr(chooser, None)
    best = max(RIDGES, key=scores.__getitem__)
    ridge = best if scores[best] > without else None
    w = gates[best] if ridge is not None else None
    layer = model.detail_gate
    with torch.no_grad():
        weights = np.zeros(UNKNOWNS) if w is None else w
        layer.weight.copy_(torch.from_numpy(weights[:-1]).reshape(1, -1).to(layer.weight))
        layer.bias.copy_(torch.from_numpy(weights[-1:]).to(layer.bias))
    return DetailFit(
        **fit_record(data, (fit_paths, holdout_paths), frames, ridge, mean_psnr, (fit, held), w, choose_on,
                     (without, scores[best] if ridge is not None else without)),
        mean_share=float(np.mean([s.share(w) for s in chooser])),
    )


def detail_fit_of(meta: dict[str, str]) -> DetailFit | None:
    """The fit recorded in a checkpoint's metadata (None: its detail gate was not fitted)."""
    return DetailFit(**json.loads(meta["detail_fit"])) if "detail_fit" in meta else None
