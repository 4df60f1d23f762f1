"""``WS /v1/stream``: the live streaming protocol (docs/protocol.md is its specification).

A session runs three tasks that share nothing but the :class:`~service.session.Session`:

* the receiver reads messages: control messages are answered at once, frames are decoded (on a
  thread) and offered to the session's one-frame slot, where a newer frame replaces a waiting one;
* the inferer takes the slot's frame and awaits the shared :class:`~service.engine.InferenceEngine`
  (inference never runs on the event loop); it takes the next frame as soon as the previous one is
  inferred, so encoding and sending overlap the next inference;
* the sender encodes results (on a thread) and writes the header and the images under one lock,
  so a control reply never lands between a header and its images.

The session ends in one ``finally`` that releases it, whatever happened (Starlette's
``WebSocketEndpoint`` lifecycle): disconnect, ``close``, idle timeout, a fatal error.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import cv2
import numpy as np
from fastapi import APIRouter, WebSocket
from PIL import Image, UnidentifiedImageError

from models import list_models
from service.engine import LoadedModel, Priority
from service.metrics import Metrics
from service.session import ClientResult, PendingFrame, Session, SessionConfig, SessionLimitReached, resize
from service.settings import Settings, presented_key

logger = logging.getLogger(__name__)
router = APIRouter()

PROTOCOL_VERSION = 1

# WebSocket close codes (RFC 6455 section 7.4; 4000-4999 are ours). docs/protocol.md lists them.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # missing or wrong API key, or an Origin not in cors_origins
CLOSE_TOO_BIG = 1009  # message larger than max_message_bytes
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013  # max_sessions reached
CLOSE_UNKNOWN_MODEL = 4404
CLOSE_IDLE = 4408  # no message for idle_timeout_s
CLOSE_SEND_TIMEOUT = 4429  # the client did not take a message for send_timeout_s (it stopped reading)
CLOSE_MODEL_FAILED = 4500  # the model could not be loaded

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
_PIL_MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "YCbCr")  # what converts to RGB without guessing
_CONFIG_KEYS = ("output_format", "jpeg_quality", "outputs", "input_format", "width", "height")
# Control messages are a few hundred bytes; these bounds hold before json.loads, whose C parser
# recurses once per nesting level (``[`` x 100000 would end in a RecursionError, not a JSON error).
MAX_CONTROL_BYTES = 65536
MAX_CONTROL_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]")


class ProtocolError(Exception):
    """A problem with what the client sent; ``code`` is the machine-readable name in the error message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- frames in and out -------------------------------------------------------------------------------------------


def check_frame_size(width: int, height: int, max_side: int, max_pixels: int) -> None:
    """ProtocolError('frame_too_large') for a size over the limits; called with header sizes, before
    any pixel is decoded, because a few KB of PNG or JPEG can declare gigabytes of pixels."""
    if width > max_side or height > max_side:
        raise ProtocolError("frame_too_large", f"{width}x{height} exceeds max_frame_side {max_side}")
    if width * height > max_pixels:
        raise ProtocolError(
            "frame_too_large", f"{width}x{height} = {width * height} pixels exceeds max_frame_pixels {max_pixels}"
        )


def decode_frame(data: bytes, config: SessionConfig, max_side: int, max_pixels: int) -> np.ndarray:
    """A binary frame message -> uint8 (h, w, 3) RGB, or ProtocolError naming what is wrong."""
    if config.input_format == "rgb24":
        assert config.width is not None and config.height is not None
        expected = config.width * config.height * 3
        if len(data) != expected:
            raise ProtocolError(
                "bad_raw_size",
                f"raw RGB24 frame must be {config.width}x{config.height}x3 = {expected} bytes, got {len(data)}",
            )
        return np.frombuffer(data, np.uint8).reshape(config.height, config.width, 3).copy()
    if not (data.startswith(PNG_SIGNATURE) or data.startswith(JPEG_SIGNATURE)):
        raise ProtocolError("bad_image", f"not a JPEG or PNG image (starts with {data[:8].hex() or 'nothing'})")
    kind = "PNG" if data.startswith(PNG_SIGNATURE) else "JPEG"
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as image:  # reads the header only
            check_frame_size(image.width, image.height, max_side, max_pixels)
            if image.mode not in _PIL_MODES:
                raise ProtocolError("bad_image", f"unsupported {image.format} pixel mode {image.mode}; send 8-bit RGB")
            if kind == "PNG":
                return _decode_png(data)
            image.load()  # decodes; a truncated or corrupt file raises here
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except ProtocolError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # a header beyond Pillow's limit
        raise ProtocolError("frame_too_large", f"{exc}; max_frame_pixels is {max_pixels}") from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        raise ProtocolError("bad_image", f"truncated or corrupt {kind}: {exc}") from None


