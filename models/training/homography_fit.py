"""Least-squares fit of a MOST network's homography readout: the linear layer after the corner pooling.

The homography head ends in ``offsets = W . pooled + b`` (``HomographyHead.offsets``), the corner
displacements in pixels of the head's scale. Given the rest of the trained network, the pooled
features of a frame pair do not depend on ``W`` and ``b``, and the corner error of the estimate is
exactly the error of these offsets (the DLT maps the corners onto them). So the readout that
minimises the corner error on labelled clips is a (reweighted) ridge regression, solved in closed
form: no learning rate, no batch noise. Gradient steps did not get there: after 7000 steps most-nss's
estimate still underestimated the translation and missed most of the rotation and zoom, and its
validation MACE swung by a pixel from one checkpoint to the next (docs/experiments.md).

Only a network with one homography head at its coarsest decoded scale is fitted (most-nss: scale 3):
there the features come before any estimate is used. In a cascade (most-net: scales 3, 2, 1) the
finer heads read features warped by the coarser estimate, so refitting one readout moves the inputs
of the next and one linear solve is no longer the optimum. Finer scales still warp their past
features by the new estimate, so the restored frame and the mask change a little too: refit the
restoration filter afterwards (``vident fit-filter``) and measure all three tasks (``vident ship``).

The ridge is chosen by grouped cross-validation over the fit sequences (whole sequences per fold,
since the frames of one clip are alike); the last ``holdout`` sequences are kept out of everything
to report what the fit does on unseen clips. Fit on a training split, never on the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.data.format import find_sequences, read_sequence, validate_sequence
from models.layers import homography_to_offsets, rescale_homography
from models.metrics import offsets_mace
from models.most import MostNet
from models.streaming import stream_intermediates

RIDGES = (1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
IRLS_ITERATIONS = 5
IRLS_FLOOR = 0.05  # pixels of the head's scale: corners fitted closer than this weigh no more


@dataclass(frozen=True)
class HomographyFit:
    """What a fit did; MACE in full-resolution pixels over the frame pairs (frame 0 has no pair).
    ``ridge`` is relative: the penalty is ``ridge`` x pairs on standardised features."""

    scale: int
    data: str
    fit_sequences: int
    holdout_sequences: int
    frames: int | None  # per sequence (None: all)
    pairs: int
    ridge: float
    cv_mace: float  # grouped cross-validation over the fit sequences, at the chosen ridge
    fit_mace_identity: float
    fit_mace_before: float
    fit_mace_after: float
    holdout_mace_identity: float | None
    holdout_mace_before: float | None
    holdout_mace_after: float | None


def fitted_scale(model: MostNet) -> int:
    """The scale whose readout can be fitted alone: the only homography head, at the coarsest scale."""
    heads = model.structure.homography
    if heads != (model.decoded_scales[0],):
        raise ValueError(
            f"the homography heads are at scales {heads}: only a single head at the coarsest decoded scale "
            f"({model.decoded_scales[0]}) can be fitted alone (in a cascade the finer heads read the coarse estimate)"
        )
    return heads[0]


@torch.no_grad()
def readout_stream(model: MostNet, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 (T, H, W, 3) clip streamed with the state carried (reset on frame 0), decoding only the
    head's scale: per frame the pooled features the readout reads (T, F) and the offsets it gives
    now (T, 8), both float64."""
    scale = fitted_scale(model)
    features = torch.cat([
        found[f"homography_pooled_s{scale}"] for _, _, found in stream_intermediates(model, frames, (scale,))
    ]).float()  # fmt: skip
    return features.double().numpy(), model.homography_heads[str(scale)].offsets(features).double().numpy()


def true_offsets(homographies: np.ndarray, scale: int, height: int, width: int) -> np.ndarray:
    """(T, 3, 3) full-resolution H_{t-1->t} -> (T, 8) corner displacements in pixels of ``scale``."""
    factor = 2.0 ** (scale - 1)
    h = rescale_homography(torch.as_tensor(homographies, dtype=torch.float64), 1 / factor)
    return homography_to_offsets(h, height / factor, width / factor).numpy()


def scale_mace(pred: np.ndarray, true: np.ndarray, scale: int) -> np.ndarray:
    """Per-pair MACE in full-resolution pixels of offsets in pixels of ``scale``."""
    return 2.0 ** (scale - 1) * offsets_mace(pred, true)


@dataclass
class _Pairs:
    features: list[np.ndarray]
    before: list[np.ndarray]
    true: list[np.ndarray]
    group: list[np.ndarray]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.concatenate(a) for a in (self.features, self.before, self.true, self.group))  # type: ignore[return-value]


