"""Offline processing on real encoded clips: output timing, sizes, and equality with streaming inference."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_video import moving_frames, mp4_display_matrix, needs_display_matrix, write_clip
from torch import nn

from export.runtime import Backend
from models import create_model
from service.backends.factory import create_backend
from service.backends.torch import TorchBackend
from service.cli import main
from service.engine import InferenceEngine
from service.pipeline import Geometry, Stream, run_streams
from service.process import Cancelled, ProcessOptions, Progress, process_video
from service.video import VideoError, read_video_frames


def nontrivial_model(name: str = "most-nss-tiny", seed: int = 1) -> nn.Module:
    """A tiny model whose homography heads are not the zero-initialised identity, so that comparing
    homographies can fail; fixed seed, so every process builds the same weights."""
    torch.manual_seed(seed)
    model = create_model(name).eval()
    for module_name, module in model.named_modules():
        if module_name.endswith("offsets"):
            nn.init.normal_(module.weight, std=0.05)
            nn.init.normal_(module.bias, std=0.5)
    return model


@pytest.fixture(scope="module")
def nss() -> Iterator[Backend]:
    backend = TorchBackend(nontrivial_model()).load()
    yield backend
    backend.close()


@pytest.fixture
def engine(nss: Backend) -> Iterator[InferenceEngine]:
    engine = InferenceEngine(nss, max_batch=1)
    yield engine
    engine.close()


def reference(backend: Backend, frames: list[np.ndarray]) -> list:
    """What a live session computes for the same frames: one stream, one frame per call."""
    height, width = frames[0].shape[:2]
    stream = Stream(backend.spec, Geometry(height, width))
    return [run_streams(backend, [stream], [frame])[0] for frame in frames]


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_outputs_match_streaming_inference(tmp_path: Path, nss: Backend, engine: InferenceEngine) -> None:
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(16))
    progress: list[Progress] = []
    report = process_video(clip, tmp_path / "out", engine, ProcessOptions(frames=True), progress.append)
    out = tmp_path / "out"
    assert report["frames"] == 16 and report["outputs"] == [
        "mask.mp4", "overlay.mp4", "restored.mp4", "homographies.json"
    ]  # fmt: skip
    assert json.loads((out / "report.json").read_text())["frames"] == 16
    assert [p.frames_done for p in progress] == list(range(1, 17)) and progress[-1].frames_total == 16

    in_info, decoded = read_video_frames(clip)
    for name in ("restored", "mask", "overlay"):
        info, frames = read_video_frames(out / f"{name}.mp4")
        assert (len(frames), info.fps, info.width, info.height) == (16, in_info.fps, 96, 64)
        assert info.duration_s == pytest.approx(in_info.duration_s, abs=1e-3)
        assert [f.pts * info.time_base for f in frames] == [f.pts * in_info.time_base for f in decoded]

    expected = reference(nss, [f.rgb for f in decoded])
    homographies = json.loads((out / "homographies.json").read_text())["homographies"]
    assert len(homographies) == 16
    np.testing.assert_array_equal(homographies[0], np.eye(3))
    assert np.abs(np.array(homographies[1:]) - np.eye(3)).max() > 1e-3  # not the untrained identity
    np.testing.assert_allclose(homographies, [r.homography for r in expected], rtol=0, atol=1e-9)
    for i, result in enumerate(expected):
        assert np.array_equal(png(out / "frames" / "restored" / f"{i:06d}.png"), result.restored)
        assert np.array_equal(png(out / "frames" / "mask" / f"{i:06d}.png"), result.teeth_mask)
    # the H.264 restored video is the PNG content up to compression
    _, restored_video = read_video_frames(out / "restored.mp4")
    assert np.abs(restored_video[5].rgb.astype(int) - expected[5].restored.astype(int)).mean() < 6


def test_odd_size_and_variable_frame_rate(tmp_path: Path, nss: Backend, engine: InferenceEngine) -> None:
    pts_ms = [0, 40, 80, 200, 240, 400, 433, 466, 500, 700]
    frames = moving_frames(10, 63, 95)
    clip = write_clip(tmp_path / "vfr.mkv", frames, "ffv1", "bgr0", pts=pts_ms, time_base=Fraction(1, 1000))
    report = process_video(clip, tmp_path / "out", engine, ProcessOptions(frames=True))
    assert report["encoded_size"] == [64, 96] and report["padded_to_even"]
    info, restored = read_video_frames(tmp_path / "out" / "restored.mp4")
    assert (info.height, info.width) == (64, 96)
    assert [round(float(f.pts * info.time_base) * 1000) for f in restored] == pts_ms
    expected = reference(nss, frames)  # ffv1 is lossless: the decoded frames are these
    for i in (0, 9):
        assert np.array_equal(png(tmp_path / "out" / "frames" / "restored" / f"{i:06d}.png"), expected[i].restored)


@needs_display_matrix
def test_portrait_phone_clip_comes_out_upright(tmp_path: Path, nss: Backend, engine: InferenceEngine) -> None:
    """Stored 64x48 with rotation -90, shown 48x64 by players: every output is 48x64, with no rotation
    tag. That the decoder turns the right way is tests/test_video.py's job."""
    clip = write_clip(tmp_path / "phone.mp4", moving_frames(4, 48, 64), rotation=-90)
    report = process_video(clip, tmp_path / "out", engine, ProcessOptions(frames=True))
    assert (report["input"]["width"], report["input"]["height"], report["input"]["rotation"]) == (48, 64, 270)
    assert report["encoded_size"] == [64, 48]
    _, upright = read_video_frames(clip)
    expected = reference(nss, [f.rgb for f in upright])
    for name in ("restored", "overlay", "mask"):
        video = tmp_path / "out" / f"{name}.mp4"
        assert mp4_display_matrix(video) == (1, 0, 0, 1)
        info, frames = read_video_frames(video)
        assert (info.width, info.height, info.rotation, len(frames)) == (48, 64, 0, 4)
    assert np.array_equal(png(tmp_path / "out" / "frames" / "restored" / "000002.png"), expected[2].restored)
    _, restored = read_video_frames(tmp_path / "out" / "restored.mp4")
    assert np.abs(restored[2].rgb.astype(int) - expected[2].restored.astype(int)).mean() < 6


