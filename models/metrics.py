"""The measurements every claim rests on: PSNR, SSIM, MACE, IoU and the warping error E(W).

All functions take batches and return one value per image (or image pair), so an evaluation can
average per frame (the convention of the dissertation's tables) or per sequence. Images are
(..., H, W, C) arrays, uint8 or float, compared at ``data_range`` (255 for uint8 frames).

* PSNR: ``10 log10(L^2 / MSE)`` over all pixels and channels of a frame.
* Colour-aligned PSNR: PSNR after the per-channel gain and offset that best map the output onto
  the target (least squares, per frame), so denoising and deblurring are judged apart from the
  colour mapping; on real video the true colours of the scene are not knowable from the input, and
  a global per-channel affine is the part of colour correction a display can calibrate away.
* SSIM: Wang et al. 2004 with the usual constants (Gaussian window 11x11, sigma 1.5, K1 = 0.01,
  K2 = 0.03), per channel on the window positions that fit inside the image, averaged over channels;
  this equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, channel_axis=-1)``.
* MACE: mean distance of the four image corners mapped by the estimated and the true homography
  (``models.layers.mean_corner_error``), in pixels. Where the homographies are held as their corner
  displacements (a regressor's readout), the same distance is read off the displacements directly
  (``offsets_mace``): the DLT maps the corners exactly onto them.
* IoU at 0.5: intersection over union of the thresholded mask and the label; 1 when both are empty.
* E(W) (Lai et al. 2018, "Learning blind video temporal consistency"): the previous output warped
  into the current frame by the TRUE homography, ``sum ||O_t - W(O_{t-1})||^2 / N`` over the N
  pixels where the warp is valid (and inside an optional region), RGB in [0, 1], squared norm over
  channels. Lower means steadier video.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from models.layers import mean_corner_error, warp_by_homography

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_batch(images: np.ndarray) -> np.ndarray:
    """(H, W, C) or (N, H, W, C) -> (N, H, W, C) float64."""
    arr = np.asarray(images, dtype=np.float64)
    return arr[None] if arr.ndim == 3 else arr


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-image PSNR in dB, shape (N,); ``inf`` for identical images."""
    p, t = _as_batch(pred), _as_batch(target)
    if p.shape != t.shape:
        raise ValueError(f"psnr: shapes differ {p.shape} vs {t.shape}")
    mse = ((p - t) ** 2).reshape(p.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def colour_aligned_psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-image PSNR after fitting ``target_c ~ gain_c * pred_c + offset_c`` per channel (least squares)."""
    p, t = _as_batch(pred), _as_batch(target)
    if p.shape != t.shape:
        raise ValueError(f"colour_aligned_psnr: shapes differ {p.shape} vs {t.shape}")
    n, c = p.shape[0], p.shape[-1]
    x, y = p.reshape(n, -1, c), t.reshape(n, -1, c)
    x_mean, y_mean = x.mean(axis=1, keepdims=True), y.mean(axis=1, keepdims=True)
    xc, yc = x - x_mean, y - y_mean
    variance = (xc * xc).sum(axis=1, keepdims=True)
    gain = np.where(variance > 0, (xc * yc).sum(axis=1, keepdims=True) / np.maximum(variance, 1e-12), 0.0)
    aligned = gain * xc + y_mean
    mse = ((aligned - y) ** 2).reshape(n, -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def _gaussian_window() -> np.ndarray:
    x = np.arange(SSIM_WINDOW, dtype=np.float64) - SSIM_WINDOW // 2
    g = np.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-image SSIM (mean over valid window positions and channels), shape (N,).

    The separable Gaussian runs in OpenCV (float64) over the whole image and the border of half a
    window is then cropped, which leaves exactly the positions where the window fits inside.
    """
    p, t = _as_batch(pred), _as_batch(target)
    if p.shape != t.shape:
        raise ValueError(f"ssim: shapes differ {p.shape} vs {t.shape}")
    n, h, w, c = p.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    g, r = _gaussian_window(), SSIM_WINDOW // 2
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    scores = np.empty(n)

    def blur(z: np.ndarray) -> np.ndarray:  # (h, w, c) -> (h - 2r, w - 2r, c)
        out = cv2.sepFilter2D(z, cv2.CV_64F, g, g, borderType=cv2.BORDER_REFLECT)
        return out.reshape(h, w, c)[r : h - r, r : w - r]

    for i in range(n):
        x, y = p[i], t[i]
        mu_x, mu_y = blur(x), blur(y)
        sxx = blur(x * x) - mu_x**2
        syy = blur(y * y) - mu_y**2
        sxy = blur(x * y) - mu_x * mu_y
        smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
        scores[i] = smap.reshape(-1, c).mean(axis=0).mean()
    return scores


def iou(pred: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per-mask IoU of ``pred >= threshold`` (probabilities in [0, 1] or bool) against ``target`` (bool/0-1)."""
    p = np.asarray(pred)
    p = p if p.dtype == bool else p >= threshold
    t = np.asarray(target).astype(bool)
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.shape != t.shape:
        raise ValueError(f"iou: shapes differ {p.shape} vs {t.shape}")
    inter = (p & t).reshape(p.shape[0], -1).sum(axis=1)
    union = (p | t).reshape(p.shape[0], -1).sum(axis=1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def mace(h_est: np.ndarray, h_true: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per-pair mean corner error in pixels, shape (N,); homographies (N, 3, 3) or (3, 3)."""
    e = torch.as_tensor(np.asarray(h_est, np.float64)).reshape(-1, 3, 3)
    t = torch.as_tensor(np.asarray(h_true, np.float64)).reshape(-1, 3, 3)
    return mean_corner_error(e, t, float(height), float(width)).numpy()


def offsets_mace(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-pair mean corner error, shape (N,), of homographies given as (N, 8) corner displacements in
    pixels (``models.layers.offsets_to_homography``'s parametrisation): ``mace`` of those homographies,
    without building them, which matters inside a cross-validated least-squares fit."""
    return np.linalg.norm((np.asarray(pred) - np.asarray(true)).reshape(-1, 4, 2), axis=-1).mean(axis=-1)


def warping_error(
    previous: np.ndarray,
    current: np.ndarray,
    h_true: np.ndarray,
    region: np.ndarray | None = None,
    data_range: float = 255.0,
) -> np.ndarray:
    """E(W) per pair, shape (N,): previous outputs warped by the true H_{t-1->t}, compared inside the valid warp.

    ``previous``/``current`` (N, H, W, 3) or (H, W, 3); ``h_true`` (N, 3, 3); ``region`` (N, H, W)
    bool restricts the comparison further (e.g. to the true teeth mask, where the homography holds).
    NaN where no pixel is valid.
    """
    prev, cur = _as_batch(previous) / data_range, _as_batch(current) / data_range
    n, h, w, _ = prev.shape
    hs = torch.as_tensor(np.asarray(h_true, np.float64)).reshape(n, 3, 3).float()
    prev_t = torch.from_numpy(prev).permute(0, 3, 1, 2).float()
    ones = torch.ones(n, 1, h, w)
    warped = warp_by_homography(torch.cat((prev_t, ones), dim=1), hs)  # (n, 4, h, w)
    valid = (warped[:, 3] >= 1.0 - 1e-3).numpy()
    if region is not None:
        valid &= np.asarray(region, bool).reshape(n, h, w)
    diff = ((warped[:, :3].permute(0, 2, 3, 1).double().numpy() - cur) ** 2).sum(axis=-1)  # (n, h, w)
    count = valid.reshape(n, -1).sum(axis=1)
    total = np.where(valid, diff, 0.0).reshape(n, -1).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), math.nan)


__all__ = ["psnr", "colour_aligned_psnr", "ssim", "iou", "mace", "offsets_mace", "warping_error"]
