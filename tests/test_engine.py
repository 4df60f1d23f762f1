"""The shared inference engine: live frames first, batching, and a clean stop with work queued."""

from __future__ import annotations

import threading

import numpy as np

from models import create_model
from service.backends.torch import TorchBackend
from service.engine import InferenceEngine, Priority
from service.pipeline import Geometry, Stream


class _GatedBackend(TorchBackend):
    """Blocks every call until released, so requests pile up in the queue deterministically."""

    def __init__(self) -> None:
        super().__init__(create_model("most-nss-tiny"))
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def _infer(self, feed):  # type: ignore[no-untyped-def]
        self.entered.set()
        self.gate.wait(timeout=30)
        self.calls.append(feed["frame"].shape[0])
        return super()._infer(feed)


def _frame() -> np.ndarray:
    return np.zeros((32, 40, 3), np.uint8)


def test_close_with_queued_work_finishes_it_without_error() -> None:
    backend = _GatedBackend().load()
    engine = InferenceEngine(backend, max_batch=1)
    geometry = Geometry(32, 40)
    futures = [engine.submit(Stream(backend.spec, geometry), _frame(), p) for p in (Priority.BATCH,) * 3]
    backend.gate.set()
    engine.close()  # the stop marker must compare with queued requests
    assert all(f.result(timeout=30).restored.shape == (32, 40, 3) for f in futures)


def test_live_frames_overtake_batch_frames_and_share_a_call() -> None:
    backend = _GatedBackend().load()
    engine = InferenceEngine(backend, max_batch=8)
    geometry = Geometry(32, 40)
    first = engine.submit(Stream(backend.spec, geometry), _frame(), Priority.BATCH)
    assert backend.entered.wait(timeout=30)  # the worker is busy with it
    batch_jobs = [engine.submit(Stream(backend.spec, geometry), _frame(), Priority.BATCH) for _ in range(2)]
    live = [engine.submit(Stream(backend.spec, geometry), _frame(), Priority.LIVE) for _ in range(3)]
    backend.gate.set()
    for f in [first, *batch_jobs, *live]:
        f.result(timeout=30)
    engine.close()
    # the first call was already running; then the three live frames in one call, then the jobs one by one
    assert backend.calls == [1, 3, 1, 1]
