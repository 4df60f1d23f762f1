"""Offline processing of one recorded video: decode -> preprocess -> infer -> postprocess -> encode.

Three stages overlap so a run approaches the backend's raw speed:

* a decoder thread turns the input into uint8 RGB frames (bounded queue ahead of inference);
* the calling thread submits frames to an :class:`~service.engine.InferenceEngine`, which runs
  :func:`~service.pipeline.run_streams` (pad, infer, crop) on its own worker thread; a small window of
  frames is in flight so the engine never idles between two frames of the stream;
* an encoder thread writes the videos, PNG frames and homographies (bounded queue behind inference).

Frames of one video are one :class:`~service.pipeline.Stream`, so results are exactly those of a live
session fed the same frames. Batch jobs submit with ``Priority.BATCH`` and share the engine with live
sessions, which go first.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata as md
import json
import platform
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from service.engine import InferenceEngine, Priority
from service.pipeline import FrameResult, Geometry, Stream
from service.video import DecodedFrame, VideoError, VideoSource, VideoWriter, open_video

OVERLAY_COLOUR = np.array([0, 230, 160], np.float32)  # teeth drawn in teal over the restored frame
OVERLAY_ALPHA = 0.45
HOMOGRAPHY_CONVENTION = (
    "H[t] maps frame t-1 to frame t (H_{t-1->t}) in continuous pixel coordinates of the upright input frame: "
    "image spans [0,W]x[0,H], pixel (i,j) centre at (j+0.5, i+0.5). H[0] is the identity."
)


class Cancelled(Exception):
    """The caller asked to stop (job deleted, server shutting down)."""


@dataclass(frozen=True)
class ProcessOptions:
    frames: bool = False  # also write lossless PNG frames (and masks)
    max_frames: int | None = None  # process only the first N frames
    frame_limit: int | None = None  # refuse inputs with more frames than this (server limit)
    duration_limit_s: float | None = None  # refuse inputs longer than this (server limit)
    pixel_limit: int | None = None  # refuse frames with more pixels than this (server limit)
    folder_fps: Fraction | None = None  # frame rate of a folder of images
    priority: Priority = Priority.BATCH
    crf: int = 18
    preset: str = "veryfast"
    in_flight: int = 2  # frames submitted ahead to the engine
    queue_size: int = 8  # decoded frames buffered ahead, results buffered behind


@dataclass
class Progress:
    frames_done: int
    frames_total: int | None  # None: the container does not say and the duration is unknown
    elapsed_s: float

    @property
    def frames_per_s(self) -> float:
        return self.frames_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if not self.frames_total or not self.frames_done:
            return None
        return max(0.0, (self.frames_total - self.frames_done) / self.frames_per_s)


@dataclass
class _Timing:
    decode_s: float = 0.0
    infer_s: float = 0.0
    wait_s: float = 0.0  # calling thread blocked on engine results
    encode_s: float = 0.0
    png_s: float = 0.0


@dataclass
class _Outputs:
    """The encoder thread's writers and what it has written so far."""

    out_dir: Path
    writers: dict[str, VideoWriter] = field(default_factory=dict)
    homographies: list[list[list[float]]] = field(default_factory=list)
    last_pts: int = 0


_END = object()


