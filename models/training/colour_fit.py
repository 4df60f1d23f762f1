"""Least-squares fit of a network's per-frame colour map (``MostConfig.colour_transform``,
``R2D4Config.colour_transform``).

The output is ``x + A(f) [x; 1]`` with ``x`` the restored frame before the map, ``f`` the frame's
colour statistics (``models.layers.colour_features``) and ``A(f)`` a 3x4 matrix linear in ``[f; 1]``.
Each output channel is then linear in the map's weights (design row ``kron([x; 1], [f; 1])`` per
pixel), so the weights that minimise the squared error to the clean targets solve one set of normal
equations, accumulated from per-frame sufficient statistics (``[x; 1]``'s 4x4 Gram matrix and its
products with the residual): every pixel enters, and the held-out error of any solution is exact.
The held-out sequences choose the ridge, or validation splits do (``choose_on``): a handful of
held-out training clips can pick a ridge so small that the map's weights grow large, which fits the
training cameras and amplifies any rounding of the statistics (a bf16 runtime's, say). "No map" is
one of the choices: where every ridge lowers PSNR on the sequences that choose, the map stays zero,
which is the network without it.

The map reads only what the trunk already computed, so MOST's mask and homography, and R2-D4's
recurrent state, stay exactly as they were. Fit it after MOST's restoration filter (``vident
fit-filter``), whose output it maps. The fit uses labelled training sequences (``vident synth
--split train``), never the test split; the last ``holdout`` sequences are kept out of it and
report what the map does there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models import most, r2d4
from models.checkpoints import load_model, read_metadata
from models.data.format import dataset_split, find_sequences, read_sequence
from models.layers import COLOUR_FEATURES
from models.most import MostNet
from models.r2d4 import R2D4
from models.streaming import stream_intermediates
from models.training.filter_fit import target_chw

RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
UNKNOWNS = 4 * (COLOUR_FEATURES + 1)  # per output channel


@dataclass(frozen=True)
class FitRecord:
    """What a least-squares fit with a chosen ridge did (PSNR in dB, unclipped, on 0-1 frames); stored in the
    checkpoint's metadata as JSON."""

    data: str
    fit_sequences: int
    holdout_sequences: int
    frames: int
    ridge: float | None  # relative to the Gram matrix's mean diagonal; None: nothing kept (it lowered PSNR)
    fit_psnr_before: float
    fit_psnr_after: float
    holdout_psnr_before: float
    holdout_psnr_after: float
    chosen_on: str | None = None  # validation splits that chose the ridge (None: the held-out sequences)
    chosen_psnr_before: float | None = None
    chosen_psnr_after: float | None = None

    @property
    def kept(self) -> bool:
        """Whether the file carries the fitted part (False: every ridge lowered PSNR where chosen)."""
        return self.ridge is not None


@dataclass(frozen=True)
class ColourFit(FitRecord):
    """A colour map's fit."""

    best_ridge_psnr: float | None = None  # the best ridge's PSNR where chosen, when no map was chosen over it


@dataclass(frozen=True)
class FrameStats:
    """One frame's sufficient statistics for the fit, float64: ``gram`` (UNKNOWNS, UNKNOWNS) and
    ``cross`` (UNKNOWNS, 3) of the design rows, the residual's squared sum per channel, the pixel count."""

    gram: np.ndarray
    cross: np.ndarray
    residual_energy: np.ndarray
    pixels: int


def frame_stats(features: np.ndarray, restored: np.ndarray, target: np.ndarray) -> FrameStats:
    """``features`` (COLOUR_FEATURES,), ``restored`` and ``target`` (3, H, W) in [0, 1]."""
    x = np.concatenate((restored.reshape(3, -1), np.ones((1, restored[0].size))), axis=0)  # (4, P)
    y = (target - restored).reshape(3, -1)  # (3, P)
    f = np.append(features, 1.0)
    xx, xy = x @ x.T, x @ y.T  # (4, 4), (4, 3)
    return FrameStats(
        gram=np.kron(xx, np.outer(f, f)),
        cross=np.einsum("jc,k->jkc", xy, f).reshape(UNKNOWNS, 3),
        residual_energy=(y * y).sum(axis=1),
        pixels=x.shape[1],
    )


