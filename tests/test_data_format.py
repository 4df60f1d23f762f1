"""On-disk format: lossless round trip, and clear errors for every kind of malformed sequence folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.data.dataset import SequenceFolderClips
from models.data.format import DataFormatError, read_sequence, validate_sequence, write_sequence
from models.data.synth import SynthConfig, render_sequence

CFG = SynthConfig(height=32, width=48, frames=4, noise="low")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("data")
    seq = render_sequence(CFG, 42)
    write_sequence(seq, root / "seq_000")
    write_sequence(render_sequence(CFG, 43), root / "seq_001")
    return root, seq


@pytest.fixture
def copy(written: tuple[Path, object], tmp_path: Path) -> Path:
    folder = tmp_path / "seq"
    shutil.copytree(written[0] / "seq_000", folder)
    return folder


def test_round_trip_is_lossless(written: tuple[Path, object]) -> None:
    root, seq = written
    info = validate_sequence(root / "seq_000")
    assert (info.frames, info.height, info.width, info.has_target_blurry) == (4, 32, 48, True)
    assert info.meta["noise"] == "low"
    back = read_sequence(root / "seq_000")
    for name in ("input", "target", "target_blurry", "mask"):
        np.testing.assert_array_equal(getattr(back, name), getattr(seq, name), err_msg=name)
    np.testing.assert_allclose(back.homographies, seq.homographies, rtol=0, atol=1e-12)


def test_partial_read_restarts_the_homography_chain(written: tuple[Path, object]) -> None:
    root, seq = written
    part = read_sequence(root / "seq_000", start=1, count=2)
    np.testing.assert_array_equal(part.homographies[0], np.eye(3))
    np.testing.assert_allclose(part.homographies[1], seq.homographies[2], atol=1e-12)
    np.testing.assert_array_equal(part.target, seq.target[1:3])


def _fails(folder: Path, *fragments: str) -> None:
    with pytest.raises(DataFormatError) as err:
        validate_sequence(folder)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_missing_frame_is_named(copy: Path) -> None:
    (copy / "target" / "000002.png").unlink()
    _fails(copy, "target", "000002.png", "missing")


def test_gap_in_input_numbering(copy: Path) -> None:
    (copy / "input" / "000001.png").unlink()
    _fails(copy, "not contiguous", "000001.png")


def test_wrong_size_is_named(copy: Path) -> None:
    cv2.imwrite(str(copy / "mask" / "000001.png"), np.zeros((30, 48), np.uint8))
    _fails(copy, "mask/000001.png", "30x48", "expected 32x48")


def test_mask_must_be_grey_and_0_255(copy: Path) -> None:
    cv2.imwrite(str(copy / "mask" / "000000.png"), np.ones((32, 48), np.uint8))
    _fails(copy, "mask values must be 0 or 255")
    cv2.imwrite(str(copy / "mask" / "000001.png"), np.zeros((32, 48, 3), np.uint8))
    _fails(copy, "mask/000001.png", "colour type 2")


def test_non_finite_homography(copy: Path) -> None:
    hs = json.loads((copy / "homography.json").read_text())
    hs[2][0][2] = float("nan")
    (copy / "homography.json").write_text(json.dumps(hs))
    _fails(copy, "homography.json", "non-finite", "[2]")


def test_missing_homography_file(copy: Path) -> None:
    (copy / "homography.json").unlink()
    _fails(copy, "homography.json: missing")


def test_homography_count_must_match_frames(copy: Path) -> None:
    hs = json.loads((copy / "homography.json").read_text())
    (copy / "homography.json").write_text(json.dumps(hs[:3]))
    _fails(copy, "3 homographies for 4 frames")


def test_first_homography_must_be_identity(copy: Path) -> None:
    hs = json.loads((copy / "homography.json").read_text())
    hs[0][0][2] = 2.0
    (copy / "homography.json").write_text(json.dumps(hs))
    _fails(copy, "first homography must be the identity")


def test_missing_folder_and_stray_files_all_reported(copy: Path) -> None:
    shutil.rmtree(copy / "mask")
    (copy / "input" / "notes.txt").write_text("x")
    _fails(copy, "mask/: missing folder", "unexpected files ['notes.txt']")


def test_not_a_png(copy: Path) -> None:
    (copy / "target" / "000003.png").write_bytes(b"JFIF not a png")
    _fails(copy, "target/000003.png: not a PNG")


def test_folder_dataset_windows_and_errors(written: tuple[Path, object], tmp_path: Path) -> None:
    root, seq = written
    data = SequenceFolderClips(root, clip_frames=2)
    assert len(data) == 4  # 2 sequences x 2 windows
    clip = data[1]
    assert clip["input"].shape == (2, 3, 32, 48)
    np.testing.assert_allclose(clip["target"][0].permute(1, 2, 0).numpy() * 255, seq.target[2], atol=1e-3)
    np.testing.assert_array_equal(clip["homography"][0].numpy(), np.eye(3, dtype=np.float32))
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    (broken / "seq_001" / "homography.json").unlink()
    shutil.rmtree(broken / "seq_000" / "target_blurry")
    with pytest.raises(DataFormatError, match="seq_001"):
        SequenceFolderClips(broken, clip_frames=2)
    shutil.copy(root / "seq_001" / "homography.json", broken / "seq_001" / "homography.json")
    with pytest.raises(DataFormatError, match="target_blurry/ is in some sequences but not in"):
        SequenceFolderClips(broken, clip_frames=2)
    with pytest.raises(DataFormatError, match="no sequence folders"):
        SequenceFolderClips(tmp_path / "broken" / "seq_000" / "mask", clip_frames=2)
