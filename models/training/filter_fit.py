"""Least-squares fit of a MOST network's scale-1 restoration filter (``MostConfig.restoration_filter``).

The restored frame is ``B^1 + head(...) + filter(B^1)``. Given the rest of the network, the filter
is linear in its weights, so the weights that minimise the squared error to the clean targets are a
least-squares solution: no learning rate, no steps, the global optimum for the clips it is fitted on.
Gradient descent did not find it: after 7000 steps most-nss's output still carried the input's noise
(high-pass correlation 0.82, ``tools/restoration_probe.py``), and 900 more steps with the input
fed to the heads barely moved the new weights (docs/experiments.md).

Only the scale-1 filter is fitted: its output is the network's restored frame and feeds nothing else,
so the mask and the homography stay exactly as they were. Coarser filters are left as they are.
The fit uses labelled sequences on disk (``vident synth --split train``), never the test split;
the last ``holdout`` sequences are kept out of the fit to report what it does on unseen clips.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from models.checkpoints import load_model, read_metadata, save_checkpoint
from models.data.format import find_sequences, read_sequence
from models.data.synth import LabelledSequence
from models.metrics import psnr
from models.most import MostNet, checkpoint_filter_fn
from models.streaming import stream_intermediates

DEFAULT_KERNEL = 5


@dataclass(frozen=True)
class FilterFit:
    """What a fit did, in 0-1 units (PSNR in dB); stored in the checkpoint's metadata as JSON."""

    kernel: int
    data: str
    fit_sequences: int
    holdout_sequences: int
    frames: int
    pixels: int  # rows of the least-squares problem
    fit_psnr_before: float
    fit_psnr_after: float
    holdout_psnr_before: float | None
    holdout_psnr_after: float | None


def load_for_fit(weights: str | Path, kernel: int | None = None) -> tuple[MostNet, dict[str, str]]:
    """A MOST checkpoint rebuilt with ``kernel`` x ``kernel`` restoration filters and its metadata.

    ``None`` keeps the checkpoint's filter size (5 for checkpoints without filters). Zero filters
    are added to checkpoints without them (the same function); a fitted scale-1 filter of another
    size is dropped (the fit replaces it anyway), but coarser non-zero filters cannot be resized."""
    model, _ = load_model(str(weights))
    if not isinstance(model, MostNet):
        raise ValueError(f"{weights}: not a MOST checkpoint (only MOST networks have restoration filters)")
    if 1 not in model.structure.restoration:
        raise ValueError(f"{weights}: the network has no scale-1 restoration head to filter")
    kernel = kernel or model.cfg.restoration_filter or DEFAULT_KERNEL
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"the filter side must be odd and positive, got {kernel}")
    if model.cfg.restoration_filter != kernel:
        if model.cfg.restoration_filter:
            with torch.no_grad():  # the fit replaces it: only the coarser filters must survive the resize
                for param in model.restoration_filters["1"].parameters():
                    param.zero_()
        into = replace(model.cfg, restoration_filter=kernel)
        _, state = checkpoint_filter_fn(model.state_dict(), model.layout_metadata(), into)
        model = MostNet(into, name=model.spec.name)
        model.load_state_dict(state, strict=True)
    return model.float().eval(), read_metadata(weights)


def scale1_head_stream(model: MostNet, frames: np.ndarray) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per frame of a uint8 (T, H, W, 3) clip, streamed with the state carried (the network in fp32):
    what the scale-1 dense heads read (without B^1), B^1 and the restoration head's output, each
    (1, C, H, W) float32. The fit and ``tools/restoration_probe.py`` both start here."""
    return [
        (found["head_features_s1"].float(), frame, found["restoration_residual_s1"].float())
        for frame, _, found in stream_intermediates(model, frames)
    ]


def target_chw(seq: LabelledSequence, t: int) -> np.ndarray:
    """Frame ``t``'s clean target as (3, H, W) float64 in [0, 1], the layout the network outputs."""
    return seq.target[t].astype(np.float64).transpose(2, 0, 1) / 255.0


def _stream(model: MostNet, seq: LabelledSequence, frames: int) -> Iterable[tuple[Tensor, Tensor, np.ndarray]]:
    """Per frame: B^1 (1, 3, H, W), the restored frame without the scale-1 filter, the target (3, H, W)."""
    for t, (_, image, head_out) in enumerate(scale1_head_stream(model, seq.input[:frames])):
        yield image, image + head_out, target_chw(seq, t)