def _decode_png(data: bytes) -> np.ndarray:
    """PNG pixels through libpng (OpenCV), which refuses image data that ends before the last row.
    Pillow's PNG decoder accepts a complete file whose compressed data stops early and leaves the
    missing rows black, so a frame cut short by a client would come back partly black."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # palette, grey, alpha -> BGR, as sent
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if pixels is None:
        raise ProtocolError("bad_image", "truncated or corrupt PNG: its image data is incomplete or damaged")
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def parse_control(text: str) -> object:
    """A control message's JSON value, or ProtocolError; size and nesting are bounded before parsing."""
    if len(text) > MAX_CONTROL_BYTES or len(text.encode()) > MAX_CONTROL_BYTES:  # characters <= bytes
        raise ProtocolError("control_too_large", f"control messages are at most {MAX_CONTROL_BYTES} bytes of UTF-8")
    depth = deepest = 0
    for bracket in _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text)):  # brackets outside strings
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_CONTROL_DEPTH:
            raise ProtocolError(
                "control_too_large", f"control messages may nest at most {MAX_CONTROL_DEPTH} levels deep"
            )
    try:
        return json.loads(text)
    except ValueError:
        raise ProtocolError("not_json", f"text messages must be JSON control messages; got {text[:40]!r}") from None


def encode_image(image: np.ndarray, image_format: str, quality: int) -> bytes:
    """uint8 RGB (h, w, 3) or grey (h, w) -> JPEG or PNG bytes (PNG: fast, lossless)."""
    pixels = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if image_format == "jpeg":
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    else:
        ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"could not encode a {image.shape} image as {image_format}")
    return buf.tobytes()


@dataclass
class EncodedPart:
    name: str
    format: str
    data: bytes
    height: int
    width: int
    channels: int

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "format": self.format,
            "bytes": len(self.data),
            "width": self.width,
            "height": self.height,
            "channels": self.channels,
        }


def encode_result(result: ClientResult, config: SessionConfig) -> list[EncodedPart]:
    """The images a client asked for, at the size it sent, in ``config.outputs`` order (masks always PNG)."""
    parts = []
    height, width = result.size
    for name in config.outputs:
        image = result.images.get(name)
        if image is None:
            continue
        image = resize(image, height, width)
        image_format = "png" if image.ndim == 2 else config.image_format
        data = encode_image(image, image_format, config.jpeg_quality)
        parts.append(EncodedPart(name, image_format, data, height, width, 1 if image.ndim == 2 else 3))
    return parts


def _choice(message: dict[str, object], key: str, choices: tuple[str, ...]) -> str:
    value = message[key]
    if value not in choices:
        raise ProtocolError("bad_config", f"{key} must be one of {list(choices)}, not {value!r}")
    return str(value)


