"""Batch jobs across machines on real components: redis-server (Debian's package), `vident worker` processes and
an API replica with ``VIDENT_JOBS_BROKER`` (the app under uvicorn, in the test process). Nothing is mocked.

The end-to-end test kills a worker with SIGKILL in the middle of a job; the claim, fencing and publishing rules
that make that safe are also checked one by one against the same Redis, where they are cheap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from real_servers import TINY, one_torch_thread, redis_server, require_queue_packages  # noqa: F401
from test_video import moving_frames, write_clip

from benchmarks.cluster import Process, free_port, vident, wait_for
from service.app import create_app, serve_in_thread
from service.cli import main
from service.jobs.store import Job
from service.settings import JobsSettings, Settings
from service.video import read_video_frames

FRAMES = 24
JOBS = 8


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    yield from redis_server(tmp_path)


def new_job(job_id: str) -> Job:
    return Job(job_id, "queued", TINY, None, False, "clip.mp4", "input.mp4", 1, time.time())


def test_claims_count_crashes_fence_old_runs_and_end_crash_loops(redis_url: str) -> None:
    from service.jobs_queue import RedisJobStore, connect

    store = RedisJobStore(connect(redis_url), redis_url)
    job_id = "c" * 22
    store.insert(new_job(job_id))
    assert store.claim(job_id, "w1", time.time(), max_attempts=3).outcome == "claimed"
    assert store.progress(job_id, 1, 5, 48)
    # w1 is alive and its status says it runs the job: a second delivery must not take the job from it
    status = {"name": "w1", "running": [{"job": job_id, "attempt": 1}]}
    store.client.set(store.alive_prefix + "w1", json.dumps(status), px=60_000)
    busy = store.claim(job_id, "w2", time.time(), 3)
    assert (busy.outcome, store.get(job_id).attempts) == ("busy", 1) and 0 < busy.number <= 60_000
    # w1 lives on but no longer runs it (its run was lost): the job is taken over, and w1's writes refused
    store.client.set(store.alive_prefix + "w1", json.dumps({**status, "running": []}), px=60_000)
    assert store.claim(job_id, "w2", time.time(), 3).number == 2
    assert not store.progress(job_id, 1, 6, 48) and not store.finish(job_id, 1, "done", time.time(), files=["x"])
    job = store.get(job_id)
    assert (job.state, job.attempts, job.restarted, job.worker, job.frames_done) == ("running", 2, True, "w2", 0)
    # a graceful stop is not a crash: it does not count towards max_attempts
    assert store.stopped(job_id, 2)
    assert store.claim(job_id, "w3", time.time(), 3).number == 3
    assert store.claim(job_id, "w4", time.time(), 3).number == 4  # crashes: attempts 1 and 3 -> 2 < 3
    failed = store.claim(job_id, "w5", time.time(), 3)  # the crash of attempt 4 is the third
    job = store.get(job_id)
    assert (failed.outcome, failed.number, job.state, job.stops) == ("failed", 3, "failed", 1)
    assert job.error.startswith("the workers running this job died 3 times") and "max_attempts 3" in job.error
    assert store.claim(job_id, "w5", time.time(), 3).outcome == "finished"  # no loop: later deliveries do nothing
    assert [j.id for j in store.expired(time.time() + 1)] == [job_id]
    assert store.delete(job_id) and store.claim(job_id, "w5", time.time(), 3).outcome == "missing"


def test_a_worker_without_the_shared_folder_fails_the_job_and_says_why(redis_url: str, tmp_path: Path) -> None:
    from service.jobs_queue import JobWorker

    jobs = JobsSettings(broker=redis_url, data_dir=tmp_path / "elsewhere", worker_name="w9")
    worker = JobWorker(Settings(jobs=jobs, _env_file=None))
    job_id = "d" * 22
    worker.store.insert(new_job(job_id))
    attempt = worker.store.claim(job_id, worker.name, time.time(), 3).number
    worker._run(job_id, attempt)  # what the queue's delivery runs once the claim succeeded
    job = worker.store.get(job_id)
    assert (job.state, worker.finished["failed"]) == ("failed", 1)
    assert job.error.startswith(f"worker w9 finds no upload in {tmp_path / 'elsewhere' / job_id}"), job.error
    worker.stop()


def test_publishing_is_all_or_nothing_and_first_wins(tmp_path: Path) -> None:
    require_queue_packages()
    from service.jobs_queue import publish

    first, second = tmp_path / ".out-1", tmp_path / ".out-2"
    for staging, text in ((first, "first"), (second, "second")):
        staging.mkdir()
        (staging / "report.json").write_text(text)
    assert publish(first, tmp_path / "out") and not first.exists()
    assert not publish(second, tmp_path / "out")  # a second complete set never replaces or mixes with the first
    assert (tmp_path / "out" / "report.json").read_text() == "first"


def test_api_replicas_share_records_and_answer_503_without_redis(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIDENT_JOBS_DATA_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("VIDENT_JOBS_BROKER", redis_url)
    settings = Settings(model=TINY, backend="torch", preload=False, _env_file=None)
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(4))
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        created = one.post("/v1/jobs", files={"file": ("clip.mp4", clip.read_bytes())})
        assert created.status_code == 202 and created.json()["state"] == "queued"
        job_id = created.json()["id"]
        assert [j["id"] for j in two.get("/v1/jobs").json()["jobs"]] == [job_id]  # another replica sees it
        metrics = two.get("/metrics").text
        assert "vident_jobs_queue_depth 1.0" in metrics and "vident_jobs_broker_up 1.0" in metrics
        assert two.delete(f"/v1/jobs/{job_id}").json()["removed"] is True
        assert one.get(f"/v1/jobs/{job_id}").status_code == 404
        assert not (tmp_path / "jobs" / job_id).exists()
    monkeypatch.setenv("VIDENT_JOBS_BROKER", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    settings = Settings(model=TINY, backend="torch", preload=False, _env_file=None)  # the environment is read here
    with TestClient(create_app(settings)) as away:
        response = away.get("/v1/jobs")
        assert response.status_code == 503 and "unreachable" in response.json()["detail"]
        assert "vident_jobs_broker_up 0.0" in away.get("/metrics").text
        assert away.get("/healthz").status_code == 200  # streaming does not depend on the job broker


def test_a_wrong_or_dead_broker_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    require_queue_packages()
    assert main(["worker", "--broker", "http://127.0.0.1:6379"]) == 2
    assert main(["serve", "--jobs-broker", "127.0.0.1:6379"]) == 2  # before loading anything
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    assert main(["worker", "--broker", dead, "--worker-name", "w"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == (
        "vident worker: broker: the job broker must be a URL like redis://HOST:6379/0 (rediss://, unix://), "
        "got a URL starting http://"
    )
    assert errors[1].startswith("vident serve: broker: the job broker must be a URL") and errors[1].endswith("no URL")
    assert errors[2].startswith(f"vident worker: the job broker at {dead} is unreachable"), errors


def test_a_worker_killed_mid_job_loses_nothing(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "jobs"
    env = {
        "VIDENT_JOBS_DATA_DIR": str(data_dir),
        "VIDENT_JOBS_BROKER": redis_url,
        "VIDENT_JOBS_HEARTBEAT_TIMEOUT_S": "3",  # production default 15 s; short here to keep the test short
        "VIDENT_BACKEND": "torch",
    }
    for name, value in env.items():  # the API replica runs in this process (uvicorn on a thread), workers apart
        monkeypatch.setenv(name, value)
    workers = {
        name: vident(["worker", "--worker-name", name], tmp_path / f"{name}.log", **env) for name in ("w1", "w2")
    }
    app = create_app(Settings(model=TINY, backend="torch", preload=False, _env_file=None))
    try:
        with serve_in_thread(app) as url:
            _kill_one_of_two_workers(url, workers, data_dir, write_clip(tmp_path / "clip.mp4", moving_frames(FRAMES)))
    finally:
        for process in workers.values():
            process.stop()


def _kill_one_of_two_workers(url: str, workers: dict[str, Process], data_dir: Path, clip: Path) -> None:
    for worker in workers.values():  # both heartbeats registered: each takes one job as soon as they come
        wait_for(lambda w=worker: True if "vident_jobs_workers 2.0" in _metrics(url, w) else None, 240, "workers")
    ids = []
    for _ in range(JOBS):
        response = httpx.post(f"{url}/v1/jobs", files={"file": ("clip.mp4", clip.read_bytes())}, timeout=30)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])

    def w1_frozen_mid_job() -> dict | None:
        """Freezes w1 (SIGSTOP) and reads the records: a job it runs with some frames done is the victim, and
        it stays so until the kill; otherwise w1 goes on and we look again."""
        workers["w1"].pause()
        victim = None
        try:
            jobs = httpx.get(f"{url}/v1/jobs", timeout=5).json()["jobs"]
            running = [j for j in jobs if j["state"] == "running" and j.get("worker") == "w1"]
            victim = next((j for j in running if 0 < j["frames_done"] < FRAMES), None)
        finally:
            if victim is None:
                workers["w1"].resume()
        return victim

    victim = wait_for(w1_frozen_mid_job, 240, "a job in progress on w1", interval=0.01)
    workers["w1"].kill()
    assert len(list((data_dir / victim["id"]).glob(f".out-{victim['attempts']}-*"))) == 1  # its unpublished part
    metrics = _metrics(url, workers["w2"])
    assert "vident_jobs_queue_depth" in metrics and 'vident_jobs_worker_frames_done{worker="w2"}' in metrics

    def all_finished() -> list[dict] | None:
        jobs = [httpx.get(f"{url}/v1/jobs/{i}", timeout=5).json() for i in ids]
        return jobs if all(j["state"] in ("done", "failed") for j in jobs) else None

    jobs = {j["id"]: j for j in wait_for(all_finished, 240, "all jobs to finish", interval=0.2)}
    assert workers["w2"].alive(), workers["w2"].tail()
    assert {j["state"] for j in jobs.values()} == {"done"}, [j["error"] for j in jobs.values()]
    redone = jobs[victim["id"]]
    assert (redone["attempts"], redone["restarted"], redone["worker"]) == (2, True, "w2"), redone
    others = [j for i, j in jobs.items() if i != victim["id"]]
    assert all((j["attempts"], j["restarted"]) == (1, False) for j in others), others
    assert {j["worker"] for j in others} <= {"w1", "w2"}, others
    for job_id in ids:  # exactly one complete set of outputs per job, nothing half-written left over
        folder = data_dir / job_id
        assert sorted(p.name for p in folder.iterdir()) == ["out"], list(folder.iterdir())
        out = folder / "out"
        assert sorted(jobs[job_id]["files"]) == sorted(p.name for p in out.iterdir())
        assert json.loads((out / "report.json").read_text())["frames"] == FRAMES
        assert len(read_video_frames(out / "restored.mp4")[1]) == FRAMES
    restored = httpx.get(f"{url}/v1/jobs/{victim['id']}/files/restored.mp4", timeout=30)
    assert restored.status_code == 200
    assert restored.content == (data_dir / victim["id"] / "out" / "restored.mp4").read_bytes()


def _metrics(url: str, worker: Process) -> str:
    if not worker.alive():
        raise AssertionError(f"a worker exited: {worker.tail()}")
    return httpx.get(f"{url}/metrics", timeout=5).text
