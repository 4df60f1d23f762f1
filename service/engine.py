"""One inference worker per loaded backend, shared by live sessions and batch jobs.

Inference runs on a dedicated thread, never on the event loop. Requests carry a priority: live
frames (``LIVE``) always go before batch-job frames (``BATCH``), so a long job never starves a
display client. Live requests that are waiting at the same moment and share a frame size are run
as one batched backend call (state tensors batched too), up to ``max_batch``.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from service.backends.base import Backend
from service.pipeline import FrameResult, Stream, run_streams


class Priority(IntEnum):
    LIVE = 0
    BATCH = 1


@dataclass(order=True)
class _Request:
    priority: int
    seq: int
    stream: Stream = field(compare=False)
    frame: np.ndarray = field(compare=False)
    future: Future[FrameResult] = field(compare=False)


class InferenceEngine:
    def __init__(self, backend: Backend, max_batch: int = 8) -> None:
        self.backend = backend
        self.max_batch = max(1, max_batch)
        self._queue: queue.PriorityQueue[_Request | tuple[int, int, None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._work, name=f"infer-{backend.spec.name}", daemon=True)
        self._closed = False
        self._thread.start()

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
            self._queue.put((99, -1, None))  # sentinel sorts last: pending work finishes first
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
            if not isinstance(item, _Request):
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
        while True:
            item = self._queue.get()
            if not isinstance(item, _Request):
                return
            batch = [r for r in self._take_batch(item) if r.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = run_streams(self.backend, [r.stream for r in batch], [r.frame for r in batch])
            except Exception as exc:  # noqa: BLE001 - every waiter must hear about the failure
                for r in batch:
                    r.future.set_exception(exc)
                continue
            for r, result in zip(batch, results, strict=True):
                r.future.set_result(result)
