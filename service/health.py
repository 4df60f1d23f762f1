"""Probes and introspection: ``/healthz`` (alive), ``/readyz`` (model loaded, room for a session), ``/metrics``,
``/v1/models``.

Probes and metrics stay open without the API key (orchestrators and Prometheus scrape them);
``/v1/models`` needs it like every other ``/v1`` route.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from models import list_models
from service.engine import EnginePool
from service.settings import Settings, get_settings, require_api_key

router = APIRouter()


@router.get("/healthz", tags=["probes"])
def healthz(request: Request) -> dict[str, object]:
    """The process answers. Cheap: no model involved (the container HEALTHCHECK calls it)."""
    state = request.app.state
    return {"status": "ok", "sessions": state.sessions.count, "uptime_s": round(time.monotonic() - state.started, 1)}


@router.get("/readyz", tags=["probes"])
def readyz(request: Request) -> JSONResponse:
    """200 once the default model is loaded (or loads lazily), 503 while it loads, after it failed, or while
    ``max_sessions`` sessions are open (``status: "full"``): a load balancer that checks this probe sends new
    sessions to other replicas and leaves the open ones where they are (deploy/haproxy.cfg)."""
    state = request.app.state
    body = {"ready": state.readiness == "ready", "status": state.readiness, "model": state.settings.model}
    if state.readiness_error:
        body["error"] = state.readiness_error
    sessions = state.sessions
    if body["ready"] and sessions.count >= sessions.max_sessions:
        body.update(ready=False, status="full", sessions=sessions.count, max_sessions=sessions.max_sessions)
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics", tags=["probes"])
def metrics(request: Request) -> Response:
    """Prometheus text format: sessions, frames, drops, errors, per-stage latency and batch histograms."""
    state = request.app.state
    for loaded in list(state.pool.models.values()):
        info = loaded.info
        labels = (loaded.name, info.name, info.device, info.precision, str(loaded.random_weights).lower())
        state.metrics.model_info.labels(*labels).set(1)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


def _model_entry(name: str, pool: EnginePool, settings: Settings) -> dict[str, object]:
    loaded = pool.models.get(name)
    entry: dict[str, object] = {
        "name": name,
        "default": name == settings.model,
        "allowed": settings.serves(name),
        "loaded": loaded is not None,
    }
    if loaded is None:
        return entry
    spec = loaded.engine.backend.spec
    entry.update(
        backend=loaded.info.name,
        device=loaded.info.device,
        precision=loaded.info.precision,
        checkpoint=loaded.checkpoint.name if loaded.checkpoint else None,  # the file, never a server path
        random_weights=loaded.random_weights,
        load_seconds=round(loaded.load_seconds, 3),
        image_outputs=[o.name for o in spec.outputs if o.kind == "map"],
        homography=any(o.kind == "homography" for o in spec.outputs),
        state_tensors=len(spec.states),
    )
    return entry


@router.get("/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])
def models(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> dict[str, object]:
    """Every registered model: whether clients may use it, and for loaded ones the runtime and weights.

    ``random_weights: true`` means no checkpoint was shipped or configured: outputs are not meaningful.
    """
    pool: EnginePool = request.app.state.pool
    names = list_models(include_tiny=True)
    return {"default": settings.model, "models": [_model_entry(n, pool, settings) for n in names]}