def process_video(
    input_path: str | Path,
    out_dir: str | Path,
    engine: InferenceEngine,
    options: ProcessOptions | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
    model_label: str | None = None,
) -> dict[str, Any]:
    """Processes ``input_path`` into ``out_dir``; returns the report (also written as report.json).

    Raises :class:`VideoError` for unusable input, :class:`Cancelled` when ``cancel`` is set.
    """
    options = options or ProcessOptions()
    cancel = cancel or threading.Event()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = engine.backend.spec
    start = time.perf_counter()
    with open_video(input_path, options.folder_fps, options.pixel_limit) as source:
        info = source.info
        total = _check_limits(source, options)
        geometry = Geometry(info.height, info.width, spec.size_multiple)
        stream = Stream(spec, geometry)
        outputs = _Outputs(out_dir)
        timing = _Timing()
        stop = threading.Event()  # set on cancel or on any stage's error: every stage winds down
        decoded: queue.Queue[Any] = queue.Queue(options.queue_size)
        results: queue.Queue[Any] = queue.Queue(options.queue_size)
        decoder = _Stage("decode", stop, lambda: _decode_stage(source, options, decoded, stop, timing))
        encoder = _Stage("encode", stop, lambda: _encode_stage(info, options, results, outputs, stop, timing))
        decoder.start()
        encoder.start()
        frames = 0
        try:
            frames = _infer_stage(
                engine, stream, options, decoded, results, stop, cancel, timing, total, start, on_progress
            )
        except BaseException:
            stop.set()
            raise
        finally:
            if cancel.is_set():
                stop.set()
            if not stop.is_set():
                _put(results, _END, stop)  # normal end: the encoder drains its queue and closes the files
            decoder.join()
            encoder.join()
            if stop.is_set():
                for writer in outputs.writers.values():
                    writer.abort()
        for stage in (decoder, encoder):
            if stage.error is not None:
                raise stage.error
        if cancel.is_set():
            raise Cancelled()
        if outputs.homographies:
            _write_homographies(out_dir / "homographies.json", outputs.homographies, info, spec.name)
        wall = time.perf_counter() - start
        report = _report(info, source.warnings, spec.name, model_label, engine, outputs, frames, timing, wall, options)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _check_limits(source: VideoSource, options: ProcessOptions) -> int | None:
    """Frames the run will produce (None if unknown); refuses inputs over the server's limits up front."""
    info = source.info
    if options.max_frames is None:
        if options.frame_limit and info.frame_count and info.frame_count > options.frame_limit:
            raise VideoError(
                f"the video has {info.frame_count} frames, more than this server's limit of {options.frame_limit}; "
                f"set max_frames to {options.frame_limit} or less to process only the start"
            )
        if options.duration_limit_s and info.duration_s and info.duration_s > options.duration_limit_s + 1e-3:
            raise VideoError(
                f"the video lasts {info.duration_s:.1f} s, longer than this server's limit of "
                f"{options.duration_limit_s:.0f} s; set max_frames to process only the start"
            )
    expected = info.expected_frames
    if options.max_frames is not None:
        return min(options.max_frames, expected) if expected else options.max_frames
    return expected


class _Stage(threading.Thread):
    def __init__(self, name: str, stop: threading.Event, work: Callable[[], None]) -> None:
        super().__init__(name=f"process-{name}", daemon=True)
        self._stop_event = stop
        self._work = work
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # noqa: BLE001 - re-raised by process_video in the caller's thread
            self.error = exc
            self._stop_event.set()


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue[Any], stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return _END


def _decode_stage(
    source: VideoSource, options: ProcessOptions, decoded: queue.Queue[Any], stop: threading.Event, timing: _Timing
) -> None:
    frames = iter(source)
    limit = options.max_frames
    while limit is None or limit > 0:
        t0 = time.perf_counter()
        frame = next(frames, None)
        timing.decode_s += time.perf_counter() - t0
        if frame is None:
            break
        if limit is None and options.frame_limit and frame.index >= options.frame_limit:
            raise VideoError(
                f"the video has more than this server's limit of {options.frame_limit} frames; "
                f"set max_frames to {options.frame_limit} or less to process only the start"
            )
        if not _put(decoded, frame, stop):
            return
        if limit is not None and frame.index + 1 >= limit:
            break
    _put(decoded, _END, stop)


def _infer_stage(
    engine: InferenceEngine,
    stream: Stream,
    options: ProcessOptions,
    decoded: queue.Queue[Any],
    results: queue.Queue[Any],
    stop: threading.Event,
    cancel: threading.Event,
    timing: _Timing,
    total: int | None,
    start: float,
    on_progress: Callable[[Progress], None] | None,
) -> int:
    """Submits frames in order with a few in flight (the engine runs one stream's frames in order)."""
    pending: collections.deque[tuple[DecodedFrame, Future[FrameResult]]] = collections.deque()
    done = 0
    ended = False
    try:
        while not ended or pending:
            if cancel.is_set():
                stop.set()
            if stop.is_set():
                return done
            if not ended and len(pending) < max(1, options.in_flight):
                frame = _get(decoded, stop)
                if frame is _END:
                    ended = True
                else:
                    pending.append((frame, engine.submit(stream, frame.rgb, options.priority)))
                continue
            frame, future = pending[0]
            t0 = time.perf_counter()
            try:
                result = future.result(timeout=0.1)
            except FutureTimeout:
                timing.wait_s += time.perf_counter() - t0
                continue
            timing.wait_s += time.perf_counter() - t0
            pending.popleft()
            timing.infer_s += result.infer_seconds
            if not _put(results, (frame.pts, result), stop):
                return done
            done += 1
            if on_progress is not None:
                on_progress(Progress(done, max(total or 0, done) or None, time.perf_counter() - start))
        return done
    finally:
        # Let the (at most ``in_flight``) submitted frames finish rather than cancel them: a cancelled
        # request would stay queued in the engine until its worker pops it, and the engine cannot
        # close while other requests wait in its queue (its stop marker does not compare with them).
        deadline = time.monotonic() + 60
        for _, future in pending:
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.0, deadline - time.monotonic()))


