"""Hostile and odd input on ``WS /v1/stream``: every case gets the documented answer and the server stays
healthy (docs/protocol.md, sections 4.3, 5 and 6).

Frame bombs are built by hand (a valid header, almost no pixel data), so a test that regresses fails
on the error it expects instead of by decoding gigabytes."""

from __future__ import annotations

import io
import json
import re
import socket
import struct
import time
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_ws import TINY, decode, expect_close, make_client, png, receive_result, wait_sessions_closed
from websockets.client import ClientProtocol
from websockets.sync.client import connect
from websockets.uri import parse_uri

from benchmarks.make_sample import synthetic_clip
from service.app import create_app, serve_in_thread
from service.backends.factory import create_backend
from service.pipeline import MIN_NETWORK_SIDE, Geometry, Stream, run_streams
from service.settings import Settings
from service.ws.protocol import CLOSE_SEND_TIMEOUT, MAX_CONTROL_BYTES, MAX_CONTROL_DEPTH

H, W = 64, 96


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, rows: int) -> bytes:
    """A well-formed PNG (IHDR, one IDAT, IEND) whose header says ``width`` x ``height`` but whose
    compressed data holds only ``rows`` black rows."""
    raw = b"".join(b"\x00" + bytes(width * 3) for _ in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to claim ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return synthetic_clip(4, H, W, seed=3)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with make_client(cors_origins=["https://display.example"]) as c:
        yield c


def still_serves(client: TestClient, ws, frame: np.ndarray) -> None:
    """The session goes on and the server answers its probes."""
    ws.send_bytes(png(frame))
    header, parts = receive_result(ws)
    assert decode(parts["restored"]).shape == frame.shape
    assert client.get("/healthz").status_code == 200


HOSTILE_FRAMES = {
    # 4096 x 4096 is within max_frame_side: it took over 14 GB to decode and infer before the pixel budget
    "4096x4096 PNG": (lambda: png_declaring(4096, 4096, 1), "frame_too_large", "max_frame_pixels"),
    # beyond Pillow's own decompression-bomb limit: Image.open raises before our check can run
    "65000x65000 JPEG": (lambda: jpeg_declaring(65000, 65000), "frame_too_large", "max_frame_pixels"),
    # a complete file whose data stops after 10 of 320 rows: Pillow fills the rest with black
    "PNG with 10 of 320 rows": (lambda: png_declaring(416, 320, 10), "bad_image", "truncated"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FRAMES))
def test_hostile_frames_get_a_non_fatal_error(client: TestClient, frames: list[np.ndarray], case: str) -> None:
    make, code, words = HOSTILE_FRAMES[case]
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_bytes(make())
        error = ws.receive_json()
        assert (error["type"], error["code"], error["seq"], error["fatal"]) == ("error", code, 0, False), error
        assert words in error["message"]
        still_serves(client, ws, frames[0])
    wait_sessions_closed(client)


def test_pixel_budget_is_a_setting_and_covers_raw_frames(frames: list[np.ndarray]) -> None:
    with make_client(max_frame_pixels=H * W) as client, client.websocket_connect("/v1/stream") as ws:
        hello = ws.receive_json()
        assert hello["limits"]["max_frame_pixels"] == H * W
        ws.send_bytes(png(np.zeros((H, W + 1, 3), np.uint8)))
        error = ws.receive_json()
        assert (error["code"], error["fatal"]) == ("frame_too_large", False) and f"{H * W}" in error["message"]
        ws.send_text(json.dumps({"type": "config", "input_format": "rgb24", "width": W + 1, "height": H}))
        error = ws.receive_json()
        assert error["code"] == "bad_config" and "max_frame_pixels" in error["message"]
        still_serves(client, ws, frames[0])  # exactly at the budget


CONTROL_MESSAGES = {
    "[ x 100000": ("[" * 100_000, "control_too_large"),
    "nested one level too deep": ("[" * (MAX_CONTROL_DEPTH + 1) + "]" * (MAX_CONTROL_DEPTH + 1), "control_too_large"),
    "too long": (json.dumps({"type": "ping", "data": "x" * MAX_CONTROL_BYTES}), "control_too_large"),
    "brackets inside strings do not count": (json.dumps({"type": "ping", "data": "[" * 1000}), None),
    "nesting at the limit": (
        json.dumps({"type": "ping", "data": json.loads("[" * (MAX_CONTROL_DEPTH - 1) + "]" * (MAX_CONTROL_DEPTH - 1))}),
        None,
    ),
}


@pytest.mark.parametrize("case", list(CONTROL_MESSAGES))
def test_control_messages_are_bounded_before_parsing(client: TestClient, frames: list[np.ndarray], case: str) -> None:
    text, code = CONTROL_MESSAGES[case]
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_text(text)
        reply = ws.receive_json()
        if code is None:
            assert reply == {"type": "pong", "data": json.loads(text)["data"]}
        else:
            assert (reply["type"], reply["code"], reply["seq"], reply["fatal"]) == ("error", code, None, False)
        still_serves(client, ws, frames[0])
    wait_sessions_closed(client)


@pytest.mark.parametrize("side", [1, 2, 5, 8, 13, 16])
def test_small_frames_are_padded_to_the_network_minimum(client: TestClient, side: int) -> None:
    frame = np.random.default_rng(side).integers(0, 256, (side, side + 3, 3), dtype=np.uint8)
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        for _ in range(2):
            ws.send_bytes(png(frame))
            header, parts = receive_result(ws)
            assert (header["width"], header["height"], header["resized"]) == (side + 3, side, False)
            assert decode(parts["restored"]).shape == (side, side + 3, 3)
            assert decode(parts["teeth_mask"]).shape == (side, side + 3)
            assert np.isfinite(np.array(header["homography"])).all()
    wait_sessions_closed(client)


def test_small_frames_run_on_runtimes_that_refuse_tiny_pooling_windows() -> None:
    """OpenVINO refuses the homography regressor's 2x2 max-pool on a 1-pixel map (any side below 24):
    the minimum network size is what makes 1x1 .. 16x16 frames work on every runtime."""
    pytest.importorskip("openvino")
    backend = create_backend(TINY, "openvino", precision="fp32")
    backend.load()
    try:
        for side in (1, 16):
            geometry = Geometry(side, side)
            assert geometry.padded == (MIN_NETWORK_SIDE, MIN_NETWORK_SIDE)
            result = run_streams(backend, [Stream(backend.spec, geometry)], [np.full((side, side, 3), 90, np.uint8)])
            assert result[0].restored.shape == (side, side, 3) and result[0].teeth_mask.shape == (side, side)
        assert Geometry(37, 53).padded == (40, 56)  # larger sizes: multiples of 8 as before
    finally:
        backend.close()


def test_reset_at_the_same_size_starts_index_at_zero(client: TestClient, frames: list[np.ndarray]) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        for i in range(2):
            ws.send_bytes(png(frames[i]))
            assert receive_result(ws)[0]["index"] == i
        ws.send_text(json.dumps({"type": "reset"}))
        assert ws.receive_json() == {"type": "reset_ok", "next_seq": 2}
        for i in range(2):
            ws.send_bytes(png(frames[2 + i]))
            header, _ = receive_result(ws)
            assert (header["seq"], header["index"], header["resized"]) == (2 + i, i, False)
            assert header["prev_seq"] == (None if i == 0 else 2)
            if i == 0:
                np.testing.assert_array_equal(np.array(header["homography"]), np.eye(3))
    wait_sessions_closed(client)


def test_websocket_origin_is_checked_against_cors_origins(client: TestClient) -> None:
    with client.websocket_connect("/v1/stream", headers={"Origin": "https://evil.example"}) as ws:
        error = expect_close(ws, 1008)
    assert error["code"] == "origin_not_allowed" and "evil.example" in error["message"]
    for allowed in ("https://display.example", "http://testserver"):  # a listed origin, the server's own page
        with client.websocket_connect("/v1/stream", headers={"Origin": allowed}) as ws:
            assert ws.receive_json()["type"] == "hello"
    with client.websocket_connect("/v1/stream") as ws:  # no Origin: not a browser
        assert ws.receive_json()["type"] == "hello"
    wait_sessions_closed(client)
    assert 'vident_sessions_refused_total{reason="origin_not_allowed"} 1.0' in client.get("/metrics").text
    with (
        make_client() as open_server,
        open_server.websocket_connect("/v1/stream", headers={"Origin": "https://evil.example"}) as ws,
    ):  # without VIDENT_CORS_ORIGINS every origin may connect, as documented
        assert ws.receive_json()["type"] == "hello"


def open_raw_websocket(base: str, receive_buffer: int | None = None) -> tuple[socket.socket, ClientProtocol]:
    """A WebSocket to ``/v1/stream`` on a plain socket (websockets' sans-I/O client): the test decides
    when, and whether, anything is read."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer is not None:  # before connect: it caps the TCP window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    protocol = ClientProtocol(parse_uri(f"ws://{host}:{port}/v1/stream"))
    protocol.send_request(protocol.connect())
    sock.sendall(b"".join(protocol.data_to_send()))
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)  # byte by byte: nothing after the handshake is consumed
    assert response.startswith(b"HTTP/1.1 101"), response
    protocol.receive_data(response)
    return sock, protocol


def test_a_client_that_stops_reading_loses_its_session() -> None:
    """Real uvicorn and a raw socket that never reads: the server's sends block once the socket buffers
    are full; the session must end with 4429 after send_timeout_s instead of holding on forever."""
    settings = Settings(model=TINY, backend="torch", warmup_size="", send_timeout_s=1.0, _env_file=None)
    app = create_app(settings)
    with serve_in_thread(app) as base:
        sock, protocol = open_raw_websocket(base, receive_buffer=4096)  # and never read from again
        height, width = 256, 320
        config = {"type": "config", "output_format": "png", "input_format": "rgb24", "width": width, "height": height}
        protocol.send_text(json.dumps(config).encode())
        rng = np.random.default_rng(0)
        sock.settimeout(1.0)
        deadline = time.monotonic() + 90
        while app.state.sessions.count == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        while app.state.sessions.count and time.monotonic() < deadline:
            protocol.send_binary(rng.integers(0, 256, (height, width, 3), dtype=np.uint8).tobytes())
            try:
                sock.sendall(b"".join(protocol.data_to_send()))
            except OSError:  # the server stopped reading us too, or closed: the loop condition decides
                pass
            time.sleep(0.02)
        sock.close()
        assert app.state.sessions.count == 0, "a client that stopped reading still holds its session"
        wait_sessions_closed(TestClient(app))  # the vident_sessions gauge too
        assert "vident_send_timeouts_total 1.0" in app.state.metrics.render().decode()
        assert httpx.get(f"{base}/healthz", timeout=10).json()["sessions"] == 0  # the server carries on
        with connect(base.replace("http://", "ws://") + "/v1/stream", open_timeout=30) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "hello"
            ws.send(png(np.full((H, W, 3), 100, np.uint8)))
            result = json.loads(ws.recv(timeout=30))
            assert (result["type"], result["index"]) == ("result", 0)
    assert CLOSE_SEND_TIMEOUT == 4429  # the code docs/protocol.md documents


def test_invalid_utf8_text_closes_with_1007() -> None:
    settings = Settings(model=TINY, backend="torch", warmup_size="", _env_file=None)
    app = create_app(settings)
    with serve_in_thread(app) as base:
        sock, protocol = open_raw_websocket(base)
        protocol.send_text(b"\xff\xfe not UTF-8")
        sock.sendall(b"".join(protocol.data_to_send()))
        sock.settimeout(10)
        while protocol.close_rcvd is None:
            data = sock.recv(65536)
            assert data, "the server closed the connection without a close frame"
            protocol.receive_data(data)
        sock.close()
        assert protocol.close_rcvd.code == 1007
        wait_sessions_closed(TestClient(app))


# Control messages whose JSON is valid but whose values have the wrong type or range: each is refused
# on its own and leaves the session's configuration as it was (docs/protocol.md, 3.2 and 4.3).
WRONG_TYPES = {
    "quality as a string": ({"type": "config", "jpeg_quality": "90"}, "bad_config"),
    "quality as a boolean": ({"type": "config", "jpeg_quality": True}, "bad_config"),
    "quality as a float": ({"type": "config", "jpeg_quality": 90.0}, "bad_config"),
    "output format as a list": ({"type": "config", "output_format": ["png"]}, "bad_config"),
    "outputs as a string": ({"type": "config", "outputs": "restored"}, "bad_config"),
    "outputs holding a list": ({"type": "config", "outputs": [["restored"]]}, "bad_config"),
    "width 10**30": ({"type": "config", "input_format": "rgb24", "width": 10**30, "height": H}, "bad_config"),
    "negative width": ({"type": "config", "input_format": "rgb24", "width": -W, "height": H}, "bad_config"),
    "type as a number": ({"type": 5}, "unknown_type"),
    "type as a list": ({"type": ["config"]}, "unknown_type"),
    "a JSON string": ("config", "unknown_type"),
    "NaN": (float("nan"), "unknown_type"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_control_values_of_the_wrong_type_change_nothing(client: TestClient, case: str) -> None:
    """The session answers the next control message with its configuration unchanged: frames would be
    served as before (no frame is streamed here, to keep the twelve cases cheap)."""
    message, code = WRONG_TYPES[case]
    with client.websocket_connect("/v1/stream") as ws:
        hello = ws.receive_json()
        ws.send_text(json.dumps(message))
        error = ws.receive_json()
        assert (error["type"], error["code"], error["seq"], error["fatal"]) == ("error", code, None, False), error
        ws.send_text(json.dumps({"type": "config"}))  # no fields: reports the configuration in force
        assert ws.receive_json() == {"type": "config_ok", "config": hello["config"]}
    assert client.get("/healthz").json()["status"] == "ok"
    wait_sessions_closed(client)


def _other_format(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((H, W, 3), 120, np.uint8)).save(buffer, kind)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["GIF", "BMP", "empty"])
def test_images_that_are_not_jpeg_or_png_are_refused(client: TestClient, frames: list[np.ndarray], kind: str) -> None:
    """Only the two documented formats reach a decoder: a GIF or BMP, which Pillow would happily open,
    and an empty binary message get ``bad_image`` without being parsed."""
    data = b"" if kind == "empty" else _other_format(kind)
    with client.websocket_connect("/v1/stream") as ws:
        ws.receive_json()
        ws.send_bytes(data)
        error = ws.receive_json()
        assert (error["code"], error["seq"], error["fatal"]) == ("bad_image", 0, False), error
        assert "not a JPEG or PNG" in error["message"]
        still_serves(client, ws, frames[0])
    wait_sessions_closed(client)


def test_a_frame_sent_before_hello_is_read_is_answered_after_hello(
    client: TestClient, frames: list[np.ndarray]
) -> None:
    """A client that sends at once, without waiting for ``hello``: hello still comes first (section 4.1)
    and the frame is the session's seq 0."""
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(png(frames[0]))
        assert ws.receive_json()["type"] == "hello"
        header, parts = receive_result(ws)
        assert (header["seq"], header["index"], header["received"]) == (0, 0, 1)
        assert decode(parts["restored"]).shape == frames[0].shape
        still_serves(client, ws, frames[1])
    wait_sessions_closed(client)


@pytest.mark.parametrize(
    "origin",
    [
        "null",  # sandboxed frames and file:// pages
        "https://display.example.evil.example",  # an allowed origin as a prefix of another host
        "http://display.example@evil.example",  # user info that looks like the allowed host
        "http://[::1",  # not a URL at all
    ],
)
def test_look_alike_origins_are_refused(client: TestClient, origin: str) -> None:
    before = refused(client, "origin_not_allowed")
    with client.websocket_connect("/v1/stream", headers={"Origin": origin}) as ws:
        error = expect_close(ws, 1008)
    assert error["code"] == "origin_not_allowed"
    wait_sessions_closed(client)
    assert client.get("/healthz").status_code == 200
    assert refused(client, "origin_not_allowed") == before + 1


def refused(client: TestClient, reason: str) -> float:
    """``vident_sessions_refused_total`` for ``reason`` on ``/metrics`` (0 before the first refusal)."""
    pattern = rf'^vident_sessions_refused_total{{reason="{reason}"}} (\S+)$'
    found = re.search(pattern, client.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0
