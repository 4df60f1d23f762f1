"""``vident eval``'s logic: a model, a baseline and classical comparators on a labelled data set (Table 6.4's form).

The model is run exactly as the service runs it: frame by frame through :mod:`service.pipeline`
(``Stream`` state, ``run_streams``, the backend from ``create_backend``), so the numbers measure
what a user gets, padding and uint8 conversions included; that is why this lives in the service
and not beside the metrics in ``models``. Rows:

* ``BASELINE``: the input as the restored frame, the identity as the homography, every pixel teeth
  (section 6.3.3's blind baseline);
* the model (restoration, and for the MOST family the teeth mask and homography);
* for R2-D4-like models with a ``denoised`` output, that output against R'_t when the data has it;
* ``ORB + RANSAC`` / ``SIFT + RANSAC``: OpenCV features matched between consecutive input frames
  and a partial-affine model (the labels' model) fitted with RANSAC, converted to our pixel convention;
* ``ECC (OpenCV)``: ``cv2.findTransformECC`` with a full homography, coarse to fine over a
  three-level pyramid: direct (intensity) alignment, the classical counterpart of a regressor;
* ``NL-means (OpenCV)``: ``cv2.fastNlMeansDenoisingColored`` on each input frame.

Per-frame values are averaged over all frames of all sequences; MACE and E(W) over frame pairs
(t >= 1). E(W) is measured where the true homography holds: teeth in the current frame that were
also teeth in the previous one (see ``stable_region``); in sequences without teeth labels
(``meta["has_mask"]`` false: the real-content split), wherever the warp is valid, and IoU is not
measured there. ``psnr_aligned`` is PSNR after a per-channel gain and offset fit to the target
(``models.metrics.colour_aligned_psnr``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from export.runtime import Backend
from models.checkpoints import shipped_checkpoint
from models.data.format import find_sequences, read_sequence, validate_sequence
from models.data.synth import LabelledSequence
from models.layers import warp_by_homography
from models.metrics import colour_aligned_psnr, iou, mace, psnr, ssim, warping_error
from service.backends.factory import create_backend
from service.pipeline import Geometry, Stream, run_streams

METRICS = ("psnr", "psnr_aligned", "ssim", "iou", "mace", "ew", "fps")
_HALF = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])  # OpenCV pixel coords -> ours


def opencv_to_pixel_homography(h_cv: np.ndarray) -> np.ndarray:
    """OpenCV's H (pixel centres at integers) in our convention (centres at +0.5): ``T H T^-1``."""
    h = _HALF @ h_cv @ np.linalg.inv(_HALF)
    return h / h[2, 2]


def stable_region(prev_mask: np.ndarray, cur_mask: np.ndarray, h_true: np.ndarray) -> np.ndarray:
    """Pixels that are teeth now and were teeth one frame earlier (previous mask warped by the true H)."""
    prev = torch.from_numpy(prev_mask.astype(np.float32))[None, None]
    warped = warp_by_homography(prev, torch.from_numpy(h_true.astype(np.float32))[None])[0, 0].numpy()
    return cur_mask.astype(bool) & (warped > 0.5)


class FeatureHomography:
    """Classical comparator: keypoints + ratio-test matches + RANSAC partial affine between frames."""

    def __init__(self, kind: str) -> None:
        if kind == "orb":
            self.detector, norm = cv2.ORB_create(nfeatures=2000), cv2.NORM_HAMMING
        elif kind == "sift":
            self.detector, norm = cv2.SIFT_create(nfeatures=2000), cv2.NORM_L2
        else:
            raise ValueError(f"unknown feature kind {kind!r}")
        self.matcher = cv2.BFMatcher(norm)
        self.failures = 0

    def estimate(self, prev_rgb: np.ndarray, cur_rgb: np.ndarray) -> np.ndarray:
        """H_{prev->cur} in our pixel convention; the identity (counted in ``failures``) when matching fails."""
        kp1, d1 = self.detector.detectAndCompute(cv2.cvtColor(prev_rgb, cv2.COLOR_RGB2GRAY), None)
        kp2, d2 = self.detector.detectAndCompute(cv2.cvtColor(cur_rgb, cv2.COLOR_RGB2GRAY), None)
        if d1 is None or d2 is None or len(kp1) < 4 or len(kp2) < 4:
            self.failures += 1
            return np.eye(3)
        pairs = self.matcher.knnMatch(d1, d2, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.75 * p[1].distance]
        if len(good) < 4:
            self.failures += 1
            return np.eye(3)
        src = np.float32([kp1[m.queryIdx].pt for m in good])
        dst = np.float32([kp2[m.trainIdx].pt for m in good])
        affine, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0)
        if affine is None:
            self.failures += 1
            return np.eye(3)
        return opencv_to_pixel_homography(np.vstack((affine, [0.0, 0.0, 1.0])))


