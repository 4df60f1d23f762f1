"""One parity loop for any two backends (Polygraphy's ``Comparator``): same feeds, state carried.

Each backend carries its own state from frame to frame, as a deployment would, so drift that
accumulates through the recurrent state shows up. The stream is a textured image moving a few
pixels per frame, so the homography and mask outputs see real motion rather than noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from export.runtime import Backend
from models.metrics import iou, mace, psnr
from models.streaming import run_stream

# Parity thresholds: fp32 runtimes vs torch, and reduced precision vs fp32.
FP32_MAX_ABS = 1e-4
# Homographies are judged by the corner error, not entry by entry: their entries mix units (pixels,
# ratios, 1/pixels), and the in-graph Gauss-Newton refinement carries fp32 rounding into the
# translation at the 1e-4 pixel level.
FP32_MACE_PX = 1e-3
REDUCED_PSNR_DB = 40.0
REDUCED_MASK_IOU = 0.99
REDUCED_MACE_PX = 0.05
# Untrained networks put every mask probability within a hair of 0.5, where the threshold flips on
# rounding noise and plain IoU says nothing. IoU is therefore also reported over the pixels where
# the reference is at least this far from 0.5; with none such, the probabilities themselves are
# compared (REDUCED_MASK_PROB).
MASK_BAND = 0.05
REDUCED_MASK_PROB = 0.02


def moving_frames(batch: int, height: int, width: int, frames: int, seed: int = 0) -> Iterator[np.ndarray]:
    """(b, 3, H, W) float32 frames in [0, 1]: a smooth random texture panning 2-3 px per frame."""
    rng = np.random.default_rng(seed)
    margin = 4 * frames + 8
    coarse = rng.random((batch, 3, (height + margin) // 8 + 2, (width + margin) // 8 + 2), dtype=np.float32)
    texture = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)  # blocky, then blurred below
    kernel = np.ones(5, np.float32) / 5
    for axis in (2, 3):
        texture = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, texture)
    texture = 0.8 * texture + 0.2 * rng.random(texture.shape, dtype=np.float32)  # fine detail
    for t in range(frames):
        dy, dx = 2 * t, 3 * t
        yield np.ascontiguousarray(texture[:, :, dy : dy + height, dx : dx + width], dtype=np.float32)


@torch.no_grad()
def exercise_untrained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Makes an untrained MOST network's mask and homography outputs non-degenerate, in place.

    Untrained, the corner-offset regressors start at zero (identity homographies) and the mask heads
    give probabilities within a hair of 0.5, so a parity check of those outputs would compare
    constants. Random offset layers (a few pixels of corner motion) and sharpened mask heads make
    the geometry and thresholding paths carry real values. Speed is unaffected; weights from a
    checkpoint should not be exercised (they are already meaningful).
    """
    generator = torch.Generator().manual_seed(seed)
    for head in getattr(model, "homography_heads", {}).values():
        layer: nn.Linear = head.offsets
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 4 / layer.in_features**0.5)
        layer.bias.copy_((torch.rand(layer.bias.shape, generator=generator) - 0.5) * 4)
    for head in getattr(model, "segmentation_heads", {}).values():
        last = [m for m in head.modules() if isinstance(m, nn.Conv2d)][-1]
        last.weight.mul_(40.0)
        last.bias.zero_()  # no offset: the sign of the logit follows the image, so masks are mixed
    return model


