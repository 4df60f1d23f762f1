"""Metrics against hand-computed values and, for PSNR/SSIM, scikit-image's independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.data.synth import SynthConfig, render_sequence
from models.metrics import colour_aligned_psnr, iou, mace, psnr, ssim, warping_error

skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the test-only reference")


def test_psnr_hand_computed() -> None:
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a + 5  # MSE 25
    assert psnr(a, b)[0] == pytest.approx(10 * math.log10(255**2 / 25))
    assert psnr(a, a)[0] == math.inf
    batch = psnr(np.stack([a, a]), np.stack([b, a + 1]))
    np.testing.assert_allclose(batch, [10 * math.log10(255**2 / 25), 10 * math.log10(255**2)])


def test_ssim_constant_images_hand_computed() -> None:
    # Constant images: sigma terms vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 100.0, 120.0
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(np.full((16, 16, 3), a), np.full((16, 16, 3), b))[0]
    assert got == pytest.approx(expected, rel=1e-12)
    assert ssim(np.full((16, 16, 3), a), np.full((16, 16, 3), a))[0] == pytest.approx(1.0)


def test_psnr_ssim_agree_with_scikit_image() -> None:
    seq = render_sequence(SynthConfig(height=48, width=64, frames=2, noise="severe"), 0)
    pred, target = seq.input[1], seq.target[1]
    ref_ssim = skimage_metrics.structural_similarity(
        pred, target, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=255
    )
    assert ssim(pred, target)[0] == pytest.approx(ref_ssim, abs=1e-9)
    assert psnr(pred, target)[0] == pytest.approx(skimage_metrics.peak_signal_noise_ratio(target, pred, data_range=255))
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 1, (2, 20, 30, 3))
    ref = skimage_metrics.structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=1.0
    )
    assert ssim(x, y, data_range=1.0)[0] == pytest.approx(ref, abs=1e-9)


def test_iou_hand_computed() -> None:
    target = np.zeros((4, 4), bool)
    target[:2] = True  # 8 pixels
    pred = np.zeros((4, 4), np.float32)
    pred[1:3] = 0.7  # 8 pixels, 4 shared
    pred[3] = 0.4  # below threshold
    assert iou(pred, target)[0] == pytest.approx(4 / 12)
    assert iou(np.zeros((4, 4)), np.zeros((4, 4), bool))[0] == 1.0  # nothing to find, nothing found
    assert iou(np.ones((4, 4)), target)[0] == pytest.approx(0.5)


def test_mace_hand_computed() -> None:
    shift = np.array([[1.0, 0, 3], [0, 1, 4], [0, 0, 1]])
    assert mace(shift, np.eye(3), 10, 20)[0] == pytest.approx(5.0)
    scale = np.diag([2.0, 2.0, 1.0])  # corners (0,0),(W,0),(W,H),(0,H) move by 0, W, |(W,H)|, H
    expected = (0 + 20 + math.hypot(20, 10) + 10) / 4
    assert mace(scale, np.eye(3), 10, 20)[0] == pytest.approx(expected)
    np.testing.assert_allclose(mace(np.stack([shift, np.eye(3)]), np.stack([shift, np.eye(3)]), 10, 20), [0, 0])


def test_warping_error_zero_for_true_motion_positive_otherwise() -> None:
    rng = np.random.default_rng(0)
    prev = rng.uniform(0, 255, (24, 32, 3))
    cur = np.zeros_like(prev)
    cur[:, 3:] = prev[:, :-3]  # content moved 3 px right: H = translate(3, 0)
    h = np.array([[1.0, 0, 3], [0, 1, 0], [0, 0, 1]])
    assert warping_error(prev, cur, h[None])[0] == pytest.approx(0.0, abs=1e-8)
    wrong = warping_error(prev, cur, np.eye(3)[None])[0]
    assert wrong > 0.05  # squared RGB error in [0, 1] units of uniform noise is about 0.5
    # Only pixels with a valid warp count: the 3 new columns on the left are ignored (no NaN, no penalty).
    region = np.zeros((1, 24, 32), bool)
    region[0, :, :3] = True
    assert math.isnan(warping_error(prev, cur, h[None], region)[0])


def test_homography_error_splits_translation_from_the_rest() -> None:
    """tools.homography_error: a translation-only estimate has no translation error and all of
    the rotation as error; an exact estimate has none; the slope sees an underestimate."""
    from tools.homography_error import corner_displacements, decompose

    angle = np.deg2rad(2.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    shifts = [np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1]], float) for dx, dy in ((3, 1), (-2, 4), (5, -3))]
    true = corner_displacements(np.stack([s @ rotation for s in shifts]), 320, 416)
    only_shift = np.broadcast_to(true.mean(1, keepdims=True), true.shape)  # the right translation, nothing else
    got = decompose(only_shift, true)
    assert got["model err translation"] < 1e-9
    assert got["model err rest"] == pytest.approx(got["rest"]) and got["rest"] > 3  # 2 deg at 416 px
    assert got["model"] == pytest.approx(got["rest"])
    exact = decompose(true, true)
    assert exact["model"] < 1e-9 and exact["ratio"] < 1e-9 and exact["slope x"] == pytest.approx(1.0)
    half = decompose(true * 0.5, true)
    assert half["slope x"] == pytest.approx(0.5) and half["ratio"] == pytest.approx(0.5)


def test_colour_error_models_forgive_what_they_claim() -> None:
    """tools.colour_error: the per-channel fit is the metric; a saturation change (channels mixed) is
    forgiven by the 3x4 map and not per channel; a tone curve only by the quadratic."""
    from tools.colour_error import fitted_psnr

    rng = np.random.default_rng(3)
    target = rng.uniform(20, 235, (24, 32, 3))
    grey = target.mean(-1, keepdims=True)
    desaturated = grey + 0.4 * (target - grey)
    per_channel = fitted_psnr(desaturated, target, "ca")
    assert per_channel == pytest.approx(colour_aligned_psnr(desaturated, target)[0], abs=0.05)
    assert per_channel < 30 < fitted_psnr(desaturated, target, "3x4")
    curved = 255 * (target / 255) ** 1.6
    assert fitted_psnr(curved, target, "3x4") < 31 < 37 < fitted_psnr(curved, target, "quad")


def test_temporal_filter_averages_static_noise_and_keeps_the_first_frame() -> None:
    """tools.temporal_filter: on a still scene (identity homographies) the recursive average lowers
    the noise; k0 = 0 returns the frames unchanged."""
    from tools.temporal_filter import recursive_filter

    rng = np.random.default_rng(4)
    scene = rng.uniform(60, 200, (1, 16, 20, 3))
    noisy = scene + rng.normal(0, 4, (6, 16, 20, 3))
    eye = np.tile(np.eye(3), (6, 1, 1))
    out = recursive_filter(noisy, eye, 0.7, 32)
    assert np.array_equal(out[0], noisy[0])
    assert np.std(out[-1] - scene[0]) < 0.75 * np.std(noisy[-1] - scene[0])
    assert np.allclose(recursive_filter(noisy, eye, 0.0, 32), noisy)


def test_crop_sequence_keeps_the_motion_in_crop_pixels() -> None:
    """Cropped frames and labels, and the same motion expressed in the crop's pixels (what the
    benchmark's --crop and training on crops of larger renders rely on)."""
    from models.data.synth import crop_sequence

    seq = render_sequence(SynthConfig(height=32, width=48, frames=3), seed=5)
    cropped = crop_sequence(seq, 4, 6, 16, 24)
    assert cropped.input.shape == (3, 16, 24, 3) and cropped.mask.shape == (3, 16, 24)
    assert np.array_equal(cropped.input[1, 0, 0], seq.input[1, 4, 6])
    assert np.array_equal(cropped.mask, seq.mask[:, 4:20, 6:30])
    assert cropped.target_blurry is not None and cropped.target_blurry.shape == (3, 16, 24, 3)
    p_crop = np.array([1.0, 2.0, 1.0])
    offset = np.array([6.0, 4.0, 0.0])  # (left, top): the crop's corner in the frame
    for h, hc in zip(seq.homographies, cropped.homographies, strict=True):
        mapped = h @ (p_crop + offset)
        np.testing.assert_allclose(hc @ p_crop / (hc @ p_crop)[2], mapped / mapped[2] - offset, atol=1e-9)
    np.testing.assert_allclose(cropped.homographies[0], np.eye(3), atol=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        crop_sequence(seq, 20, 0, 16, 24)
