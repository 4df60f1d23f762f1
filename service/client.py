"""Python client for ``WS /v1/stream`` (asyncio, the ``websockets`` package), and ``vident stream``'s engine.

:class:`StreamClient` speaks the protocol of docs/protocol.md: it connects, reads ``hello``, sets
output options, sends frames and yields :class:`Result` objects (header + encoded images). Sending
and receiving are independent, so a caller can pace frames by the clock (``realtime``) or keep a
fixed number in flight (``fast``): with two in flight the server always has the next frame ready
when it finishes one, and - since it takes that frame before sending the previous result - never
drops a frame of a client that waits for a result before sending another one.

:func:`stream_source` streams a video file (PyAV), a folder of frames, or a camera (OpenCV) and
saves restored frames, masks and homographies. When the server goes away mid-stream (behind a load
balancer: its replica died or restarted) it connects again with back-off (:class:`Reconnect`), starts a
new stream on whichever replica it reaches, and counts the frames that were lost with the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import cv2
import numpy as np
import websockets

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
# Refusals worth another try, perhaps on another replica: the server is full (close code 1013).
RETRYABLE_CODES = frozenset({"too_many_sessions"})
_SUFFIX = {"jpeg": ".jpg", "png": ".png"}


class ServerError(RuntimeError):
    """An ``error`` message from the server (``code`` as in docs/protocol.md)."""

    def __init__(self, message: dict[str, object]) -> None:
        super().__init__(f"{message.get('code')}: {message.get('message')}")
        self.code = str(message.get("code"))
        self.seq = message.get("seq")
        self.fatal = bool(message.get("fatal"))


@dataclass
class Result:
    """One processed frame: the JSON header and its images, still encoded (bytes as the server sent them)."""

    header: dict[str, object]
    images: dict[str, bytes]
    latency_s: float | None = None  # client-measured: frame sent -> last image received

    @property
    def seq(self) -> int:
        return int(self.header["seq"])  # type: ignore[arg-type]

    @property
    def homography(self) -> np.ndarray | None:
        h = self.header.get("homography")
        return None if h is None else np.asarray(h, np.float64)

    def decode(self, name: str = "restored") -> np.ndarray:
        """An image part as uint8 RGB (h, w, 3) or grey (h, w)."""
        pixels = cv2.imdecode(np.frombuffer(self.images[name], np.uint8), cv2.IMREAD_UNCHANGED)
        return pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def with_query(url: str, **params: str | None) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode({k: v for k, v in params.items() if v})) if q)
    return urlunsplit(parts._replace(query=query))


def encode_frame(rgb: np.ndarray, image_format: str = "jpeg", quality: int = 95) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if image_format == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode(_SUFFIX[image_format], bgr, params)
    if not ok:
        raise ValueError(f"could not encode a {rgb.shape} frame as {image_format}")
    return buf.tobytes()


class StreamClient:
    """``async with StreamClient(url) as client``: one session. ``url`` is ws://host:port/v1/stream."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        output_format: str = "jpeg",
        jpeg_quality: int = 90,
        outputs: list[str] | None = None,
    ) -> None:
        self.url = with_query(url, model=model)
        self.api_key = api_key
        self.options: dict[str, object] = {"output_format": output_format, "jpeg_quality": jpeg_quality}
        if outputs is not None:
            self.options["outputs"] = outputs
        self.hello: dict[str, object] = {}
        self.served_by: str | None = None  # the X-Served-By header a load balancer adds (deploy/haproxy.cfg)
        self.sent = 0
        self._sent_at: dict[int, float] = {}
        self._ws: websockets.ClientConnection | None = None

    async def __aenter__(self) -> StreamClient:
        headers = {"X-API-Key": self.api_key} if self.api_key else None
        self._ws = await websockets.connect(self.url, additional_headers=headers, max_size=None, open_timeout=120)
        if self._ws.response is not None:
            self.served_by = self._ws.response.headers.get("X-Served-By")
        self.hello = await self._control_reply("hello")
        await self.configure(**self.options)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._ws is not None:
            await self._ws.close()

    @property
    def ws(self) -> websockets.ClientConnection:
        if self._ws is None:
            raise RuntimeError("not connected: use 'async with StreamClient(...)'")
        return self._ws

    async def _control_reply(self, kind: str) -> dict[str, object]:
        """Reads until the message of type ``kind``; call only while no frames are in flight."""
        while True:
            message = await self.ws.recv()
            if isinstance(message, bytes):
                continue
            parsed = json.loads(message)
            if parsed.get("type") == "error":
                raise ServerError(parsed)
            if parsed.get("type") == kind:
                return parsed

    async def configure(self, **options: object) -> dict[str, object]:
        """Sends a ``config`` message and returns the effective configuration (no frames may be in flight)."""
        await self.ws.send(json.dumps({"type": "config", **options}))
        return (await self._control_reply("config_ok"))["config"]  # type: ignore[return-value]

    async def send_frame(self, frame: bytes | np.ndarray, image_format: str = "jpeg", quality: int = 95) -> int:
        """Sends one frame (encoded bytes, or RGB uint8 to encode here); returns its ``seq``."""
        data = frame if isinstance(frame, bytes) else encode_frame(frame, image_format, quality)
        seq = self.sent
        self._sent_at[seq] = time.perf_counter()
        await self.ws.send(data)
        self.sent += 1
        return seq

    async def reset(self) -> None:
        await self.ws.send(json.dumps({"type": "reset"}))

    async def close(self) -> None:
        """Asks the server to finish pending frames, send ``bye`` and close (read it from ``messages``)."""
        await self.ws.send(json.dumps({"type": "close"}))

    async def messages(self) -> AsyncIterator[Result | ServerError | dict[str, object]]:
        """Every server message until the socket closes: Result, ServerError (not raised), or control dicts."""
        try:
            while True:
                message = await self.ws.recv()
                if isinstance(message, bytes):
                    raise RuntimeError("protocol error: a binary message without a result header")
                header = json.loads(message)
                kind = header.get("type")
                if kind == "result":
                    images = {}
                    for part in header["parts"]:
                        data = await self.ws.recv()
                        if not isinstance(data, bytes) or len(data) != part["bytes"]:
                            raise RuntimeError(f"protocol error: expected {part['bytes']} bytes for {part['name']}")
                        images[part["name"]] = data
                    sent_at = self._sent_at.pop(header["seq"], None)
                    self._forget_before(header["seq"])
                    latency = None if sent_at is None else time.perf_counter() - sent_at
                    yield Result(header, images, latency)
                elif kind == "error":
                    yield ServerError(header)
                else:
                    yield header
        except websockets.ConnectionClosed:
            return

    def _forget_before(self, seq: int) -> None:
        # frames older than a result were dropped by the server (newest wins): stop tracking them
        for old in [s for s in self._sent_at if s < seq]:
            del self._sent_at[old]


