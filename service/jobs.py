"""Durable batch jobs: ``/v1/jobs`` uploads a recorded video, a worker pool runs :func:`process_video` on it.

Durable with no extra server: job records live in SQLite (stdlib ``sqlite3``, WAL journal) and files in
``<data_dir>/<job id>/``. The database is the truth, the in-memory queue only a wake-up list, so a
server that stops or crashes loses nothing: at start, queued jobs run and jobs found ``running`` (the
process died under them) go back to the queue, restart from the beginning and say so
(``restarted: true``, ``attempts`` > 1).

Workers submit frames with ``Priority.BATCH`` to the same :class:`~service.engine.InferenceEngine`
that live sessions use, so a long job never delays a display client. Job ids come from
``secrets.token_urlsafe`` and are checked against :data:`JOB_ID` before they touch the filesystem;
result names are checked against the job's own list of produced files.

Across machines (``VIDENT_JOBS_BROKER=redis://...``): records live in Redis and a shared queue feeds
``vident worker`` processes on any node; :mod:`service.jobs_queue` implements that mode behind the same
API (:func:`make_manager` picks one), and the single-machine path needs neither Redis nor its client.

``service.app.create_app`` mounts :data:`router` and enters :func:`lifespan` (jobs then use the app's
engine pool). Any other FastAPI app can use :func:`mount_jobs` and call ``start()`` / ``stop()`` from its
lifespan; ``uvicorn --factory service.jobs:create_standalone_app`` serves the jobs API alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import re
import secrets
import shutil
import sqlite3
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client.registry import Collector
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from service.engine import InferenceEngine, Priority
from service.process import Cancelled, ProcessOptions, Progress, process_video
from service.settings import DEFAULT_MAX_FRAME_PIXELS
from service.video import FrameTooLarge, VideoError, open_video

log = logging.getLogger("vident.jobs")

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")  # secrets.token_urlsafe(16): 128 random bits
STATES = ("queued", "running", "done", "failed", "cancelled")
_SUFFIX = re.compile(r"^\.[a-z0-9]{1,5}$")
_PROGRESS_EVERY_S = 0.5  # database writes for progress, at most this often per job


class JobSettings(BaseSettings):
    """Jobs configuration, environment variables ``VIDENT_JOBS_<FIELD>`` (e.g. ``VIDENT_JOBS_DATA_DIR``)."""

    model_config = SettingsConfigDict(env_prefix="VIDENT_JOBS_")

    data_dir: Path = Field(default_factory=lambda: _default_data_dir(), description="job records and files")
    max_upload_mb: float = Field(2048.0, gt=0, description="upload size cap, streamed to disk")
    concurrent_jobs: int = Field(1, ge=1, le=32, description="jobs processed at the same time")
    retention_hours: float = Field(24.0, gt=0, description="finished jobs and their files are removed after this")
    sweep_interval_s: float = Field(60.0, gt=0, description="how often expired jobs are looked for")
    max_frames: int = Field(108_000, ge=1, description="longer videos need max_frames (1 h at 30 fps)")
    max_duration_s: float = Field(3600.0, gt=0, description="longer videos need max_frames")
    max_frame_pixels: int = Field(
        DEFAULT_MAX_FRAME_PIXELS, ge=64, description="larger frames are refused; default: the app's max_frame_pixels"
    )
    max_attempts: int = Field(
        3, ge=1, description="a job whose runs ended this often with the server dying under it fails for good"
    )
    default_model: str = "most-nss"
    models: list[str] = Field(default_factory=list, description="models jobs may ask for; empty: any registered")
    # For engines this module creates itself (no get_engine given):
    checkpoints: dict[str, Path] = Field(default_factory=dict, description="model name -> weights file")
    backend: str = "torch"
    device: str = "cpu"
    precision: str = "fp32"
    engine_max_batch: int = Field(8, ge=1)
    # Across machines (service.jobs_queue); unset, everything above runs in this one process:
    broker: str | None = Field(
        None, description="redis://host:6379/0: records and the queue live there and `vident worker` processes run "
        "the jobs; unset: embedded SQLite and in-process workers",
    )  # fmt: skip
    heartbeat_timeout_s: float = Field(
        15.0, gt=0, description="a worker silent this long counts as dead: its job is delivered to another worker"
    )
    worker_name: str = Field("", description="this worker's name in records and metrics; empty: host-pid")

    @field_validator("broker", mode="before")
    @classmethod
    def _broker_url(cls, value: object) -> object:
        if value in ("", None):
            return None  # VIDENT_JOBS_BROKER= (empty) in a compose file: no broker
        scheme, sep, _ = str(value).partition("://")
        if not sep or scheme not in ("redis", "rediss", "unix"):  # the message shows no more than the scheme: a
            shown = f"a URL starting {scheme}://" if sep else "no URL"  # URL may carry a password
            raise ValueError(f"the job broker must be a URL like redis://HOST:6379/0 (rediss://, unix://), got {shown}")
        return value


def _default_data_dir() -> Path:
    """Per-user data folder (XDG), not the working directory: a server started from a checkout must not
    write into it. Containers set ``VIDENT_JOBS_DATA_DIR`` to a mounted volume."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "vident" / "jobs"


