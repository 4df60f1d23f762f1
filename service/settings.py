"""Typed service settings: from the environment (prefix ``VIDENT_``), a ``.env`` file, or ``vident serve`` flags.

One object carries every knob the app reads, so a deployment (Docker, compose, systemd) configures
the service with environment variables only, and tests build the app with explicit values.
Lists are given as JSON in the environment, e.g. ``VIDENT_CORS_ORIGINS='["https://a.example"]'``.
"""

from __future__ import annotations

from fastapi import HTTPException, Request
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.requests import HTTPConnection

# 1080p with its height padded to a multiple of 8: the largest frame a dental microcamera sends.
DEFAULT_MAX_FRAME_PIXELS = 1920 * 1088


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIDENT_", env_file=".env", extra="ignore", protected_namespaces=())

    host: str = Field("127.0.0.1", description="address uvicorn binds (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    # Models and runtime
    model: str = Field("most-nss", description="default model: loaded at startup, used when a client names none")
    allowed_models: list[str] = Field(
        default_factory=list,
        description="models clients may request with ?model=; empty = every registered model (loaded on first use)",
    )
    checkpoint: str | None = Field(None, description="weights for the default model; none = shipped or random")
    backend: str = Field("auto", description="torch | onnxruntime | openvino | tensorrt | auto (fastest for device)")
    device: str = "cpu"
    precision: str = Field(
        "auto", description="fp32 | fp16 | bf16 | int8 (openvino) | auto (the factory's choice for the runtime)"
    )
    max_batch: int = Field(
        0, ge=0, description="live frames of equal size from several sessions run as one call; 0 = the backend's "
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
        description="largest width * height of a frame, read from the image or video header before decoding: "
        "a small compressed file can declare a frame whose pixels and activations fill the memory",
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

    def key_matches(self, candidate: str | None) -> bool:
        """True when no key is configured or ``candidate`` equals it (constant time)."""
        import hmac

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