# --- sources -----------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """Frames (encoded bytes, or RGB uint8 arrays) and the rate they were recorded at."""

    frames: Iterator[bytes | np.ndarray]
    fps: float
    description: str


def open_source(source: str, fps: float | None = None) -> Source:
    """A folder of PNG/JPEG frames (sent as they are), a video file (PyAV) or a camera index (OpenCV)."""
    path = Path(source)
    if source.isdigit() and not path.exists():
        return _camera(int(source), fps)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(FRAME_SUFFIXES)} frames")
        return Source((p.read_bytes() for p in files), fps or 25.0, f"{len(files)} frames in {path}")
    if path.is_file():
        return _video(path, fps)
    raise FileNotFoundError(f"{source}: not a folder, a video file or a camera index")


def _video(path: Path, fps: float | None) -> Source:
    """The service's own decoder (``service.video``), so a phone clip streams upright as jobs see it."""
    from service.video import open_video

    source = open_video(path)
    info = source.info
    rate = fps or float(info.fps or 25)

    def frames() -> Iterator[np.ndarray]:
        with source:
            for frame in source:
                yield frame.rgb

    turned = f", turned {info.rotation} degrees upright" if info.rotation else ""
    return Source(frames(), rate, f"{path} ({info.codec}, {info.width}x{info.height}{turned}, {rate:g} fps)")


def _camera(index: int, fps: float | None) -> Source:
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        raise FileNotFoundError(f"camera {index} could not be opened")
    rate = fps or capture.get(cv2.CAP_PROP_FPS) or 30.0

    def frames() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    return
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    return Source(frames(), rate, f"camera {index} ({rate:g} fps)")


# --- streaming a source to a folder ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reconnect:
    """What :func:`stream_source` does when the connection breaks mid-stream or a connect fails: wait
    ``first_delay_s``, doubling up to ``max_delay_s``, at most ``attempts`` times in a row, then give up.
    Behind a load balancer the next connection reaches a live replica, where a new stream starts (a new
    session: the model's state starts over, as after a ``reset``)."""

    attempts: int = 8
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delays(self) -> Iterator[float]:
        delay = self.first_delay_s
        for _ in range(self.attempts):
            yield delay
            delay = min(2 * delay, self.max_delay_s)


