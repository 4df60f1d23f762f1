"""Synthetic data: exact labels, determinism by seed, degradations, and the torch datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from models.data.dataset import SyntheticClips, SyntheticStream, clip_tensors
from models.data.degrade import CameraResponse, poisson_gaussian
from models.data.synth import SynthConfig, render_sequence, sequence_seed
from models.layers import warp_by_homography

SMALL = SynthConfig(height=64, width=96, frames=4, noise="moderate")


def _warp(image: np.ndarray, h: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> warped float32 of the same layout."""
    x = torch.from_numpy(np.atleast_3d(image).astype(np.float32)).permute(2, 0, 1)[None]
    return (
        warp_by_homography(x, torch.from_numpy(h).float()[None])[0]
        .permute(1, 2, 0)
        .numpy()
        .squeeze(-1 if image.ndim == 2 else None)
    )


@pytest.mark.parametrize("index", range(3))
def test_true_homography_aligns_previous_target_on_static_teeth(index: int) -> None:
    # Lighting off: it changes the target between frames by design; everything else (blur,
    # instruments, spray) stays on and is masked out as the label's definition says.
    cfg = SynthConfig(height=64, width=96, frames=4, lighting=False, motion=2.0)
    seq = render_sequence(cfg, sequence_seed(1, "train", index))
    for t in range(1, cfg.frames):
        h = seq.homographies[t]
        valid = _warp(np.ones((64, 96), np.float32), h) > 0.999
        still_teeth = _warp(seq.mask[t - 1].astype(np.float32), h) > 0.999
        no_occluder = _warp(seq.occluder[t - 1].astype(np.float32), h) < 1e-3
        keep = valid & seq.mask[t] & still_teeth & ~seq.occluder[t] & no_occluder
        assert keep.sum() > 300, "the check needs teeth in view"
        current = seq.target[t].astype(np.float32)
        aligned = np.abs(_warp(seq.target[t - 1], h) - current).mean(axis=-1)[keep].mean()
        unaligned = np.abs(seq.target[t - 1].astype(np.float32) - current).mean(axis=-1)[keep].mean()
        assert aligned < 3.0, f"frame {t}: warped previous target differs by {aligned:.2f} grey levels"
        assert unaligned > 3 * aligned, "the camera should move enough for the check to mean something"


def test_homographies_are_partial_affine_with_identity_first() -> None:
    seq = render_sequence(SMALL, sequence_seed(0, "val", 0))
    hs = seq.homographies
    assert hs.shape == (4, 3, 3) and hs.dtype == np.float64
    np.testing.assert_array_equal(hs[0], np.eye(3))
    np.testing.assert_allclose(hs[:, 2], np.tile([0.0, 0.0, 1.0], (4, 1)), atol=1e-12)
    a = hs[1:, :2, :2]  # s R: equal diagonal, opposite off-diagonal
    np.testing.assert_allclose(a[:, 0, 0], a[:, 1, 1], atol=1e-9)
    np.testing.assert_allclose(a[:, 0, 1], -a[:, 1, 0], atol=1e-9)


def test_arrays_shapes_and_types() -> None:
    seq = render_sequence(SMALL, 5)
    for name in ("input", "target", "target_blurry"):
        arr = getattr(seq, name)
        assert arr.shape == (4, 64, 96, 3) and arr.dtype == np.uint8, name
    assert seq.mask.shape == (4, 64, 96) and seq.mask.dtype == bool
    assert seq.meta["noise"] == "moderate"