def frame_psnr(stats: FrameStats, theta: np.ndarray | None) -> float:
    """PSNR of the frame with the map ``theta`` (UNKNOWNS, 3) applied (None: without it)."""
    energy = stats.residual_energy.sum()
    if theta is not None:
        energy += -2 * np.sum(theta * stats.cross) + np.einsum("ic,ij,jc->", theta, stats.gram, theta)
    mse = max(float(energy) / (3 * stats.pixels), 1e-12)
    return float(10 * np.log10(1.0 / mse))


def solve(frames: list[FrameStats], ridge: float) -> np.ndarray:
    """The least-squares map (UNKNOWNS, 3) over ``frames``; ``ridge`` relative to the mean diagonal."""
    gram = sum(s.gram for s in frames)
    cross = sum(s.cross for s in frames)
    gram = gram + ridge * np.trace(gram) / UNKNOWNS * np.eye(UNKNOWNS)
    return np.linalg.solve(gram, cross)


def theta_to_linear(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(UNKNOWNS, 3) -> the colour layer's (12, COLOUR_FEATURES) weight and (12,) bias.

    Row ``j * (F + 1) + k`` of channel c's column multiplies ``[x; 1]_j [f; 1]_k``; the layer's
    output ``3c + j`` is A's (c, j) entry, ``9 + c`` channel c's offset."""
    per = theta.reshape(4, COLOUR_FEATURES + 1, 3)
    weight = np.zeros((12, COLOUR_FEATURES + 1))
    for c in range(3):
        for j in range(4):
            weight[3 * c + j if j < 3 else 9 + c] = per[j, :, c]
    return weight[:, :-1], weight[:, -1]


Mapped = MostNet | R2D4


def with_zero_layer(model: Mapped, option: str) -> Mapped:
    """``model`` rebuilt with the zero layer of a layout option (``colour_transform``, ``detail_return``)
    where it has none (the same function), through its family's ``checkpoint_filter_fn`` as ``vident
    train --init-from`` converts weights; a network that has it comes back as it is."""
    if getattr(model.cfg, option):
        return model
    into = replace(model.cfg, **{option: True})
    family = most if isinstance(model, MostNet) else r2d4
    _, state = family.checkpoint_filter_fn(model.state_dict(), model.layout_metadata(), into)  # type: ignore[arg-type]
    rebuilt = type(model)(into, name=model.spec.name)  # type: ignore[arg-type]
    rebuilt.load_state_dict(state, strict=True)
    return rebuilt


def with_colour_map(model: Mapped) -> Mapped:
    """``model`` with a zero colour map where it has none."""
    return with_zero_layer(model, "colour_transform")


def load_with_zero_layer(weights: str | Path, option: str, layer: str) -> tuple[Mapped, dict[str, str]]:
    """A MOST or R2-D4 checkpoint rebuilt with ``option``'s layer (``layer`` names it in the refusal; zero
    where it had none), float32 in eval mode, and its metadata: what a least-squares fit starts from."""
    model, _ = load_model(str(weights))
    if not isinstance(model, MostNet | R2D4):
        raise ValueError(f"{weights}: a {type(model).__name__} has no {layer} (MOST and R2-D4 networks do)")
    return with_zero_layer(model, option).float().eval(), read_metadata(weights)


def load_for_colour_fit(weights: str | Path) -> tuple[Mapped, dict[str, str]]:
    """A MOST or R2-D4 checkpoint rebuilt with the colour map (zero where it had none) and its metadata."""
    return load_with_zero_layer(weights, "colour_transform", "colour map")


def sequence_stats(model: Mapped, path: Path, frames: int) -> list[FrameStats]:
    """Per frame of one labelled sequence, streamed with the state carried."""
    seq = read_sequence(path, count=frames)
    out = []
    with torch.no_grad():
        for t, (_, _, found) in enumerate(stream_intermediates(model, seq.input[:frames])):
            features = found["colour_features"][0].double().numpy()
            out.append(frame_stats(features, found["restored_before_colour"][0].double().numpy(), target_chw(seq, t)))
    return out


def fit_colour_transform(
    model: Mapped,
    data: Path,
    frames: int = 6,
    holdout: int = 2,
    progress: bool = True,
    choose_on: Sequence[Path] = (),
) -> ColourFit:
    """Solve the colour map in place; returns the fit's record. ``choose_on``: validation splits
    (``vident synth --split val``) whose sequences choose the ridge instead of the held-out ones."""
    if not model.cfg.colour_transform:
        raise ValueError("the network has no colour map: load it with load_for_colour_fit")
    fit_paths, holdout_paths = split_fit_data(data, holdout, choose_on)
    fit = [s for p in tqdm(fit_paths, desc="fit clips", disable=not progress) for s in sequence_stats(model, p, frames)]
    held = [s for p in holdout_paths for s in sequence_stats(model, p, frames)]

    def mean_psnr(stats: list[FrameStats], theta: np.ndarray | None) -> float:
        return float(np.mean([frame_psnr(s, theta) for s in stats]))

    chooser = [s for v in choose_on for p in find_sequences(v) for s in sequence_stats(model, p, frames)] or held
    thetas = {r: solve(fit, r) for r in RIDGES}
    scores = {r: mean_psnr(chooser, theta) for r, theta in thetas.items()}
    without = mean_psnr(chooser, None)
    best = max(RIDGES, key=scores.__getitem__)
    ridge = best if scores[best] >= without else None
    theta = thetas[best] if ridge is not None else np.zeros((UNKNOWNS, 3))
    weight, bias = theta_to_linear(theta)
    layer = model.colour_transform
    assert layer is not None
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight).to(layer.weight))
        layer.bias.copy_(torch.from_numpy(bias).to(layer.bias))
    return ColourFit(
        **fit_record(data, (fit_paths, holdout_paths), frames, ridge, mean_psnr, (fit, held), theta, choose_on,
                     (without, scores[best] if ridge is not None else without)),
        best_ridge_psnr=None if ridge is not None else scores[best],
    )


def split_fit_data(data: Path, holdout: int, choose_on: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """``data``'s sequences to fit on and the last ``holdout`` ones; refuses choosers that are not
    validation splits (shared by the least-squares fits whose ridge a split may choose)."""
    for split in choose_on:
        if (kind := dataset_split(split)) != "val":
            raise ValueError(f"{split}: the ridge is chosen on validation splits (--split val), not a {kind!r} split")
    paths = find_sequences(data)
    if len(paths) <= holdout or holdout < 1:
        raise ValueError(f"{data}: {len(paths)} sequences; --holdout must be >= 1 and leave some to fit")
    return paths[: len(paths) - holdout], paths[len(paths) - holdout :]


def fit_record(
    data: Path,
    paths: tuple[list[Path], list[Path]],
    frames: int,
    ridge: float | None,
    score: Callable[[list[Any], Any], float],
    stats: tuple[list[Any], list[Any]],
    solution: object,
    choose_on: Sequence[Path],
    chosen_psnr: tuple[float, float],
) -> dict[str, Any]:
    """The record fields the least-squares fits share: sizes, the ridge, and mean PSNR (``score``) without
    and with ``solution`` on the fit's and the held-out frames' statistics; ``chosen_psnr`` is the same pair
    on the choosing frames, which the fit has already scored to choose the ridge."""
    fit, held = stats
    return {
        "data": str(data),
        "fit_sequences": len(paths[0]),
        "holdout_sequences": len(paths[1]),
        "frames": frames,
        "ridge": ridge,
        "fit_psnr_before": score(fit, None),
        "fit_psnr_after": score(fit, solution),
        "holdout_psnr_before": score(held, None),
        "holdout_psnr_after": score(held, solution),
        "chosen_on": ",".join(str(v) for v in choose_on) or None,
        "chosen_psnr_before": chosen_psnr[0] if choose_on else None,
        "chosen_psnr_after": chosen_psnr[1] if choose_on else None,
    }


def colour_fit_of(meta: dict[str, str]) -> ColourFit | None:
    """The fit recorded in a checkpoint's metadata (None: its colour map was not fitted)."""
    return ColourFit(**json.loads(meta["colour_fit"])) if "colour_fit" in meta else None
