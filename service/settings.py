"""Typed service settings: from the environment (prefix ``VIDENT_``), a ``.env`` file, or command-line flags.

One object carries every knob the service reads, so a deployment (Docker, compose, systemd) configures
it with environment variables only, and tests build it with explicit values. Knobs that only batch
jobs read form the nested section :class:`JobsSettings` (``settings.jobs``, variables
``VIDENT_JOBS_<FIELD>``); what jobs share with live streaming (the model, the runtime, the weights,
the pixel budget) is defined once, at the top, so the two can never disagree about a default.
Lists and maps are given as JSON in the environment, e.g. ``VIDENT_CORS_ORIGINS='["https://a.example"]'``.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.requests import HTTPConnection

# 1080p with its height padded to a multiple of 8: the largest frame a dental microcamera sends.
DEFAULT_MAX_FRAME_PIXELS = 1920 * 1088

# Jobs knobs that became knobs of the whole service: old name in the jobs section -> name at the top.
_MOVED_TO_THE_TOP = {
    "default_model": "model",
    "models": "allowed_models",
    "checkpoints": "checkpoints",
    "backend": "backend",
    "device": "device",
    "precision": "precision",
    "engine_max_batch": "max_batch",
    "max_frame_pixels": "max_frame_pixels",
}


def _default_data_dir() -> Path:
    """Per-user data folder (XDG), not the working directory: a server started from a checkout must not
    write into it. Containers set ``VIDENT_JOBS_DATA_DIR`` to a mounted volume."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "vident" / "jobs"


class JobsSettings(BaseModel):
    """Batch jobs (docs/jobs.md): ``Settings.jobs``, environment variables ``VIDENT_JOBS_<FIELD>``
    (e.g. ``VIDENT_JOBS_DATA_DIR``). The model, runtime, weights and pixel budget of jobs are the
    service's own (``VIDENT_MODEL``, ``VIDENT_BACKEND``, ...)."""

    # forbid: a misspelt or retired VIDENT_JOBS_* variable stops the service instead of being ignored
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(default_factory=_default_data_dir, description="job records and files")
    max_upload_mb: float = Field(2048.0, gt=0, description="upload size cap, streamed to disk")
    concurrent_jobs: int = Field(1, ge=1, le=32, description="jobs processed at the same time")
    retention_hours: float = Field(24.0, gt=0, description="finished jobs and their files are removed after this")
    sweep_interval_s: float = Field(60.0, gt=0, description="how often expired jobs are looked for")
    max_frames: int = Field(108_000, ge=1, description="longer videos need max_frames (1 h at 30 fps)")
    max_duration_s: float = Field(3600.0, gt=0, description="longer videos need max_frames")
    max_attempts: int = Field(
        3, ge=1, description="a job whose runs ended this often with the server dying under it fails for good"
    )
    # Across machines (service.jobs_queue); unset, jobs run in the serving process:
    broker: str | None = Field(
        None, description="redis://host:6379/0: records and the queue live there and `vident worker` processes run "
        "the jobs; unset: embedded SQLite and in-process workers",
    )  # fmt: skip
    heartbeat_timeout_s: float = Field(
        15.0, gt=0, description="a worker silent this long counts as dead: its job is delivered to another worker"
    )
    worker_name: str = Field("", description="this worker's name in records and metrics; empty: host-pid")

    @model_validator(mode="before")
    @classmethod
    def _moved_to_the_top(cls, values: object) -> object:
        if isinstance(values, dict):
            for old in sorted(set(values) & set(_MOVED_TO_THE_TOP)):
                new = _MOVED_TO_THE_TOP[old]
                raise ValueError(
                    f"VIDENT_JOBS_{old.upper()} is now VIDENT_{new.upper()}, one setting for streaming and jobs"
                )
        return values

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


