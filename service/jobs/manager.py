"""Running jobs: :class:`JobManager` owns the store, the worker threads and the retention sweep.

A job runs with the streaming app's engine for its model (``get_engine``), so batch frames and live
frames go through one engine, live first; without the app (the standalone jobs app, ``vident worker``)
engines come from :func:`own_engines`. Any error inside a job is the job's (:func:`job_error`), never
the server's: worker threads outlive every job.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from prometheus_client.registry import Collector

from service.engine import EnginePool, InferenceEngine, Priority
from service.jobs.store import JOB_ID, Job, JobStore
from service.process import Cancelled, ProcessOptions, Progress, process_video
from service.settings import Settings
from service.video import FrameTooLarge, VideoError, open_video

log = logging.getLogger("vident.jobs")

_PROGRESS_EVERY_S = 0.5  # database writes for progress, at most this often per job


class DataDirBusy(RuntimeError):
    """Another process serves jobs from the same data folder."""


class JobManager:
    """Owns the store, the worker threads and the retention sweep; ``start()`` and ``stop()`` from a lifespan.

    ``get_engine(model)`` returns the shared engine of a loaded model (the streaming app's); without
    it the manager loads its own engines (:func:`own_engines`).
    """

    def __init__(
        self, settings: Settings | None = None, get_engine: Callable[[str], InferenceEngine] | None = None
    ) -> None:
        self.settings = settings or Settings()
        self.root = self.settings.jobs.data_dir.resolve()
        self._get_engine = get_engine
        self._own_engines = own_engines(self.settings)
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
        max_attempts = self.settings.jobs.max_attempts
        restarted, failed = self.store.recover(max_attempts, time.time())
        if restarted:
            log.warning("%d interrupted job(s) restart from the beginning", restarted)
        for job_id in failed:
            log.error("job %s: the server died under it %d times; marked failed", job_id, max_attempts)
        self._stopping.clear()
        for job in self.store.queued():
            self._wake.put(job.id)
        for i in range(self.settings.jobs.concurrent_jobs):
            self._threads.append(threading.Thread(target=self._work, name=f"jobs-worker-{i}", daemon=True))
        self._threads.append(threading.Thread(target=self._sweep_loop, name="jobs-retention", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Running jobs are interrupted and stay ``running`` in the store: the next start restarts them."""
        self._stopping.set()
        for event in list(self._cancels.values()):
            event.set()
        for _ in range(self.settings.jobs.concurrent_jobs):
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
    def retention_s(self) -> float:
        """How long finished jobs and their files are kept."""
        return self.settings.jobs.retention_hours * 3600

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

        registered = list_models(include_tiny=True)
        if model not in registered or not self.settings.serves(model):
            s = self.settings
            available = sorted({*s.allowed_models, s.model}) if s.allowed_models else registered
            raise ValueError(f"model {model!r} is not available for jobs; available: {', '.join(available)}")

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
        return self._own_engines.load(model).engine

    # retention -------------------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> list[str]:
        """Removes expired jobs and orphaned folders (uploads that never became jobs); returns removed ids."""
        now = time.time() if now is None else now
        retention_s = self.retention_s
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
        while not self._stopping.wait(self.settings.jobs.sweep_interval_s):
            try:
                removed = self.sweep()
                if removed:
                    log.info("retention: removed %d job(s)", len(removed))
            except Exception:  # noqa: BLE001 - the sweep retries next interval
                log.exception("retention sweep failed")


def own_engines(settings: Settings) -> EnginePool:
    """Engines loaded from the settings (backend, device, precision, checkpoints, max_batch), one per model
    on first use, for job runners without the streaming app's pool: the standalone jobs app and
    ``vident worker``. No warm-up: nobody waits for a job's first frame as a live client does."""
    return EnginePool(
        backend=settings.backend,
        device=settings.device,
        precision=settings.precision,
        max_batch=settings.max_batch,
        checkpoints=settings.checkpoints,
    )


def run_job(
    job: Job,
    folder: Path,
    out_dir: Path,
    engine: InferenceEngine,
    settings: Settings,
    on_progress: Callable[[Progress], None],
    cancel: threading.Event,
) -> dict[str, Any]:
    """Processes the job's input into ``out_dir`` and returns the record fields of a finished job. Raises
    :class:`~service.process.Cancelled` when ``cancel`` is set, or the job's own error (see :func:`job_error`)."""
    options = ProcessOptions(
        frames=job.frames,
        max_frames=job.max_frames,
        frame_limit=settings.jobs.max_frames,
        duration_limit_s=settings.jobs.max_duration_s,
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


def progress_writer(write: Callable[[int, int | None], bool], cancel: threading.Event) -> Callable[[Progress], None]:
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


def make_manager(settings: Settings, get_engine: Callable[[str], InferenceEngine] | None = None) -> JobManager:
    """The single-machine :class:`JobManager`, or with ``settings.jobs.broker`` the one that only enqueues (records
    in Redis, jobs run by ``vident worker`` processes); imported only then, so one machine needs no Redis."""
    if settings.jobs.broker:
        from service.jobs_queue import QueuedJobManager

        return QueuedJobManager(settings)
    return JobManager(settings, get_engine)
