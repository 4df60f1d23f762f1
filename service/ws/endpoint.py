"""``WS /v1/stream``: the route and the lifecycle of one live session (docs/protocol.md is the protocol).

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
import enum
import json
import logging
import time
from urllib.parse import urlsplit

from fastapi import APIRouter, WebSocket

from models import list_models
from service.engine import LoadedModel, Priority
from service.metrics import Metrics
from service.session import ClientResult, PendingFrame, Session, SessionConfig, SessionLimitReached
from service.settings import Settings, presented_key
from service.ws.codec import decode_frame, encode_result
from service.ws.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_IDLE,
    CLOSE_INTERNAL,
    CLOSE_MODEL_FAILED,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_SEND_TIMEOUT,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    CLOSE_UNKNOWN_MODEL,
    ProtocolError,
    apply_config,
    hello_message,
    parse_control,
)

logger = logging.getLogger(__name__)
router = APIRouter()


class Received(enum.Enum):
    """How a session's receive loop ended, which decides how the session ends."""

    DISCONNECTED = "disconnected"  # the client went away: nothing more to send
    CLOSE = "close"  # the client sent ``close``: finish the frames in flight, send ``bye``, close with 1000
    ENDED = "ended"  # the server ended the session (idle, oversize message, a reply it could not send)


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
            if receiver in done and receiver.result() is Received.CLOSE:
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

    async def _receive(self) -> Received:
        """Reads messages until the client leaves, asks to close or the session ends; says which."""
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
                    return Received.ENDED
                message, receiving = receiving.result(), None
                if message["type"] == "websocket.disconnect":
                    return Received.DISCONNECTED
                self.session.touch()
                if message.get("bytes") is not None:
                    if not await self._frame(message["bytes"]):
                        return Received.ENDED
                elif await self._control(message.get("text") or "") is Received.CLOSE:
                    return Received.CLOSE
                if self.conn.closed:  # a reply could not be sent (send_timeout): the session is over
                    return Received.ENDED
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

    async def _control(self, text: str) -> Received | None:
        """Answers one control message: :attr:`Received.CLOSE` when it was ``close``, else None (go on)."""
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
            return Received.CLOSE
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
    if not settings.serves(name):
        allowed = ", ".join(sorted({*settings.allowed_models, settings.model}))
        return f"model {name!r} is not served here; allowed: {allowed}"
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
        session.touch()  # the idle clock starts now: the client could not send anything while the model loaded
        await runner.run()
    finally:
        state.sessions.close(session)
        metrics.sessions.labels(model).dec()
        await conn.close(CLOSE_GOING_AWAY, "session ended")
        logger.info(
            "session %s closed: %d received, %d processed, %d dropped, %d errors",
            session.id, session.received, session.processed, session.dropped, session.errors,
        )  # fmt: skip