class Settings(BaseSettings):
    # Nested sections split at the first "_" after the prefix, at most once: VIDENT_JOBS_DATA_DIR is
    # jobs.data_dir, while top-level names with underscores (VIDENT_MAX_SESSIONS) are not sections.
    model_config = SettingsConfigDict(
        env_prefix="VIDENT_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        env_file=".env",
        extra="ignore",
        protected_namespaces=(),
    )

    host: str = Field("127.0.0.1", description="address uvicorn binds (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    # Models and runtime: live sessions, batch jobs and `vident worker` alike
    model: str = Field(
        "most-nss", description="default model: loaded at startup, used when a client or a job names none"
    )
    allowed_models: list[str] = Field(
        default_factory=list,
        description="models clients and jobs may request (besides the default); empty = every registered model "
        "(loaded on first use)",
    )
    checkpoints: dict[str, Path] = Field(
        default_factory=dict,
        description='model name -> weights file, e.g. {"most-nss": "/w/most-nss.safetensors"}; a model not '
        "named here runs its shipped weights, or random ones",
    )
    backend: str = Field("auto", description="torch | onnxruntime | openvino | tensorrt | auto (fastest for device)")
    device: str = "cpu"
    precision: str = Field(
        "auto", description="fp32 | fp16 | bf16 | int8 (openvino) | auto (the factory's choice for the runtime)"
    )
    max_batch: int = Field(
        0, ge=0, description="frames of equal size from several sessions or jobs run as one call; 0 = the backend's "
        "choice (1 on the CPU, where batching buys little and costs latency and memory; 8 on GPUs)",
    )  # fmt: skip
    preload: bool = Field(True, description="load the default model at startup (readyz is 503 until done)")
    malloc_arena_max: int = Field(
        default=2,
        ge=0,
        description="glibc malloc arenas for the server process (0 = glibc's default of 8 per core); a small "
        "number stops per-thread arenas from keeping freed memory after sessions close",
    )
    warmup_size: str = Field(
        "320x416",
        pattern=r"^(\d+x\d+)?$",
        description="HxW of the start-up warm-up (batch 1 and max_batch, before /readyz turns ready); '' = none",
    )

    # Sessions and limits
    max_sessions: int = Field(16, ge=1)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest WebSocket message accepted")
    max_frame_side: int = Field(4096, ge=8, description="largest decoded frame width or height")
    max_frame_pixels: int = Field(
        DEFAULT_MAX_FRAME_PIXELS,
        ge=64,
        description="largest width * height of a frame, live or in a job's video, read from the image or video "
        "header before decoding: a small compressed file can declare a frame whose pixels and activations fill "
        "the memory",
    )
    idle_timeout_s: float = Field(60.0, gt=0, description="a session with no message for this long is closed")
    send_timeout_s: float = Field(
        10.0, gt=0, description="a session whose client takes longer than this to accept one message is closed"
    )
    fps_cap: float = Field(0.0, ge=0, description="per-session processed frames per second; 0 = no cap")
    default_jpeg_quality: int = Field(90, ge=1, le=100)

    # Access
    api_key: SecretStr | None = Field(None, description="when set, required as X-API-Key header or api_key query")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="origins allowed by CORS; when set, also the only browser origins (besides the server's own "
        "pages) that may open WebSocket sessions, which CORS does not cover; [] = none for CORS, any for WebSockets",
    )

    jobs: JobsSettings = Field(default_factory=JobsSettings)

    @model_validator(mode="before")
    @classmethod
    def _retired_checkpoint(cls, values: object) -> object:
        if os.environ.get("VIDENT_CHECKPOINT"):  # one weights file for the default model, before the map
            raise ValueError('VIDENT_CHECKPOINT is now VIDENT_CHECKPOINTS, a map: {"most-nss": "/path.safetensors"}')
        return values

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        # VIDENT_API_KEY= (empty) in a compose file means "no key", not "the empty key".
        return None if value in ("", None) else value

    @property
    def warmup_hw(self) -> tuple[int, int] | None:
        if not self.warmup_size:
            return None
        height, width = (int(v) for v in self.warmup_size.split("x"))
        return height, width

    def serves(self, model: str) -> bool:
        """Whether clients and jobs may use ``model`` (a registered name): the default model and
        ``allowed_models``, or any model when that list is empty."""
        return not self.allowed_models or model in self.allowed_models or model == self.model

    def key_matches(self, candidate: str | None) -> bool:
        """True when no key is configured or ``candidate`` equals it (constant time)."""
        if self.api_key is None:
            return True
        return candidate is not None and hmac.compare_digest(
            candidate.encode(), self.api_key.get_secret_value().encode()
        )


def get_settings(connection: HTTPConnection) -> Settings:
    """FastAPI dependency: the settings the running app was built with."""
    return connection.app.state.settings


def presented_key(connection: HTTPConnection) -> str | None:
    return connection.headers.get("x-api-key") or connection.query_params.get("api_key")


def require_api_key(request: Request) -> None:
    """FastAPI dependency for HTTP routes under /v1 (the jobs router uses it too): 401 without the key."""
    if not get_settings(request).key_matches(presented_key(request)):
        raise HTTPException(401, "missing or wrong API key (X-API-Key header or api_key query parameter)")
