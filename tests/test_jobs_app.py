"""Jobs inside the streaming app (``service.app.create_app`` mounts the router and enters the lifespan hook):
the app's engine pool runs the job, the API key guards /v1/jobs, and a busy data folder disables jobs
without taking the streaming service down."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_jobs import MODEL, post, wait
from test_video import moving_frames, write_clip

from service.app import create_app
from service.jobs.manager import JobManager
from service.jobs.routes import running
from service.settings import JobsSettings, Settings


@pytest.fixture(autouse=True)
def _data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDENT_JOBS_DATA_DIR", str(tmp_path / "jobs"))


def test_jobs_share_the_apps_engines_and_api_key(tmp_path: Path) -> None:
    settings = Settings(model=MODEL, backend="torch", preload=False, api_key="secret", _env_file=None)
    with TestClient(create_app(settings)) as client:
        clip = write_clip(tmp_path / "clip.mp4", moving_frames(6))
        assert post(client, clip).status_code == 401
        client.headers["X-API-Key"] = "secret"
        job = wait(client, post(client, clip).json()["id"])
        assert (job["state"], job["model"], job["frames_done"]) == ("done", MODEL, 6)  # the app's default model
        assert MODEL in client.app.state.engines  # loaded by the app's pool, shared with live sessions
        assert client.get(f"/v1/jobs/{job['id']}/files/restored.mp4").status_code == 200
        assert post(client, clip, model="no-such-model").status_code == 400


def test_busy_data_dir_disables_jobs_not_the_server(tmp_path: Path) -> None:
    with running(JobManager(Settings(jobs=JobsSettings(data_dir=tmp_path / "jobs"), _env_file=None))):  # busy
        with TestClient(create_app(Settings(model=MODEL, backend="torch", preload=False, _env_file=None))) as client:
            response = client.get("/v1/jobs")
            assert response.status_code == 503 and "in use by another vident server" in response.json()["detail"]
            assert client.get("/healthz").status_code == 200