@dataclass
class Job:
    id: str
    state: str
    model: str
    max_frames: int | None
    frames: bool
    input_name: str
    input_file: str
    input_bytes: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    frames_done: int = 0
    frames_total: int | None = None
    attempts: int = 0
    restarted: bool = False
    stops: int = 0  # runs interrupted by a graceful server stop (not the job's doing)
    error: str | None = None
    warnings: list[str] | None = None
    files: list[str] | None = None
    worker: str | None = None  # the worker that runs or ran the job (distributed mode; None on one machine)

    def public(self, retention_s: float, now: float | None = None) -> dict[str, Any]:
        """The API view: progress, rate and ETA are derived here, not stored."""
        now = time.time() if now is None else now
        elapsed = (self.finished_at or now) - self.started_at if self.started_at else 0.0
        rate = self.frames_done / elapsed if self.state == "running" and elapsed > 0 else None
        eta = None
        if rate and self.frames_total:
            eta = round(max(0.0, self.frames_total - self.frames_done) / rate, 1)
        progress = 1.0 if self.state == "done" else 0.0
        if self.state != "done" and self.frames_total:
            progress = min(1.0, self.frames_done / self.frames_total)
        view = {
            "id": self.id,
            "state": self.state,
            "model": self.model,
            "options": {"max_frames": self.max_frames, "frames": self.frames},
            "input_name": self.input_name,
            "input_bytes": self.input_bytes,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": round(progress, 4),
            "frames_done": self.frames_done,
            "frames_total": self.frames_total,
            "frames_per_s": round(rate, 2) if rate else None,
            "eta_s": eta,
            "attempts": self.attempts,
            "restarted": self.restarted,
            "error": self.error,
            "warnings": self.warnings or [],
            "files": self.files or [],
            "expires_at": self.finished_at + retention_s if self.finished_at else None,
        }
        if self.worker is not None:
            view["worker"] = self.worker
        return view


