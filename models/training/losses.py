"""Task losses as the dissertation sets them.

MOST (eq. 5.3, 6.5): per-scale Charbonnier on the restoration, binary cross-entropy on the teeth
mask, MACE on the homography, with labels brought to each scale (frames and masks averaged down,
homographies rescaled by S = diag(2, 2, 1), never resized as images). R2-D4 (eq. 3.23-3.26): MSE on
the restored frame plus 0.6 x MSE on the first-stage (denoised, blurry) frame, plus an optional
VGG-19 perceptual term when a weights file is given (none can be downloaded here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from models.layers import mean_corner_error, rescale_homography
from models.most import MostStep

TASKS = ("restoration", "segmentation", "homography")
R2D4_NOISE_WEIGHT = 0.6  # eq. 3.25: the first (denoising) stage's share
R2D4_PERCEPTUAL_WEIGHT = 0.01


def charbonnier(pred: Tensor, target: Tensor, eps: float = 1e-3) -> Tensor:
    return torch.sqrt((pred - target) ** 2 + eps * eps).mean()


def colour_aligned(pred: Tensor, target: Tensor) -> Tensor:
    """``pred`` with a per-image, per-channel gain and offset fitted to ``target`` by least squares
    (the fit held constant), as colour-aligned PSNR judges it: a loss on it trains structure
    (noise, blur) and leaves colour to the least-squares colour map."""
    with torch.no_grad():
        p, t = pred.float().flatten(2), target.float().flatten(2)
        pc, tc = p - p.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
        gain = (pc * tc).mean(-1) / (pc.square().mean(-1) + 1e-6)
        offset = t.mean(-1) - gain * p.mean(-1)
    return pred * gain[..., None, None] + offset[..., None, None]


COLOUR_BLOCK = 8  # full-resolution pixels averaged per side by :func:`low_frequency`


def low_frequency(x: Tensor, scale: int = 1) -> Tensor:
    """``x`` (at scale ``scale``) averaged over blocks of ``COLOUR_BLOCK`` full-resolution pixels: what
    is left is its colour and shading, with noise and fine structure averaged away, so a loss on it
    holds colour without charging what the colour-aligned term trains."""
    side = max(1, COLOUR_BLOCK >> (scale - 1))
    return F.avg_pool2d(x, side, ceil_mode=True)


def downscale(x: Tensor, scale: int) -> Tensor:
    """A full-resolution label at scale s (1, 2, 3): area averaging, as the network's own inputs."""
    return x if scale == 1 else F.avg_pool2d(x, 2 ** (scale - 1))


def homography_at_scale(h: Tensor, scale: int) -> Tensor:
    return h if scale == 1 else rescale_homography(h, 2.0 ** -(scale - 1))


def mask_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Binary cross-entropy over the labelled pixels; clips without teeth labels carry mask -1
    (``models.data.dataset.UNLABELLED``) and add nothing, so restoration-only content can share a batch."""
    labelled = (mask >= 0).to(logits.dtype)
    total = F.binary_cross_entropy_with_logits(logits, mask.clamp(min=0), weight=labelled, reduction="sum")
    return total / labelled.sum().clamp(min=1.0)


def mace_loss(h_est: Tensor, h_true: Tensor, height: int, width: int) -> Tensor:
    return mean_corner_error(h_est, h_true, height, width).mean()


@dataclass
class MostTargets:
    """Labels of one frame for a batch: sharp vivid frame, teeth mask (0/1), H_{t-1->t} (full-res)."""

    restored: Tensor  # (b, 3, H, W)
    mask: Tensor  # (b, 1, H, W)
    homography: Tensor  # (b, 3, 3)


def most_task_losses(
    step: MostStep, targets: MostTargets, aligned: float = 0.0, colour: float = 0.0
) -> dict[str, Tensor]:
    """Sum over the scales that have a head of each task's loss (eq. 5.3 before task weights).
    ``aligned``: the share of the restoration loss taken after a per-channel colour fit
    (:func:`colour_aligned`); ``colour``: the weight of a Charbonnier term on :func:`low_frequency`
    added to it; both 0 is the dissertation's loss."""
    height, width = targets.restored.shape[-2:]
    zero = targets.restored.new_zeros(())
    restoration, segmentation, homography = zero, zero, zero
    for s, pred in step.restored.items():
        pred, target = pred.float(), downscale(targets.restored, s)
        term = charbonnier(pred, target)
        if aligned:
            term = (1 - aligned) * term + aligned * charbonnier(colour_aligned(pred, target), target)
        if colour:
            term = term + colour * charbonnier(low_frequency(pred, s), low_frequency(target, s))
        restoration = restoration + term
    for s, logits in step.mask_logits.items():
        segmentation = segmentation + mask_loss(logits.float(), downscale(targets.mask, s))
    for s, h in step.homography.items():
        h_true = homography_at_scale(targets.homography, s)
        homography = homography + mace_loss(h.float(), h_true, height // 2 ** (s - 1), width // 2 ** (s - 1))
    return {"restoration": restoration, "segmentation": segmentation, "homography": homography}


class VGGPerceptual(nn.Module):
    """VGG-19 features up to relu3_x (eq. 3.26), built without torchvision from a local weights file.

    The file is a ``.safetensors`` with torchvision's ``features.{i}.weight/bias`` names; nothing is
    downloaded. Inputs are RGB in [0, 1], normalised with ImageNet statistics.
    """

    CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256)

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in self.CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_ch, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = int(item)
        self.features = nn.Sequential(*layers)
        state = {
            k.removeprefix("features."): v for k, v in load_file(str(weights)).items() if k.startswith("features.")
        }
        own = self.features.state_dict()
        self.features.load_state_dict({k: state[k] for k in own})
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(self.features((pred - self.mean) / self.std), self.features((target - self.mean) / self.std))


def r2d4_loss(
    outputs: dict[str, Tensor],
    target: Tensor,
    target_blurry: Tensor,
    perceptual: VGGPerceptual | None = None,
    aligned: float = 0.0,
    colour: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The dissertation's stage losses (eq. 3.25-3.27). ``aligned``: the share of each stage's MSE
    taken after a per-channel colour fit to that stage's own target (:func:`colour_aligned`);
    ``colour``: the weight of an MSE on :func:`low_frequency` added to each stage's."""

    def stage(pred: Tensor, stage_target: Tensor) -> Tensor:
        pred = pred.float()
        term = F.mse_loss(pred, stage_target)
        if aligned:
            term = (1 - aligned) * term + aligned * F.mse_loss(colour_aligned(pred, stage_target), stage_target)
        if colour:
            term = term + colour * F.mse_loss(low_frequency(pred), low_frequency(stage_target))
        return term

    parts = {"blur": stage(outputs["restored"], target), "noise": stage(outputs["denoised"], target_blurry)}
    if perceptual is not None:
        parts["perceptual"] = perceptual(outputs["restored"].float(), target)
    return r2d4_total(parts), parts


def r2d4_total(parts: dict[str, Tensor]) -> Tensor:
    """The weighted sum of :func:`r2d4_loss`'s parts; the trainer sums the parts over a clip's
    frames first, and the sum is linear, so both totals agree."""
    total = parts["blur"] + R2D4_NOISE_WEIGHT * parts["noise"]
    if "perceptual" in parts:
        total = total + R2D4_PERCEPTUAL_WEIGHT * parts["perceptual"]
    return total
