"""The WebSocket protocol of docs/protocol.md against the real app (Starlette's TestClient, tiny model)."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Mapping

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from benchmarks.make_sample import synthetic_clip
from export.runtime import Backend
from service.app import create_app
from service.backends.factory import create_backend
from service.pipeline import Geometry, Stream, run_streams
from service.session import client_homography
from service.settings import Settings

TINY = "most-nss-tiny"
H, W = 64, 96


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return synthetic_clip(6, H, W, seed=1)


class GatedBackend(Backend):
    """A real backend whose calls wait for ``gate`` (to hold a frame in flight) and can be made to fail."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.spec, inner.info)
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = False

    def _load(self) -> None:
        self.inner.load()

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(20), "test never opened the gate"
        if self.fail:
            raise RuntimeError("injected backend failure")
        return self.inner.infer(feed)


def make_client(backend: list[GatedBackend] | None = None, **overrides: object) -> TestClient:
    # No start-up warm-up here: it would call the gated backends before a test holds their gates.
    settings = Settings(**{"model": TINY, "backend": "torch", "idle_timeout_s": 10, "warmup_size": "",
                           "_env_file": None, **overrides})  # fmt: skip
    factory: Callable[..., Backend] | None = None
    if backend is not None:

        def factory(name: str, runtime: str, device: str, precision: str, checkpoint: object) -> Backend:
            backend.append(GatedBackend(create_backend(name, "torch")))
            return backend[-1]

    return TestClient(create_app(settings, backend_factory=factory))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with make_client(max_sessions=3) as c:
        yield c


def open_sessions_metric(client: TestClient) -> float:
    """``vident_sessions`` summed over models: the open sessions monitoring sees on ``/metrics``."""
    return sum(sample.value for family in client.app.state.metrics.sessions.collect() for sample in family.samples)


