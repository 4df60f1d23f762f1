"""Neural Scale Search (6.2.2, eq. 6.1-6.5): which scales each task really needs.

The search runs on MOST-NET++ (every task at every scale). For task i the full-resolution
estimate is the lowest-scale output brought to full resolution plus the gated inner-scale
differences,

    O~_i = u(O_i^3) + g_i^2 * (u(O_i^2) - u(O_i^3)) + g_i^1 * (u(O_i^1) - u(O_i^2)),

so that with every gate open it is the highest-scale output and with every gate closed the
lowest. (Eq. 6.3 writes the difference the other way round and scales the sum by 1 / (S - 1);
with that reading all-open gates would not reproduce MOST-NET++, so this is the telescoping form.)
Gates g are Gumbel-softmax samples over {keep, drop} with temperature tau (default 5); alpha is
the keep probability; the loss is sum_i lambda_i eps_i(O~_i) + w * sum log alpha (the sparsity
term L0 of eq. 6.5), optimised in one backward pass with the network weights (single level).
Homographies are compared as corner displacements at full resolution, so differences between
scales are differences of where the image corners go.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import apply_homography, image_corners, rescale_homography
from models.most import SCALES, TASKS, MostStep, Structure
from models.training.losses import MostTargets, charbonnier, mask_loss

GATED_SCALES = (1, 2)  # scale 3 is the baseline and always kept


class ScaleGates(nn.Module):
    def __init__(self, tau: float = 5.0, init_keep_logit: float = 0.0) -> None:
        super().__init__()
        self.tau = tau
        logits = torch.zeros(len(TASKS), len(GATED_SCALES), 2)
        logits[..., 0] = init_keep_logit
        self.logits = nn.Parameter(logits)  # (task, scale, {keep, drop})

    def alpha(self) -> Tensor:
        """Keep probabilities, (tasks, gated scales)."""
        return torch.softmax(self.logits, dim=-1)[..., 0]

    def sample(self) -> Tensor:
        return F.gumbel_softmax(self.logits, tau=self.tau, hard=False, dim=-1)[..., 0]

    def sparsity(self) -> Tensor:
        """L0(alpha) = sum log alpha: minimising it closes gates that do not pay for themselves."""
        return torch.log(self.alpha().clamp_min(1e-6)).sum()

    def derive(self, threshold: float = 0.5) -> Structure:
        alpha = self.alpha().detach()
        kept = {
            task: tuple(s for j, s in enumerate(GATED_SCALES) if alpha[i, j] > threshold) + (3,)
            for i, task in enumerate(TASKS)
        }
        return Structure(**kept)

    def snapshot(self) -> dict[str, float]:
        alpha = self.alpha().detach()
        return {
            f"alpha_{task}_s{s}": float(alpha[i, j]) for i, task in enumerate(TASKS) for j, s in enumerate(GATED_SCALES)
        }


def _corners_full(h: Tensor, scale: int, height: int, width: int) -> Tensor:
    """Where a scale-s homography sends the full-resolution image corners, (b, 4, 2)."""
    h_full = rescale_homography(h, 2.0 ** (scale - 1))
    corners = image_corners(height, width, h_full).expand(h.shape[0], 4, 2)
    return apply_homography(h_full, corners)


def _to_full(x: Tensor, scale: int) -> Tensor:
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=2.0 ** (scale - 1), mode="bilinear", align_corners=False)


def gated_task_errors(step: MostStep, targets: MostTargets, gates: Tensor) -> dict[str, Tensor]:
    """eps_i^1 of eq. 6.5 for every task, from MOST-NET++ outputs and gate values (tasks, gated scales)."""
    height, width = targets.restored.shape[-2:]
    per_task: dict[str, dict[int, Tensor]] = {
        "restoration": {s: _to_full(step.restored[s], s) for s in SCALES},
        "segmentation": {s: _to_full(step.mask_logits[s], s) for s in SCALES},
        "homography": {s: _corners_full(step.homography[s], s, height, width) for s in SCALES},
    }
    errors = {}
    for i, task in enumerate(TASKS):
        outs = per_task[task]
        estimate = outs[3]
        for s in (2, 1):  # scale 2 refines scale 3, then scale 1 refines scale 2
            estimate = estimate + gates[i, GATED_SCALES.index(s)] * (outs[s] - outs[s + 1])
        if task == "restoration":
            errors[task] = charbonnier(estimate.float(), targets.restored)
        elif task == "segmentation":
            errors[task] = mask_loss(estimate.float(), targets.mask)
        else:
            truth = _corners_full(targets.homography, 1, height, width)
            errors[task] = (estimate - truth).norm(dim=-1).mean()
    return errors