def _collect(model: MostNet, paths: Sequence[Path], frames: int | None, progress: bool, desc: str) -> _Pairs:
    scale = fitted_scale(model)
    pairs = _Pairs([], [], [], [])
    for i, path in enumerate(tqdm(paths, desc=desc, disable=not progress)):
        info = validate_sequence(path)
        seq = read_sequence(path, count=min(frames or info.frames, info.frames), info=info)
        features, before = readout_stream(model, seq.input)
        true = true_offsets(seq.homographies, scale, *seq.size)
        pairs.features.append(features[1:])  # frame 0 is its own predecessor: no pair
        pairs.before.append(before[1:])
        pairs.true.append(true[1:])
        pairs.group.append(np.full(seq.frames - 1, i))
    return pairs


def _solve(
    x: np.ndarray, y: np.ndarray, ridge: float, iterations: int = IRLS_ITERATIONS
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression on standardised features, returned as the readout's own (8, F) weight and (8,)
    bias (standardisation folded in), so the fitted layer runs unchanged in every backend.

    MACE, the homography's loss and metric, is the mean corner *distance*, not its square: after the
    least-squares start, ``iterations`` rounds of iteratively reweighted least squares weight each
    corner's two offsets by 1 / its distance (floored), which minimises the mean distance instead
    (the corners are solved separately, since their weights differ). The bias is not penalised."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # constant features (dead channels): their weight stays 0
    z = np.hstack(((x - mean) / std, np.ones((len(x), 1))))
    penalty = ridge * len(z) * np.eye(z.shape[1])
    penalty[-1, -1] = 0.0
    weights = np.ones((len(z), 4))
    solution = np.zeros((z.shape[1], 8))
    for _ in range(iterations + 1):
        for c in range(4):
            weighted = z * weights[:, c : c + 1]
            gram = z.T @ weighted + penalty * weights[:, c].mean()
            solution[:, 2 * c : 2 * c + 2] = np.linalg.solve(gram, weighted.T @ y[:, 2 * c : 2 * c + 2])
        distance = np.linalg.norm((z @ solution - y).reshape(-1, 4, 2), axis=-1)
        weights = 1.0 / np.maximum(distance, IRLS_FLOOR)
    weight = (solution[:-1] / std[:, None]).T
    return weight, solution[-1] - weight @ mean


def fit_homography_readout(
    model: MostNet,
    data: Path,
    frames: int | None = None,
    holdout: int = 4,
    ridges: Sequence[float] = RIDGES,
    folds: int = 5,
    progress: bool = True,
) -> HomographyFit:
    """Solve the readout in place; returns the fit's record. ``frames``: the first N frames of each
    sequence (None: all); every frame after the first makes a pair."""
    scale = fitted_scale(model)
    paths = find_sequences(data)
    if len(paths) < holdout + 2:
        raise ValueError(f"{data}: {len(paths)} sequences, need at least --holdout {holdout} + 2 (cross-validation)")
    fit_paths, holdout_paths = paths[: len(paths) - holdout], paths[len(paths) - holdout :]
    x, before, y, group = _collect(model, fit_paths, frames, progress, "fit clips").arrays()
    if len(x) == 0:
        raise ValueError(f"{data}: the sequences have one frame each, no frame pairs to fit")
    folds = min(folds, len(fit_paths))
    cv: dict[float, float] = {}
    for ridge in ridges:
        errors = []
        for k in range(folds):
            train = group % folds != k
            weight, bias = _solve(x[train], y[train], ridge)
            errors.append(scale_mace(x[~train] @ weight.T + bias, y[~train], scale))
        cv[ridge] = float(np.concatenate(errors).mean())
    ridge = min(cv, key=cv.__getitem__)
    weight, bias = _solve(x, y, ridge)
    held: tuple[float | None, float | None, float | None] = (None, None, None)
    if holdout_paths:  # streamed before the readout changes, for its "before"
        hx, hbefore, hy, _ = _collect(model, holdout_paths, frames, progress, "held-out clips").arrays()
        held = tuple(float(scale_mace(p, hy, scale).mean()) for p in (0 * hy, hbefore, hx @ weight.T + bias))  # type: ignore[assignment]
    layer = model.homography_heads[str(scale)].offsets
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight).to(layer.weight))
        layer.bias.copy_(torch.from_numpy(bias).to(layer.bias))
    fitted = (x @ weight.T + bias, y)
    return HomographyFit(
        scale=scale,
        data=str(data),
        fit_sequences=len(fit_paths),
        holdout_sequences=len(holdout_paths),
        frames=frames,
        pairs=len(x),
        ridge=ridge,
        cv_mace=cv[ridge],
        fit_mace_identity=float(scale_mace(0 * y, y, scale).mean()),
        fit_mace_before=float(scale_mace(before, y, scale).mean()),
        fit_mace_after=float(scale_mace(*fitted, scale).mean()),
        holdout_mace_identity=held[0],
        holdout_mace_before=held[1],
        holdout_mace_after=held[2],
    )
