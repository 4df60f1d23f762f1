"""Prometheus metrics of one app instance.

Each app owns its own ``CollectorRegistry`` (not the process-global one) so several apps in one
process - tests, the load benchmark - never collide on metric names, and ``/metrics`` shows exactly
this app's numbers.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Per-stage latencies of a live frame: 0.5 ms .. 10 s, denser where real-time budgets sit.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("vident_sessions", "open streaming sessions", ["model"], registry=r)
        self.sessions_opened = Counter("vident_sessions_opened", "sessions accepted", ["model"], registry=r)
        self.sessions_refused = Counter(
            "vident_sessions_refused", "connections refused, by reason", ["reason"], registry=r
        )
        self.frames_received = Counter("vident_frames_received", "frame messages received", ["model"], registry=r)
        self.frames_processed = Counter("vident_frames_processed", "frames inferred and sent", ["model"], registry=r)
        self.frames_dropped = Counter(
            "vident_frames_dropped", "frames replaced by a newer one before inference", ["model"], registry=r
        )
        self.errors = Counter("vident_errors", "error messages sent to clients, by code", ["code"], registry=r)
        self.send_timeouts = Counter(
            "vident_send_timeouts", "sessions closed because the client stopped reading (send_timeout_s)", registry=r
        )
        self.stage_seconds = Histogram(
            "vident_stage_seconds",
            "per-frame latency of each stage (wait = decoded until inference starts; total = receipt to send)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vident_batch_size", "frames per backend call", ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r
        )
        self.batch_seconds = Histogram(
            "vident_batch_seconds", "wall time of one backend call", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "vident_model_loaded",
            "1 for each loaded model, with its runtime and whether its weights are random",
            ["model", "backend", "device", "precision", "random_weights"],
            registry=r,
        )

    def batch_hook(self, model: str) -> Callable[[int, float], None]:
        """The engine's ``on_batch`` callback for ``model`` (called on the inference thread)."""
        size = self.batch_size.labels(model)
        seconds = self.batch_seconds.labels(model)

        def observe(batch: int, wall: float) -> None:
            size.observe(batch)
            seconds.observe(wall)

        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
