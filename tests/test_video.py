"""PyAV decode/encode on real encoded files: several codecs and containers, odd sizes, variable frame
rate, folders of frames, and inputs that are not (or no longer) videos."""

from __future__ import annotations

import re
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from service.video import VideoError, VideoWriter, open_video, read_video_frames

# (codec, container suffix, pixel format, lossless)
CODECS = [
    ("libx264", ".mp4", "yuv420p", False),
    ("mpeg4", ".avi", "yuv420p", False),
    ("mjpeg", ".avi", "yuvj420p", False),
    ("libvpx-vp9", ".webm", "yuv420p", False),
    ("ffv1", ".mkv", "bgr0", True),
]


def moving_frames(n: int, height: int = 64, width: int = 96, seed: int = 0) -> list[np.ndarray]:
    """Smooth colour waves that drift frame to frame, plus a little texture: compressible, not flat."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 8, (height, width, 3))
    y, x = np.mgrid[0:height, 0:width] / 16.0
    frames = []
    for t in range(n):
        phase = 2 * np.pi * t / 24
        rgb = np.stack([np.sin(x + phase), np.sin(y - 0.7 * phase), np.sin(0.6 * (x + y) + 1.3 * phase)], axis=-1)
        frames.append((124 + 100 * rgb + texture).astype(np.uint8))
    return frames


def write_clip(
    path: Path,
    frames: list[np.ndarray],
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    fps: int | Fraction = 25,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int = 0,
) -> Path:
    """``rotation``: a display matrix in degrees counter-clockwise, as phones write (portrait is -90)."""
    height, width = frames[0].shape[:2]
    options = {"b": "2000000"} if codec == "mpeg4" else None  # its default bit rate is too low to compare frames
    with VideoWriter(
        path, width, height, fps, time_base, codec=codec, pix_fmt=pix_fmt, options=options, display_rotation=rotation
    ) as writer:
        for i, frame in enumerate(frames):
            writer.write(frame, None if pts is None else pts[i])
    return path


def available(codec: str) -> bool:
    return codec in av.codecs_available


needs_display_matrix = pytest.mark.skipif(
    not hasattr(av.video.stream.VideoStream, "set_display_rotation"), reason="PyAV < 17.1 writes no display matrix"
)


def mp4_display_matrix(path: Path) -> tuple[float, float, float, float]:
    """(a, b, c, d) of the first track header's matrix (ISO/IEC 14496-12, 8.3.2): players show the stored
    point (p, q), q pointing down, at (a*p + c*q + x, b*p + d*q + y). Read from the file's bytes, so the
    direction a test expects does not rest on PyAV's or FFmpeg's sign conventions."""
    data = path.read_bytes()
    box = data.index(b"tkhd") + 4  # version (1 byte), flags (3), times and ids (20 or 32), 16 bytes, matrix
    matrix = box + 4 + (32 if data[box] == 1 else 20) + 16
    a, b, _, c, d = struct.unpack(">5i", data[matrix : matrix + 20])
    return a / 65536, b / 65536, c / 65536, d / 65536


def best_turns(decoded: np.ndarray, stored: np.ndarray) -> tuple[int, float]:
    """Which np.rot90 of the stored frame the decoded frame is (0-3), and the mean abs error there."""
    errors = {
        k: np.abs(decoded.astype(int) - np.rot90(stored, k).astype(int)).mean()
        for k in range(4)
        if np.rot90(stored, k).shape == decoded.shape
    }
    k = min(errors, key=errors.__getitem__)
    return k, errors[k]


@pytest.mark.parametrize(("codec", "suffix", "pix_fmt", "lossless"), CODECS, ids=[c[0] for c in CODECS])
def test_decode_codecs_and_containers(tmp_path: Path, codec: str, suffix: str, pix_fmt: str, lossless: bool) -> None:
    if not available(codec):
        pytest.skip(f"the FFmpeg bundled with PyAV has no {codec} encoder")
    frames = moving_frames(12)
    path = write_clip(tmp_path / f"clip{suffix}", frames, codec, pix_fmt)
    info, decoded = read_video_frames(path)
    assert (info.height, info.width, info.fps) == (64, 96, 25)
    assert len(decoded) == 12
    assert info.expected_frames == 12
    seconds = [float(f.pts * info.time_base) for f in decoded]
    np.testing.assert_allclose(seconds, np.arange(12) / 25, atol=1e-3)
    errors = np.array([[np.abs(d.rgb.astype(int) - f.astype(int)).mean() for f in frames] for d in decoded])
    assert np.array_equal(errors.argmin(axis=1), np.arange(12)), "decoded frames are not the encoded ones, in order"
    mean_error = errors.diagonal().mean()
    assert mean_error == 0 if lossless else mean_error < 6, f"{codec}: mean abs error {mean_error}"


def test_variable_frame_rate_keeps_timestamps(tmp_path: Path) -> None:
    pts_ms = [0, 40, 80, 200, 240, 400, 433, 466, 500, 700]
    path = write_clip(tmp_path / "vfr.mkv", moving_frames(10), pts=pts_ms, time_base=Fraction(1, 1000))
    info, decoded = read_video_frames(path)
    assert [round(float(f.pts * info.time_base) * 1000) for f in decoded] == pts_ms


def test_writer_pads_odd_sizes_to_even_for_yuv420(tmp_path: Path) -> None:
    frames = moving_frames(4, 63, 95)
    with VideoWriter(tmp_path / "odd.mp4", 95, 63, 25) as writer:
        assert writer.encoded_size == (64, 96)
        for frame in frames:
            writer.write(frame)
    info, decoded = read_video_frames(tmp_path / "odd.mp4")
    assert (info.height, info.width, len(decoded)) == (64, 96, 4)
    # content keeps its pixel coordinates: the padding is one replicated row/column at the bottom/right
    assert np.abs(decoded[2].rgb[:63, :95].astype(int) - frames[2].astype(int)).mean() < 6


def test_odd_size_lossless_decode(tmp_path: Path) -> None:
    frames = moving_frames(5, 63, 95)
    info, decoded = read_video_frames(write_clip(tmp_path / "odd.mkv", frames, "ffv1", "bgr0"))
    assert (info.height, info.width) == (63, 95)
    assert all(np.array_equal(d.rgb, f) for d, f in zip(decoded, frames, strict=True))


@needs_display_matrix
@pytest.mark.parametrize("rotation", [-90, 90, 180, 270])
def test_rotated_clip_decodes_upright(tmp_path: Path, rotation: int) -> None:
    """-90 is a portrait phone clip (the ``rotate=90`` tag of older FFmpeg): stored landscape, shown a
    quarter turn clockwise. The expected turn comes from the matrix in the file, not from the decoder."""
    frames = moving_frames(6, 48, 80)
    clip = write_clip(tmp_path / "phone.mp4", frames, rotation=rotation)
    turns = round(rotation / 90) % 4  # counter-clockwise quarter turns, as np.rot90 counts them
    angle = np.radians(90 * turns)
    # a quarter turn counter-clockwise on screen (q down) takes the stored point (p, q) to (q, -p) + translation
    np.testing.assert_allclose(mp4_display_matrix(clip), [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)],
                               atol=1e-4)  # fmt: skip
    info, decoded = read_video_frames(clip)
    assert info.rotation == 90 * turns
    assert (info.width, info.height) == ((48, 80) if turns % 2 else (80, 48))
    for d, f in zip(decoded, frames, strict=True):
        assert d.rgb.shape == (info.height, info.width, 3) and d.rgb.flags.c_contiguous
        k, error = best_turns(d.rgb, f)
        assert k == turns and error < 6, f"decoded frame is np.rot90(stored, {k}) (error {error:.1f}), not {turns}"


@needs_display_matrix
@pytest.mark.parametrize(("rotation", "turns"), [(100, 1), (45, 0)])
def test_rotation_between_quarter_turns_goes_to_the_nearest(tmp_path: Path, rotation: int, turns: int) -> None:
    frames = moving_frames(3, 48, 80)
    with open_video(write_clip(tmp_path / "tilted.mp4", frames, rotation=rotation)) as source:
        decoded = list(source)
    assert source.info.rotation == 90 * turns
    assert [best_turns(d.rgb, f)[0] for d, f in zip(decoded, frames, strict=True)] == [turns] * 3
    # PyAV truncates the angle to whole degrees: 100 can read 99
    assert len(source.warnings) == 1
    assert re.fullmatch(rf"tilted\.mp4: the display rotation of \d+ degrees is not a quarter turn; used {90 * turns}",
                        source.warnings[0])  # fmt: skip


def test_folder_of_frames(tmp_path: Path) -> None:
    frames = moving_frames(6, 37, 51)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"f{i:03d}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    with open_video(tmp_path, folder_fps=12.5) as source:
        assert (source.info.fps, source.info.frame_count) == (Fraction(25, 2), 6)
        decoded = list(source)
    assert [f.pts for f in decoded] == list(range(6))
    assert all(np.array_equal(d.rgb, f) for d, f in zip(decoded, frames, strict=True))


def test_folder_of_phone_jpegs_is_upright(tmp_path: Path) -> None:
    """EXIF orientation 6 (stored sideways; viewers turn it a quarter clockwise) is applied, as for videos."""
    frames = moving_frames(3, 40, 56)
    exif = Image.Exif()
    exif[0x0112] = 6
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"f{i:03d}.jpg", quality=95, exif=exif)
    with open_video(tmp_path) as source:
        assert (source.info.width, source.info.height) == (40, 56)
        decoded = list(source)
    for d, f in zip(decoded, frames, strict=True):
        rgb = d.rgb.astype(int)
        assert np.abs(rgb - np.rot90(f, -1)).mean() < 6 < np.abs(rgb - np.rot90(f, 1)).mean()


def test_folder_with_mixed_sizes_is_an_error(tmp_path: Path) -> None:
    Image.fromarray(moving_frames(1, 16, 16)[0]).save(tmp_path / "a.png")
    Image.fromarray(moving_frames(1, 16, 24)[0]).save(tmp_path / "b.png")
    with pytest.raises(VideoError, match="b.png is 24x16"), open_video(tmp_path) as source:
        list(source)


def test_not_a_video(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError, match="not a readable video"):
        open_video(text)
    empty = tmp_path / "empty.mkv"
    empty.write_bytes(b"")
    with pytest.raises(VideoError):
        open_video(empty)
    with pytest.raises(VideoError, match="does not exist"):
        open_video(tmp_path / "missing.mp4")


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoError, match="no video stream"):
        open_video(path)


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    mp4 = write_clip(tmp_path / "clip.mp4", moving_frames(20))  # index at the front (faststart)
    data = mp4.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 3 // 4])
    with open_video(tmp_path / "cut.mp4") as source:
        decoded = list(source)
    assert 0 < len(decoded) < 20  # the frames before the cut are kept ...
    assert "could not be decoded" in source.warnings[0]  # ... and the loss is reported
    (tmp_path / "head.mp4").write_bytes(data[:200])
    with pytest.raises(VideoError, match="no video stream"):  # the header survives, the stream table does not
        open_video(tmp_path / "head.mp4")
    corrupt = bytearray(data)
    rng = np.random.default_rng(1)
    start = len(corrupt) * 3 // 5
    corrupt[start:] = rng.integers(0, 256, len(corrupt) - start, dtype=np.uint8).tobytes()  # garbage at the end
    (tmp_path / "garbage.mp4").write_bytes(bytes(corrupt))
    with open_video(tmp_path / "garbage.mp4") as source:
        decoded = list(source)
    assert len(decoded) < 20 and source.warnings
    webm = write_clip(tmp_path / "clip.webm", moving_frames(20), "libvpx-vp9")
    data = webm.read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) // 2])
    with open_video(tmp_path / "cut.webm") as source:
        assert 0 < len(list(source)) < 20


@needs_display_matrix
def test_rotated_clip_whose_first_packet_is_corrupt_still_decodes_upright(tmp_path: Path) -> None:
    """The orientation is read from the first frame that decodes, not from the first packet: a portrait
    clip whose first frame is lost keeps its upright size, and the loss is reported."""
    frames = moving_frames(6, 48, 80)
    clip = tmp_path / "phone.mp4"
    with VideoWriter(clip, 80, 48, 25, options={"g": "1"}, display_rotation=-90) as writer:  # every frame a keyframe
        for frame in frames:
            writer.write(frame)
    with av.open(str(clip)) as container:
        first = next(p for p in container.demux(container.streams.video[0]) if p.size)
        position, size = first.pos, first.size
    data = bytearray(clip.read_bytes())
    data[position : position + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "bad.mp4").write_bytes(bytes(data))
    with open_video(tmp_path / "bad.mp4") as source:
        decoded = list(source)
    assert (source.info.width, source.info.height, source.info.rotation) == (48, 80, 270)
    assert len(decoded) == 5 and "could not be decoded" in source.warnings[0]
    for d, f in zip(decoded, frames[1:], strict=True):
        assert best_turns(d.rgb, f)[0] == 3
