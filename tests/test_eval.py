"""``vident synth`` + ``vident eval`` end to end on a tiny data set, and the OpenCV convention bridge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models import create_model
from models.checkpoints import save_checkpoint
from models.data.format import read_sequence
from models.layers import apply_homography
from service.cli import main
from service.evaluation import opencv_to_pixel_homography


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "test"
    assert main(["synth", "--out", str(out), "--sequences", "2", "--frames", "3", "--size", "64x96"]) == 0
    return out


def test_synth_writes_documented_layout(tiny_data: Path) -> None:
    info = json.loads((tiny_data / "dataset.json").read_text())
    assert info["split"] == "test" and info["seed"] == 2024 and info["config"]["noise"] == "moderate"
    assert sorted(p.name for p in tiny_data.iterdir()) == ["dataset.json", "seq_000", "seq_001"]
    seq = read_sequence(tiny_data / "seq_000")
    assert seq.input.shape == (3, 64, 96, 3)


def test_synth_motion_scales_the_camera_motion(tiny_data: Path, tmp_path: Path) -> None:
    """--motion 2.5 renders the same sequence with the camera moving faster (and says so in dataset.json)."""
    fast = tmp_path / "fast"
    argv = ["synth", "--out", str(fast), "--sequences", "1", "--frames", "3", "--size", "64x96", "--motion", "2.5"]
    assert main(argv) == 0
    assert json.loads((fast / "dataset.json").read_text())["config"]["motion"] == 2.5
    assert json.loads((tiny_data / "dataset.json").read_text())["config"]["motion"] == 1.0

    def shift(folder: Path) -> float:
        h = read_sequence(folder / "seq_000").homographies[1:]
        corners = np.array([[0, 0, 1], [96, 0, 1], [96, 64, 1], [0, 64, 1]], float).T
        moved = np.einsum("tij,jk->tik", h, corners)
        return float(np.abs(moved[:, :2] / moved[:, 2:] - corners[:2]).mean())

    assert shift(fast) > 1.5 * shift(tiny_data)


def _rows(path: Path) -> dict[str, dict]:
    report = json.loads(path.read_text())
    return report, {row["name"]: row for row in report["rows"]}


def test_eval_most_tiny_random_weights(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "most-nss-tiny", "--data", str(tiny_data), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in printed and "BASELINE" in printed
    report, rows = _rows(out)
    assert report["random_weights"] is True and report["checkpoint"] is None
    assert report["frames"] == 6 and report["sequences"] == ["seq_000", "seq_001"]
    assert set(rows) == {"BASELINE", "most-nss-tiny", "ORB + RANSAC", "SIFT + RANSAC", "ECC (OpenCV)",
                         "NL-means (OpenCV)"}
    # The baseline's IoU is the teeth fraction of each frame (every pixel predicted teeth).
    masks = np.concatenate([read_sequence(tiny_data / s).mask for s in ("seq_000", "seq_001")])
    assert rows["BASELINE"]["iou"] == pytest.approx(masks.reshape(6, -1).mean(axis=1).mean())
    assert rows["BASELINE"]["fps"] is None
    for key in ("psnr", "ssim", "iou", "mace", "ew", "fps"):
        assert rows["most-nss-tiny"][key] is not None, key
    assert rows["ORB + RANSAC"]["psnr"] is None and rows["ORB + RANSAC"]["mace"] is not None
    assert rows["NL-means (OpenCV)"]["mace"] is None and rows["NL-means (OpenCV)"]["psnr"] > 0


def test_eval_r2d4_checkpoint_has_no_mask_or_homography(tiny_data: Path, tmp_path: Path) -> None:
    checkpoint = save_checkpoint(create_model("r2-d4-tiny"), tmp_path / "r2d4.safetensors")
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(checkpoint), "--data", str(tiny_data), "--json", str(out)]
    assert main([*args, "--no-comparators", "--max-sequences", "1", "--max-frames", "2"]) == 0
    report, rows = _rows(out)
    assert report["random_weights"] is False and report["checkpoint"] == str(checkpoint)
    assert report["frames"] == 2
    assert set(rows) == {"BASELINE", "r2-d4-tiny", "r2-d4-tiny (denoised vs R')"}
    assert rows["r2-d4-tiny"]["iou"] is None and rows["r2-d4-tiny"]["mace"] is None
    assert rows["r2-d4-tiny"]["psnr"] is not None


def test_eval_reports_malformed_data(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_data, broken)
    (broken / "seq_001" / "mask" / "000001.png").unlink()
    assert main(["eval", "--model", "most-nss-tiny", "--data", str(broken)]) == 2
    assert "seq_001/mask" in capsys.readouterr().out


def test_opencv_homography_conversion_exact() -> None:
    # Points in our convention, mapped by a known partial affine; OpenCV sees them shifted by -0.5.
    h_true = np.array([[0.98, -0.05, 4.0], [0.05, 0.98, -2.5], [0.0, 0.0, 1.0]])
    pts = np.random.default_rng(0).uniform(0, 100, (30, 2))
    mapped = apply_homography(torch.from_numpy(h_true), torch.from_numpy(pts)).numpy()
    affine, _ = cv2.estimateAffinePartial2D((pts - 0.5).astype(np.float32), (mapped - 0.5).astype(np.float32))
    h_ours = opencv_to_pixel_homography(np.vstack((affine, [0, 0, 1])))
    np.testing.assert_allclose(h_ours, h_true, atol=1e-4)
    # The unconverted matrix is off by the half-pixel shift through the rotation/scale part.
    assert np.abs(np.vstack((affine, [0, 0, 1])) - h_true).max() > 1e-3


def test_synth_refuses_to_write_into_a_data_set_unless_told(tmp_path: Path) -> None:
    """A second `vident synth` into the same folder would leave old sequences beside new ones (a data
    set of two configurations); it is refused, and --overwrite replaces the whole set."""
    out = tmp_path / "set"
    small = ["--frames", "2", "--size", "32x48"]
    assert main(["synth", "--out", str(out), "--sequences", "3", *small]) == 0
    before = (out / "seq_002" / "input" / "000000.png").read_bytes()
    assert main(["synth", "--out", str(out), "--sequences", "2", "--seed", "5", *small]) == 2
    assert (out / "seq_002" / "input" / "000000.png").read_bytes() == before
    assert json.loads((out / "dataset.json").read_text())["sequences"] == 3
    assert main(["synth", "--out", str(out), "--sequences", "2", "--seed", "5", "--overwrite", *small]) == 0
    assert sorted(p.name for p in out.glob("seq_*")) == ["seq_000", "seq_001"]
    assert json.loads((out / "dataset.json").read_text())["seed"] == 5