class EccHomography:
    """Classical comparator: OpenCV's enhanced correlation coefficient alignment (Evangelidis and
    Psarakis 2008) with a homography motion model, coarse to fine (1/4, 1/2, 1) from the identity."""

    def __init__(self, levels: int = 3, iterations: int = 50, epsilon: float = 1e-5) -> None:
        self.levels = levels
        self.criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, epsilon)
        self.failures = 0

    def estimate(self, prev_rgb: np.ndarray, cur_rgb: np.ndarray) -> np.ndarray:
        """H_{prev->cur} in our pixel convention; the identity (counted in ``failures``) when ECC fails."""
        prev = cv2.cvtColor(prev_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        cur = cv2.cvtColor(cur_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        pyramid = [(prev, cur)]
        for _ in range(self.levels - 1):
            pyramid.append((cv2.pyrDown(pyramid[-1][0]), cv2.pyrDown(pyramid[-1][1])))
        warp = np.eye(3, dtype=np.float32)  # OpenCV convention at the current level
        try:
            for level in range(self.levels - 1, -1, -1):
                template, image = pyramid[level]
                # ECC's warp maps template (previous frame) coordinates into the input image (current frame).
                _, warp = cv2.findTransformECC(template, image, warp, cv2.MOTION_HOMOGRAPHY, self.criteria, None, 5)
                if level:
                    warp = _rescale_cv(warp, 2.0).astype(np.float32)
        except cv2.error:
            self.failures += 1
            return np.eye(3)
        return opencv_to_pixel_homography(warp.astype(np.float64))


def _rescale_cv(h: np.ndarray, factor: float) -> np.ndarray:
    """An OpenCV-convention homography at ``factor`` times the resolution (pyrDown halves the pixel
    grid with centres at integers: x_fine = 2 x_coarse + 0.5)."""
    up = np.array([[factor, 0.0, (factor - 1) / 2], [0.0, factor, (factor - 1) / 2], [0.0, 0.0, 1.0]])
    out = up @ h.astype(np.float64) @ np.linalg.inv(up)
    return out / out[2, 2]


@dataclass
class Row:
    """Per-frame metric values of one method, and the seconds it spent."""

    name: str
    values: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in METRICS if k != "fps"})
    seconds: float = 0.0
    timed_frames: int = 0
    failures: int = 0  # comparator frame pairs where no model could be fitted

    def add_restoration(self, restored: np.ndarray, target: np.ndarray) -> None:
        self.values["psnr"].append(float(psnr(restored, target)[0]))
        self.values["psnr_aligned"].append(float(colour_aligned_psnr(restored, target)[0]))
        self.values["ssim"].append(float(ssim(restored, target)[0]))

    def summary(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for key, vals in self.values.items():
            finite = [v for v in vals if math.isfinite(v)]
            out[key] = float(np.mean(finite)) if finite else None
        out["fps"] = self.timed_frames / self.seconds if self.seconds > 0 else None
        return out


def nl_means(frame: np.ndarray) -> np.ndarray:
    """The NL-means comparator on one uint8 RGB frame: OpenCV, h = hColor = 10, 7x7 patches, 21x21 search."""
    bgr = cv2.fastNlMeansDenoisingColored(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), None, 10, 10, 7, 21)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _restoration_and_ew(
    row: Row, outputs: list[np.ndarray], seq: LabelledSequence, regions: list[np.ndarray | None], reference: np.ndarray
) -> None:
    for t, out in enumerate(outputs):
        row.add_restoration(out, reference[t])
        if t > 0:
            row.values["ew"].append(float(warping_error(outputs[t - 1], out, seq.homographies[t], regions[t])[0]))