@dataclass
class ConnectionSummary:
    """One connection (one session on one server) of a stream."""

    server: str | None  # X-Served-By of the load balancer, if any
    session: object = None  # the server's session id
    sent: int = 0
    processed: int = 0
    dropped: int = 0
    errors: int = 0  # errors about single frames
    lost: int = 0  # sent, then the connection broke before the server answered for them
    ended: str = "open"  # bye | broken | fatal error


@dataclass
class StreamSummary:
    sent: int = 0
    processed: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    reconnects: int = 0
    lost: int = 0
    connections: list[ConnectionSummary] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def latency_percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def as_dict(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "processed": self.processed,
            "dropped": self.dropped,
            "lost": self.lost,
            "reconnects": self.reconnects,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "fps": round(self.fps, 3),
            "latency_ms": {f"p{q}": self.latency_percentile(q) for q in (50, 95, 99)},
            "connections": [asdict(c) for c in self.connections],
        }


async def stream_source(
    source: Source,
    url: str,
    out_dir: Path | None,
    realtime: bool = False,
    in_flight: int = 2,
    max_frames: int | None = None,
    frame_format: str = "jpeg",
    progress: bool = True,
    reconnect: Reconnect | None = Reconnect(),
    **client_options: object,
) -> StreamSummary:
    """Streams ``source`` and saves results under ``out_dir`` (restored/, teeth_mask/, homographies.json).

    ``realtime``: send at the source's frame rate whatever comes back (the server drops stale frames);
    otherwise as fast as possible with at most ``in_flight`` frames unanswered. ``reconnect``: what to do
    when the server goes away (None: fail). Frames are numbered across connections, so saved files and
    homographies keep the source's order; the first frame on a new connection starts a new stream.
    """
    summary = StreamSummary()
    homographies: list[dict[str, object]] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    frames = itertools.islice(source.frames, max_frames)
    pace = _Pace(1.0 / source.fps if realtime else 0.0)
    hello: dict[str, object] = {}
    unsent: list[bytes | np.ndarray] = []  # a frame whose send failed goes first on the next connection
    while True:
        client = await _connect(url, client_options, reconnect, progress)
        hello = client.hello
        connection = ConnectionSummary(client.served_by, client.hello.get("session"))
        summary.connections.append(connection)
        try:
            finished = await _stream_connection(
                client, connection, frames, unsent, summary, homographies, out_dir, pace, in_flight, frame_format,
                progress,
            )  # fmt: skip
        finally:
            await client.__aexit__(None, None, None)
        if finished or reconnect is None:
            break
        summary.reconnects += 1
        pace.restart(summary.sent)
        if progress:
            print(f"\nconnection lost ({connection.lost} frame(s) unanswered); reconnecting", file=sys.stderr)
    summary.seconds = time.perf_counter() - pace.start
    if progress:
        _print_progress(summary, summary.seconds, end="\n")
    if out_dir is not None:
        (out_dir / "homographies.json").write_text(json.dumps(homographies, indent=1))
        (out_dir / "summary.json").write_text(json.dumps({**summary.as_dict(), "server": hello}, indent=1))
    return summary


