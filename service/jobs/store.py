"""Job records: the :class:`Job` dataclass, its SQLite store, and how a row maps to a record.

One connection behind a lock (writes are tiny and rare) in WAL mode with ``synchronous=NORMAL``:
durable across process crashes, which is what lets a restarted server pick up where a dead one
stopped. The distributed store (:class:`service.jobs_queue.RedisJobStore`) keeps the same records.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")  # secrets.token_urlsafe(16): 128 random bits
STATES = ("queued", "running", "done", "failed", "cancelled")


class JobsUnavailable(RuntimeError):
    """The shared job store cannot be reached (distributed mode): answered with 503, like jobs that are off."""


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
