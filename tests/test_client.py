"""The Python client and ``vident stream`` against a real uvicorn server (tiny model, small frames)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from test_video import needs_display_matrix, write_clip

from benchmarks.make_sample import synthetic_clip
from service.app import create_app, serve_in_thread
from service.cli import main
from service.client import ServerError, StreamClient, open_source, stream_source
from service.settings import Settings

TINY = "most-nss-tiny"
H, W = 48, 64


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = create_app(Settings(model=TINY, backend="torch", api_key="key", _env_file=None))
    with serve_in_thread(app) as url:
        yield url.replace("http://", "ws://") + "/v1/stream"


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    return synthetic_clip(8, H, W, seed=2)


def test_folder_of_frames_fast_mode_saves_everything(server: str, clip: list[np.ndarray], tmp_path: Path) -> None:
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i, frame in enumerate(clip):
        cv2.imwrite(str(frames_dir / f"{i:04d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    code = main(["stream", str(frames_dir), "--url", server, "--out", str(out), "--api-key", "key", "--fast"])
    assert code == 0
    restored = sorted((out / "restored").glob("*.png"))
    masks = sorted((out / "teeth_mask").glob("*.png"))
    assert [p.name for p in restored] == [f"{i:06d}.png" for i in range(len(clip))]  # fast mode: nothing dropped
    assert len(masks) == len(clip)
    assert cv2.imread(str(restored[0])).shape == (H, W, 3)
    assert cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED).shape == (H, W)
    homographies = json.loads((out / "homographies.json").read_text())
    assert [h["seq"] for h in homographies] == list(range(len(clip)))
    assert homographies[0]["homography"] == np.eye(3).tolist() and homographies[0]["prev_seq"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processed"] == len(clip) and summary["dropped"] == 0 and summary["fps"] > 0
    assert summary["latency_ms"]["p50"] > 0 and summary["server"]["model"] == TINY


def test_video_file_realtime_mode(server: str, clip: list[np.ndarray], tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mjpeg", rate=50)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuvj420p"
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    source = open_source(str(video))
    assert source.fps == 50 and "mjpeg" in source.description
    summary = asyncio.run(stream_source(source, server, tmp_path / "out", realtime=True, progress=False, api_key="key"))
    assert summary.sent == len(clip) and summary.processed >= 1 and not summary.errors
    assert summary.processed + summary.dropped == len(clip)  # every frame either came back or was dropped
    saved = json.loads((tmp_path / "out" / "homographies.json").read_text())
    assert len(saved) == summary.processed and saved[-1]["seq"] == len(clip) - 1  # the newest frame always wins


def test_client_errors(server: str, clip: list[np.ndarray]) -> None:
    async def run() -> None:
        with pytest.raises(ServerError) as refused:
            async with StreamClient(server, api_key="nope"):
                pass
        assert refused.value.code == "unauthorized"
        async with StreamClient(server, api_key="key", output_format="png") as client:
            assert client.hello["model"] == TINY
            await client.send_frame(b"not an image")
            await client.send_frame(clip[0], "png")
            await client.close()
            messages = [m async for m in client.messages()]
        error, result, bye = messages
        assert isinstance(error, ServerError) and error.code == "bad_image" and error.seq == 0
        assert result.seq == 1 and result.decode().shape == (H, W, 3) and result.decode("teeth_mask").shape == (H, W)
        np.testing.assert_array_equal(result.homography, np.eye(3))
        assert bye["type"] == "bye" and bye["processed"] == 1 and bye["errors"] == 1

    asyncio.run(run())


def test_missing_source_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stream", str(tmp_path / "nothing.mp4"), "--url", "ws://127.0.0.1:9/v1/stream"]) == 2
    assert "not a folder, a video file or a camera index" in capsys.readouterr().err
    (tmp_path / "notes.mp4").write_text("not a video")
    assert main(["stream", str(tmp_path / "notes.mp4"), "--url", "ws://127.0.0.1:9/v1/stream"]) == 2
    assert "notes.mp4" in capsys.readouterr().err


@needs_display_matrix
def test_phone_clip_streams_upright(clip: list[np.ndarray], tmp_path: Path) -> None:
    """``vident stream`` decodes with the service's decoder: a portrait clip (stored sideways, rotation
    -90) is sent as players show it, a quarter turn clockwise from what is stored."""
    source = open_source(str(write_clip(tmp_path / "phone.mp4", clip, rotation=-90)))
    frames = list(source.frames)
    assert "turned 270 degrees" in source.description and len(frames) == len(clip)
    for sent, stored in zip(frames, clip, strict=True):
        assert isinstance(sent, np.ndarray) and sent.shape == (W, H, 3)
        upright = np.rot90(stored, -1).astype(int)
        assert np.abs(sent.astype(int) - upright).mean() < 6 < np.abs(sent.astype(int) - np.rot90(stored, 1)).mean()