class _Pace:
    """Real-time pacing: frame n leaves at ``start + n * interval``; after a reconnection the clock restarts
    from the next frame, so the frames of the outage are not sent in a burst."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.start = time.perf_counter()
        self._origin = self.start

    def restart(self, sent: int) -> None:
        self._origin = time.perf_counter() - sent * self.interval

    async def wait(self, sent: int) -> None:
        if self.interval:
            await asyncio.sleep(max(0.0, self._origin + sent * self.interval - time.perf_counter()))


async def _connect(
    url: str, options: dict[str, object], reconnect: Reconnect | None, progress: bool
) -> StreamClient:
    """A connected client, trying again with back-off when the server is unreachable, refuses the handshake
    (a balancer with no live replica answers 503) or is full. Raises ConnectionError or ServerError."""
    delays = reconnect.delays() if reconnect is not None else iter(())
    while True:
        client = StreamClient(url, **options)  # type: ignore[arg-type]
        try:
            return await client.__aenter__()
        except ServerError as exc:
            await client.__aexit__(None, None, None)
            if exc.code not in RETRYABLE_CODES:
                raise
            problem: Exception = exc
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed) as exc:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            problem = exc
        delay = next(delays, None)
        if delay is None:
            if isinstance(problem, ServerError):
                raise problem
            raise ConnectionError(f"could not stream to {url}: {problem}") from problem
        if progress:
            print(f"\n{url}: {problem}; trying again in {delay:g} s", file=sys.stderr)
        await asyncio.sleep(delay)


async def _stream_connection(
    client: StreamClient,
    connection: ConnectionSummary,
    frames: Iterator[bytes | np.ndarray],
    unsent: list[bytes | np.ndarray],
    summary: StreamSummary,
    homographies: list[dict[str, object]],
    out_dir: Path | None,
    pace: _Pace,
    in_flight: int,
    frame_format: str,
    progress: bool,
) -> bool:
    """Streams frames over one connection; True when the stream is over (the source ended and the server
    said bye, or a fatal error), False when the connection broke with frames left to send."""
    offset = summary.sent  # frames before this connection: seq + offset numbers frames across connections
    dropped_before = summary.dropped
    answered = asyncio.Condition()
    done_count = 0  # results + errors about frames + frames the server reported dropped
    outcome = "broken"

    async def receive() -> None:
        nonlocal done_count, outcome
        async for message in client.messages():
            if isinstance(message, Result):
                summary.processed += 1
                connection.processed += 1
                connection.dropped = int(message.header["dropped"])  # type: ignore[arg-type]
                summary.dropped = dropped_before + connection.dropped
                if message.latency_s is not None:
                    summary.latencies_ms.append(message.latency_s * 1e3)
                if out_dir is not None:
                    _save(out_dir, message, homographies, offset)
            elif isinstance(message, ServerError):
                summary.errors.append(str(message))
                connection.errors += message.seq is not None
                if message.fatal:
                    outcome = "fatal error"
                    break
            elif message.get("type") == "bye":
                outcome = "bye"
                break
            async with answered:
                done_count = connection.processed + connection.dropped + connection.errors
                answered.notify_all()
        async with answered:
            done_count = 1 << 62  # the socket is gone: release the sender
            answered.notify_all()

    receiver = asyncio.create_task(receive())
    last_print = time.perf_counter()
    source_ended = False
    try:
        while not receiver.done():
            frame = unsent.pop() if unsent else await asyncio.to_thread(next, frames, None)
            if frame is None:
                source_ended = True
                break
            if pace.interval:
                await pace.wait(summary.sent)
            else:
                async with answered:
                    await answered.wait_for(lambda: client.sent - done_count < in_flight)
            try:
                await client.send_frame(frame, frame_format)
            except websockets.ConnectionClosed:
                unsent.append(frame)
                break
            summary.sent += 1
            connection.sent += 1
            if progress and time.perf_counter() - last_print >= 1.0:
                last_print = time.perf_counter()
                _print_progress(summary, last_print - pace.start)
        if source_ended and not receiver.done():
            with contextlib.suppress(websockets.ConnectionClosed):
                await client.close()
        await asyncio.wait_for(receiver, timeout=120)
    finally:
        receiver.cancel()
    connection.ended = outcome
    if outcome != "bye":
        connection.lost = max(0, connection.sent - connection.processed - connection.dropped - connection.errors)
        summary.lost += connection.lost
    # Over: the server said bye, a fatal error (reconnecting would repeat it), or nothing is left to send.
    return outcome != "broken" or (source_ended and not unsent)


def _save(out_dir: Path, result: Result, homographies: list[dict[str, object]], offset: int = 0) -> None:
    """Files and homographies numbered by the frame's place in the source (``seq`` + frames sent on earlier
    connections), so a stream that reconnected still saves one numbered sequence."""
    number = result.seq + offset
    for part in result.header["parts"]:  # type: ignore[union-attr]
        folder = out_dir / part["name"]
        folder.mkdir(exist_ok=True)
        (folder / f"{number:06d}{_SUFFIX[part['format']]}").write_bytes(result.images[part["name"]])
    h = result.header
    prev_seq = h["prev_seq"]
    homographies.append(
        {"seq": number, "index": h["index"], "prev_seq": None if prev_seq is None else prev_seq + offset,  # type: ignore[operator]
         "homography": h["homography"]}
    )  # fmt: skip


def _print_progress(summary: StreamSummary, seconds: float, end: str = "\r") -> None:
    fps = summary.processed / seconds if seconds > 0 else 0.0
    p50 = summary.latency_percentile(50)
    latency = f"{p50:.0f} ms" if p50 is not None else "-"
    counts = f"sent {summary.sent}  processed {summary.processed}  dropped {summary.dropped}"
    if summary.lost:
        counts += f"  lost {summary.lost}"
    line = f"{counts}  {fps:.1f} FPS  latency p50 {latency}"
    print(line.ljust(78), end=end, file=sys.stderr, flush=True)
