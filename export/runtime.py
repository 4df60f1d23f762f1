"""One interface for every runtime (Polygraphy's runners): torch, ONNX Runtime, OpenVINO, TensorRT.

A backend runs one model's streaming graph: ``infer`` takes the spec's input names (``frame``,
``reset`` and every state tensor) as float32 numpy arrays and returns every output name (model
outputs then next-state tensors). The same names everywhere make a parity check one loop over
backends, and let the service batch sessions by concatenating feeds along axis 0.

The interface lives here, below the service, because export checks the graphs it writes by running
them (:mod:`export.verify`, :mod:`export.int8`): like Polygraphy's ``Comparator``, that code depends
on runners, never on the service that implements them (``service/backends/``).
"""

from __future__ import annotations

import importlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType, TracebackType

import numpy as np

from models.spec import ModelSpec


class BackendUnavailable(RuntimeError):
    """The runtime or device a backend needs is missing; the message names what and how to get it."""


@dataclass(frozen=True)
class BackendInfo:
    name: str  # torch | onnxruntime | openvino | tensorrt
    device: str  # cpu | cuda
    precision: str  # fp32 | fp16 | bf16 | int8
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


def import_runtime(module: str, backend: str, install: str) -> ModuleType:
    """``import module`` or :class:`BackendUnavailable` saying which package to install.

    Runtimes are imported when first used, not at module import: a machine without one still runs
    the others, and the message names the package instead of showing an ImportError traceback."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(
            f"{backend} backend: the '{install}' package is not installed (pip install {install})"
        ) from exc


def cpu_threads() -> int:
    """Cores this process may use (affinity-aware), the right intra-op thread count for latency."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


__all__ = ["Backend", "BackendInfo", "BackendUnavailable", "cpu_threads", "import_runtime"]
