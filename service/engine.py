"""One inference worker per loaded backend, shared by live sessions and batch jobs.

Inference runs on a dedicated thread, never on the event loop. Requests carry a priority: live
frames (``LIVE``) always go before batch-job frames (``BATCH``), so a long job never starves a
display client. Live requests that are waiting at the same moment and share a frame size are run
as one batched backend call (state tensors batched too), up to ``max_batch``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

from export.runtime import Backend, BackendInfo
from models.checkpoints import shipped_checkpoint
from service.backends.factory import create_backend
from service.memory import release_free_memory
from service.pipeline import FrameResult, Geometry, Stream, run_streams

logger = logging.getLogger(__name__)


class Priority(IntEnum):
    LIVE = 0
    BATCH = 1


_STOP_PRIORITY = 1 << 30  # sorts after every real request: pending work finishes before the worker stops


@dataclass(order=True)
class _Request:
    """A frame to run, or (``stream is None``) the stop marker; one type so the queue can always compare."""

    priority: int
    seq: int
    stream: Stream | None = field(default=None, compare=False)
    frame: np.ndarray | None = field(default=None, compare=False)
    future: Future[FrameResult] | None = field(default=None, compare=False)

    @property
    def is_stop(self) -> bool:
        return self.stream is None


class InferenceEngine:
    """``on_batch(size, seconds)``, when given, is called on the worker thread after every backend call
    (the service feeds its batch-size and inference-time metrics from it)."""

    def __init__(
        self,
        backend: Backend,
        max_batch: int = 8,
        on_batch: Callable[[int, float], None] | None = None,
        prepare: Callable[[Backend], None] | None = None,
    ) -> None:
        """``prepare`` (the warm-up) runs first, on the worker thread itself: runtimes keep per-thread
        working memory (oneDNN scratchpads, malloc arenas), so warming up on any other thread leaves
        the real worker's first-use allocations to the first client. :meth:`wait_ready` waits for it."""
        self.backend = backend
        self.max_batch = max(1, max_batch)
        self.on_batch = on_batch
        self._prepare = prepare
        self._ready: Future[None] = Future()
        self._queue: queue.PriorityQueue[_Request] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._work, name=f"infer-{backend.spec.name}", daemon=True)
        self._closed = False
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Blocks until ``prepare`` has run; re-raises what it raised."""
        self._ready.result(timeout)

    def submit(self, stream: Stream, frame: np.ndarray, priority: Priority = Priority.LIVE) -> Future[FrameResult]:
        if self._closed:
            raise RuntimeError("inference engine is closed")
        future: Future[FrameResult] = Future()
        self._queue.put(_Request(int(priority), next(self._seq), stream, frame, future))
        return future

    async def run(self, stream: Stream, frame: np.ndarray, priority: Priority = Priority.LIVE) -> FrameResult:
        return await asyncio.wrap_future(self.submit(stream, frame, priority))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_Request(_STOP_PRIORITY, -1))
            self._thread.join(timeout=30)

    def _take_batch(self, first: _Request) -> list[_Request]:
        batch = [first]
        if first.priority != Priority.LIVE:
            return batch
        held: list[_Request] = []
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item.is_stop:
                self._queue.put(item)
                break
            same = item.priority == Priority.LIVE and item.stream.geometry == first.stream.geometry
            # one frame per stream per call: a stream's next frame needs the state this call produces
            if same and all(r.stream is not item.stream for r in batch):
                batch.append(item)
            else:
                held.append(item)
        for item in held:
            self._queue.put(item)
        return batch

    def _work(self) -> None:
        try:
            if self._prepare is not None:
                self._prepare(self.backend)
        except BaseException as exc:  # noqa: BLE001 - the loader re-raises it from wait_ready
            self._ready.set_exception(exc)
        else:
            self._ready.set_result(None)
        while True:
            item = self._queue.get()
            if item.is_stop:
                return
            self._serve(item)
            # Nothing of a served batch may outlive the call: a local holding the last request would
            # keep a closed session's stream (its state: about 33 MiB at 320x416 for most-nss) alive
            # until the next frame arrives.
            del item

    def _serve(self, item: _Request) -> None:
        batch = [r for r in self._take_batch(item) if r.future.set_running_or_notify_cancel()]
        if not batch:
            return
        start = time.perf_counter()
        try:
            results = run_streams(self.backend, [r.stream for r in batch], [r.frame for r in batch])
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about the failure
            for r in batch:
                r.future.set_exception(exc)
            return
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), time.perf_counter() - start)
            except Exception:  # a metrics hook must never leave waiters hanging
                logger.exception("on_batch hook failed")
        for r, result in zip(batch, results, strict=True):
            r.future.set_result(result)


BackendFactory = Callable[..., Backend]


@dataclass(frozen=True)
class LoadedModel:
    """What ``/v1/models`` reports about a model the pool has loaded."""

    name: str
    engine: InferenceEngine
    info: BackendInfo
    checkpoint: Path | None  # None: random initialisation (no shipped or configured weights)
    load_seconds: float

    @property
    def random_weights(self) -> bool:
        return self.checkpoint is None


def warm_up(backend: Backend, size: tuple[int, int], max_batch: int) -> None:
    """Runs a new backend at batch 1 and at ``max_batch`` on grey frames of ``size``, before any session
    can reach it.

    Why: runtimes allocate their working set (kernels, activation buffers, thread pools) on first use.
    Done at load time, the first client does not pay for it in latency, and the idle server's memory
    already holds it (measured effect on memory: docs/performance-service.md).
    """
    height, width = size
    geometry = Geometry(height, width, backend.spec.size_multiple)
    start = time.perf_counter()
    frame = np.full((height, width, 3), 128, np.uint8)
    for batch in sorted({1, max_batch}):
        streams = [Stream(backend.spec, geometry) for _ in range(batch)]
        for _ in range(2):  # the first frame resets, the second runs with carried state
            run_streams(backend, streams, [frame] * batch)
    release_free_memory()
    logger.info("%s warmed up at %dx%d, batch 1 and %d, in %.1f s", backend.spec.name, height, width, max_batch,
                time.perf_counter() - start)  # fmt: skip


class EnginePool:
    """Loaded models by name, each with one :class:`InferenceEngine`, shared by sessions and batch jobs.

    Models load once, lazily (``get``/``load``) or at startup, on a worker thread; a per-name lock
    makes concurrent first requests wait for one load instead of loading twice.
    ``engines`` is the plain ``name -> InferenceEngine`` view the batch-jobs code reads.
    """

    def __init__(
        self,
        backend: str = "auto",
        device: str = "cpu",
        precision: str = "auto",
        max_batch: int = 8,
        checkpoints: Mapping[str, str | Path] | None = None,
        backend_factory: BackendFactory | None = None,
        on_batch: Callable[[str], Callable[[int, float], None]] | None = None,
        warmup_size: tuple[int, int] | None = None,
    ) -> None:
        self.backend = backend
        self.warmup_size = warmup_size
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        self.checkpoints = dict(checkpoints or {})
        self._factory = backend_factory
        self._on_batch = on_batch
        self.models: dict[str, LoadedModel] = {}
        self.engines: dict[str, InferenceEngine] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def load(self, name: str) -> LoadedModel:
        """Loads ``name`` if needed (blocking: call from a thread, not the event loop)."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name in self.models:
                return self.models[name]
            checkpoint = self.checkpoints.get(name)
            start = time.perf_counter()
            factory = self._factory or create_backend
            # "auto" goes to the factory as it is: it picks the runtime and precision (create_backend).
            backend = factory(name, self.backend, self.device, self.precision, checkpoint)
            max_batch = self.max_batch or backend.info.max_batch
            used = Path(checkpoint) if checkpoint else shipped_checkpoint(name)
            hook = self._on_batch(name) if self._on_batch else None
            size = self.warmup_size
            prepare = None if size is None else (lambda b: warm_up(b, size, max_batch))
            engine = InferenceEngine(backend, max_batch=max_batch, on_batch=hook, prepare=prepare)
            try:
                engine.wait_ready()
            except BaseException:
                engine.close()
                backend.close()
                raise
            loaded = LoadedModel(name, engine, backend.info, used, time.perf_counter() - start)
            info = backend.info
            logger.info(
                "model %s loaded in %.1f s: backend %s, device %s, precision %s (settings: %s, %s)",
                name, loaded.load_seconds, info.name, info.device, info.precision, self.backend, self.precision,
            )  # fmt: skip
            if used is None:
                logger.warning("model %s: no checkpoint shipped or configured; running with RANDOM weights", name)
            else:
                logger.info("model %s: weights from %s", name, used)
            self.models[name] = loaded
            self.engines[name] = engine
            return loaded

    async def get(self, name: str) -> InferenceEngine:
        """The engine for ``name``, loading it off the event loop on first use."""
        loaded = self.models.get(name)
        if loaded is None:
            loaded = await asyncio.to_thread(self.load, name)
        return loaded.engine

    def close(self) -> None:
        for loaded in list(self.models.values()):
            loaded.engine.close()
            loaded.engine.backend.close()
        self.models.clear()
        self.engines.clear()