def wait_sessions_closed(client: TestClient, timeout: float = 10.0) -> None:
    """The server side finishes a session just after the client's socket closes: wait for it, in the
    session manager and on ``/metrics`` (the gauge falls a moment after the manager lets go)."""
    deadline = time.monotonic() + timeout
    while (client.app.state.sessions.count or open_sessions_metric(client)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.app.state.sessions.count == 0, "a session leaked"
    assert open_sessions_metric(client) == 0, "vident_sessions on /metrics did not return to 0"


def wait_entered(gated: GatedBackend, client: TestClient, ws, timeout: float) -> None:
    """Waits for a frame to reach the gated backend; on a timeout the failure says where the frame
    is: the sessions' counters, the server loop's tasks and every thread's stack."""
    if gated.entered.wait(timeout):
        return

    def task_stacks() -> str:
        out = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=out)
        return out.getvalue()

    sessions = [(s.received, s.processed, s.dropped, s.errors, s.in_flight, s.slot.pending, s.slot.closed)
                for s in client.app.state.sessions.sessions()]  # fmt: skip
    frames = sys._current_frames()
    threads = "".join(f"--- thread {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                      for t in threading.enumerate() if t.ident in frames)  # fmt: skip
    pytest.fail(f"no frame reached the backend in {timeout:g} s; sessions (received, processed, dropped, errors, "
                f"in_flight, pending, closed): {sessions}\nserver tasks:\n{ws.portal.call(task_stacks)}\n{threads}")


def receive_result(ws) -> tuple[dict, dict[str, bytes]]:
    header = ws.receive_json()
    assert header["type"] == "result", header
    return header, {part["name"]: ws.receive_bytes() for part in header["parts"]}


def decode(data: bytes) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def expect_close(ws, code: int) -> dict:
    """The fatal error message, then the close with ``code``."""
    error = ws.receive_json()
    assert error["type"] == "error" and error["fatal"], error
    with pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    assert closed.value.code == code
    return error


def test_happy_path(client: TestClient, frames: list[np.ndarray]) -> None:
    with client.websocket_connect(f"/v1/stream?model={TINY}") as ws:
        hello = ws.receive_json()
        assert hello["type"] == "hello" and hello["protocol"] == 1 and hello["model"] == TINY
        assert hello["random_weights"] is True and hello["homography"] is True
        assert hello["image_outputs"] == ["restored", "teeth_mask"] and hello["backend"]["name"] == "torch"
        ws.send_text(json.dumps({"type": "config", "output_format": "png"}))
        assert ws.receive_json() == {"type": "config_ok", "config": {**hello["config"], "output_format": "png"}}
        for i, frame in enumerate(frames[:3]):
            ws.send_bytes(png(frame) if i != 1 else jpeg(frame))
            header, parts = receive_result(ws)
            assert (header["seq"], header["index"], header["dropped"]) == (i, i, 0)
            assert header["prev_seq"] == (None if i == 0 else i - 1)
            assert (header["width"], header["height"], header["resized"]) == (W, H, False)
            assert set(header["timings_ms"]) == {"decode", "wait", "infer", "encode", "total"}
            assert header["timings_ms"]["infer"] > 0
            restored, mask = decode(parts["restored"]), decode(parts["teeth_mask"])
            assert restored.shape == (H, W, 3) and mask.shape == (H, W)
            assert [p["format"] for p in header["parts"]] == ["png", "png"]
            assert [p["bytes"] for p in header["parts"]] == [len(parts["restored"]), len(parts["teeth_mask"])]
            homography = np.array(header["homography"])
            assert homography.shape == (3, 3) and np.isfinite(homography).all()
            if i == 0:
                np.testing.assert_array_equal(homography, np.eye(3))
        ws.send_text(
            json.dumps({"type": "config", "output_format": "jpeg", "jpeg_quality": 50, "outputs": ["restored"]})
        )
        assert ws.receive_json()["type"] == "config_ok"
        ws.send_bytes(png(frames[3]))
        header, parts = receive_result(ws)
        assert [p["name"] for p in header["parts"]] == ["restored"] and parts["restored"][:3] == b"\xff\xd8\xff"
        ws.send_text(json.dumps({"type": "ping", "data": 7}))
        assert ws.receive_json() == {"type": "pong", "data": 7}
        ws.send_text(json.dumps({"type": "close"}))
        assert ws.receive_json() == {"type": "bye", "received": 4, "processed": 4, "dropped": 0, "errors": 0}
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1000
    wait_sessions_closed(client)


def test_raw_rgb24_and_wrong_raw_size(client: TestClient, frames: list[np.ndarray]) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_text(json.dumps({"type": "config", "input_format": "rgb24", "width": W, "height": H}))
        assert ws.receive_json()["config"]["input_format"] == "rgb24"
        ws.send_bytes(frames[0].tobytes()[:-3])
        error = ws.receive_json()
        assert (error["code"], error["seq"], error["fatal"]) == ("bad_raw_size", 0, False)
        assert str(W * H * 3) in error["message"]
        ws.send_bytes(frames[0].tobytes())
        header, parts = receive_result(ws)
        assert (header["seq"], header["index"]) == (1, 0) and decode(parts["restored"]).shape == (H, W, 3)
    wait_sessions_closed(client)


BAD_MESSAGES = {
    "not an image": (b"hello, this is not a picture", "bad_image", "not a JPEG or PNG"),
    "truncated JPEG": (None, "bad_image", "truncated"),
    "truncated PNG": (None, "bad_image", "truncated"),
    "text, not JSON": ("frame 1", "not_json", "JSON"),
    "JSON, not an object": ("[1, 2]", "unknown_type", "unknown control message"),
    "unknown control message": ('{"type": "rewind"}', "unknown_type", "rewind"),
    "unknown config field": ('{"type": "config", "colour": "red"}', "bad_config", "colour"),
    "bad output format": ('{"type": "config", "output_format": "gif"}', "bad_config", "gif"),
    "bad quality": ('{"type": "config", "jpeg_quality": 0}', "bad_config", "jpeg_quality"),
    "raw without size": ('{"type": "config", "input_format": "rgb24"}', "bad_config", "width and height"),
    "unknown output": ('{"type": "config", "outputs": ["restored", "depth"]}', "bad_config", "outputs"),
    "huge frame": (None, "frame_too_large", "max_frame_side"),
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_input_gets_a_named_error_and_the_session_goes_on(
    client: TestClient, frames: list[np.ndarray], case: str
) -> None:
    message, code, words = BAD_MESSAGES[case]
    if case == "truncated JPEG":
        message = jpeg(frames[0])[:-400]
    elif case == "truncated PNG":
        message = png(frames[0])[:-200]
    elif case == "huge frame":
        message = png(np.zeros((8, 5000, 3), np.uint8))
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        (ws.send_bytes if isinstance(message, bytes) else ws.send_text)(message)
        error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == code and not error["fatal"], error
        assert words in error["message"]
        assert error["seq"] == (0 if isinstance(message, bytes) else None)
        ws.send_bytes(png(frames[1]))  # the session survives
        header, _ = receive_result(ws)
        assert header["index"] == 0
    wait_sessions_closed(client)


def test_unknown_model_is_refused(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream?model=most-huge") as ws:
        error = expect_close(ws, 4404)
    assert error["code"] == "unknown_model" and "most-huge" in error["message"] and TINY in error["message"]
    wait_sessions_closed(client)


def test_reset_size_change_and_odd_sizes(client: TestClient, frames: list[np.ndarray]) -> None:
    small = cv2.resize(frames[2], (W // 2, H // 2), interpolation=cv2.INTER_AREA)
    odd = frames[3][:37, :53].copy()
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_bytes(png(frames[0]))
        ws.send_bytes(png(frames[1]))
        receive_result(ws)
        first, _ = receive_result(ws)
        # another size without reset: resized to the session size and back; H in the client's pixels
        ws.send_bytes(png(small))
        header, parts = receive_result(ws)
        assert (header["width"], header["height"], header["resized"]) == (W // 2, H // 2, True)
        assert (header["session_width"], header["session_height"]) == (W, H)
        assert decode(parts["restored"]).shape == (H // 2, W // 2, 3)
        assert decode(parts["teeth_mask"]).shape == (H // 2, W // 2)
        assert header["index"] == 2 and header["prev_seq"] == 1
        # reset: the next frame starts a new stream and fixes a new session size (any size: padded to 8)
        ws.send_text(json.dumps({"type": "reset"}))
        assert ws.receive_json() == {"type": "reset_ok", "next_seq": 3}
        ws.send_bytes(png(odd))
        header, parts = receive_result(ws)
        assert (header["index"], header["prev_seq"], header["resized"]) == (0, None, False)
        assert (header["session_width"], header["session_height"]) == (53, 37)
        np.testing.assert_array_equal(np.array(header["homography"]), np.eye(3))
        assert decode(parts["restored"]).shape == (37, 53, 3)
        ws.send_bytes(png(frames[4][:37, :53].copy()))
        header, _ = receive_result(ws)
        assert header["index"] == 1 and header["prev_seq"] == 3
    wait_sessions_closed(client)


def test_client_homography_is_the_session_homography_in_client_pixels() -> None:
    rng = np.random.default_rng(0)
    h_session = np.eye(3) + 0.01 * rng.standard_normal((3, 3))
    session, prev, cur = (64, 96), (128, 192), (32, 48)
    h_client = client_homography(h_session, session, prev, cur)
    point = np.array([40.0, 20.0, 1.0])  # a point of the previous client frame (x, y)
    in_session = point * [96 / 192, 64 / 128, 1]
    mapped = h_session @ in_session
    expected = mapped[:2] / mapped[2] * [48 / 96, 32 / 64]
    got = h_client @ point
    np.testing.assert_allclose(got[:2] / got[2], expected, rtol=1e-12)
    np.testing.assert_array_equal(client_homography(h_session, session, session, session), h_session)


def test_streamed_results_equal_offline_processing(client: TestClient, frames: list[np.ndarray]) -> None:
    """PNG in, PNG out (lossless): the service computes exactly what run_streams computes on the same frames."""
    streamed = []
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_text(json.dumps({"type": "config", "output_format": "png"}))
        ws.receive_json()
        for frame in frames:  # lockstep: one frame in flight, so none is dropped
            ws.send_bytes(png(frame))
            streamed.append(receive_result(ws))
    backend = client.app.state.pool.models[TINY].engine.backend  # the same weights the server used
    stream = Stream(backend.spec, Geometry(H, W))
    for frame, (header, parts) in zip(frames, streamed, strict=True):
        offline = run_streams(backend, [stream], [frame])[0]
        np.testing.assert_array_equal(decode(parts["restored"]), offline.restored)
        np.testing.assert_array_equal(decode(parts["teeth_mask"]), offline.teeth_mask)
        np.testing.assert_array_equal(np.array(header["homography"]), offline.homography)
    wait_sessions_closed(client)


def test_newest_frame_wins_and_drops_are_reported(frames: list[np.ndarray]) -> None:
    backends: list[GatedBackend] = []
    with make_client(backends) as client:
        with client.websocket_connect("/v1/stream") as ws:
            assert ws.receive_json()["type"] == "hello"
            gated = backends[0]
            gated.gate.clear()
            gated.entered.clear()
            ws.send_bytes(png(frames[0]))
            wait_entered(gated, client, ws, 30)  # frame 0 is in flight, held at the gate
            for frame in frames[1:4]:
                ws.send_bytes(png(frame))
            (session,) = client.app.state.sessions.sessions()
            deadline = time.monotonic() + 10
            while session.received < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            gated.gate.set()
            first, _ = receive_result(ws)
            newest, _ = receive_result(ws)
            assert (first["seq"], first["dropped"]) == (0, 2)  # dropped so far, when the result is sent
            assert (newest["seq"], newest["dropped"], newest["prev_seq"], newest["index"]) == (3, 2, 0, 1)
            ws.send_text(json.dumps({"type": "close"}))
            assert ws.receive_json() == {"type": "bye", "received": 4, "processed": 2, "dropped": 2, "errors": 0}
        wait_sessions_closed(client)
        metrics = client.get("/metrics").text
        assert f'vident_frames_dropped_total{{model="{TINY}"}} 2.0' in metrics


def test_disconnect_mid_stream_releases_the_session(frames: list[np.ndarray]) -> None:
    backends: list[GatedBackend] = []
    with make_client(backends) as client:
        manager = client.app.state.sessions
        opened: list[weakref.ref] = []
        open_session = manager.open
        manager.open = lambda *a: opened.append(weakref.ref(s := open_session(*a))) or s  # type: ignore[method-assign]
        for _ in range(3):
            with client.websocket_connect("/v1/stream") as ws:
                assert ws.receive_json()["type"] == "hello"
                backends[0].gate.clear()
                backends[0].entered.clear()
                ws.send_bytes(png(frames[0]))
                ws.send_bytes(png(frames[1]))
                wait_entered(backends[0], client, ws, 30)
                assert client.app.state.sessions.count == 1
            # the client left while its frame was inside the backend and another was pending
            wait_sessions_closed(client)
            backends[0].gate.set()
        assert 'vident_sessions{model="most-nss-tiny"} 0.0' in client.get("/metrics").text
        deadline = time.monotonic() + 10
        while any(ref() is not None for ref in opened) and time.monotonic() < deadline:
            gc.collect()  # the engine may still hold the last stream until its gated call returns
            time.sleep(0.05)
        assert len(opened) == 3 and all(ref() is None for ref in opened), "session objects are still referenced"
        with client.websocket_connect("/v1/stream") as ws:  # the engine still serves new sessions
            ws.receive_json()
            ws.send_bytes(png(frames[2]))
            assert receive_result(ws)[0]["index"] == 0
        wait_sessions_closed(client)


def test_inference_failure_is_reported_and_the_session_goes_on(frames: list[np.ndarray]) -> None:
    backends: list[GatedBackend] = []
    with make_client(backends) as client, client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_bytes(png(frames[0]))
        receive_result(ws)
        backends[0].fail = True
        ws.send_bytes(png(frames[1]))
        error = ws.receive_json()
        assert (error["code"], error["seq"], error["fatal"]) == ("inference_failed", 1, False)
        backends[0].fail = False
        ws.send_bytes(png(frames[2]))
        header, _ = receive_result(ws)
        assert (header["seq"], header["index"]) == (2, 0)  # state was discarded: a new stream starts


def test_session_limit(frames: list[np.ndarray]) -> None:
    with make_client(max_sessions=1) as client:
        with client.websocket_connect("/v1/stream") as first:
            first.receive_json()
            with client.websocket_connect("/v1/stream") as second:
                error = expect_close(second, 1013)
                assert error["code"] == "too_many_sessions"
            first.send_bytes(png(frames[0]))
            assert receive_result(first)[0]["seq"] == 0  # the refusal did not touch the open session
        wait_sessions_closed(client)
        refused = client.get("/metrics").text
        assert 'vident_sessions_refused_total{reason="too_many_sessions"} 1.0' in refused


def test_fps_cap_and_message_size(frames: list[np.ndarray]) -> None:
    # fps cap 0.5: frame 0 runs at once, the next may start 2 s later; frames 1-3 arrive well before
    with make_client(max_message_bytes=20_000, fps_cap=0.5) as client:
        with client.websocket_connect("/v1/stream") as ws:
            ws.receive_json()
            for frame in frames[:4]:
                ws.send_bytes(png(frame))
            a, _ = receive_result(ws)
            b, _ = receive_result(ws)
            assert (a["seq"], b["seq"], b["dropped"]) == (0, 3, 2)
            ws.send_bytes(b"\x89PNG\r\n\x1a\n" + bytes(25_000))
            error = expect_close(ws, 1009)
            assert error["code"] == "message_too_big" and "20000" in error["message"]
        wait_sessions_closed(client)


def test_idle_timeout() -> None:
    with make_client(idle_timeout_s=0.5) as client:
        with client.websocket_connect("/v1/stream") as idle:
            idle.receive_json()
            error = expect_close(idle, 4408)
            assert error["code"] == "idle_timeout"
        wait_sessions_closed(client)


def test_the_idle_clock_starts_at_the_hello_not_while_the_model_loads() -> None:
    """A session that waited for a slow model load (longer than the idle timeout) is not closed as idle
    right after its hello: the client has had no time to send anything yet."""

    def factory(name: str, runtime: str, device: str, precision: str, checkpoint: object) -> Backend:
        time.sleep(1.5)  # a slow load: a large checkpoint, an engine build, a busy machine
        return create_backend(name, "torch")

    settings = Settings(model=TINY, backend="torch", idle_timeout_s=1.0, warmup_size="", preload=False,
                        _env_file=None)  # fmt: skip
    with TestClient(create_app(settings, backend_factory=factory)) as client:
        with client.websocket_connect("/v1/stream") as ws:
            assert ws.receive_json()["type"] == "hello"  # after the 1.5 s load
            ws.send_text(json.dumps({"type": "ping", "data": 1}))
            assert ws.receive_json() == {"type": "pong", "data": 1}
            assert expect_close(ws, 4408)["code"] == "idle_timeout"  # the timeout itself still holds
        wait_sessions_closed(client)


def test_api_key(frames: list[np.ndarray]) -> None:
    with make_client(api_key="s3cret") as client:
        with client.websocket_connect("/v1/stream") as ws:
            assert expect_close(ws, 1008)["code"] == "unauthorized"
        with client.websocket_connect("/v1/stream?api_key=wrong") as ws:
            assert expect_close(ws, 1008)["code"] == "unauthorized"
        with client.websocket_connect("/v1/stream", headers={"X-API-Key": "s3cret"}) as ws:
            assert ws.receive_json()["type"] == "hello"
        with client.websocket_connect("/v1/stream?api_key=s3cret") as ws:
            assert ws.receive_json()["type"] == "hello"
        wait_sessions_closed(client)


def test_model_that_fails_to_load() -> None:
    def broken(*args: object) -> Backend:
        raise RuntimeError("no such runtime here")

    settings = Settings(model=TINY, backend="torch", _env_file=None)
    with TestClient(create_app(settings, backend_factory=broken)) as client:
        deadline = time.monotonic() + 10
        while client.app.state.readiness == "loading" and time.monotonic() < deadline:
            time.sleep(0.01)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "no such runtime" in ready.json()["error"]
        assert client.get("/healthz").status_code == 200
        with client.websocket_connect("/v1/stream") as ws:
            error = expect_close(ws, 4500)
        assert error["code"] == "model_unavailable" and "no such runtime" in error["message"]
        wait_sessions_closed(client)


def test_frames_of_several_sessions_are_batched(frames: list[np.ndarray]) -> None:
    """Two sessions' frames that wait at the same moment run as one backend call, each with its own state."""
    backends: list[GatedBackend] = []
    with make_client(backends, max_batch=8) as client:
        sockets = [client.websocket_connect("/v1/stream") for _ in range(3)]
        first, second, third = (s.__enter__() for s in sockets)
        try:
            for ws in (first, second, third):
                assert ws.receive_json()["type"] == "hello"
                ws.send_text(json.dumps({"type": "config", "output_format": "png"}))
                ws.receive_json()
            gated = backends[0]
            gated.gate.clear()
            first.send_bytes(png(frames[0]))
            wait_entered(gated, client, first, 60)  # one frame holds the engine (generous: CI cores are shared)
            second.send_bytes(png(frames[1]))
            third.send_bytes(png(frames[2]))
            engine = client.app.state.engines[TINY]
            deadline = time.monotonic() + 60
            while engine._queue.qsize() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            gated.gate.set()
            results = [receive_result(ws) for ws in (first, second, third)]
        finally:
            for s in sockets:
                s.__exit__(None, None, None)
        wait_sessions_closed(client)
        metrics = client.get("/metrics").text
        assert f'vident_batch_size_count{{model="{TINY}"}} 2.0' in metrics  # two calls for three frames
        assert f'vident_batch_size_sum{{model="{TINY}"}} 3.0' in metrics
        backend = gated.inner
        for frame, (header, parts) in zip(frames[:3], results, strict=True):
            alone = run_streams(backend, [Stream(backend.spec, Geometry(H, W))], [frame])[0]
            assert header["index"] == 0
            difference = np.abs(decode(parts["restored"]).astype(int) - alone.restored.astype(int))
            assert difference.max() <= 1  # batch of 2 vs batch of 1: float summation order only


def test_a_server_bug_closes_only_that_session(
    client: TestClient, frames: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.ws.endpoint

    def broken(*args: object) -> list:
        raise ZeroDivisionError("injected encoder bug")

    monkeypatch.setattr(service.ws.endpoint, "encode_result", broken)
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_bytes(png(frames[0]))
        error = expect_close(ws, 1011)
    assert error["code"] == "internal" and "injected encoder bug" in error["message"]
    wait_sessions_closed(client)
    monkeypatch.undo()
    with client.websocket_connect("/v1/stream") as ws:  # the server and the engine carry on
        ws.receive_json()
        ws.send_bytes(png(frames[1]))
        assert receive_result(ws)[0]["index"] == 0
    wait_sessions_closed(client)
