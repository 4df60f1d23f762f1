"""The /v1/jobs API on a minimal app (the streaming app mounts the same router): uploads, limits, ids,
results, cancellation, retention, recovery and priority on a shared engine."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from test_process import nontrivial_model, reference
from test_video import moving_frames, write_clip

from export.runtime import Backend
from models.checkpoints import load_model, save_checkpoint
from service.backends.factory import create_backend
from service.backends.torch import TorchBackend
from service.engine import InferenceEngine, Priority
from service.jobs.manager import JobManager
from service.jobs.routes import mount_jobs
from service.jobs.store import JOB_ID, Job, JobStore
from service.settings import JobsSettings, Settings
from service.video import read_video_frames

MODEL = "most-nss-tiny"


def make_app(settings: Settings, get_engine: Any = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.jobs.start()
        yield
        app.state.jobs.stop()

    app = FastAPI(lifespan=lifespan)
    mount_jobs(app, settings, get_engine)
    return app


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    """The service's settings for jobs on MODEL (torch, fp32); ``overrides`` name fields of either level."""
    jobs = {name: overrides.pop(name) for name in list(overrides) if name in JobsSettings.model_fields}
    jobs = {"data_dir": tmp_path / "data", "sweep_interval_s": 3600, **jobs}
    return Settings(**{"model": MODEL, "backend": "torch", **overrides}, jobs=jobs, _env_file=None)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(make_app(settings_for(tmp_path))) as client:
        yield client


def post(client: TestClient, path: Path, **fields: Any) -> Any:
    return client.post(
        "/v1/jobs", files={"file": (path.name, path.read_bytes())}, data={k: str(v) for k, v in fields.items()}
    )


def wait(client: TestClient, job_id: str, states: tuple[str, ...] = ("done", "failed"), timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {states}: {job}")


def test_job_lifecycle_and_results(tmp_path: Path) -> None:
    weights = save_checkpoint(nontrivial_model(MODEL), tmp_path / "weights.safetensors")
    with TestClient(make_app(settings_for(tmp_path, checkpoints={MODEL: weights}))) as client:
        check_lifecycle(client, tmp_path, TorchBackend(load_model(MODEL, weights)[0]))


def check_lifecycle(client: TestClient, tmp_path: Path, backend: Backend) -> None:
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(12))
    response = post(client, clip, model=MODEL, frames="true")
    assert response.status_code == 202, response.text
    created = response.json()
    assert JOB_ID.fullmatch(created["id"]) and created["state"] == "queued" and created["input_name"] == "clip.mp4"
    job = wait(client, created["id"])
    assert job["state"] == "done", job
    assert (job["frames_done"], job["frames_total"], job["progress"]) == (12, 12, 1.0)
    assert (job["attempts"], job["restarted"], job["error"]) == (1, False, None)
    assert job["files"] == [
        "mask.mp4", "overlay.mp4", "restored.mp4", "homographies.json", "report.json", "frames.zip"
    ]  # fmt: skip
    assert job["expires_at"] == pytest.approx(job["finished_at"] + 24 * 3600)
    assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [job["id"]]

    restored = client.get(f"/v1/jobs/{job['id']}/files/restored.mp4")
    assert restored.status_code == 200 and restored.headers["content-type"] == "video/mp4"
    (tmp_path / "restored.mp4").write_bytes(restored.content)
    info, frames = read_video_frames(tmp_path / "restored.mp4")
    assert (len(frames), info.fps) == (12, 25)
    homographies = client.get(f"/v1/jobs/{job['id']}/files/homographies.json").json()["homographies"]
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/files/frames.zip").content))
    assert len([n for n in archive.namelist() if n.startswith("restored/")]) == 12
    expected = reference(backend, [f.rgb for f in read_video_frames(clip)[1]])
    np.testing.assert_allclose(homographies, [r.homography for r in expected], atol=1e-9)
    for i in (0, 11):
        png = np.asarray(Image.open(io.BytesIO(archive.read(f"restored/{i:06d}.png"))))
        assert np.array_equal(png, expected[i].restored)
    report = client.get(f"/v1/jobs/{job['id']}/files/report.json").json()
    assert report["frames"] == 12 and report["model"] == MODEL
    # the upload is gone once the job is done; results stay until retention or DELETE
    folder = tmp_path / "data" / job["id"]
    assert not list(folder.glob("input*")) and (folder / "out" / "restored.mp4").is_file()
    deleted = client.delete(f"/v1/jobs/{job['id']}").json()
    assert deleted["removed"] and deleted["state"] == "done"
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404 and not folder.exists()