def _encode_stage(
    info: Any,
    options: ProcessOptions,
    results: queue.Queue[Any],
    outputs: _Outputs,
    stop: threading.Event,
    timing: _Timing,
) -> None:
    while True:
        item = _get(results, stop)
        if item is _END:
            break
        pts, result = item
        t0 = time.perf_counter()
        images = _output_images(result)
        if not outputs.writers:
            for name in images:
                outputs.writers[name] = VideoWriter(
                    outputs.out_dir / f"{name}.mp4", info.width, info.height, info.fps, info.time_base,
                    options={"crf": str(options.crf), "preset": options.preset},
                )  # fmt: skip
        for name, image in images.items():
            outputs.writers[name].write(image, pts)
        if result.homography is not None:
            outputs.homographies.append(result.homography.tolist())
        outputs.last_pts = pts
        timing.encode_s += time.perf_counter() - t0
        if options.frames:
            t0 = time.perf_counter()
            _write_pngs(outputs.out_dir / "frames", result)
            timing.png_s += time.perf_counter() - t0
    if stop.is_set():
        return
    for writer in outputs.writers.values():
        t0 = time.perf_counter()
        writer.close()
        timing.encode_s += time.perf_counter() - t0


def _output_images(result: FrameResult) -> dict[str, np.ndarray]:
    images = {"restored": result.restored}
    if result.teeth_mask is not None:
        images["mask"] = result.teeth_mask
        images["overlay"] = overlay(result.restored, result.teeth_mask)
    images.update(result.extra)
    return images


def overlay(restored: np.ndarray, teeth_mask: np.ndarray) -> np.ndarray:
    """The mask drawn over the restored frame, its opacity following the mask's probability."""
    weight = teeth_mask.astype(np.float32)[..., None] * (OVERLAY_ALPHA / 255.0)  # (h, w, 1)
    blended = restored.astype(np.float32) * (1.0 - weight) + OVERLAY_COLOUR * weight
    return (blended + 0.5).astype(np.uint8)


def _write_pngs(folder: Path, result: FrameResult) -> None:
    """Lossless frames; compress_level 1 keeps PNG writing cheap (size is not the point here)."""
    images = {"restored": result.restored, **result.extra}
    if result.teeth_mask is not None:
        images["mask"] = result.teeth_mask
    for name, image in images.items():
        path = folder / name / f"{result.index:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, compress_level=1)


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def _report(
    info: Any,
    warnings: list[str],
    model: str,
    model_label: str | None,
    engine: InferenceEngine,
    outputs: _Outputs,
    frames: int,
    timing: _Timing,
    wall: float,
    options: ProcessOptions,
) -> dict[str, Any]:
    files = sorted(f"{name}.mp4" for name in outputs.writers)
    if outputs.homographies:
        files.append("homographies.json")
    backend = engine.backend.info
    encoded = next(iter(outputs.writers.values())).encoded_size if outputs.writers else (info.height, info.width)
    return {
        "input": {
            "codec": info.codec,
            "container": info.container,
            "width": info.width,
            "height": info.height,
            "rotation": info.rotation,
            "fps": str(info.fps),
            "frames_in_container": info.frame_count,
        },
        "frames": frames,
        "fps": float(info.fps),
        "duration_s": float((outputs.last_pts * info.time_base) + 1 / info.fps) if frames else 0.0,
        "model": model_label or model,
        "backend": {"name": backend.name, "device": backend.device, "precision": backend.precision},
        "outputs": files,
        "png_frames": bool(options.frames),
        "encoded_size": list(encoded),
        "padded_to_even": list(encoded) != [info.height, info.width],
        "timing": {
            "wall_s": round(wall, 4),
            "decode_s": round(timing.decode_s, 4),
            "infer_s": round(timing.infer_s, 4),
            "wait_for_engine_s": round(timing.wait_s, 4),
            "encode_s": round(timing.encode_s, 4),
            "png_s": round(timing.png_s, 4),
            "frames_per_s": round(frames / wall, 3) if wall > 0 else None,
            "infer_frames_per_s": round(frames / timing.infer_s, 3) if timing.infer_s > 0 else None,
        },
        "warnings": list(warnings),
        "versions": {
            "vident": _version("vident"),
            "python": platform.python_version(),
            "torch": _version("torch"),
            "av": av.__version__,
            "ffmpeg": ".".join(str(v) for v in av.library_versions.get("libavcodec", ())),
            "numpy": np.__version__,
        },
    }


def _write_homographies(path: Path, homographies: list[list[list[float]]], info: Any, model: str) -> None:
    path.write_text(
        json.dumps(
            {
                "model": model,
                "frame_size": [info.height, info.width],
                "convention": HOMOGRAPHY_CONVENTION,
                "homographies": homographies,
            }
        )
    )
