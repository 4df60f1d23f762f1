"""Hostile requests to batch jobs and to the API key, on the whole app (``create_app``: the jobs router
mounted, the app's engine pool): every case gets the documented answer (docs/jobs.md, docs/protocol.md
sections 1, 6 and 10), leaves nothing behind (no stored upload, no open session) and the server stays
healthy. The WebSocket side of hostile input is tests/test_ws_hostile.py."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_jobs import post, wait
from test_video import moving_frames, write_clip
from test_ws import TINY, expect_close, png, wait_sessions_closed
from websockets.sync.client import connect

from benchmarks.memory import mjpeg_video
from service.app import create_app, serve_in_thread
from service.jobs.store import JOB_ID
from service.settings import Settings

KEY = "k3y-for-hostile-tests"
H, W = 64, 96
UPLOAD_CAP_MB = 0.25


def hostile_settings() -> Settings:
    # The pixel budget is one 96x64 frame, so a frame over it is cheap to make and to refuse.
    return Settings(model=TINY, backend="torch", api_key=KEY, max_frame_pixels=H * W, warmup_size="",
                    idle_timeout_s=10, _env_file=None)  # fmt: skip


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VIDENT_JOBS_MAX_UPLOAD_MB", str(UPLOAD_CAP_MB))
        with TestClient(create_app(hostile_settings()), headers={"X-API-Key": KEY}) as c:
            yield c


@pytest.fixture(scope="module")
def anonymous(client: TestClient) -> TestClient:
    """Requests to the same running app without the key (no lifespan of its own)."""
    return TestClient(client.app)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", moving_frames(3, H, W))


@pytest.fixture(scope="module")
def finished_job(client: TestClient, clip: Path) -> str:
    job = wait(client, post(client, clip).json()["id"])
    assert job["state"] == "done", job
    return job["id"]


def assert_healthy(client: TestClient) -> None:
    """The server answers, no session is open and no folder is left of a refused upload."""
    assert client.get("/healthz").json()["status"] == "ok"
    wait_sessions_closed(client)
    data_dir = client.app.state.jobs.settings.jobs.data_dir
    stored = {job["id"] for job in client.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]}
    folders = {p.name for p in data_dir.iterdir() if JOB_ID.fullmatch(p.name)}
    assert folders <= stored, f"folders of refused uploads: {folders - stored}"


# --- the API key --------------------------------------------------------------------------------------------------

WRONG_KEYS = {
    "none": {},
    "wrong header": {"X-API-Key": "wrong"},
    "the key in another case": {"X-API-Key": KEY.upper()},
    "an empty header": {"X-API-Key": ""},
}
ROUTES = ["GET /v1/models", "GET /v1/jobs", "POST /v1/jobs", "GET /v1/jobs/{id}",
          "GET /v1/jobs/{id}/files/report.json", "DELETE /v1/jobs/{id}"]  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
def test_http_routes_need_the_key(
    client: TestClient, anonymous: TestClient, clip: Path, finished_job: str, route: str
) -> None:
    method, path = route.split(" ")
    job_id = finished_job
    if method == "DELETE":  # a job of its own, so the module's job survives the keyed request
        job_id = wait(client, post(client, clip).json()["id"])["id"]
    path = path.format(id=job_id)
    files = {"file": (clip.name, clip.read_bytes())} if method == "POST" else None
    jobs_before = client.get("/v1/jobs").json()["jobs"]
    for name, headers in WRONG_KEYS.items():
        # a key under another query name is no key either
        response = anonymous.request(method, path, headers=headers, files=files, params={"apikey": KEY})
        assert response.status_code == 401, (name, response.status_code, response.text)
        assert "API key" in response.json()["detail"]
    assert client.get("/v1/jobs").json()["jobs"] == jobs_before  # nothing was created or removed
    keyed = client.request(method, path, files=files)
    assert keyed.status_code in (200, 202), keyed.text  # the same request with the key is served
    if method == "POST":
        wait(client, keyed.json()["id"])
    assert_healthy(client)


def test_probes_need_no_key(client: TestClient, anonymous: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/"):
        assert anonymous.get(path).status_code == 200, path
    assert anonymous.get("/v1/models").status_code == 401
    assert_healthy(client)


@pytest.mark.parametrize(
    ("query", "headers"),
    [("", {}), ("?api_key=wrong", {}), ("?api_key=", {}), ("", {"X-API-Key": KEY.upper()})],
    ids=["none", "wrong query", "empty query", "the key in another case"],
)
def test_websocket_sessions_need_the_key(
    client: TestClient, anonymous: TestClient, query: str, headers: dict[str, str]
) -> None:
    with anonymous.websocket_connect(f"/v1/stream{query}", headers=headers) as ws:
        error = expect_close(ws, 1008)
    assert error["code"] == "unauthorized" and KEY not in error["message"]
    with anonymous.websocket_connect(f"/v1/stream?api_key={KEY}") as ws:  # the key as browsers send it
        assert ws.receive_json()["type"] == "hello"
    assert_healthy(client)


def test_api_keys_in_urls_never_reach_the_logs() -> None:
    """Real uvicorn, real request lines: a key sent in the query (right or wrong) is logged as ``***``."""
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error")]
    app = create_app(hostile_settings())
    with serve_in_thread(app) as base:
        levels = [logger.level for logger in loggers]
        for logger in loggers:  # serve_in_thread runs at "warning"; request lines are "info"
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)
        try:
            for key in (KEY, "wrong-" + KEY):
                status = httpx.get(f"{base}/v1/models", params={"api_key": key}, timeout=30).status_code
                assert status == (200 if key == KEY else 401)
                with connect(f"{base.replace('http', 'ws')}/v1/stream?api_key={key}", open_timeout=30) as ws:
                    assert ws.recv(timeout=30)  # hello, or the unauthorized error
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.removeHandler(handler)
                logger.setLevel(level)
        deadline = time.monotonic() + 10
        while app.state.sessions.count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.sessions.count == 0
    text = captured.getvalue()
    assert KEY not in text, text
    assert text.count("api_key=***") >= 4, text  # two HTTP request lines and two WebSocket handshakes


# --- job requests -------------------------------------------------------------------------------------------------

BAD_FIELDS = {
    "max_frames 10**30": ({"max_frames": str(10**30)}, "max_frames must be an integer from 1 to"),
    "max_frames -1": ({"max_frames": "-1"}, "max_frames must be an integer from 1 to"),
    "max_frames 1e3": ({"max_frames": "1e3"}, "max_frames must be an integer from 1 to"),
    "a model path": ({"model": "../../etc/passwd"}, "is not available for jobs"),
    "an unknown field": ({"output": "/etc/passwd"}, "unknown form field"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_job_fields_get_400_and_store_nothing(client: TestClient, clip: Path, case: str) -> None:
    fields, words = BAD_FIELDS[case]
    before = client.get("/v1/jobs").json()["jobs"]
    response = post(client, clip, **fields)
    assert response.status_code == 400 and words in response.json()["detail"], response.text
    assert client.get("/v1/jobs").json()["jobs"] == before
    assert_healthy(client)


@pytest.mark.parametrize("declared_length", [True, False], ids=["Content-Length", "chunked"])
def test_uploads_over_the_cap_get_413(client: TestClient, declared_length: bool) -> None:
    """Refused from the Content-Length before reading, or while streaming when there is none."""
    size = int(UPLOAD_CAP_MB * 1024 * 1024) * 2
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n\r\n'
    tail = b"\r\n--b--\r\n"

    def chunked() -> Iterator[bytes]:
        yield head
        for _ in range(size // 65536):
            yield b"\x00" * 65536
        yield tail

    body = b"".join(chunked()) if declared_length else chunked()
    response = client.post("/v1/jobs", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and f"limit of {UPLOAD_CAP_MB:g} MB" in response.json()["detail"]
    assert_healthy(client)


BAD_UPLOADS = {
    "an empty file": ({"files": {"file": ("empty.mp4", b"")}}, 400, "empty"),
    "no file part": ({"files": {"model": (None, TINY)}}, 400, "no 'file' part"),
    "not multipart": ({"content": b"\x00" * 100, "headers": {"content-type": "video/mp4"}}, 415, "multipart"),
    "a body cut short": (
        {"content": b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.mp4"\r\n\r\nabc',
         "headers": {"content-type": "multipart/form-data; boundary=b"}},
        400, "ended before",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_malformed_uploads_are_refused(client: TestClient, case: str) -> None:
    request, status, words = BAD_UPLOADS[case]
    response = client.post("/v1/jobs", **request)
    assert response.status_code == status and words in response.json()["detail"], response.text
    assert_healthy(client)


def test_an_upload_that_is_not_a_video_fails_its_job(client: TestClient, tmp_path: Path) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("#!/bin/sh\nrm -rf /\n" * 50)
    response = post(client, fake)
    assert response.status_code == 202  # only the header-level checks run at upload
    job = wait(client, response.json()["id"])
    assert job["state"] == "failed" and job["error"].startswith("notes.mp4 is not a readable video"), job
    assert client.get(f"/v1/jobs/{job['id']}/files/report.json").status_code == 404
    assert_healthy(client)


def test_a_video_of_frames_over_the_pixel_budget_is_refused_at_upload(client: TestClient, tmp_path: Path) -> None:
    """Checked on the container's stream information, before the job exists (benchmarks/memory.py sends
    8000x8000 frames this way to a real server)."""
    video = mjpeg_video(tmp_path / "big.avi", [(2 * H, 2 * W)] * 2)
    before = client.get("/v1/jobs").json()["jobs"]
    response = post(client, video)
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(f"big.avi: {2 * W}x{2 * H} frames ({4 * H * W} pixels)")
    assert f"limit of {H * W} pixels per frame (max_frame_pixels)" in response.json()["detail"]
    assert client.get("/v1/jobs").json()["jobs"] == before
    assert_healthy(client)


def test_a_later_frame_over_the_pixel_budget_fails_the_job(client: TestClient, tmp_path: Path) -> None:
    """The header declares frames within the budget and the third frame is larger: only the per-frame
    check sees it, and the job fails saying so."""
    video = mjpeg_video(tmp_path / "grows.avi", [(H, W), (H, W), (2 * H, 2 * W), (H, W)])
    response = post(client, video)
    assert response.status_code == 202, response.text
    job = wait(client, response.json()["id"])
    assert job["state"] == "failed", job
    assert f"grows.avi: {2 * W}x{2 * H} frames ({4 * H * W} pixels)" in job["error"], job["error"]
    assert "max_frame_pixels" in job["error"]
    assert_healthy(client)


@pytest.mark.parametrize(
    "name", ["..%2Fjobs.sqlite3", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "input.mp4", "%2E%2E"]
)
def test_job_files_cannot_leave_the_jobs_output(client: TestClient, finished_job: str, name: str) -> None:
    response = client.get(f"/v1/jobs/{finished_job}/files/{name}")
    assert response.status_code == 404, (name, response.status_code)
    detail = response.json()["detail"]
    if "%2F" in name:  # a decoded slash matches no route
        assert detail == "Not Found", detail
    else:  # any other name reaches the handler, which serves only the job's own files
        assert f"has no file {unquote(name)!r}" in detail, detail
    assert b"root:" not in response.content and b"SQLite" not in response.content
    assert client.get(f"/v1/jobs/{name}").status_code == 404  # the same name where a job id goes
    assert client.get(f"/v1/jobs/{finished_job}/files/report.json").status_code == 200  # the real file is there
    assert_healthy(client)


def test_the_stream_still_serves_after_the_hostile_requests(client: TestClient) -> None:
    """Last in the module: after every refusal above, a keyed session streams a frame."""
    with client.websocket_connect("/v1/stream") as ws:
        assert ws.receive_json()["type"] == "hello"
        ws.send_bytes(png(np.full((H, W, 3), 90, np.uint8)))
        header = ws.receive_json()
        assert (header["type"], header["index"]) == ("result", 0), header
    assert_healthy(client)