def test_model_without_mask_writes_its_other_outputs(tmp_path: Path) -> None:
    backend = create_backend("r2-d4-tiny")
    engine = InferenceEngine(backend, max_batch=1)
    try:
        report = process_video(write_clip(tmp_path / "c.avi", moving_frames(4), "mjpeg", "yuvj420p"), tmp_path / "o",
                               engine)  # fmt: skip
    finally:
        engine.close()
    assert report["outputs"] == ["denoised.mp4", "restored.mp4"]
    assert not (tmp_path / "o" / "homographies.json").exists()


def test_limits(tmp_path: Path, engine: InferenceEngine) -> None:
    clip = write_clip(tmp_path / "clip.webm", moving_frames(12), "libvpx-vp9")  # webm stores no frame count
    report = process_video(clip, tmp_path / "a", engine, ProcessOptions(max_frames=5))
    assert report["frames"] == 5
    assert len(read_video_frames(tmp_path / "a" / "restored.mp4")[1]) == 5
    with pytest.raises(VideoError, match="limit of 8 frames"):
        process_video(clip, tmp_path / "b", engine, ProcessOptions(frame_limit=8))
    with pytest.raises(VideoError, match="longer than this server's limit"):
        process_video(clip, tmp_path / "c", engine, ProcessOptions(duration_limit_s=0.2))
    # max_frames within the limit processes the start of a long video
    assert process_video(clip, tmp_path / "d", engine, ProcessOptions(max_frames=8, frame_limit=8))["frames"] == 8


def test_cancel_and_errors_stop_every_stage(tmp_path: Path, nss: Backend, engine: InferenceEngine) -> None:
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(30))
    cancel = threading.Event()

    def stop_after_3(progress: Progress) -> None:
        if progress.frames_done == 3:
            cancel.set()

    before = threading.active_count()
    with pytest.raises(Cancelled):
        process_video(clip, tmp_path / "a", engine, on_progress=stop_after_3, cancel=cancel)

    class Failing(Backend):
        calls = 0

        def _load(self) -> None:
            pass

        def _infer(self, feed: dict) -> dict:
            Failing.calls += 1
            if Failing.calls == 4:
                raise RuntimeError("device lost")
            return nss.infer(feed)

    failing = InferenceEngine(Failing(nss.spec, nss.info), max_batch=1)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            process_video(clip, tmp_path / "b", failing)
    finally:
        failing.close()
    assert threading.active_count() == before  # no decode/encode thread left behind
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(VideoError, match="not a readable video"):
        process_video(text, tmp_path / "c", engine)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(moving_frames(5, 40, 56)):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    out = tmp_path / "out"
    argv = ["process", str(folder), "--model", "most-nss-tiny", "--out", str(out), "--fps", "10", "--quiet"]
    assert main([*argv, "--frames"]) == 0
    assert "5 frames at 10.000 fps" in capsys.readouterr().out
    info, frames = read_video_frames(out / "overlay.mp4")
    assert (len(frames), info.fps, info.duration_s) == (5, 10, pytest.approx(0.5))
    assert len(list((out / "frames" / "mask").glob("*.png"))) == 5
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 1000)
    assert main(["process", str(tmp_path / "bad.mp4"), "--model", "most-nss-tiny", "--out", str(out)]) == 2
    assert "not a readable video" in capsys.readouterr().err
