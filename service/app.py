"""The ASGI app: ``create_app(settings)`` wires settings, models, sessions, metrics and routes.

State on ``app.state`` (what other routers may use):

* ``settings``: :class:`~service.settings.Settings`;
* ``pool``: :class:`~service.engine.EnginePool`; ``await pool.get(name)`` returns the shared
  :class:`~service.engine.InferenceEngine` for a model, loading it once; submit batch work with
  ``Priority.BATCH`` so live sessions keep precedence;
* ``engines``: ``pool.engines``, the ``name -> InferenceEngine`` dict of loaded models;
* ``sessions``: :class:`~service.session.SessionManager`; ``metrics``: :class:`~service.metrics.Metrics`.

Batch jobs (``service.jobs.routes``) are mounted under ``/v1/jobs`` (every route requires the API
key when one is configured); their ``lifespan`` is entered after the app state exists and exited
before the engines close, so jobs share the app's engines.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import unquote_plus

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service import health
from service.engine import BackendFactory, EnginePool
from service.jobs import routes as jobs_routes
from service.memory import limit_malloc_arenas
from service.metrics import Metrics
from service.session import SessionManager
from service.settings import Settings, require_api_key
from service.ws import endpoint

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


# A query parameter in a logged URL: (separator, name, value).
_QUERY_PARAMETER = re.compile(r"([?&])([^=&\s\"]*)=([^&\s\"]*)")
# uvicorn logs request lines with the query string: HTTP on uvicorn.access, WebSocket handshakes on uvicorn.error.
_URL_LOGGERS = ("uvicorn.access", "uvicorn.error")


class RedactApiKey(logging.Filter):
    """Rewrites ``api_key=SECRET`` to ``api_key=***`` in log records. Browsers can only send the key
    as a query parameter on WebSockets, and uvicorn logs every request's path with its query, so
    without this the key lands in plain text in access logs and whatever collects them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_api_key(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_api_key(a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_api_key(text: str) -> str:
    """``text`` with the value of every ``api_key`` query parameter replaced by ``***``; names are
    compared decoded (``api%5Fkey``), as Starlette reads them."""

    def redact(match: re.Match[str]) -> str:
        separator, name, _ = match.groups()
        return f"{separator}{name}=***" if unquote_plus(name).lower() == "api_key" else match.group(0)

    return _QUERY_PARAMETER.sub(redact, text) if "=" in text else text


def redact_api_keys_in_logs() -> None:
    """Puts :class:`RedactApiKey` on uvicorn's loggers once. Filters on a logger survive uvicorn's
    ``dictConfig`` (it replaces handlers, not filters), so this may run before uvicorn starts."""
    for name in _URL_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactApiKey) for f in target.filters):
            target.addFilter(RedactApiKey())


def _version() -> str:
    try:
        return importlib.metadata.version("vident")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


async def _preload(app: FastAPI) -> None:
    """Loads the default model off the event loop; /readyz reports the outcome."""
    state = app.state
    state.readiness = "loading"
    try:
        await asyncio.to_thread(state.pool.load, state.settings.model)
    except Exception as exc:  # noqa: BLE001 - the server stays up to report the failure on /readyz
        logger.exception("default model %s failed to load", state.settings.model)
        state.readiness, state.readiness_error = "failed", f"{type(exc).__name__}: {exc}"
        return
    state.readiness = "ready"


def create_app(settings: Settings | None = None, backend_factory: BackendFactory | None = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment). ``backend_factory`` replaces
    :func:`service.backends.factory.create_backend` (tests use it to slow or break a backend)."""
    settings = settings or Settings()
    limit_malloc_arenas(settings.malloc_arena_max)  # before the worker threads exist
    redact_api_keys_in_logs()
    metrics = Metrics()
    pool = EnginePool(
        backend=settings.backend,
        device=settings.device,
        precision=settings.precision,
        max_batch=settings.max_batch,
        checkpoints=settings.checkpoints,
        backend_factory=backend_factory,
        on_batch=metrics.batch_hook,
        warmup_size=settings.warmup_hw,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_preload(app)) if settings.preload else None
        try:
            async with jobs_routes.lifespan(app):
                yield
        finally:
            if loader is not None:
                await asyncio.gather(loader, return_exceptions=True)
            await asyncio.to_thread(pool.close)

    app = FastAPI(
        title="vident",
        version=_version(),
        summary="Real-time multi-task video enhancement for dental microcameras (WebSocket: see docs/protocol.md)",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.pool = pool
    app.state.engines = pool.engines
    app.state.sessions = SessionManager(settings.max_sessions, settings.idle_timeout_s)
    app.state.started = time.monotonic()
    app.state.readiness = "loading" if settings.preload else "ready"  # lazy loading: ready at once
    app.state.readiness_error = None
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.include_router(health.router)
    app.include_router(endpoint.router)
    app.include_router(jobs_routes.router, dependencies=[Depends(require_api_key)])

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Runs ``app`` under uvicorn on a background thread (port 0: a free one); yields ``http://host:port``.

    For tests, the browser check and the load benchmark: the real server stack (uvicorn's WebSocket
    implementation and limits) without a subprocess.
    """
    import uvicorn

    settings: Settings = app.state.settings
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", ws_max_size=settings.max_message_bytes + 65536
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