def _integer(message: dict[str, object], key: str, largest: int) -> int:
    value = message[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= largest:
        raise ProtocolError("bad_config", f"{key} must be an integer 1..{largest}, not {value!r}")
    return value


def apply_config(
    config: SessionConfig, message: dict[str, object], image_outputs: tuple[str, ...], settings: Settings
) -> SessionConfig:
    """A new SessionConfig with the message's fields applied, or ProtocolError('bad_config', ...)."""
    unknown = sorted(set(message) - {"type", *_CONFIG_KEYS})
    if unknown:
        raise ProtocolError("bad_config", f"unknown config field(s) {unknown}; known: {list(_CONFIG_KEYS)}")
    new = replace(config)
    if "output_format" in message:
        new.image_format = _choice(message, "output_format", ("jpeg", "png"))  # type: ignore[assignment]
    if "jpeg_quality" in message:
        new.jpeg_quality = _integer(message, "jpeg_quality", 100)
    if "outputs" in message:
        outputs = message["outputs"]
        if not isinstance(outputs, list) or any(o not in image_outputs for o in outputs) or "restored" not in outputs:
            raise ProtocolError(
                "bad_config", f"outputs must be a list from {list(image_outputs)} including 'restored', not {outputs!r}"
            )
        new.outputs = tuple(dict.fromkeys(outputs))
    for key in ("width", "height"):
        if key in message:
            setattr(new, key, None if message[key] is None else _integer(message, key, settings.max_frame_side))
    if "input_format" in message:
        new.input_format = _choice(message, "input_format", ("encoded", "rgb24"))  # type: ignore[assignment]
    if new.input_format == "rgb24":
        if new.width is None or new.height is None:
            raise ProtocolError("bad_config", "input_format 'rgb24' needs width and height")
        if new.width * new.height * 3 > settings.max_message_bytes:
            limit = settings.max_message_bytes
            raise ProtocolError("bad_config", f"{new.width}x{new.height} RGB24 frames exceed max_message_bytes {limit}")
        if new.width * new.height > settings.max_frame_pixels:
            limit = settings.max_frame_pixels
            raise ProtocolError("bad_config", f"{new.width}x{new.height} RGB24 frames exceed max_frame_pixels {limit}")
    return new


# --- the session -------------------------------------------------------------------------------------------------


class Connection:
    """Sends on one socket: JSON and binary messages, errors, closing; never raises for a gone client."""

    def __init__(self, websocket: WebSocket, metrics: Metrics, send_timeout_s: float) -> None:
        self.websocket = websocket
        self.metrics = metrics
        self.send_timeout_s = send_timeout_s
        self.lock = asyncio.Lock()
        self.closed = False

    async def send(self, header: dict[str, object], payloads: tuple[bytes, ...] = ()) -> bool:
        """One JSON message and the binary messages that belong to it, never interleaved with others.

        Each message must be taken within ``send_timeout_s``: a client that stops reading fills the
        socket buffers and would otherwise hold its session (its frames count as in flight, so it
        never goes idle) and the results' memory forever. Such a session is closed with 4429.
        """
        if self.closed:
            return False
        async with self.lock:
            try:
                await asyncio.wait_for(self.websocket.send_text(json.dumps(header)), self.send_timeout_s)
                for payload in payloads:
                    await asyncio.wait_for(self.websocket.send_bytes(payload), self.send_timeout_s)
            except TimeoutError:
                logger.warning("client stopped reading for %g s: closing its session", self.send_timeout_s)
                self.metrics.send_timeouts.inc()
                await self.close(CLOSE_SEND_TIMEOUT, "send_timeout")  # no error message: it would not be read
                return False
            except Exception:  # noqa: BLE001 - the client went away; the receiver sees the disconnect
                self.closed = True
                return False
        return True

    async def error(self, code: str, message: str, seq: int | None = None, fatal: bool = False) -> None:
        self.metrics.errors.labels(code).inc()
        await self.send({"type": "error", "code": code, "message": message, "seq": seq, "fatal": fatal})

    async def close(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            # bounded too: a close frame waits behind the unsent data of a client that stopped reading
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.websocket.close(code, reason[:120]), self.send_timeout_s)

    async def refuse(self, code: str, message: str, close_code: int) -> None:
        await self.error(code, message, fatal=True)
        await self.close(close_code, code)


class SessionRunner:
    def __init__(
        self, conn: Connection, session: Session, loaded: LoadedModel, settings: Settings, metrics: Metrics
    ) -> None:
        self.conn = conn
        self.session = session
        self.loaded = loaded
        self.settings = settings
        self.metrics = metrics
        self.image_outputs = tuple(o.name for o in loaded.engine.backend.spec.outputs if o.kind == "map")
        self.results: asyncio.Queue[tuple[PendingFrame, ClientResult, float, float] | None] = asyncio.Queue(1)

    async def run(self) -> None:
        receiver = asyncio.create_task(self._receive())
        workers = [asyncio.create_task(self._infer()), asyncio.create_task(self._send())]
        try:
            done, _ = await asyncio.wait([receiver, *workers], return_when=asyncio.FIRST_COMPLETED)
            if receiver in done and receiver.result() == "close":
                self.session.slot.close()  # finish the frame in flight and the pending one, then say goodbye
                await asyncio.gather(*workers)
                s = self.session
                bye = {"type": "bye", "received": s.received, "processed": s.processed, "dropped": s.dropped}
                await self.conn.send({**bye, "errors": s.errors})
                await self.conn.close(CLOSE_NORMAL, "bye")
            elif receiver not in done:
                # a worker ended first: a bug (it raised), or the client vanished while we were sending
                for task in done:
                    if task.exception() is not None:
                        logger.error("session %s failed", self.session.id, exc_info=task.exception())
                        await self.conn.refuse("internal", f"server error: {task.exception()}", CLOSE_INTERNAL)
                        break
        finally:
            for task in (receiver, *workers):
                task.cancel()
            await asyncio.gather(receiver, *workers, return_exceptions=True)

    async def _receive(self) -> str:
        """Reads until the client leaves ('disconnected'), asks to close ('close') or the session ends ('ended')."""
        ws = self.conn.websocket
        idle = self.settings.idle_timeout_s
        receiving: asyncio.Future[dict] | None = None
        try:
            while True:
                receiving = receiving or asyncio.ensure_future(ws.receive())
                # idle = no message from the client and no result to it for idle_timeout_s
                remaining = self.session.last_activity + idle - time.monotonic()
                done, _ = await asyncio.wait([receiving], timeout=max(0.0, remaining))
                if not done:
                    if self.session.busy:
                        self.session.touch()  # frames are waiting or in inference: the session is not idle
                    if time.monotonic() - self.session.last_activity < idle:
                        continue
                    await self.conn.refuse("idle_timeout", f"nothing received or sent for {idle:g} s", CLOSE_IDLE)
                    return "ended"
                message, receiving = receiving.result(), None
                if message["type"] == "websocket.disconnect":
                    return "disconnected"
                self.session.touch()
                if message.get("bytes") is not None:
                    if not await self._frame(message["bytes"]):
                        return "ended"
                elif await self._control(message.get("text") or "") == "close":
                    return "close"
                if self.conn.closed:  # a reply could not be sent (send_timeout): the session is over
                    return "ended"
        finally:
            if receiving is not None:
                receiving.cancel()

    async def _error(self, code: str, message: str, seq: int | None = None) -> None:
        """A non-fatal error: the session goes on."""
        self.session.errors += 1
        await self.conn.error(code, message, seq)

    async def _frame(self, data: bytes) -> bool:
        session = self.session
        received_at = time.perf_counter()
        seq = session.next_seq()
        self.metrics.frames_received.labels(session.model).inc()
        if len(data) > self.settings.max_message_bytes:
            await self.conn.error(
                "message_too_big", f"{len(data)} bytes > max_message_bytes {self.settings.max_message_bytes}", seq, True
            )
            await self.conn.close(CLOSE_TOO_BIG, "message_too_big")
            return False
        try:
            s = self.settings
            image = await asyncio.to_thread(decode_frame, data, session.config, s.max_frame_side, s.max_frame_pixels)
        except ProtocolError as exc:
            await self._error(exc.code, exc.message, seq)
            return True
        frame = PendingFrame(seq, image, received_at, time.perf_counter() - received_at)
        self.metrics.stage_seconds.labels("decode").observe(frame.decode_seconds)
        if session.offer(frame) is not None:
            self.metrics.frames_dropped.labels(session.model).inc()
        return True

    async def _control(self, text: str) -> str | None:
        session = self.session
        try:
            message = parse_control(text)
        except ProtocolError as exc:
            await self._error(exc.code, exc.message)
            return None
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "config":
            try:
                session.config = apply_config(session.config, message, self.image_outputs, self.settings)
            except ProtocolError as exc:
                await self._error(exc.code, exc.message)
                return None
            await self.conn.send({"type": "config_ok", "config": session.config.as_dict()})
        elif kind == "reset":
            session.reset_requested = True
            await self.conn.send({"type": "reset_ok", "next_seq": session.received})
        elif kind == "ping":
            await self.conn.send({"type": "pong", "data": message.get("data")})
        elif kind == "close":
            return "close"
        else:
            known = "config, reset, ping, close"
            await self._error("unknown_type", f"unknown control message type {kind!r}; known: {known}")
        return None

    async def _infer(self) -> None:
        session, engine = self.session, self.loaded.engine
        min_interval = 1.0 / self.settings.fps_cap if self.settings.fps_cap > 0 else 0.0
        last_start = -float("inf")
        while True:
            if min_interval:  # newer frames keep replacing the pending one while we wait
                await asyncio.sleep(max(0.0, last_start + min_interval - time.perf_counter()))
            frame = await session.slot.take()
            if frame is None:
                break
            last_start = time.perf_counter()
            session.in_flight += 1
            stream, network_frame = session.stream_for(frame, engine.backend.spec)
            try:
                result = await engine.run(stream, network_frame, Priority.LIVE)
            except Exception as exc:  # noqa: BLE001 - the backend failed on this frame; the session survives
                logger.exception("session %s: inference failed on frame %d", session.id, frame.seq)
                session.stream = None  # its state may be half-updated: the next frame starts a new stream
                session.in_flight -= 1
                await self._error("inference_failed", f"inference failed: {exc}", frame.seq)
                continue
            waited = time.perf_counter() - frame.received_at - frame.decode_seconds - result.infer_seconds
            await self.results.put((frame, session.to_client(frame, result), max(0.0, waited), result.infer_seconds))
        await self.results.put(None)

    async def _send(self) -> None:
        session, stages = self.session, self.metrics.stage_seconds
        while (item := await self.results.get()) is not None:
            frame, result, waited, inferred = item
            config = session.config
            start = time.perf_counter()
            parts = await asyncio.to_thread(encode_result, result, config)
            encoded = time.perf_counter() - start
            total = time.perf_counter() - frame.received_at
            h = result.homography
            header = {
                "type": "result",
                "seq": result.seq,
                "index": result.index,
                "prev_seq": result.prev_seq,
                "width": result.size[1],
                "height": result.size[0],
                "session_width": result.session_size[1],
                "session_height": result.session_size[0],
                "resized": result.resized,
                "homography": None if h is None else h.tolist(),
                "received": session.received,
                "processed": session.processed,
                "dropped": session.dropped,
                "timings_ms": {
                    "decode": round(frame.decode_seconds * 1e3, 3),
                    "wait": round(waited * 1e3, 3),
                    "infer": round(inferred * 1e3, 3),
                    "encode": round(encoded * 1e3, 3),
                    "total": round(total * 1e3, 3),
                },
                "parts": [p.describe() for p in parts],
            }
            sent = await self.conn.send(header, tuple(p.data for p in parts))
            session.in_flight -= 1
            session.touch()
            if not sent:
                return
            for stage, seconds in (("wait", waited), ("infer", inferred), ("encode", encoded), ("total", total)):
                stages.labels(stage).observe(seconds)
            self.metrics.frames_processed.labels(session.model).inc()


def origin_allowed(origin: str, host: str | None, cors_origins: list[str]) -> bool:
    """Whether a browser page from ``origin`` may open a session.

    Browsers send any page's WebSockets with its Origin and apply no CORS to them, so the check that
    CORS makes for HTTP happens here: with ``cors_origins`` set, only those origins and the server's
    own pages (the demo) may connect; without it, every origin may. Clients that are not
    browsers send no Origin and are not affected (they are what the API key is for).
    """
    if not cors_origins or "*" in cors_origins or origin in cors_origins:
        return True
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # not a URL (e.g. a broken IPv6 literal)
        return False
    return host is not None and bool(netloc) and netloc.lower() == host.lower()


def model_problem(name: str, settings: Settings) -> str | None:
    """Why a client may not stream with ``name``, or None."""
    registered = list_models(include_tiny=True)
    if name not in registered:
        return f"unknown model {name!r}; registered: {', '.join(registered)}"
    allowed = settings.allowed_models
    if allowed and name not in allowed and name != settings.model:
        return f"model {name!r} is not served here; allowed: {', '.join(sorted({*allowed, settings.model}))}"
    return None


@router.websocket("/v1/stream")
async def stream_socket(websocket: WebSocket) -> None:
    """One live session; see docs/protocol.md. Query: ``model`` (default: the server's), ``api_key``."""
    state = websocket.app.state
    settings: Settings = state.settings
    metrics: Metrics = state.metrics
    await websocket.accept()  # accept first so that every refusal can carry a close code and an error message
    conn = Connection(websocket, metrics, settings.send_timeout_s)
    origin = websocket.headers.get("origin")
    if origin is not None and not origin_allowed(origin, websocket.headers.get("host"), settings.cors_origins):
        metrics.sessions_refused.labels("origin_not_allowed").inc()
        message = f"origin {origin[:100]!r} is not allowed here (VIDENT_CORS_ORIGINS)"
        await conn.refuse("origin_not_allowed", message, CLOSE_POLICY)
        return
    if not settings.key_matches(presented_key(websocket)):
        metrics.sessions_refused.labels("unauthorized").inc()
        await conn.refuse("unauthorized", "missing or wrong API key (X-API-Key header or api_key query)", CLOSE_POLICY)
        return
    model = websocket.query_params.get("model") or settings.model
    problem = model_problem(model, settings)
    if problem is not None:
        metrics.sessions_refused.labels("unknown_model").inc()
        await conn.refuse("unknown_model", problem, CLOSE_UNKNOWN_MODEL)
        return
    client = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "?"
    try:
        session = state.sessions.open(model, client, SessionConfig(jpeg_quality=settings.default_jpeg_quality))
    except SessionLimitReached as exc:
        metrics.sessions_refused.labels("too_many_sessions").inc()
        await conn.refuse("too_many_sessions", str(exc), CLOSE_TRY_LATER)
        return
    metrics.sessions.labels(model).inc()
    metrics.sessions_opened.labels(model).inc()
    logger.info("session %s opened: %s, model %s", session.id, client, model)
    try:
        try:
            await state.pool.get(model)
            loaded = state.pool.models[model]
        except Exception as exc:  # noqa: BLE001 - a model that cannot load must not take the server down
            logger.exception("model %s failed to load", model)
            await conn.refuse("model_unavailable", f"model {model} could not be loaded: {exc}", CLOSE_MODEL_FAILED)
            return
        runner = SessionRunner(conn, session, loaded, settings, metrics)
        session.config.outputs = runner.image_outputs
        await conn.send(hello_message(session, loaded, settings))
        await runner.run()
    finally:
        state.sessions.close(session)
        metrics.sessions.labels(model).dec()
        await conn.close(CLOSE_GOING_AWAY, "session ended")
        logger.info(
            "session %s closed: %d received, %d processed, %d dropped, %d errors",
            session.id, session.received, session.processed, session.dropped, session.errors,
        )  # fmt: skip


def hello_message(session: Session, loaded: LoadedModel, settings: Settings) -> dict[str, object]:
    spec = loaded.engine.backend.spec
    return {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "session": session.id,
        "model": session.model,
        "backend": {"name": loaded.info.name, "device": loaded.info.device, "precision": loaded.info.precision},
        "random_weights": loaded.random_weights,
        "image_outputs": [o.name for o in spec.outputs if o.kind == "map"],
        "homography": any(o.kind == "homography" for o in spec.outputs),
        "config": session.config.as_dict(),
        "limits": {
            "max_message_bytes": settings.max_message_bytes,
            "max_frame_side": settings.max_frame_side,
            "max_frame_pixels": settings.max_frame_pixels,
            "idle_timeout_s": settings.idle_timeout_s,
            "send_timeout_s": settings.send_timeout_s,
            "fps_cap": settings.fps_cap,
            "max_sessions": settings.max_sessions,
        },
    }
