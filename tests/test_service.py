"""HTTP side of the service: probes, metrics, models, settings from the environment, CORS, static page."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from models import create_model
from models.checkpoints import save_checkpoint
from service import app as app_module
from service.app import create_app
from service.engine import EnginePool
from service.settings import Settings

TINY = "most-nss-tiny"


def settings(**overrides: object) -> Settings:
    return Settings(**{"model": TINY, "backend": "torch", "_env_file": None, **overrides})


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 30
    while client.app.state.readiness == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(settings(api_key="k", cors_origins=["https://display.example"]))) as c:
        wait_ready(c)
        yield c


def test_probes(client: TestClient) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["sessions"] == 0
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "status": "ready", "model": TINY}


def test_models_needs_the_key_and_reports_random_weights(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
    body = client.get("/v1/models?api_key=k").json()
    assert body["default"] == TINY
    by_name = {m["name"]: m for m in body["models"]}
    assert {"most-nss", "most-net", "r2-d4", TINY} <= set(by_name)
    tiny = by_name[TINY]
    assert tiny["loaded"] and tiny["default"] and tiny["random_weights"] is True and tiny["checkpoint"] is None
    assert (tiny["backend"], tiny["device"], tiny["precision"]) == ("torch", "cpu", "fp32")
    assert tiny["image_outputs"] == ["restored", "teeth_mask"] and tiny["homography"] is True
    assert by_name["r2-d4"] == {"name": "r2-d4", "default": False, "allowed": True, "loaded": False}


def test_metrics_exposition(client: TestClient) -> None:
    text = client.get("/metrics").text
    for name in ("vident_sessions", "vident_frames_dropped_total", "vident_stage_seconds", "vident_batch_size"):
        assert f"# TYPE {name} " in text
    assert 'vident_model_loaded{backend="torch",device="cpu",model="most-nss-tiny",precision="fp32",' in text
    assert 'random_weights="true"} 1.0' in text


def test_metrics_count_frames_and_stages(client: TestClient) -> None:
    frame = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "PNG")
    with client.websocket_connect("/v1/stream", headers={"X-API-Key": "k"}) as ws:
        ws.receive_json()
        for _ in range(2):
            ws.send_bytes(buffer.getvalue())
            header = ws.receive_json()
            for _part in header["parts"]:
                ws.receive_bytes()
    deadline = time.monotonic() + 10
    while client.app.state.sessions.count and time.monotonic() < deadline:
        time.sleep(0.01)
    text = client.get("/metrics").text
    assert f'vident_frames_processed_total{{model="{TINY}"}} 2.0' in text
    for stage in ("decode", "wait", "infer", "encode", "total"):
        assert f'vident_stage_seconds_count{{stage="{stage}"}} 2.0' in text
    assert f'vident_batch_size_count{{model="{TINY}"}} 2.0' in text


def test_cors_and_docs(client: TestClient) -> None:
    preflight = client.options(
        "/v1/models",
        headers={"Origin": "https://display.example", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.headers["access-control-allow-origin"] == "https://display.example"
    other = client.options(
        "/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in other.headers
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/readyz", "/metrics", "/v1/models"} <= set(paths)


def test_demo_page_and_sample_clip_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the internet
    assert "warpHomography" in client.get("/static/app.js").text
    (clip,) = client.get("/static/samples/index.json").json()
    first = client.get(f"/static/{clip['path']}000000.jpg")
    assert first.status_code == 200 and first.content[:3] == b"\xff\xd8\xff"
    last = client.get(f"/static/{clip['path']}{clip['frames'] - 1:06d}.jpg")
    assert last.status_code == 200


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDENT_MAX_SESSIONS", "3")
    monkeypatch.setenv("VIDENT_MODEL", "r2-d4-tiny")
    monkeypatch.setenv("VIDENT_CORS_ORIGINS", '["https://a.example"]')
    monkeypatch.setenv("VIDENT_API_KEY", "")
    loaded = Settings(_env_file=None)
    assert (loaded.max_sessions, loaded.model, loaded.cors_origins, loaded.api_key) == (
        3,
        "r2-d4-tiny",
        ["https://a.example"],
        None,
    )
    assert loaded.key_matches(None)
    keyed = Settings(api_key="abc", _env_file=None)
    assert keyed.key_matches("abc") and not keyed.key_matches("abd") and not keyed.key_matches(None)


def test_lazy_model_loading_and_readiness_without_preload() -> None:
    with TestClient(create_app(settings(preload=False, allowed_models=["r2-d4-tiny"]))) as c:
        assert c.get("/readyz").status_code == 200
        assert c.app.state.engines == {}
        with c.websocket_connect("/v1/stream?model=r2-d4-tiny") as ws:
            hello = ws.receive_json()
            assert hello["model"] == "r2-d4-tiny" and hello["image_outputs"] == ["restored", "denoised"]
            assert hello["homography"] is False
        assert set(c.app.state.engines) == {"r2-d4-tiny"}
        with c.websocket_connect("/v1/stream?model=most-net-tiny") as ws:
            error = ws.receive_json()
        assert error["code"] == "unknown_model" and "not served here" in error["message"]


def test_shared_pool_loads_each_model_once() -> None:
    pool = EnginePool(backend="torch")
    try:
        first = pool.load(TINY)
        assert pool.load(TINY) is first and pool.engines[TINY] is first.engine  # loaded once, shared
        assert first.random_weights
    finally:
        pool.close()
    assert pool.engines == {}


def test_jobs_are_mounted_behind_the_key_and_live_with_the_app(tmp_path: Path) -> None:
    """Batch jobs share the app: their routes need the API key, their manager starts with the app and
    its workers stop with it."""
    with TestClient(create_app(settings(api_key="k", jobs={"data_dir": tmp_path / "jobs"}))) as c:
        wait_ready(c)
        assert c.get("/v1/jobs").status_code == 401
        listed = c.get("/v1/jobs", headers={"X-API-Key": "k"})
        assert listed.status_code == 200, listed.text
        manager = c.app.state.jobs
        assert manager.settings.jobs.data_dir == tmp_path / "jobs"
    assert (tmp_path / "jobs").is_dir()


def test_models_names_the_checkpoint_file_not_its_path(tmp_path: Path) -> None:
    weights = save_checkpoint(create_model(TINY), tmp_path / "secret-folder" / "tiny.safetensors")
    with TestClient(create_app(settings(checkpoints={TINY: weights}))) as c:
        wait_ready(c)
        tiny = {m["name"]: m for m in c.get("/v1/models").json()["models"]}[TINY]
    assert (tiny["checkpoint"], tiny["random_weights"]) == ("tiny.safetensors", False)
    assert str(tmp_path) not in json.dumps(tiny)


def test_api_keys_in_urls_are_redacted_in_uvicorn_logs(client: TestClient) -> None:
    """uvicorn logs each request line with its query (HTTP on uvicorn.access, WebSocket handshakes on
    uvicorn.error); the filter create_app installs must survive uvicorn's logging set-up."""
    uvicorn.Config(client.app, log_level="info")  # configures uvicorn's loggers, as `vident serve` does
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    loggers = [logging.getLogger("uvicorn.access"), logging.getLogger("uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        loggers[0].info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/v1/models?model=a&api_key=s3cret&x=1", "1.1", 200
        )
        loggers[1].info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5001", "/v1/stream?api_key=s3cret")
        loggers[1].info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5002", "/v1/stream?API%5Fkey=s3cret")
        loggers[0].info("GET /v1/jobs?api_key_hint=visible&apikey=visible")  # other names stay as they are
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    text = lines.getvalue()
    assert "s3cret" not in text, text
    assert "/v1/models?model=a&api_key=***&x=1" in text and "/v1/stream?api_key=***" in text
    assert "API%5Fkey=***" in text and "api_key_hint=visible&apikey=visible" in text
    create_app(settings())  # a second app does not stack a second filter
    assert sum(isinstance(f, app_module.RedactApiKey) for f in loggers[0].filters) == 1
