"""The shared inference engine: live frames first, batching, and a clean stop with work queued."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

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


def test_pool_warms_a_model_up_before_anyone_can_use_it() -> None:
    """Batch 1 and max_batch, reset then carried state, at the configured size; then the model is ready."""
    from service.engine import EnginePool

    seen: list[tuple[int, ...]] = []
    threads: set[str] = set()

    class _Recording(TorchBackend):
        def _infer(self, feed):  # type: ignore[no-untyped-def]
            seen.append((*feed["frame"].shape, int(feed["reset"].sum())))
            threads.add(threading.current_thread().name)
            return super()._infer(feed)

    def factory(name, runtime, device, precision, checkpoint):  # type: ignore[no-untyped-def]
        return _Recording(create_model(name)).load()

    pool = EnginePool(backend="torch", max_batch=3, backend_factory=factory, warmup_size=(32, 48))
    try:
        loaded = pool.load("most-nss-tiny")
        assert seen == [(1, 3, 32, 48, 1), (1, 3, 32, 48, 0), (3, 3, 32, 48, 3), (3, 3, 32, 48, 0)]
        # on the thread that serves the sessions, so its per-thread working memory is part of idle
        assert threads == {"infer-most-nss-tiny"}
        assert pool.models["most-nss-tiny"] is loaded
    finally:
        pool.close()
    cold = EnginePool(backend="torch", backend_factory=factory)
    seen.clear()
    try:
        cold.load("most-nss-tiny")
        assert seen == []
    finally:
        cold.close()


def test_pool_hands_auto_to_the_factory_as_it_is() -> None:
    """The factory resolves "auto" (fastest runtime, bf16 only where parity holds); the pool does not guess."""
    from service.engine import EnginePool

    asked: list[tuple[str, str, str]] = []

    def factory(name, runtime, device, precision, checkpoint):  # type: ignore[no-untyped-def]
        asked.append((runtime, device, precision))
        return TorchBackend(create_model(name)).load()

    pool = EnginePool(backend="auto", precision="auto", backend_factory=factory)
    try:
        pool.load("r2-d4-tiny")
    finally:
        pool.close()
    assert asked == [("auto", "cpu", "auto")]


def test_a_failing_warm_up_fails_the_load_and_registers_nothing() -> None:
    from service.engine import EnginePool

    closed: list[bool] = []

    class _Broken(TorchBackend):
        def _infer(self, feed):  # type: ignore[no-untyped-def]
            raise RuntimeError("out of memory while compiling")

        def close(self) -> None:
            closed.append(True)
            super().close()

    def factory(name, runtime, device, precision, checkpoint):  # type: ignore[no-untyped-def]
        return _Broken(create_model(name)).load()

    pool = EnginePool(backend="torch", max_batch=1, backend_factory=factory, warmup_size=(32, 48))
    with pytest.raises(RuntimeError, match="out of memory while compiling"):
        pool.load("most-nss-tiny")
    assert pool.models == {} and pool.engines == {}
    assert closed == [True]


def test_an_idle_engine_keeps_no_stream_alive() -> None:
    """A closed session's state must be freed at once, not when the next frame comes: the worker
    thread used to keep its last request (and so the stream's state tensors) in a local variable."""
    import gc
    import weakref

    backend = TorchBackend(create_model("most-nss-tiny")).load()
    engine = InferenceEngine(backend, max_batch=1)
    try:
        stream = Stream(backend.spec, Geometry(32, 40))
        engine.submit(stream, _frame()).result(timeout=30)
        gone = weakref.ref(stream)
        del stream
        deadline = time.monotonic() + 5
        while gone() is not None and time.monotonic() < deadline:  # the worker may still be unwinding
            gc.collect()
            time.sleep(0.01)
        assert gone() is None
    finally:
        engine.close()
