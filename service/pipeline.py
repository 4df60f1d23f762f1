"""decode -> preprocess -> infer -> postprocess -> encode, shared by the WebSocket path, batch jobs,
``vident eval`` and the benchmarks, so that all of them compute the same thing.

This module owns the middle three stages for streams of RGB frames:

* :class:`Geometry` maps a client's frame size to the network's (multiples of 8, at least
  :data:`MIN_NETWORK_SIDE`). Frames are padded at the bottom and right by edge replication, so a
  client pixel keeps its coordinates and homographies need no correction; outputs are cropped back.
* :class:`Stream` is one video stream's recurrent state (explicit tensors from the model spec).
* :func:`run_streams` runs several streams' next frames as one batched backend call (state
  tensors concatenated along the batch axis), then splits the results back per stream.

Decoding (PyAV, Pillow) and encoding live with the callers; they hand over uint8 HxWx3 RGB.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from export.runtime import Backend
from models.spec import ModelSpec

# Smallest height and width the networks run at. MOST's homography regressor max-pools (2x2) five
# times at scale 1, four at 2 and three at 3; torch pools a 1-pixel map with ceil_mode, but
# OpenVINO and ONNX Runtime refuse a pooling window larger than its input, which happens below 24
# pixels. Smaller frames are padded up to this like any other size, so no frame is too small.
MIN_NETWORK_SIDE = 32


@dataclass(frozen=True)
class Geometry:
    """Client frame size and the padded size the network runs at."""

    height: int
    width: int
    multiple: int = 8
    minimum: int = MIN_NETWORK_SIDE

    @property
    def padded(self) -> tuple[int, int]:
        m = self.multiple
        return (-(-max(self.height, self.minimum) // m) * m, -(-max(self.width, self.minimum) // m) * m)

    def pad(self, batch: np.ndarray) -> np.ndarray:
        """(b, c, h, w) -> (b, c, H, W) with edge replication at the bottom/right."""
        ph, pw = self.padded
        if (ph, pw) == (self.height, self.width):
            return batch
        return np.pad(batch, ((0, 0), (0, 0), (0, ph - self.height), (0, pw - self.width)), mode="edge")

    def crop(self, batch: np.ndarray) -> np.ndarray:
        return batch[..., : self.height, : self.width]


def to_network(frames: Sequence[np.ndarray], geometry: Geometry) -> np.ndarray:
    """uint8 (h, w, 3) RGB frames -> float32 (b, 3, H, W) in [0, 1], padded."""
    for f in frames:
        if f.shape != (geometry.height, geometry.width, 3) or f.dtype != np.uint8:
            raise ValueError(
                f"frame must be uint8 {geometry.height}x{geometry.width}x3 RGB, got {f.dtype} {tuple(f.shape)}"
            )
    batch = np.stack(frames).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return geometry.pad(batch)


def to_uint8_image(chw: np.ndarray) -> np.ndarray:
    """float (3, h, w) in [0, 1] -> uint8 (h, w, 3), rounded and clipped."""
    return (np.clip(chw, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


@dataclass
class FrameResult:
    """What one frame yields, in the client's pixels."""

    index: int
    restored: np.ndarray  # uint8 (h, w, 3)
    teeth_mask: np.ndarray | None  # uint8 (h, w), 0..255 probability, or None for models without masks
    homography: np.ndarray | None  # float64 (3, 3) H_{t-1->t}, identity on a stream's first frame
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # other image outputs (e.g. 'denoised')
    infer_seconds: float = 0.0


class Stream:
    """One video stream's state: explicit tensors, zeros with reset = 1 on the first frame."""

    def __init__(self, spec: ModelSpec, geometry: Geometry) -> None:
        self.spec = spec
        self.geometry = geometry
        h, w = geometry.padded
        spec.check_size(h, w)
        self.state = spec.initial_state(1, h, w)
        self.frames_done = 0
        self.needs_reset = True

    def reset(self) -> None:
        """Scene cut: the next frame starts a new stream (state from zeros, ``index`` 0)."""
        self.needs_reset = True
        self.frames_done = 0


def run_streams(backend: Backend, streams: Sequence[Stream], frames: Sequence[np.ndarray]) -> list[FrameResult]:
    """Advances every stream by its frame in one backend call; streams must share a geometry."""
    if not streams or len(streams) != len(frames):
        raise ValueError("run_streams needs one frame per stream")
    geometry = streams[0].geometry
    if any(s.geometry != geometry for s in streams):
        raise ValueError("streams batched together must share a frame size")
    spec = backend.spec
    feed: dict[str, np.ndarray] = {
        spec.frame.name: to_network(frames, geometry),
        spec.reset.name: np.array([float(s.needs_reset) for s in streams], np.float32).reshape(-1, 1, 1, 1),
    }
    for state_spec in spec.states:
        feed[state_spec.name] = np.concatenate([s.state[state_spec.name] for s in streams], axis=0)
    start = time.perf_counter()
    outputs = backend.infer(feed)
    seconds = time.perf_counter() - start
    results = []
    for i, stream in enumerate(streams):
        stream.state = {s.name: outputs[s.next_name][i : i + 1] for s in spec.states}
        results.append(_result(spec, outputs, i, stream, seconds / len(streams), first=stream.needs_reset))
        stream.needs_reset = False
        stream.frames_done += 1
    return results


def _result(
    spec: ModelSpec, outputs: dict[str, np.ndarray], i: int, stream: Stream, seconds: float, first: bool
) -> FrameResult:
    geometry = stream.geometry
    mask = None
    homography = None
    extra = {}
    for out in spec.outputs:
        value = outputs[out.name][i]
        if out.kind == "homography":
            # A stream's first frame has no predecessor: H is the identity by definition (as in the data).
            homography = np.eye(3) if first else value.astype(np.float64) / float(value[2, 2])
        elif out.name == "teeth_mask":
            mask = (np.clip(geometry.crop(value)[0], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        elif out.name != "restored":
            extra[out.name] = to_uint8_image(geometry.crop(value))
    return FrameResult(
        index=stream.frames_done,
        restored=to_uint8_image(geometry.crop(outputs["restored"][i])),
        teeth_mask=mask,
        homography=homography,
        extra=extra,
        infer_seconds=seconds,
    )
