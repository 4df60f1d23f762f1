"""Streaming sessions: one WebSocket connection = one :class:`Session` with its own recurrent state.

The :class:`SessionManager` owns every open session and enforces the caps (how many at once, how
long idle); the WebSocket endpoint (:mod:`service.ws.endpoint`) only moves messages. A session holds at most
one frame waiting for inference (:class:`FrameSlot`): when a newer frame arrives first, the older
one is dropped and counted, so a client that sends faster than the model runs sees bounded latency
and no queue ever grows (Holoscan's "newest wins" queue policy).

Frames whose size differs from the session's first frame are resized to the session size for the
network and the outputs are resized back, with the homography rescaled, so every result is in the
pixels of the frame the client sent (see docs/protocol.md, "Frame sizes").
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from models.spec import ModelSpec
from service.memory import release_free_memory
from service.pipeline import FrameResult, Geometry, Stream

ImageFormat = Literal["jpeg", "png"]
InputFormat = Literal["encoded", "rgb24"]


class SessionLimitReached(RuntimeError):
    """``max_sessions`` sessions are open; the client should retry later (close code 1013)."""


@dataclass
class SessionConfig:
    """Options a client sets with ``config`` messages; they apply to frames received afterwards."""

    image_format: ImageFormat = "jpeg"
    jpeg_quality: int = 90
    outputs: tuple[str, ...] = ()  # image outputs to send, in this order; set from the model at open
    input_format: InputFormat = "encoded"
    width: int | None = None  # rgb24 frame size, declared before raw frames
    height: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "output_format": self.image_format,
            "jpeg_quality": self.jpeg_quality,
            "outputs": list(self.outputs),
            "input_format": self.input_format,
            "width": self.width,
            "height": self.height,
        }


@dataclass
class PendingFrame:
    """A decoded frame waiting for inference, as the client sent it."""

    seq: int
    image: np.ndarray  # uint8 (h, w, 3) RGB
    received_at: float  # perf_counter when its message arrived
    decode_seconds: float
    reset: bool = False  # a reset was requested after the previous frame and before this one


class FrameSlot:
    """Holds at most one pending frame; ``offer`` replaces (drops) a frame that has not started."""

    def __init__(self) -> None:
        self._frame: PendingFrame | None = None
        self._ready = asyncio.Event()
        self.closed = False

    def offer(self, frame: PendingFrame) -> PendingFrame | None:
        """Stores ``frame``; returns the frame it replaced (now dropped), if any."""
        dropped, self._frame = self._frame, frame
        if dropped is not None and dropped.reset:
            frame.reset = True  # the reset the dropped frame carried still has to happen
        self._ready.set()
        return dropped

    @property
    def pending(self) -> bool:
        return self._frame is not None

    def take_nowait(self) -> PendingFrame | None:
        frame, self._frame = self._frame, None
        self._ready.clear()
        return frame

    async def take(self) -> PendingFrame | None:
        """The pending frame, waiting for one; None once closed and empty."""
        while self._frame is None and not self.closed:
            await self._ready.wait()
            self._ready.clear()
        return self.take_nowait()

    def close(self) -> None:
        """No more frames: ``take`` returns what is pending, then None."""
        self.closed = True
        self._ready.set()


@dataclass(eq=False)
class Session:
    """The state of one connection. Only the session's own tasks touch it, all on the event loop."""

    id: str
    model: str
    client: str
    config: SessionConfig
    opened_at: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    slot: FrameSlot = field(default_factory=FrameSlot)
    stream: Stream | None = None
    received: int = 0  # binary frame messages so far (the next frame's seq)
    processed: int = 0
    dropped: int = 0
    errors: int = 0
    reset_requested: bool = False
    prev_seq: int | None = None  # seq of the last frame the network saw in the current stream
    prev_size: tuple[int, int] | None = None  # its (height, width) as the client sent it
    in_flight: int = 0  # frames taken for inference whose result is not sent yet

    @property
    def busy(self) -> bool:
        """Frames are waiting or being worked on: the session is not idle, whatever the client does."""
        return self.in_flight > 0 or self.slot.pending

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def next_seq(self) -> int:
        seq = self.received
        self.received += 1
        return seq

    def offer(self, frame: PendingFrame) -> PendingFrame | None:
        """Queues a decoded frame (newest wins); returns the frame dropped to make room, if any."""
        frame.reset = frame.reset or self.reset_requested
        self.reset_requested = False
        dropped = self.slot.offer(frame)
        if dropped is not None:
            self.dropped += 1
        return dropped

    def stream_for(self, frame: PendingFrame, spec: ModelSpec) -> tuple[Stream, np.ndarray]:
        """The stream that processes ``frame`` and the frame at the stream's size.

        The first frame (and the first after a reset) fixes the session size; later frames of
        another size are resized to it (area filter when shrinking, bilinear when enlarging).
        """
        h, w = frame.image.shape[:2]
        if self.stream is None or (frame.reset and self.stream.geometry != Geometry(h, w)):
            self.stream = Stream(spec, Geometry(h, w))
            self.prev_seq = self.prev_size = None
        elif frame.reset:
            self.stream.reset()
            self.prev_seq = self.prev_size = None
        g = self.stream.geometry
        return self.stream, resize(frame.image, g.height, g.width)

    def to_client(self, frame: PendingFrame, result: FrameResult) -> ClientResult:
        """``result`` (at the session size) with its homography in the pixels of the frames as the client
        sent them; the images are resized back to the client's size when they are encoded (off the loop)."""
        assert self.stream is not None
        g = self.stream.geometry
        size = frame.image.shape[:2]
        homography = result.homography
        if homography is not None and self.prev_size is not None:
            homography = client_homography(homography, (g.height, g.width), self.prev_size, size)
        images = {"restored": result.restored}
        if result.teeth_mask is not None:
            images["teeth_mask"] = result.teeth_mask
        images.update(result.extra)
        prev_seq = self.prev_seq
        self.prev_seq, self.prev_size = frame.seq, size
        self.processed += 1
        return ClientResult(frame.seq, result.index, prev_seq, homography, images, size, (g.height, g.width))