class JobStore:
    """Job records in SQLite. One connection behind a lock: writes are tiny and rare (progress every
    0.5 s per job), so a lock is simpler than a connection per thread and keeps WAL readers cheap."""

    _COLUMNS = (
        "id, state, model, max_frames, frames, input_name, input_file, input_bytes, created_at, started_at, "
        "finished_at, frames_done, frames_total, attempts, restarted, error, warnings, files, stops"
    )

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, state TEXT NOT NULL, model TEXT NOT NULL, max_frames INTEGER,
                frames INTEGER NOT NULL, input_name TEXT NOT NULL, input_file TEXT NOT NULL,
                input_bytes INTEGER NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
                frames_done INTEGER NOT NULL DEFAULT 0, frames_total INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
                restarted INTEGER NOT NULL DEFAULT 0, error TEXT, warnings TEXT, files TEXT,
                stops INTEGER NOT NULL DEFAULT 0)"""
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "stops" not in columns:  # a data folder written before the column existed
            self._db.execute("ALTER TABLE jobs ADD COLUMN stops INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def _fetch(self, where: str, params: tuple[Any, ...] = ()) -> list[Job]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM jobs {where}", params).fetchall()
        return [_job_from_row(row) for row in rows]

    def insert(self, job: Job) -> None:
        self._execute(
            "INSERT INTO jobs (id, state, model, max_frames, frames, input_name, input_file, input_bytes, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.id, job.state, job.model, job.max_frames, int(job.frames), job.input_name, job.input_file,
             job.input_bytes, job.created_at),
        )  # fmt: skip

    def get(self, job_id: str) -> Job | None:
        jobs = self._fetch("WHERE id = ?", (job_id,))
        return jobs[0] if jobs else None

    def list(self, limit: int = 100) -> list[Job]:
        return self._fetch("ORDER BY created_at DESC LIMIT ?", (limit,))

    def queued(self) -> list[Job]:
        return self._fetch("WHERE state = 'queued' ORDER BY created_at")

    def recover(self, max_attempts: int, now: float) -> tuple[int, list[str]]:
        """Jobs a dead process left ``running`` go back to the queue, marked restarted, except those
        that were running every one of the ``max_attempts`` times the server died: they end
        ``failed``, or a job that kills the server (out of memory, a crash in a native library)
        would kill it again at every start. Returns (jobs requeued, ids of jobs failed)."""
        failed = []
        for job in self._fetch("WHERE state = 'running' AND attempts - stops >= ?", (max_attempts,)):
            crashes = job.attempts - job.stops
            error = (
                f"the server stopped {crashes} times while this job ran (a crash, out of memory or a kill), "
                f"the most this server allows (max_attempts {max_attempts}); the job is not run again"
            )
            self._execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE id = ? AND state = 'running'",
                (now, error, job.id),
            )
            failed.append(job.id)
        cursor = self._execute(
            "UPDATE jobs SET state = 'queued', restarted = 1, frames_done = 0, frames_total = NULL "
            "WHERE state = 'running'"
        )
        return cursor.rowcount, failed

    def stopped(self, job_id: str) -> None:
        """A graceful stop interrupted the job's run: that attempt does not count against max_attempts."""
        self._execute("UPDATE jobs SET stops = stops + 1 WHERE id = ? AND state = 'running'", (job_id,))

    def claim(self, job_id: str, now: float) -> bool:
        """queued -> running, atomically: False if the job was deleted or taken meanwhile."""
        cursor = self._execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, frames_done = 0, "
            "error = NULL WHERE id = ? AND state = 'queued'",
            (now, job_id),
        )
        return cursor.rowcount == 1

    def progress(self, job_id: str, done: int, total: int | None) -> bool:
        """False once the record is gone (the job was deleted): the worker then cancels."""
        cursor = self._execute(
            "UPDATE jobs SET frames_done = ?, frames_total = ? WHERE id = ? AND state = 'running'",
            (done, total, job_id),
        )
        return cursor.rowcount == 1

    def finish(self, job_id: str, state: str, now: float, **fields: Any) -> bool:
        assert state in ("done", "failed"), state
        values = {"state": state, "finished_at": now}
        for key, value in fields.items():
            values[key] = json.dumps(value) if key in ("warnings", "files") else value
        sets = ", ".join(f"{key} = ?" for key in values)
        cursor = self._execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), job_id))
        return cursor.rowcount == 1

    def delete(self, job_id: str) -> bool:
        return self._execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount == 1

    def expired(self, before: float) -> list[Job]:
        return self._fetch("WHERE state IN ('done', 'failed') AND finished_at < ?", (before,))


def _job_from_row(row: tuple[Any, ...]) -> Job:
    (id_, state, model, max_frames, frames, input_name, input_file, input_bytes, created_at, started_at,
     finished_at, frames_done, frames_total, attempts, restarted, error, warnings, files, stops) = row  # fmt: skip
    return Job(
        id_, state, model, max_frames, bool(frames), input_name, input_file, input_bytes, created_at, started_at,
        finished_at, frames_done, frames_total, attempts, bool(restarted), stops, error,
        json.loads(warnings) if warnings else None, json.loads(files) if files else None,
    )  # fmt: skip


