"""One interface for every runtime (Polygraphy's runners): torch, ONNX Runtime, OpenVINO, TensorRT.

A backend runs one model's streaming graph: ``infer`` takes the spec's input names (``frame``,
``reset`` and every state tensor) as float32 numpy arrays and returns every output name (model
outputs then next-state tensors). The same names everywhere make a parity check one loop over
backends, and let the service batch sessions by concatenating feeds along axis 0.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from models.spec import ModelSpec


class BackendUnavailable(RuntimeError):
    """The runtime or device a backend needs is missing; the message names what and how to get it."""


@dataclass(frozen=True)
class BackendInfo:
    name: str  # torch | onnxruntime | openvino | tensorrt
    device: str  # cpu | cuda
    precision: str  # fp32 | fp16 | bf16
    # Most frames one call should take from several sessions; 0 = 1 on the CPU, 8 elsewhere. On the CPU one
    # frame already fills the cores: most-nss at 320x416 on OpenVINO bf16 ran 2.16 FPS at batch 1 and 2.27 at
    # batch 4, for 4x the latency and +950 MB (docs/performance-service.md).
    max_batch: int = 0

    def __post_init__(self) -> None:
        if self.max_batch == 0:
            object.__setattr__(self, "max_batch", 1 if self.device == "cpu" else 8)


class Backend(ABC):
    """``load()`` once, ``infer(feed)`` many times, ``close()``; also a context manager.

    Public methods wrap ``_load`` / ``_infer`` / ``_close`` and record wall time so the pipeline
    and benchmarks read the same numbers.
    """

    def __init__(self, spec: ModelSpec, info: BackendInfo) -> None:
        self.spec = spec
        self.info = info
        self.loaded = False
        self.last_infer_seconds = 0.0
        self.load_seconds = 0.0

    def load(self) -> Backend:
        if not self.loaded:
            start = time.perf_counter()
            self._load()
            self.load_seconds = time.perf_counter() - start
            self.loaded = True
        return self

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.loaded:
            self.load()
        missing = [n for n in self.spec.input_names if n not in feed]
        if missing:
            raise KeyError(f"{self.spec.name}: feed lacks {missing}")
        start = time.perf_counter()
        outputs = self._infer(feed)
        self.last_infer_seconds = time.perf_counter() - start
        return outputs

    def close(self) -> None:
        if self.loaded:
            self._close()
            self.loaded = False

    def __enter__(self) -> Backend:
        return self.load()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _close(self) -> None:  # most runtimes free themselves with the object
        return None