def test_bad_inputs_fail_the_job_not_the_server(client: TestClient, tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(12))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[:300])
    long = write_clip(tmp_path / "long.avi", moving_frames(30), "mjpeg", "yuvj420p")
    jobs = {name: post(client, path).json()["id"] for name, path in [("text", text), ("cut", cut), ("long", long)]}
    errors = {name: wait(client, job_id)["error"] for name, job_id in jobs.items()}
    assert errors["text"].startswith("notes.mp4 is not a readable video")
    assert "no video stream" in errors["cut"] or "no frame" in errors["cut"]
    assert errors["long"] is None
    assert all(wait(client, job_id)["state"] == ("done" if n == "long" else "failed") for n, job_id in jobs.items())
    assert client.get(f"/v1/jobs/{jobs['text']}/files/report.json").status_code == 404


def test_server_limits(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_frames=20, max_upload_mb=0.05)
    with TestClient(make_app(settings)) as client:
        long = write_clip(tmp_path / "long.avi", moving_frames(30), "mjpeg", "yuvj420p")
        job = wait(client, post(client, long).json()["id"])
        assert job["state"] == "failed" and "limit of 20" in job["error"] and "max_frames" in job["error"]
        job = wait(client, post(client, long, max_frames=10).json()["id"])
        assert (job["state"], job["frames_done"]) == ("done", 10)

        big = tmp_path / "big.mp4"
        big.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
        response = post(client, big)
        assert response.status_code == 413 and "limit of 0.05 MB" in response.json()["detail"]

        def chunked() -> Iterator[bytes]:  # no Content-Length: the cap is enforced while streaming
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.mp4"\r\n\r\n'
            for _ in range(20):
                yield b"\x00" * 10_000
            yield b"\r\n--b--\r\n"

        response = client.post(
            "/v1/jobs", content=chunked(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert response.status_code == 413
        # nothing is left of refused uploads
        assert sorted(p.name for p in (tmp_path / "data").iterdir() if JOB_ID.fullmatch(p.name)) == sorted(
            j["id"] for j in client.get("/v1/jobs").json()["jobs"]
        )


def test_request_validation(client: TestClient, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(2))
    assert post(client, clip, model="no-such-model").status_code == 400
    assert "unknown form field" in post(client, clip, colour="red").json()["detail"]
    assert post(client, clip, max_frames="-3").status_code == 400
    assert post(client, clip, frames="maybe").status_code == 400
    assert client.post("/v1/jobs", data={"model": MODEL}).status_code in (400, 415)
    assert client.post("/v1/jobs", content=b"raw", headers={"content-type": "video/mp4"}).status_code == 415
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert "empty" in post(client, empty).json()["detail"]
    for bad in ("..%2F..%2Fetc", "short", "A" * 21 + "!", "../jobs.sqlite3"):
        assert client.get(f"/v1/jobs/{bad}").status_code == 404
    job = wait(client, post(client, clip).json()["id"])
    for name in ("..%2Fjobs.sqlite3", "input.mp4", "out", "restored.MP4"):
        assert client.get(f"/v1/jobs/{job['id']}/files/{name}").status_code == 404
    with pytest.raises(ValueError):
        JobManager(settings_for(tmp_path)).job_dir("../../etc")


def test_delete_cancels_a_running_job(tmp_path: Path) -> None:
    with TestClient(make_app(settings_for(tmp_path))) as client:
        clip = write_clip(tmp_path / "clip.mp4", moving_frames(150))
        first, second = post(client, clip).json()["id"], post(client, clip).json()["id"]
        running = wait(client, first, ("running",))
        assert client.get(f"/v1/jobs/{second}").json()["state"] == "queued"  # one job at a time by default
        deleted = client.delete(f"/v1/jobs/{second}").json()
        assert (deleted["state"], deleted["removed"]) == ("cancelled", True)
        assert not (tmp_path / "data" / second).exists()
        assert running["frames_done"] < 150
        assert client.delete(f"/v1/jobs/{first}").json()["state"] == "cancelled"
        assert client.get(f"/v1/jobs/{first}").status_code == 404
        deadline = time.monotonic() + 10
        while (tmp_path / "data" / first).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (tmp_path / "data" / first).exists()  # the worker let go and removed the folder
        assert client.delete(f"/v1/jobs/{first}").status_code == 404


def test_retention_sweep(client: TestClient, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(2))
    job = wait(client, post(client, clip).json()["id"])
    orphan = tmp_path / "data" / ("o" * 22)  # an upload that never became a job (server died mid-upload)
    orphan.mkdir()
    (orphan / "upload.part").write_bytes(b"x")
    manager: JobManager = client.app.state.jobs
    assert manager.sweep() == []  # nothing has expired yet
    assert sorted(manager.sweep(now=time.time() + 25 * 3600)) == sorted([job["id"], orphan.name])
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert not (tmp_path / "data" / job["id"]).exists() and not orphan.exists()


def test_interrupted_jobs_restart_on_start(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(6))
    store = JobStore(settings.jobs.data_dir / "jobs.sqlite3")
    for job_id, state in (("r" * 22, "running"), ("q" * 22, "queued")):
        (settings.jobs.data_dir / job_id).mkdir()
        (settings.jobs.data_dir / job_id / "input.mp4").write_bytes(clip.read_bytes())
        store.insert(Job(job_id, "queued", MODEL, None, False, "clip.mp4", "input.mp4", 1, time.time()))
        if state == "running":  # a process claimed it, wrote partial results, then died
            assert store.claim(job_id, time.time())
            (settings.jobs.data_dir / job_id / "out").mkdir()
            (settings.jobs.data_dir / job_id / "out" / "stale.mp4").write_bytes(b"partial")
    store.close()
    with TestClient(make_app(settings)) as client:
        restarted, queued = wait(client, "r" * 22), wait(client, "q" * 22)
    assert (restarted["state"], restarted["restarted"], restarted["attempts"], restarted["frames_done"]) == (
        "done", True, 2, 6
    )  # fmt: skip
    assert (queued["state"], queued["restarted"], queued["attempts"]) == ("done", False, 1)
    assert not (settings.jobs.data_dir / ("r" * 22) / "out" / "stale.mp4").exists()


def test_jobs_use_the_shared_engine_at_batch_priority(tmp_path: Path) -> None:
    class Recording(InferenceEngine):
        priorities: list[Priority] = []

        def submit(self, stream: Any, frame: Any, priority: Priority = Priority.LIVE) -> Any:
            self.priorities.append(priority)
            return super().submit(stream, frame, priority)

    engine = Recording(create_backend(MODEL))
    engines = {MODEL: engine}
    try:
        with TestClient(make_app(settings_for(tmp_path, concurrent_jobs=2), engines.__getitem__)) as client:
            clip = write_clip(tmp_path / "clip.mp4", moving_frames(4))
            ids = [post(client, clip).json()["id"] for _ in range(2)]
            assert [wait(client, i)["state"] for i in ids] == ["done", "done"]
            # a model the app did not load: a clear job error
            other = wait(client, post(client, clip, model="most-net-tiny").json()["id"])
            assert other["state"] == "failed" and "not available" in other["error"]
    finally:
        engine.close()
    assert Recording.priorities == [Priority.BATCH] * 8
    assert json.loads((tmp_path / "data" / ids[0] / "out" / "report.json").read_text())["frames"] == 4


def test_graceful_stop_leaves_running_jobs_to_restart(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(60))
    with TestClient(make_app(settings)) as client:
        job_id = post(client, clip).json()["id"]
        wait(client, job_id, ("running",))
    store = JobStore(settings.jobs.data_dir / "jobs.sqlite3")  # the app has stopped: read the record directly
    stopped = store.get(job_id)
    store.close()
    assert stopped is not None and stopped.state == "running" and stopped.frames_done < 60
    with TestClient(make_app(settings)) as client:
        job = wait(client, job_id)
    assert (job["state"], job["restarted"], job["attempts"], job["frames_done"]) == ("done", True, 2, 60)


def test_frames_over_the_pixel_budget_are_refused_before_decoding(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(3))  # 96x64 = 6144 pixels
    with TestClient(make_app(settings_for(tmp_path, max_frame_pixels=96 * 64 - 1))) as client:
        response = post(client, clip)
        assert response.status_code == 400
        detail = response.json()["detail"]
        assert detail.startswith("clip.mp4: 96x64 frames (6144 pixels)") and "6143" in detail
        assert "max_frame_pixels" in detail
        assert client.get("/v1/jobs").json()["jobs"] == []  # nothing stored
        assert not [p for p in (tmp_path / "data").iterdir() if JOB_ID.fullmatch(p.name)]
    with TestClient(make_app(settings_for(tmp_path, max_frame_pixels=96 * 64))) as client:
        job_id = post(client, clip).json()["id"]  # exactly at the budget
        assert wait(client, job_id)["state"] == "done"
    # a job accepted under a larger budget that the server has since lowered: checked again when it runs
    settings = settings_for(tmp_path, max_frame_pixels=1000)
    store = JobStore(settings.jobs.data_dir / "jobs.sqlite3")
    (settings.jobs.data_dir / ("p" * 22)).mkdir()
    (settings.jobs.data_dir / ("p" * 22) / "input.mp4").write_bytes(clip.read_bytes())
    store.insert(Job("p" * 22, "queued", MODEL, None, False, "clip.mp4", "input.mp4", 1, time.time()))
    store.close()
    with TestClient(make_app(settings)) as client:
        job = wait(client, "p" * 22)
    assert job["state"] == "failed" and "limit of 1000 pixels per frame" in job["error"]


def test_max_frames_is_range_checked(client: TestClient, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(2))
    for bad in (str(10**30), "0", "108001", "1.5", "ten"):
        response = post(client, clip, max_frames=bad)
        assert response.status_code == 400, (bad, response.text)
        assert "max_frames must be an integer from 1 to 108000" in response.json()["detail"]
    job = wait(client, post(client, clip, max_frames=108000).json()["id"])
    assert (job["state"], job["options"]["max_frames"]) == ("done", 108000)


def crash_under(store: JobStore, job_ids: list[str], times: int, max_attempts: int = 3) -> None:
    """What ``times`` server deaths during the jobs leave in the store: each start claims the jobs
    (attempts + 1, recorded before they run) and the process dies before they end."""
    for _ in range(times):
        _, failed = store.recover(max_attempts, time.time())  # what the next start does first
        assert failed == []
        for job_id in job_ids:
            assert store.claim(job_id, time.time())


def test_a_job_that_keeps_killing_the_server_fails_instead_of_crash_looping(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)  # max_attempts 3 by default
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4))
    store = JobStore(settings.jobs.data_dir / "jobs.sqlite3")
    for job_id in ("x" * 22, "s" * 22, "q" * 22):
        (settings.jobs.data_dir / job_id).mkdir()
        (settings.jobs.data_dir / job_id / "input.mp4").write_bytes(clip.read_bytes())
        store.insert(Job(job_id, "queued", MODEL, None, False, "clip.mp4", "input.mp4", 1, time.time()))
    # x is the poison job: the server died in all three of its runs; s ran three times too, but one
    # of its runs ended in a graceful stop, which is not the job's doing
    crash_under(store, ["x" * 22, "s" * 22], 3)
    store.stopped("s" * 22)
    store.close()
    with TestClient(make_app(settings)) as client:
        poison, survivor, queued = (wait(client, job_id) for job_id in ("x" * 22, "s" * 22, "q" * 22))
        assert client.get("/v1/jobs").status_code == 200
    assert (poison["state"], poison["attempts"], poison["frames_done"]) == ("failed", 3, 0)
    assert "stopped 3 times while this job ran" in poison["error"] and "max_attempts 3" in poison["error"]
    assert poison["finished_at"] is not None  # so the retention sweep removes it like any finished job
    assert (survivor["state"], survivor["attempts"], survivor["restarted"]) == ("done", 4, True)
    assert (queued["state"], queued["attempts"]) == ("done", 1)


