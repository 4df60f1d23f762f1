"""A contact sheet of a labelled sequence, so a person can see what the networks learn from.

Columns: input B_t, blurry target R'_t, sharp target R_t, teeth mask over R_t, and the previous
target warped by the true H_{t-1->t} over the current one (red = warped previous, cyan = current:
grey where the label is right, colour fringes where it is not, e.g. on instruments).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from models.data.synth import LabelledSequence
from models.layers import warp_by_homography

COLUMNS = ("input B", "blurry R'", "target R", "mask M", "warped R(t-1) / R(t)")


def _warp_rgb(image: np.ndarray, h: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    warped = warp_by_homography(x, torch.from_numpy(h.astype(np.float32))[None])
    return warped[0].permute(1, 2, 0).numpy().clip(0, 255).astype(np.uint8)


def contact_sheet(seq: LabelledSequence, rows: int = 4) -> np.ndarray:
    """uint8 RGB image: ``rows`` frames (t >= 1, evenly spaced) by the five columns above."""
    t_max = seq.frames - 1
    times = sorted({int(round(v)) for v in np.linspace(min(1, t_max), t_max, rows)})
    lines = []
    for t in times:
        target = seq.target[t]
        overlay = target.copy()
        teeth = seq.mask[t]
        overlay[teeth] = (0.55 * overlay[teeth] + 0.45 * np.array([60, 200, 255])).astype(np.uint8)
        edges = cv2.morphologyEx(teeth.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        overlay[edges] = (0, 255, 255)
        prev = _warp_rgb(seq.target[t - 1], seq.homographies[t]) if t > 0 else seq.target[t]
        grey_prev = cv2.cvtColor(prev, cv2.COLOR_RGB2GRAY)
        grey_cur = cv2.cvtColor(target, cv2.COLOR_RGB2GRAY)
        anaglyph = np.stack((grey_prev, grey_cur, grey_cur), axis=-1)
        blurry = seq.target_blurry[t] if seq.target_blurry is not None else np.zeros_like(target)
        lines.append(np.concatenate((seq.input[t], blurry, target, overlay, anaglyph), axis=1))
    sheet = np.concatenate(lines, axis=0)
    width = seq.size[1]
    header = np.full((24, sheet.shape[1], 3), 255, np.uint8)
    for i, label in enumerate(COLUMNS):
        cv2.putText(header, label, (i * width + 6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate((header, sheet), axis=0)


def write_contact_sheet(seq: LabelledSequence, path: str, rows: int = 4) -> None:
    if not cv2.imwrite(path, cv2.cvtColor(contact_sheet(seq, rows), cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")