class JobManager:
    """Owns the store, the worker threads and the retention sweep; ``start()`` and ``stop()`` from a lifespan.

    ``get_engine(model)`` returns the shared engine of a loaded model (the streaming app's); without
    it the manager loads its own engines with :func:`service.backends.factory.create_backend`.
    """

    def __init__(
        self, settings: JobSettings | None = None, get_engine: Callable[[str], InferenceEngine] | None = None
    ) -> None:
        self.settings = settings or JobSettings()
        self.root = self.settings.data_dir.resolve()
        self._get_engine = get_engine
        self._own_engines = OwnEngines(self.settings)
        self._wake: queue.Queue[str | None] = queue.Queue()
        self._cancels: dict[str, threading.Event] = {}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.store: JobStore | None = None
        self._lock_file: IO[bytes] | None = None
        self.unavailable: str | None = None  # why jobs are off (set by the app hook), for 503 answers

    # lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Raises :class:`DataDirBusy` if another process serves jobs from the same folder: two servers
        would each restart the other's running jobs."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock_exclusively(self.root / "server.lock")
        self.store = JobStore(self.root / "jobs.sqlite3")
        restarted, failed = self.store.recover(self.settings.max_attempts, time.time())
        if restarted:
            log.warning("%d interrupted job(s) restart from the beginning", restarted)
        for job_id in failed:
            log.error("job %s: the server died under it %d times; marked failed", job_id, self.settings.max_attempts)
        self._stopping.clear()
        for job in self.store.queued():
            self._wake.put(job.id)
        for i in range(self.settings.concurrent_jobs):
            self._threads.append(threading.Thread(target=self._work, name=f"jobs-worker-{i}", daemon=True))
        self._threads.append(threading.Thread(target=self._sweep_loop, name="jobs-retention", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Running jobs are interrupted and stay ``running`` in the store: the next start restarts them."""
        self._stopping.set()
        for event in list(self._cancels.values()):
            event.set()
        for _ in range(self.settings.concurrent_jobs):
            self._wake.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        self._own_engines.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the lock (a crash releases it too)
            self._lock_file = None

    def metrics_collector(self) -> Collector | None:
        """A Prometheus collector for the app's ``/metrics``, or None: on one machine the queue is in-process
        and the job records say everything (the distributed manager returns one for the shared queue)."""
        return None

    @property
    def db(self) -> JobStore:
        if self.store is None:
            raise RuntimeError("the job manager is not started")
        return self.store

    # paths -----------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        """The only way from a job id to a path: ids that are not ours never reach the filesystem."""
        if not JOB_ID.fullmatch(job_id):
            raise ValueError("malformed job id")
        return self.root / job_id

    def result_path(self, job: Job, name: str) -> Path | None:
        if job.state != "done" or name not in (job.files or []):
            return None
        return self.job_dir(job.id) / "out" / name

    # API operations ------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        from models import list_models

        allowed = self.settings.models or list_models(include_tiny=True)
        if model not in allowed:
            raise ValueError(f"model {model!r} is not available for jobs; available: {', '.join(allowed)}")

    def check_input(self, path: Path, name: str) -> None:
        """FrameTooLarge when the container declares frames over the pixel budget (answered with 400 at
        upload). Anything else wrong with the file is left to the job, whose error says it in full."""
        try:
            open_video(path, max_pixels=self.settings.max_frame_pixels).close()
        except FrameTooLarge as exc:
            raise FrameTooLarge(str(exc).replace(path.name, name)) from None
        except VideoError:
            pass

    def submit(self, job_id: str, model: str, max_frames: int | None, frames: bool, input_name: str, input_file: str,
               input_bytes: int) -> Job:  # fmt: skip
        job = Job(job_id, "queued", model, max_frames, frames, input_name, input_file, input_bytes, time.time())
        self.db.insert(job)
        self._wake.put(job_id)
        return job

    def delete(self, job_id: str) -> Job | None:
        """Cancels a queued or running job and removes its record and files; returns the record as it was."""
        job = self.db.get(job_id)
        if job is None:
            return None
        self.db.delete(job_id)
        cancel = self._cancels.get(job_id)
        if cancel is not None:
            cancel.set()  # the worker removes the folder once it has let go of its files
        else:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return job

    # workers ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping.is_set():
            job_id = self._wake.get()
            if job_id is None:
                return
            cancel = threading.Event()
            self._cancels[job_id] = cancel
            try:
                if self.db.claim(job_id, time.time()):
                    self._run(job_id, cancel)
                elif cancel.is_set() and self.db.get(job_id) is None:
                    shutil.rmtree(self.job_dir(job_id), ignore_errors=True)  # deleted between wake-up and claim
            except Exception:  # noqa: BLE001 - a worker must outlive any one job
                log.exception("job %s: worker error", job_id)
            finally:
                self._cancels.pop(job_id, None)

    def _run(self, job_id: str, cancel: threading.Event) -> None:
        job = self.db.get(job_id)
        if job is None:
            return
        folder = self.job_dir(job_id)
        out_dir = folder / "out"
        shutil.rmtree(out_dir, ignore_errors=True)  # a restarted job starts from the beginning
        # False once the record is gone (deleted, possibly by another process sharing the data dir)
        on_progress = progress_writer(lambda done, total: self.db.progress(job_id, done, total), cancel)
        log.info("job %s: %s on %s (attempt %d)", job_id, job.model, job.input_name, job.attempts)
        try:
            result = run_job(job, folder, out_dir, self._engine(job.model), self.settings, on_progress, cancel)
            (folder / job.input_file).unlink(missing_ok=True)  # done: the upload is no longer needed
            finished = self.db.finish(job_id, "done", time.time(), **result)
        except Cancelled:
            if self._stopping.is_set() and self.db.get(job_id) is not None:
                self.db.stopped(job_id)
                return  # server shutdown: the record stays 'running' and the next start restarts it
            finished = False
        except Exception as exc:  # noqa: BLE001 - any job error is the job's, never the server's
            finished = self.db.finish(job_id, "failed", time.time(), error=job_error(job, exc))
        if not finished:  # the record was deleted while the job ran
            shutil.rmtree(folder, ignore_errors=True)

    def _engine(self, model: str) -> InferenceEngine:
        if self._get_engine is not None:
            try:
                return self._get_engine(model)
            except KeyError as exc:
                raise ValueError(f"model {model!r} is not available on this server ({_message(exc)})") from None
        return self._own_engines.get(model)

    # retention -------------------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> list[str]:
        """Removes expired jobs and orphaned folders (uploads that never became jobs); returns removed ids."""
        now = time.time() if now is None else now
        retention_s = self.settings.retention_hours * 3600
        removed = []
        for job in self.db.expired(now - retention_s):
            self.db.delete(job.id)
            shutil.rmtree(self.job_dir(job.id), ignore_errors=True)
            removed.append(job.id)
        for folder in self.root.iterdir():
            if JOB_ID.fullmatch(folder.name) and folder.is_dir() and self.db.get(folder.name) is None:
                newest = max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
                if folder.name not in self._cancels and now - newest > max(3600.0, retention_s):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
        return removed

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self.settings.sweep_interval_s):
            try:
                removed = self.sweep()
                if removed:
                    log.info("retention: removed %d job(s)", len(removed))
            except Exception:  # noqa: BLE001 - the sweep retries next interval
                log.exception("retention sweep failed")


class DataDirBusy(RuntimeError):
    pass


class JobsUnavailable(RuntimeError):
    """The shared job store cannot be reached (distributed mode): answered with 503, like jobs that are off."""


class OwnEngines:
    """Engines loaded from :class:`JobSettings` (backend, device, precision, checkpoints), one per model, for
    job runners without the streaming app's pool: the standalone jobs app and ``vident worker``."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self._engines: dict[str, InferenceEngine] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> InferenceEngine:
        with self._lock:
            if model not in self._engines:
                from service.backends.factory import create_backend

                s = self.settings
                backend = create_backend(model, s.backend, s.device, s.precision, s.checkpoints.get(model))
                self._engines[model] = InferenceEngine(backend, max_batch=s.engine_max_batch)
            return self._engines[model]

    def close(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.close()
                engine.backend.close()
            self._engines.clear()


def run_job(
    job: Job,
    folder: Path,
    out_dir: Path,
    engine: InferenceEngine,
    settings: JobSettings,
    on_progress: Callable[[Progress], None],
    cancel: threading.Event,
) -> dict[str, Any]:
    """Processes the job's input into ``out_dir`` and returns the record fields of a finished job. Raises
    :class:`~service.process.Cancelled` when ``cancel`` is set, or the job's own error (see :func:`job_error`)."""
    options = ProcessOptions(
        frames=job.frames,
        max_frames=job.max_frames,
        frame_limit=settings.max_frames,
        duration_limit_s=settings.max_duration_s,
        pixel_limit=settings.max_frame_pixels,
        priority=Priority.BATCH,
    )
    report = process_video(folder / job.input_file, out_dir, engine, options, on_progress, cancel, job.model)
    files = [*report["outputs"], "report.json"]
    if job.frames:
        _zip_folder(out_dir / "frames", out_dir / "frames.zip")
        files.append("frames.zip")
    return {"files": files, "warnings": report["warnings"], "frames_done": report["frames"],
            "frames_total": report["frames"]}  # fmt: skip


def progress_writer(
    write: Callable[[int, int | None], bool], cancel: threading.Event
) -> Callable[[Progress], None]:
    """``process_video``'s progress callback: writes (frames done, total) at most every 0.5 s and at the
    end; sets ``cancel`` when ``write`` answers False (the record is gone or no longer this run's)."""
    last_write = 0.0

    def on_progress(progress: Progress) -> None:
        nonlocal last_write
        now = time.monotonic()
        if now - last_write >= _PROGRESS_EVERY_S or progress.frames_done == progress.frames_total:
            last_write = now
            if not write(progress.frames_done, progress.frames_total):
                cancel.set()

    return on_progress


def job_error(job: Job, exc: BaseException) -> str:
    """The ``error`` of a job that raised ``exc``: input and model problems say what is wrong in the user's
    terms (the name they uploaded, not the stored ``input.mp4``); anything else is an internal error, logged."""
    if isinstance(exc, (VideoError, ValueError, KeyError, RuntimeError)):
        return _message(exc).replace(job.input_file, job.input_name)
    log.error("job %s failed", job.id, exc_info=exc)
    return f"internal error: {_message(exc)}"


def _lock_exclusively(path: Path) -> IO[bytes]:
    file = path.open("a+b")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (the service targets Linux)
        return file
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise DataDirBusy(f"{path.parent} is in use by another vident server; set VIDENT_JOBS_DATA_DIR") from None
    return file


def _message(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text or type(exc).__name__


def _zip_folder(folder: Path, archive: Path) -> None:
    """PNG frames as one download; stored, not deflated: PNG is compressed already."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for file in sorted(folder.rglob("*.png")):
            zf.write(file, file.relative_to(folder).as_posix())
    shutil.rmtree(folder)


# uploads ---------------------------------------------------------------------------------------------
class UploadTooLarge(Exception):
    pass


class _MultipartUpload:
    """Streams one multipart/form-data body: the ``file`` part goes to disk chunk by chunk, with a size
    cap; the other parts are small option fields kept in memory (each at most 1 KiB)."""

    FIELD_LIMIT = 1024

    def __init__(self, boundary: bytes, target: Path, max_bytes: int) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self.complete = False
        self._file: Any = None
        self._header_field = b""
        self._header_value = b""
        self._part_name: str | None = None
        self._part_filename: str | None = None
        self._field_value = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: setattr(self, "_header_field", self._header_field + d[s:e]),
                "on_header_value": lambda d, s, e: setattr(self, "_header_value", self._header_value + d[s:e]),
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": lambda: setattr(self, "complete", True),
            },
        )

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _part_begin(self) -> None:
        self._part_name = self._part_filename = None
        self._field_value = bytearray()

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            _, params = parse_options_header(self._header_value)
            self._part_name = params.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in params:
                self._part_filename = params[b"filename"].decode("utf-8", "replace")
        self._header_field = self._header_value = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_name == "file" and self._part_filename is not None:
            if self.filename is not None and self._file is None:
                raise MultipartParseError("send exactly one file part named 'file'")
            if self._file is None:
                self.filename = self._part_filename
                self._file = self.target.open("wb")
            self.file_bytes += end - start
            if self.file_bytes > self.max_bytes:
                raise UploadTooLarge()
            self._file.write(data[start:end])
        else:
            self._field_value += data[start:end]
            if len(self._field_value) > self.FIELD_LIMIT:
                raise MultipartParseError(f"form field {self._part_name!r} is longer than {self.FIELD_LIMIT} bytes")

    def _part_end(self) -> None:
        if self._part_name == "file" and self._part_filename is not None:
            if self._file is None:  # an empty file part
                self.filename = self._part_filename
                self.target.touch()
            self.close()
        elif self._part_name:
            self.fields[self._part_name] = self._field_value.decode("utf-8", "replace")


def _parse_options(fields: dict[str, str], default_model: str, frame_limit: int) -> tuple[str, int | None, bool]:
    unknown = set(fields) - {"model", "max_frames", "frames"}
    if unknown:
        raise ValueError(f"unknown form field(s): {', '.join(sorted(unknown))}; expected model, max_frames, frames")
    model = fields.get("model", "").strip() or default_model
    max_frames = None
    if fields.get("max_frames", "").strip():
        wanted = f"max_frames must be an integer from 1 to {frame_limit} (this server's limit)"
        try:
            max_frames = int(fields["max_frames"])
        except ValueError:
            raise ValueError(f"{wanted}, got {fields['max_frames'][:40]!r}") from None
        if not 1 <= max_frames <= frame_limit:  # also keeps it within SQLite's 64-bit integers
            raise ValueError(f"{wanted}, got {fields['max_frames'][:40]}")
    frames_text = fields.get("frames", "false").strip().lower()
    if frames_text not in ("true", "false", "1", "0", "yes", "no", ""):
        raise ValueError(f"frames must be true or false, got {fields['frames']!r}")
    return model, max_frames, frames_text in ("true", "1", "yes")


def _input_suffix(filename: str) -> str:
    """Keep the extension (it helps FFmpeg guess raw formats) only when it is a plain short one."""
    suffix = Path(filename.replace("\\", "/")).suffix.lower()
    return suffix if _SUFFIX.fullmatch(suffix) else ".bin"


# HTTP API ---------------------------------------------------------------------------------------------
class _JobsRoute(APIRoute):
    """Answers 503 with the reason when the shared job store (distributed mode) cannot be reached, as for jobs
    that are off, instead of a bare 500: an API replica keeps serving streams while Redis is away."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except JobsUnavailable as exc:
                return JSONResponse({"detail": f"batch jobs are unavailable: {exc}"}, status_code=503)

        return answer


def get_jobs(request: Request) -> JobManager:
    manager: JobManager = request.app.state.jobs
    if manager.store is None:
        raise HTTPException(503, f"batch jobs are unavailable: {manager.unavailable or 'not started'}")
    return manager


Jobs = Annotated[JobManager, Depends(get_jobs)]


def _job_or_404(jobs: JobManager, job_id: str) -> Job:
    job = jobs.db.get(job_id) if JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def create_router() -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=_JobsRoute)

    @router.post("", status_code=202)
    async def create_job(request: Request, jobs: Jobs) -> JSONResponse:
        """Multipart upload: a ``file`` part (the video) and optional fields ``model``, ``max_frames``, ``frames``."""
        content_type, params = parse_options_header(request.headers.get("content-type", ""))
        if content_type != b"multipart/form-data" or not params.get(b"boundary"):
            raise HTTPException(415, "send multipart/form-data with a 'file' part")
        max_bytes = int(jobs.settings.max_upload_mb * 1024 * 1024)
        too_large = f"upload is larger than this server's limit of {jobs.settings.max_upload_mb:g} MB"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes + 64 * 1024:  # 64 KiB: multipart headers and fields
            raise HTTPException(413, too_large)
        job_id = secrets.token_urlsafe(16)
        folder = jobs.job_dir(job_id)
        folder.mkdir(parents=True)
        upload = _MultipartUpload(params[b"boundary"], folder / "upload.part", max_bytes)
        try:
            async for chunk in request.stream():
                await asyncio.to_thread(upload.write, chunk)  # disk writes off the event loop
            upload.close()
            if not upload.complete:
                raise ValueError("the upload ended before the multipart body was complete")
            if upload.filename is None:
                raise ValueError("no 'file' part in the upload")
            if upload.file_bytes == 0:
                raise ValueError("the uploaded file is empty")
            model, max_frames, frames = _parse_options(
                upload.fields, jobs.settings.default_model, jobs.settings.max_frames
            )
            jobs.check_model(model)
            input_file = "input" + _input_suffix(upload.filename)
            (folder / "upload.part").rename(folder / input_file)
            await asyncio.to_thread(jobs.check_input, folder / input_file, upload.filename[:255])
            job = jobs.submit(job_id, model, max_frames, frames, upload.filename[:255], input_file, upload.file_bytes)
        except UploadTooLarge:
            upload.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(413, too_large) from None
        except (ValueError, MultipartParseError) as exc:
            upload.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(400, str(exc)) from None
        except BaseException:
            upload.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return JSONResponse(job.public(jobs.settings.retention_hours * 3600), status_code=202)

    @router.get("")
    def list_jobs(jobs: Jobs, limit: int = 100) -> dict[str, Any]:
        retention_s = jobs.settings.retention_hours * 3600
        return {"jobs": [job.public(retention_s) for job in jobs.db.list(max(1, min(limit, 1000)))]}

    @router.get("/{job_id}")
    def get_job(job_id: str, jobs: Jobs) -> dict[str, Any]:
        return _job_or_404(jobs, job_id).public(jobs.settings.retention_hours * 3600)

    @router.get("/{job_id}/files/{name}")
    def get_file(job_id: str, name: str, jobs: Jobs) -> FileResponse:
        job = _job_or_404(jobs, job_id)
        path = jobs.result_path(job, name)
        if path is None or not path.is_file():
            raise HTTPException(
                404, f"job {job_id} has no file {name!r}; files: {', '.join(job.files or []) or 'none'}"
            )
        return FileResponse(path, filename=name)

    @router.delete("/{job_id}")
    def delete_job(job_id: str, jobs: Jobs) -> dict[str, Any]:
        _job_or_404(jobs, job_id)
        job = jobs.delete(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        view = job.public(jobs.settings.retention_hours * 3600)
        if job.state in ("queued", "running"):
            view["state"] = "cancelled"
        view["removed"] = True
        return view

    return router


def make_manager(settings: JobSettings, get_engine: Callable[[str], InferenceEngine] | None = None) -> JobManager:
    """The single-machine :class:`JobManager`, or with ``settings.broker`` the one that only enqueues (records
    in Redis, jobs run by ``vident worker`` processes); imported only then, so one machine needs no Redis."""
    if settings.broker:
        from service.jobs_queue import QueuedJobManager

        return QueuedJobManager(settings)
    return JobManager(settings, get_engine)


def mount_jobs(
    app: FastAPI, settings: JobSettings | None = None, get_engine: Callable[[str], InferenceEngine] | None = None
) -> JobManager:
    """Adds ``/v1/jobs`` to ``app``; the caller's lifespan must call ``start()`` and ``stop()`` on the result."""
    manager = make_manager(settings or JobSettings(), get_engine)
    app.state.jobs = manager
    app.include_router(router)
    return manager


router = create_router()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The streaming app's hook (``service.app`` mounts :data:`router` and enters this): jobs share the
    app's engine pool, so batch frames and live frames go through one engine per model, live first.

    Job settings come from ``VIDENT_JOBS_*`` (or ``app.state.job_settings``, which ``vident serve`` sets from
    its flags); unless set there, the default model and the models jobs may use follow the app's
    ``VIDENT_MODEL`` and ``VIDENT_ALLOWED_MODELS``. With a broker, ``/metrics`` also shows the shared queue.
    """
    manager = getattr(app.state, "jobs", None)
    if manager is None:
        app_settings = app.state.settings
        settings = getattr(app.state, "job_settings", None) or JobSettings()
        follow = {}
        if "default_model" not in settings.model_fields_set:
            follow["default_model"] = app_settings.model
        if "models" not in settings.model_fields_set and app_settings.allowed_models:
            follow["models"] = sorted({*app_settings.allowed_models, app_settings.model})
        if "max_frame_pixels" not in settings.model_fields_set:
            follow["max_frame_pixels"] = app_settings.max_frame_pixels
        pool = app.state.pool
        manager = make_manager(settings.model_copy(update=follow), lambda name: pool.load(name).engine)
        app.state.jobs = manager
    try:
        await asyncio.to_thread(manager.start)
    except (DataDirBusy, JobsUnavailable, OSError, sqlite3.Error) as exc:  # streaming stays up; /v1/jobs says why
        log.error("batch jobs disabled: %s", exc)
        manager.unavailable = str(exc)
    metrics = getattr(app.state, "metrics", None)
    collector = manager.metrics_collector() if metrics is not None and manager.store is not None else None
    if collector is not None:
        metrics.registry.register(collector)
    try:
        yield
    finally:
        if collector is not None:
            metrics.registry.unregister(collector)
        await asyncio.to_thread(manager.stop)  # before the app closes the engines


@contextlib.contextmanager
def running(manager: JobManager) -> Iterator[JobManager]:
    manager.start()
    try:
        yield manager
    finally:
        manager.stop()


def create_standalone_app(settings: JobSettings | None = None) -> FastAPI:
    """The jobs API alone, with its own engines: ``uvicorn --factory service.jobs:create_standalone_app``."""
    settings = settings or JobSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with running(app.state.jobs):
            yield

    app = FastAPI(title="vident jobs", lifespan=lifespan)
    mount_jobs(app, settings)
    return app