def test_max_attempts_is_a_setting(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_attempts=1)
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(2))
    store = JobStore(settings.jobs.data_dir / "jobs.sqlite3")
    (settings.jobs.data_dir / ("x" * 22)).mkdir()
    (settings.jobs.data_dir / ("x" * 22) / "input.mp4").write_bytes(clip.read_bytes())
    store.insert(Job("x" * 22, "queued", MODEL, None, False, "clip.mp4", "input.mp4", 1, time.time()))
    crash_under(store, ["x" * 22], 1, max_attempts=1)
    store.close()
    with TestClient(make_app(settings)) as client:
        job = wait(client, "x" * 22)
    assert (job["state"], job["attempts"]) == ("failed", 1) and "max_attempts 1" in job["error"]


def test_a_store_without_the_stops_column_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            """CREATE TABLE jobs (
                id TEXT PRIMARY KEY, state TEXT NOT NULL, model TEXT NOT NULL, max_frames INTEGER,
                frames INTEGER NOT NULL, input_name TEXT NOT NULL, input_file TEXT NOT NULL,
                input_bytes INTEGER NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
                frames_done INTEGER NOT NULL DEFAULT 0, frames_total INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
                restarted INTEGER NOT NULL DEFAULT 0, error TEXT, warnings TEXT, files TEXT)"""
        )
        db.execute(
            "INSERT INTO jobs (id, state, model, frames, input_name, input_file, input_bytes, created_at, attempts) "
            "VALUES (?, 'running', ?, 0, 'a.mp4', 'input.mp4', 1, 0, 3)",
            ("o" * 22, MODEL),
        )
        db.commit()
    store = JobStore(path)
    try:
        assert store.recover(3, time.time()) == (0, ["o" * 22])
        job = store.get("o" * 22)
        assert job is not None and (job.state, job.stops) == ("failed", 0)
    finally:
        store.close()


def test_a_tiny_video_runs_on_a_runtime_with_a_minimum_size(tmp_path: Path) -> None:
    """17x13 frames: OpenVINO refuses the network below 24 pixels a side; frames are padded up to the
    pipeline's minimum and the outputs keep the input's size."""
    pytest.importorskip("openvino")
    clip = write_clip(tmp_path / "tiny.mkv", moving_frames(3, 13, 17), "ffv1", "bgr0")
    with TestClient(make_app(settings_for(tmp_path, backend="openvino"))) as client:
        # OpenVINO compiles the refinement's unrolled steps first: minutes on a loaded 2-core machine.
        job = wait(client, post(client, clip, frames="true").json()["id"], timeout=300)
        assert (job["state"], job["frames_done"], job["error"]) == ("done", 3, None), job
        archive = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/files/frames.zip").content))
        assert np.asarray(Image.open(io.BytesIO(archive.read("restored/000002.png")))).shape == (13, 17, 3)
        report = client.get(f"/v1/jobs/{job['id']}/files/report.json").json()
    assert report["encoded_size"] == [14, 18]  # H.264 needs even sizes: one replicated row and column