@dataclass
class ClientResult:
    seq: int
    index: int  # frames since the stream (re)started; 0 = first frame, identity homography
    prev_seq: int | None  # the frame the homography maps from
    homography: np.ndarray | None  # float64 (3, 3) in client pixels
    images: dict[str, np.ndarray]  # name -> uint8 (H, W, 3) or (H, W) at the session size
    size: tuple[int, int]  # (height, width) of the frame as the client sent it
    session_size: tuple[int, int]

    @property
    def resized(self) -> bool:
        return self.size != self.session_size


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    shrink = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def client_homography(
    h_session: np.ndarray, session: tuple[int, int], prev: tuple[int, int], cur: tuple[int, int]
) -> np.ndarray:
    """H between two client frames from H between their session-size versions.

    With the pixel convention of :mod:`models.layers` (image spans [0, W] x [0, H]) a resize is exactly
    S = diag(w / W, h / H, 1), so H_client = S_cur H S_prev^-1.
    """
    sh, sw = session

    def scale(size: tuple[int, int]) -> np.ndarray:
        return np.diag([size[1] / sw, size[0] / sh, 1.0])

    if prev == session and cur == session:
        return h_session
    mapped = scale(cur) @ h_session @ np.linalg.inv(scale(prev))
    return mapped / mapped[2, 2]


class SessionManager:
    """Every open session; refuses new ones beyond ``max_sessions`` and knows the idle timeout."""

    def __init__(self, max_sessions: int, idle_timeout_s: float) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, Session] = {}

    @property
    def count(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def open(self, model: str, client: str, config: SessionConfig) -> Session:
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitReached(f"{self.max_sessions} sessions open (the maximum); try again later")
        session = Session(secrets.token_urlsafe(9), model, client, config)
        self._sessions[session.id] = session
        return session

    def close(self, session: Session) -> None:
        """Forgets the session and its state (idempotent); its stream's tensors go with it."""
        session.slot.close()
        session.stream = None
        if self._sessions.pop(session.id, None) is not None and not self._sessions:
            release_free_memory()