def mask_iou(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """IoU of two batches of probability maps thresholded strictly above 0.5, pooled over the batch (and
    restricted to ``where``); two empty masks agree perfectly. Strict, so that the undecided 0.5 of an
    untrained head is no mask at all, in both runtimes alike."""
    ma, mb = a > 0.5, b > 0.5
    if where is not None:
        ma, mb = ma & where, mb & where
    return float(iou(ma[None], mb[None])[0])  # boolean masks go through as they are: one pooled value


def confident_mask_iou(reference: np.ndarray, candidate: np.ndarray, band: float = MASK_BAND) -> float | None:
    """IoU over pixels where the reference is decided (|p - 0.5| >= band); None when there are none."""
    decided = np.abs(reference - 0.5) >= band
    return mask_iou(reference, candidate, where=decided) if decided.any() else None


@dataclass
class ParityReport:
    """Worst case over the stream of each measure; ``max_abs`` per tensor name (outputs and state)."""

    reference: str
    candidate: str
    batch: int
    height: int
    width: int
    frames: int
    max_abs: dict[str, float] = field(default_factory=dict)
    psnr_db: float | None = None  # restored frame, min over frames
    mask_iou: float | None = None  # min over frames
    mask_iou_confident: float | None = None  # min over frames with decided pixels; None: all near 0.5
    mace_px: float | None = None  # max over frames

    @property
    def worst_abs(self) -> float:
        """The largest difference over every map (outputs and state); the homography counts by MACE."""
        return max(v for k, v in self.max_abs.items() if k != "homography")

    def within_fp32(self, tolerance: float = FP32_MAX_ABS) -> bool:
        return self.worst_abs <= tolerance and (self.mace_px is None or self.mace_px <= FP32_MACE_PX)

    def within_reduced(
        self, psnr: float = REDUCED_PSNR_DB, iou: float = REDUCED_MASK_IOU, mace: float = REDUCED_MACE_PX
    ) -> bool:
        ok = self.psnr_db is None or self.psnr_db >= psnr
        if self.mask_iou_confident is not None:
            ok &= self.mask_iou_confident >= iou
        elif "teeth_mask" in self.max_abs:  # undecided masks: compare the probabilities instead
            ok &= self.max_abs["teeth_mask"] <= REDUCED_MASK_PROB
        return ok and (self.mace_px is None or self.mace_px <= mace)

    def summary(self) -> str:
        where = f"{self.frames} frames, b{self.batch}, {self.height}x{self.width}"
        parts = [f"{self.candidate} vs {self.reference} ({where})"]
        parts.append(f"max |diff| {self.worst_abs:.2e}")
        if self.psnr_db is not None:
            parts.append(f"restored PSNR {self.psnr_db:.1f} dB")
        if self.mask_iou is not None:
            confident = "n/a" if self.mask_iou_confident is None else f"{self.mask_iou_confident:.4f}"
            parts.append(f"mask IoU {self.mask_iou:.4f} (decided pixels {confident})")
        if self.mace_px is not None:
            parts.append(f"MACE diff {self.mace_px:.4f} px")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def compare_backends(
    reference: Backend,
    candidate: Backend,
    batch: int = 1,
    height: int = 64,
    width: int = 96,
    frames: int = 10,
    seed: int = 0,
) -> ParityReport:
    """Runs the same moving stream through both backends and reports how far the candidate strays."""
    return compare_streams(reference, candidate, [list(moving_frames(batch, height, width, frames, seed))])


def compare_streams(reference: Backend, candidate: Backend, streams: list[list[np.ndarray]]) -> ParityReport:
    """Worst case over several streams (each starts with a reset), e.g. rendered sequences rather than
    the moving pattern: int8 ranges are calibrated on realistic frames and must be judged on them."""
    spec = reference.spec
    if tuple(spec.output_names) != tuple(candidate.spec.output_names):
        raise ValueError(f"{reference.info.name} and {candidate.info.name} run different graphs")
    batch, _, height, width = streams[0][0].shape
    report = ParityReport(
        reference=f"{reference.info.name}/{reference.info.precision}",
        candidate=f"{candidate.info.name}/{candidate.info.precision}",
        batch=batch,
        height=height,
        width=width,
        frames=sum(len(s) for s in streams),
    )
    names = {o.name: o for o in spec.outputs}
    psnrs, ious, confident_ious, maces = [], [], [], []
    for stream in streams:  # one stream at a time: most-nss carries 33 MiB of state per step at 320x416
        for want, have in zip(run_stream(reference, stream), run_stream(candidate, stream), strict=True):
            for name in spec.output_names:
                if have[name].shape != want[name].shape:
                    raise ValueError(f"{name}: shape {have[name].shape} != {want[name].shape}")
                diff = float(np.max(np.abs(have[name].astype(np.float64) - want[name])))
                report.max_abs[name] = max(report.max_abs.get(name, 0.0), diff)
            if "restored" in names:  # clipped as the pipeline clips before uint8; one value per batch
                restored = (np.clip(have["restored"], 0, 1)[None], np.clip(want["restored"], 0, 1)[None])
                psnrs.append(float(psnr(*restored, data_range=1.0)[0]))
            if "teeth_mask" in names:
                ious.append(mask_iou(have["teeth_mask"], want["teeth_mask"]))
                confident = confident_mask_iou(want["teeth_mask"], have["teeth_mask"])
                if confident is not None:
                    confident_ious.append(confident)
            if "homography" in names:  # the worst sample of the batch
                maces.append(float(mace(have["homography"], want["homography"], height, width).max()))
    report.psnr_db = min(psnrs) if psnrs else None
    report.mask_iou = min(ious) if ious else None
    report.mask_iou_confident = min(confident_ious) if confident_ious else None
    report.mace_px = max(maces) if maces else None
    return report