def test_same_seed_same_sequence_other_seed_or_split_differs() -> None:
    a = render_sequence(SMALL, sequence_seed(7, "train", 3))
    b = render_sequence(SMALL, sequence_seed(7, "train", 3))
    for name in ("input", "target", "target_blurry", "mask", "homographies"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for other in (sequence_seed(8, "train", 3), sequence_seed(7, "test", 3), sequence_seed(7, "train", 4)):
        c = render_sequence(SMALL, other)
        assert not np.array_equal(a.target, c.target)
        assert not np.array_equal(a.input, c.input)


def test_input_is_noisy_pale_blurred_target() -> None:
    seq = render_sequence(SynthConfig(height=64, width=96, frames=3, noise="severe", lighting=False), 11)
    diff_blur = np.abs(seq.target.astype(int) - seq.target_blurry.astype(int)).mean()
    assert diff_blur > 0.5, "motion blur should change the frame"
    # The camera response flattens contrast: the input's spread is well below the target's.
    assert seq.input.astype(float).std() < seq.target_blurry.astype(float).std()


def test_poisson_gaussian_matches_eq_3_1_moments() -> None:
    rng = np.random.default_rng(0)
    a, sigma, z = 1.9, 1.7, 100.0 / 255.0
    x = poisson_gaussian(rng, np.full(200_000, z, np.float32), a, sigma).astype(float)
    assert abs(x.mean() - 100.0) < 0.2
    expected_var = a * 100.0 + sigma**2 + 1 / 12  # + rounding
    assert abs(x.var() / expected_var - 1) < 0.03


def test_camera_response_identity_and_pale() -> None:
    rgb = np.random.default_rng(0).uniform(0, 1, (8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(CameraResponse.identity().apply(rgb), rgb, atol=1e-6)
    pale = CameraResponse(black=0.1, contrast=0.6, saturation=0.5, gains=(0.9, 1.0, 1.1), gamma=1.0).apply(rgb)
    assert pale.min() >= 0.1 - 1e-6 and pale.max() <= 0.7 + 1e-6


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="exposure"):
        SynthConfig(exposure=16)
    with pytest.raises(ValueError, match="noise"):
        SynthConfig(noise="loud")
    with pytest.raises(ValueError, match="split"):
        sequence_seed(0, "training", 0)


def test_clip_tensors_match_trainer_layout() -> None:
    seq = render_sequence(SMALL, 3)
    clip = clip_tensors(seq)
    assert set(clip) == {"input", "target", "target_blurry", "mask", "homography"}
    assert clip["input"].shape == (4, 3, 64, 96) and clip["input"].dtype == torch.float32
    assert clip["mask"].shape == (4, 1, 64, 96)
    assert clip["homography"].shape == (4, 3, 3)
    assert 0.0 <= float(clip["target"].min()) and float(clip["target"].max()) <= 1.0
    np.testing.assert_allclose(clip["input"][1].permute(1, 2, 0).numpy() * 255, seq.input[1], atol=1e-3)


def test_synthetic_clips_same_with_and_without_workers() -> None:
    cfg = SynthConfig(height=64, width=96, frames=3)
    data = SyntheticClips(cfg, length=4, seed=3)
    serial = list(DataLoader(data, batch_size=2, num_workers=0))
    parallel = list(DataLoader(data, batch_size=2, num_workers=2))
    assert serial[0]["input"].shape == (2, 3, 3, 64, 96)
    for s, p in zip(serial, parallel, strict=True):
        for key in s:
            torch.testing.assert_close(s[key], p[key], rtol=0, atol=0)


def test_synthetic_stream_shards_workers_without_repeats() -> None:
    cfg = SynthConfig(height=32, width=48, frames=2)
    loader = DataLoader(SyntheticStream(cfg, seed=1), batch_size=1, num_workers=2)
    got = []
    for i, batch in enumerate(loader):
        got.append(batch["homography"][0, 1])
        if i == 3:
            break
    expected = [
        torch.from_numpy(render_sequence(cfg, sequence_seed(1, "train", k)).homographies[1]).float() for k in range(4)
    ]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_crops_of_larger_renders_are_windows_of_the_same_clip() -> None:
    """``crop``: the clip is a window of the full-size render (scene at the full size's scale), at a
    seeded position, with its homographies moved into the window's pixels."""
    from models.data.dataset import rendered_clip

    cfg = SynthConfig(height=64, width=96, frames=3)
    positions = set()
    for index in range(4):
        clip = rendered_clip(cfg, 0, "train", index, crop=(32, 48))
        assert clip["input"].shape == (3, 3, 32, 48)
        full = render_sequence(cfg, sequence_seed(0, "train", index))
        pixels = (full.input.astype(np.float32) / 255).transpose(0, 3, 1, 2)
        hits = [(t, left) for t in range(33) for left in range(49)
                if np.array_equal(pixels[:, :, t : t + 32, left : left + 48], clip["input"].numpy())]  # fmt: skip
        assert len(hits) == 1
        positions.add(hits[0])
        torch.testing.assert_close(rendered_clip(cfg, 0, "train", index, crop=(32, 48))["input"], clip["input"])
    assert len(positions) > 1  # the window moves from clip to clip
