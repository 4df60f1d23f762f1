"""Video in and out for batch processing: PyAV decode to uint8 RGB, H.264 mp4 encode at the input's timing.

Decoding accepts whatever container and codec the FFmpeg bundled with PyAV reads (mp4, mkv, mov, avi,
webm; H.264, H.265, VP9, MJPEG, ...) and a folder of PNG/JPEG frames. Every frame keeps its
presentation timestamp (``pts``, relative to the first frame, in the source's time base), and the
writer reuses those timestamps, so the outputs have the same frame rate and duration as the input,
variable frame rate included.

H.264 in yuv420p needs even width and height. An odd-sized frame is padded by one row/column at the
bottom/right by edge replication (the same convention as :class:`service.pipeline.Geometry`): every
pixel keeps its coordinates, so masks and homographies still map onto the encoded video; the lossless
PNG frames (``--frames``) keep the exact input size.

Phone clips are stored sideways with a display matrix (a portrait clip is stored landscape, rotation
-90) that players apply. The decoder applies it too, so frames, sizes and every output are upright as
players show the input, and the outputs carry no rotation: they play the same in every player. An angle
between quarter turns goes to the nearest one, with a warning (:func:`_upright_turns`).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_FOLDER_FPS = Fraction(30)
MAX_BAD_PACKETS = 50  # consecutive undecodable packets before a stream counts as garbage

log = logging.getLogger("vident.video")


class VideoError(ValueError):
    """The input cannot be processed; the message says why in words a user can act on."""


class FrameTooLarge(VideoError):
    """The frames have more pixels than the caller allows (``max_pixels``)."""


def check_pixels(name: str, width: int, height: int, max_pixels: int | None) -> None:
    """FrameTooLarge for frames over the budget. Called with the sizes a header declares, before
    decoding: a small file can declare frames whose pixels, and the network's activations for
    them, do not fit in memory."""
    if max_pixels is not None and width * height > max_pixels:
        raise FrameTooLarge(
            f"{name}: {width}x{height} frames ({width * height} pixels) are larger than this server's limit of "
            f"{max_pixels} pixels per frame (max_frame_pixels)"
        )


@dataclass(frozen=True)
class VideoInfo:
    """What the container says before decoding. ``frame_count`` is None where the container does not
    store it (webm, mkv): it is then estimated from the duration by :attr:`expected_frames`.

    ``width`` and ``height`` are those of the upright frames, as players show them: a portrait phone
    clip stored 1920x1080 reports 1080x1920. ``rotation`` is what was applied to get there (see
    :func:`_upright_turns`).
    """

    width: int
    height: int
    fps: Fraction  # average frame rate
    time_base: Fraction  # unit of DecodedFrame.pts
    frame_count: int | None
    duration_s: float | None
    codec: str
    container: str
    rotation: int = 0  # degrees counter-clockwise (0, 90, 180, 270) the stored frames were turned

    @property
    def expected_frames(self) -> int | None:
        if self.frame_count:
            return self.frame_count
        if self.duration_s:
            return max(1, round(self.duration_s * float(self.fps)))
        return None


@dataclass
class DecodedFrame:
    index: int
    rgb: np.ndarray  # uint8 (h, w, 3), upright
    pts: int  # presentation time in VideoInfo.time_base units, 0 for the first frame


@dataclass
class VideoSource:
    """Iterates an input's frames once. Use :func:`open_video`; close it (or use ``with``).

    A decode error after at least one good frame (a truncated upload, say) ends the stream with a
    message in ``warnings`` instead of failing: the frames that decoded are still worth processing.
    No frame at all is a :class:`VideoError`.
    """

    info: VideoInfo
    _frames: Iterator[DecodedFrame]
    _container: av.container.InputContainer | None = None
    warnings: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[DecodedFrame]:
        return self._frames

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_video(
    path: str | Path, folder_fps: Fraction | float | None = None, max_pixels: int | None = None
) -> VideoSource:
    """A video file or a folder of PNG/JPEG frames (sorted by name, played at ``folder_fps``).

    ``max_pixels`` refuses frames with more pixels (:class:`FrameTooLarge`): checked on the header
    here and again on every decoded frame, before it is converted to RGB. A file's first frame is
    decoded here already: the display rotation rides on the frames, and it decides the reported size.
    """
    path = Path(path)
    if path.is_dir():
        return _open_folder(path, Fraction(folder_fps or DEFAULT_FOLDER_FPS).limit_denominator(1001), max_pixels)
    if not path.is_file():
        raise VideoError(f"{path} does not exist")
    return _open_file(path, max_pixels)


def _open_file(path: Path, max_pixels: int | None) -> VideoSource:
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoError(f"{path.name} is not a readable video ({_reason(exc)})") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{path.name} has no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if not ctx.width or not ctx.height:
            raise VideoError(f"{path.name}: the video stream has no frame size (corrupt header?)")
        check_pixels(path.name, ctx.width, ctx.height, max_pixels)
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not fps or fps <= 0:
            raise VideoError(f"{path.name}: the video stream has no frame rate")
        time_base = stream.time_base or Fraction(1, 1) / Fraction(fps)
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        # The display matrix rides on the decoded frames (from the container, or from the codec's
        # orientation message), so the first frame says which way up the video is.
        items = _frames_salvaged(container, stream)
        first = next(items, None)
        warnings: list[str] = []
        angle = first.rotation if isinstance(first, av.VideoFrame) else 0.0  # no frame yet: taken as upright
        turns = _upright_turns(angle, path.name, warnings)
        width, height = (ctx.height, ctx.width) if turns % 2 else (ctx.width, ctx.height)
        info = VideoInfo(
            width=width,
            height=height,
            fps=Fraction(fps),
            time_base=Fraction(time_base),
            frame_count=stream.frames or None,
            duration_s=duration,
            codec=ctx.name,
            container=container.format.name,
            rotation=turns * 90,
        )
    except BaseException:
        container.close()
        raise
    source = VideoSource(info, iter(()), container, warnings)
    frames = items if first is None else itertools.chain([first], items)
    source._frames = _decode(frames, info, angle, source.warnings, path.name, max_pixels)
    return source


def _upright_turns(rotation: float, name: str, warnings: list[str]) -> int:
    """Counter-clockwise quarter turns (0-3, for ``np.rot90``) that show a stored frame as players do.

    ``rotation`` is PyAV's ``VideoFrame.rotation``: the display matrix's angle in degrees, counter-clockwise
    as the picture is seen (y pointing down), in [-180, 180]. A portrait phone clip says -90 (its MP4
    matrix, and the old ``rotate=90`` tag, mean "turn a quarter clockwise"), so its frames turn -1 times.
    Other angles (no phone writes them; PyAV truncates to whole degrees, so 90 can read 89) go to the
    nearest quarter turn, so that frames stay rectangular and the model sees them at full size; an exact
    diagonal (45, 135, ...) keeps the stored shape. More than a degree off, a warning in ``warnings``
    (the job's report) and the log says so. Mirroring in the matrix is not applied.
    """
    turns = round(rotation / 90)
    if abs(rotation - 90 * turns) > 1:
        message = f"{name}: the display rotation of {rotation} degrees is not a quarter turn; used {90 * turns % 360}"
        log.warning(message)
        warnings.append(message)
    return turns % 4


def _decode(
    items: Iterator[av.VideoFrame | str],
    info: VideoInfo,
    rotation: float,
    warnings: list[str],
    name: str,
    max_pixels: int | None,
) -> Iterator[DecodedFrame]:
    frame_ticks = 1 / (info.fps * info.time_base)  # one frame period in time-base units
    index = 0
    first_pts: int | None = None
    last_pts = -1
    size = (info.height, info.width)
    turns = info.rotation // 90  # what ``rotation``, the display angle measured at opening, gave
    error: str | None = None
    try:
        for frame in items:
            if isinstance(frame, str):
                error = frame
                continue
            check_pixels(name, frame.width, frame.height, max_pixels)
            if frame.rotation != rotation:  # the orientation changes mid-stream
                turns = _upright_turns(frame.rotation, name, warnings)
                rotation = frame.rotation
            upright = (frame.width, frame.height) if turns % 2 else (frame.height, frame.width)
            if upright != size:
                raise VideoError(f"{name}: frame size changes from {size[1]}x{size[0]} to {upright[1]}x{upright[0]}")
            rgb = frame.to_ndarray(format="rgb24")
            if turns:
                rgb = np.ascontiguousarray(np.rot90(rgb, turns))  # (h, w, 3) as displayed
            if frame.pts is None:  # some AVI/raw streams: derive time from the frame index
                pts = round(index * frame_ticks)
            else:
                first_pts = frame.pts if first_pts is None else first_pts
                pts = frame.pts - first_pts
            # Encoders need strictly increasing timestamps; broken files repeat or reorder some.
            pts = max(pts, last_pts + 1)
            last_pts = pts
            yield DecodedFrame(index, rgb, pts)
            index += 1
    except av.error.FFmpegError as exc:  # converting a decoded frame failed: no salvage possible
        error = _reason(exc)
    if index == 0:
        if error:
            raise VideoError(f"{name}: no frame could be decoded ({error})")
        raise VideoError(f"{name}: the video has no frames")
    if error:
        warnings.append(f"some of the input could not be decoded ({error}; truncated or corrupt?): {index} frames used")


def _frames_salvaged(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> Iterator[av.VideoFrame | str]:
    """Decoded frames, skipping packets the decoder rejects (as the ffmpeg tool does); the first error's
    text comes last. After a read error the decoder is flushed: it holds a few good frames back
    (threads, reordering), which a truncated file would otherwise lose."""
    error: str | None = None
    bad_in_a_row = 0
    try:
        for packet in container.demux(stream):
            try:
                yield from packet.decode()
                bad_in_a_row = 0
            except av.error.FFmpegError as exc:
                error = error or _reason(exc)
                bad_in_a_row += 1
                if bad_in_a_row > MAX_BAD_PACKETS:
                    break
    except av.error.FFmpegError as exc:
        error = error or _reason(exc)
        try:
            yield from stream.codec_context.decode(None)
        except av.error.FFmpegError:
            pass
    if error:
        yield error


def _open_folder(path: Path, fps: Fraction, max_pixels: int | None) -> VideoSource:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise VideoError(f"{path} has no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} frames")
    width, height = _read_image(files[0], max_pixels).size
    info = VideoInfo(width, height, fps, 1 / fps, len(files), len(files) / float(fps), "image", "folder")

    def frames() -> Iterator[DecodedFrame]:
        for i, file in enumerate(files):
            image = _read_image(file, max_pixels)
            if image.size != (width, height):
                raise VideoError(f"{file.name} is {image.size[0]}x{image.size[1]}, the first frame {width}x{height}")
            yield DecodedFrame(i, np.asarray(image.convert("RGB"), dtype=np.uint8), i)

    return VideoSource(info, frames())


def _read_image(file: Path, max_pixels: int | None) -> Image.Image:
    try:
        image = Image.open(file)  # the header only
        check_pixels(file.name, image.width, image.height, max_pixels)
        image.load()
    except FrameTooLarge:
        raise
    except Image.DecompressionBombError as exc:
        raise FrameTooLarge(f"{file.name}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise VideoError(f"{file.name} is not a readable image ({exc})") from None
    return ImageOps.exif_transpose(image)  # phone JPEGs: upright, as viewers show them (EXIF orientation)


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return re.sub(r"\s*:\s*'[^']*'$", "", text)  # PyAV appends the file path: keep server paths out


class VideoWriter:
    """Encodes frames at the source's time base: each frame keeps its input timestamp.

    The default is what results use: H.264 (libx264, yuv420p) in mp4, ``crf`` 18 (visually lossless
    at these sizes) and ``preset`` veryfast, which keeps encoding far below inference time (see
    docs/jobs.md), and no display matrix: results are upright. Other codecs and pixel formats, and
    ``display_rotation`` (degrees counter-clockwise, as PyAV's ``VideoFrame.rotation`` reads it back; a
    portrait phone clip is -90), make test and benchmark inputs.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: Fraction | int,
        time_base: Fraction | None = None,
        codec: str = "libx264",
        pix_fmt: str = "yuv420p",
        options: dict[str, str] | None = None,
        display_rotation: int = 0,
    ) -> None:
        self.path = Path(path)
        self.width, self.height = width, height
        fps = Fraction(fps)
        subsampled = pix_fmt.startswith(("yuv420", "yuvj420", "nv12"))
        self.encoded_size = (height + height % 2, width + width % 2) if subsampled else (height, width)
        if options is None:
            options = {"crf": "18", "preset": "veryfast"} if codec == "libx264" else {}
        mux_options = {"movflags": "+faststart"} if self.path.suffix.lower() in (".mp4", ".mov") else {}
        self._container = av.open(str(self.path), mode="w", options=mux_options)
        self._stream = self._container.add_stream(codec, rate=fps, options=options)
        self._stream.height, self._stream.width = self.encoded_size
        self._stream.pix_fmt = pix_fmt
        if display_rotation:
            self._stream.set_display_rotation(display_rotation)  # PyAV >= 17.1
        self.time_base = Fraction(time_base) if time_base else 1 / fps
        self._stream.time_base = self.time_base
        # The codec's time base too: left at 1/fps, it would round variable-rate timestamps to frames.
        self._stream.codec_context.time_base = self.time_base
        self._frame_ticks = max(1, round(1 / (fps * self.time_base)))
        self.frames = 0

    def write(self, image: np.ndarray, pts: int | None = None) -> None:
        """uint8 (h, w, 3) RGB or (h, w) gray at ``pts`` (time-base units, increasing; default: frame index)."""
        if pts is None:
            pts = self.frames * self._frame_ticks
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame is {image.shape[:2]}, writer expects {(self.height, self.width)}")
        eh, ew = self.encoded_size
        if (eh, ew) != (self.height, self.width):
            pad = ((0, eh - self.height), (0, ew - self.width)) + ((0, 0),) * (image.ndim - 2)
            image = np.pad(image, pad, mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24" if image.ndim == 3 else "gray")
        frame.pts = pts
        frame.time_base = self.time_base
        frame.duration = self._frame_ticks  # the last frame's duration closes the file's total duration
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None  # type: ignore[assignment]

    def abort(self) -> None:
        """Close without caring whether the file is complete (cancellation, errors)."""
        try:
            self.close()
        except av.error.FFmpegError:
            pass

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close() if exc_type is None else self.abort()


def read_video_frames(path: str | Path) -> tuple[VideoInfo, list[DecodedFrame]]:
    """Every frame of a (small) video: for tests and verification, not for long inputs."""
    with open_video(path) as source:
        return source.info, list(source)