def evaluate_sequence(
    seq: LabelledSequence,
    rows: dict[str, Row],
    backend: Backend,
    comparators: bool,
    on_frame: Callable[[], None] | None = None,
) -> None:
    """Adds one sequence's per-frame values to ``rows`` (created on first use)."""
    spec = backend.spec
    height, width = seq.size
    frames = seq.frames
    labelled = bool(seq.meta.get("has_mask", True))
    regions: list[np.ndarray | None] = [None] * frames
    if labelled:
        regions[1:] = [stable_region(seq.mask[t - 1], seq.mask[t], seq.homographies[t]) for t in range(1, frames)]

    def row(name: str) -> Row:
        return rows.setdefault(name, Row(name))

    # BASELINE: input as output, identity homography, every pixel teeth.
    base = row("BASELINE")
    _restoration_and_ew(base, list(seq.input), seq, regions, seq.target)
    if labelled:
        base.values["iou"].extend(iou(np.ones_like(seq.mask), seq.mask).tolist())
    base.values["mace"].extend(mace(np.tile(np.eye(3), (frames - 1, 1, 1)), seq.homographies[1:], height, width))

    # The model, streamed frame by frame as the service does.
    model_row = row(spec.name)
    stream = Stream(spec, Geometry(height, width))
    restored, denoised = [], []
    for t in range(frames):
        start = time.perf_counter()
        result = run_streams(backend, [stream], [seq.input[t]])[0]
        model_row.seconds += time.perf_counter() - start
        model_row.timed_frames += 1
        restored.append(result.restored)
        if "denoised" in result.extra:
            denoised.append(result.extra["denoised"])
        if result.teeth_mask is not None and labelled:
            model_row.values["iou"].append(float(iou(result.teeth_mask.astype(np.float32) / 255.0, seq.mask[t])[0]))
        if result.homography is not None and t > 0:
            model_row.values["mace"].append(float(mace(result.homography, seq.homographies[t], height, width)[0]))
        if on_frame is not None:
            on_frame()
    _restoration_and_ew(model_row, restored, seq, regions, seq.target)
    if denoised and seq.target_blurry is not None:
        _restoration_and_ew(row(f"{spec.name} (denoised vs R')"), denoised, seq, regions, seq.target_blurry)

    if not comparators:
        return
    cv2.setRNGSeed(0)  # RANSAC draws from OpenCV's generator: the same rows on every run
    estimators = (("ORB + RANSAC", FeatureHomography("orb")), ("SIFT + RANSAC", FeatureHomography("sift")),
                  ("ECC (OpenCV)", EccHomography()))  # fmt: skip
    for label, estimator in estimators:
        feature_row = row(label)
        for t in range(1, frames):
            start = time.perf_counter()
            h_est = estimator.estimate(seq.input[t - 1], seq.input[t])
            feature_row.seconds += time.perf_counter() - start
            feature_row.timed_frames += 1
            feature_row.values["mace"].append(float(mace(h_est, seq.homographies[t], height, width)[0]))
        feature_row.failures += estimator.failures
    nlm_row = row("NL-means (OpenCV)")
    cleaned = []
    for t in range(frames):
        start = time.perf_counter()
        cleaned.append(nl_means(seq.input[t]))
        nlm_row.seconds += time.perf_counter() - start
        nlm_row.timed_frames += 1
    _restoration_and_ew(nlm_row, cleaned, seq, regions, seq.target)


@dataclass
class EvalReport:
    model: str
    checkpoint: str | None
    random_weights: bool
    backend: str
    device: str
    data: str
    sequences: list[str]
    frames: int
    rows: dict[str, dict[str, float | None]]
    notes: dict[str, str]

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.model,
            "checkpoint": self.checkpoint,
            "random_weights": self.random_weights,
            "backend": self.backend,
            "device": self.device,
            "data": self.data,
            "sequences": self.sequences,
            "frames": self.frames,
            "ew_region": "teeth in the current frame and (warped) in the previous one",
            "rows": [{"name": name, **values} for name, values in self.rows.items()],
            "notes": self.notes,
        }


def count_frames(data: str | Path, max_sequences: int | None = None, max_frames: int | None = None) -> int:
    """Frames an evaluation will run over (validates every folder first)."""
    folders = find_sequences(data)[:max_sequences]
    return sum(min(validate_sequence(f).frames, max_frames or 10**9) for f in folders)


def evaluate(
    model: str,
    data: str | Path,
    backend: str = "torch",
    device: str = "cpu",
    checkpoint: str | Path | None = None,
    max_sequences: int | None = None,
    max_frames: int | None = None,
    comparators: bool = True,
    on_frame: Callable[[], None] | None = None,
) -> EvalReport:
    """Runs every row over every sequence under ``data`` (all folders validated before anything runs)."""
    folders = find_sequences(data)[:max_sequences]
    infos = [validate_sequence(f) for f in folders]
    is_path = Path(model).suffix == ".safetensors"
    used = checkpoint or (model if is_path else shipped_checkpoint(model))
    runner = create_backend(model, backend=backend, device=device, checkpoint=checkpoint)
    rows: dict[str, Row] = {}
    frames = 0
    try:
        for info in infos:
            count = min(info.frames, max_frames) if max_frames else info.frames
            seq = read_sequence(info.path, 0, count, info=info)
            evaluate_sequence(seq, rows, runner, comparators, on_frame)
            frames += count
    finally:
        runner.close()
    return EvalReport(
        model=runner.spec.name,
        checkpoint=str(used) if used else None,
        random_weights=used is None,
        backend=backend,
        device=device,
        data=str(data),
        sequences=[i.path.name for i in infos],
        frames=frames,
        rows={name: r.summary() for name, r in rows.items()},
        notes={n: f"{r.failures} frame pairs without a fit (identity used)" for n, r in rows.items() if r.failures},
    )


__all__ = [
    "EccHomography",
    "EvalReport",
    "FeatureHomography",
    "evaluate",
    "evaluate_sequence",
    "nl_means",
    "count_frames",
    "opencv_to_pixel_homography",
    "stable_region",
]