def _columns(image: Tensor, kernel: int) -> np.ndarray:
    """(H*W, 3*k*k + 1): each pixel's k x k colour neighbourhood (zero-padded, as the convolution
    pads) and a 1 for the bias; the column order is the one of the convolution's weight."""
    cols = F.unfold(image.double(), kernel, padding=kernel // 2)[0].T
    return torch.cat((cols, cols.new_ones(cols.shape[0], 1)), dim=1).numpy()


def fit_restoration_filter(
    model: MostNet,
    data: Path,
    frames: int = 6,
    holdout: int = 2,
    subsample: int = 4,
    ridge: float = 1e-6,
    progress: bool = True,
) -> FilterFit:
    """Solve the scale-1 filter in place; returns the fit's record. ``subsample``: every Nth pixel
    goes into the normal equations (neighbouring pixels add little and cost memory and time);
    ``ridge`` (relative to the mean diagonal) only guards against a singular system."""
    kernel = model.cfg.restoration_filter
    paths = find_sequences(data)
    if len(paths) <= holdout:
        raise ValueError(f"{data}: {len(paths)} sequences, need more than --holdout {holdout}")
    fit_paths, holdout_paths = paths[: len(paths) - holdout], paths[len(paths) - holdout :]
    n = 3 * kernel * kernel + 1
    gram, cross, rows = np.zeros((n, n)), np.zeros((n, 3)), 0
    fit_frames: list[tuple[Tensor, Tensor, np.ndarray]] = []
    for path in tqdm(fit_paths, desc="fit clips", disable=not progress):
        for image, unfiltered, target in _stream(model, read_sequence(path, count=frames), frames):
            a = _columns(image, kernel)[::subsample]
            y = (target - unfiltered[0].double().numpy()).reshape(3, -1).T[::subsample]
            gram += a.T @ a
            cross += a.T @ y
            rows += a.shape[0]
            fit_frames.append((image, unfiltered, target))
    gram += ridge * np.trace(gram) / n * np.eye(n)
    solution = np.linalg.solve(gram, cross)  # (n, 3)
    conv = model.restoration_filters["1"]
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(solution[:-1].T.reshape(3, 3, kernel, kernel)).to(conv.weight))
        conv.bias.copy_(torch.from_numpy(solution[-1]).to(conv.bias))

    def frame_psnr(restored: Tensor, target: np.ndarray) -> float:
        """PSNR of one (1, 3, H, W) frame in [0, 1], clipped as the pipeline clips before uint8."""
        return float(psnr(np.clip(restored[0].double().numpy(), 0, 1), target, data_range=1.0)[0])

    def mean_psnr(frames_: list[tuple[Tensor, Tensor, np.ndarray]]) -> tuple[float, float]:
        """Mean per-frame PSNR without and with the fitted filter."""
        before, after = [], []
        for image, unfiltered, target in frames_:
            with torch.no_grad():
                filtered = unfiltered + conv(image)
            before.append(frame_psnr(unfiltered, target))
            after.append(frame_psnr(filtered, target))
        return float(np.mean(before)), float(np.mean(after))

    fit_before, fit_after = mean_psnr(fit_frames)
    held = [f for path in holdout_paths for f in _stream(model, read_sequence(path, count=frames), frames)]
    held_before, held_after = mean_psnr(held) if held else (None, None)
    return FilterFit(
        kernel=kernel,
        data=str(data),
        fit_sequences=len(fit_paths),
        holdout_sequences=len(holdout_paths),
        frames=frames,
        pixels=rows,
        fit_psnr_before=fit_before,
        fit_psnr_after=fit_after,
        holdout_psnr_before=held_before,
        holdout_psnr_after=held_after,
    )


def save_fitted(model: torch.nn.Module, meta: dict[str, str], out: Path, **records: object) -> Path:
    """``out/last.safetensors`` (float32), keeping the source's training record (and earlier fits) so
    ``vident ship`` describes the training of the trunk, plus each fit's record under its keyword
    (``filter_fit=FilterFit(...)``, ``colour_fit=ColourFit(...)``), as JSON in the metadata and
    beside the weights (``out/filter_fit.json``)."""
    kept = {k: v for k, v in meta.items() if k not in ("model", "structure", "dtype", "source_run")}
    kept.update({key: json.dumps(asdict(record)) for key, record in records.items()})  # type: ignore[call-overload]
    path = save_checkpoint(model, out / "last.safetensors", kept)
    for key, record in records.items():
        (out / f"{key}.json").write_text(json.dumps(asdict(record), indent=2) + "\n")  # type: ignore[call-overload]
    return path


def filter_fit_of(meta: dict[str, str]) -> FilterFit | None:
    """The fit recorded in a checkpoint's metadata (None: its filters were not fitted)."""
    return FilterFit(**json.loads(meta["filter_fit"])) if "filter_fit" in meta else None
