"""``/v1/jobs``: the HTTP API of batch jobs (docs/jobs.md), and the ways to serve it.

``service.app.create_app`` mounts :data:`router` and enters :func:`lifespan` (jobs then use the app's
settings and engine pool). Any other FastAPI app can use :func:`mount_jobs` and call ``start()`` /
``stop()`` from its lifespan; ``uvicorn --factory service.jobs.routes:create_standalone_app`` serves the
jobs API alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import MultipartParseError, parse_options_header

from service.engine import InferenceEngine
from service.jobs.manager import DataDirBusy, JobManager, make_manager
from service.jobs.store import JOB_ID, Job, JobsUnavailable
from service.jobs.upload import MultipartUpload, UploadTooLarge, input_suffix, parse_options
from service.settings import Settings

log = logging.getLogger("vident.jobs")


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
        limits = jobs.settings.jobs
        max_bytes = int(limits.max_upload_mb * 1024 * 1024)
        too_large = f"upload is larger than this server's limit of {limits.max_upload_mb:g} MB"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes + 64 * 1024:  # 64 KiB: multipart headers and fields
            raise HTTPException(413, too_large)
        job_id = secrets.token_urlsafe(16)
        folder = jobs.job_dir(job_id)
        folder.mkdir(parents=True)
        upload = MultipartUpload(params[b"boundary"], folder / "upload.part", max_bytes)
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
            model, max_frames, frames = parse_options(upload.fields, jobs.settings.model, limits.max_frames)
            jobs.check_model(model)
            input_file = "input" + input_suffix(upload.filename)
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
        return JSONResponse(job.public(jobs.retention_s), status_code=202)

    @router.get("")
    def list_jobs(jobs: Jobs, limit: int = 100) -> dict[str, Any]:
        return {"jobs": [job.public(jobs.retention_s) for job in jobs.db.list(max(1, min(limit, 1000)))]}

    @router.get("/{job_id}")
    def get_job(job_id: str, jobs: Jobs) -> dict[str, Any]:
        return _job_or_404(jobs, job_id).public(jobs.retention_s)

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
        view = job.public(jobs.retention_s)
        if job.state in ("queued", "running"):
            view["state"] = "cancelled"
        view["removed"] = True
        return view

    return router


def mount_jobs(
    app: FastAPI, settings: Settings | None = None, get_engine: Callable[[str], InferenceEngine] | None = None
) -> JobManager:
    """Adds ``/v1/jobs`` to ``app``; the caller's lifespan must call ``start()`` and ``stop()`` on the result."""
    manager = make_manager(settings or Settings(), get_engine)
    app.state.jobs = manager
    app.include_router(router)
    return manager


router = create_router()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The streaming app's hook (``service.app`` mounts :data:`router` and enters this): jobs share the
    app's engine pool, so batch frames and live frames go through one engine per model, live first.

    Jobs run with the app's settings (``app.state.settings``: its model, allowed models and pixel budget,
    and its ``jobs`` section). With a broker, ``/metrics`` also shows the shared queue.
    """
    manager = getattr(app.state, "jobs", None)
    if manager is None:
        pool = app.state.pool
        manager = make_manager(app.state.settings, lambda name: pool.load(name).engine)
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


def create_standalone_app(settings: Settings | None = None) -> FastAPI:
    """The jobs API alone, with its own engines: ``uvicorn --factory service.jobs.routes:create_standalone_app``."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with running(app.state.jobs):
            yield

    app = FastAPI(title="vident jobs", lifespan=lifespan)
    mount_jobs(app, settings)
    return app
