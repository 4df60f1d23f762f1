"""OpenVINO backend: the exported ONNX graph compiled for the CPU, fp32, bf16 or int8 (export/int8.py).

OpenVINO compiles a graph for static shapes fastest, so the model is reshaped and compiled once per
input shape (batch, height, width) and the compiled model is cached; a live stream keeps one
shape, so compilation happens once per stream size. Each compiled shape holds its own buffers
(about 0.2 GB for most-nss at 320x416), so only the first ``max_static_shapes`` shapes get one;
later shapes share a single dynamic-shape compilation, which bounds the memory of a server whose
clients send many frame sizes. (Evicting compiled models instead crashed the process later with
SIGSEGV: docs/performance-service.md.) ``PERFORMANCE_HINT=LATENCY`` with one stream
and all cores per request is what streaming wants (one frame at a time, as soon as possible).

bf16 (``INFERENCE_PRECISION_HINT``) needs CPU support (AVX512-BF16 or AMX, reported by the plugin
as the ``BF16`` capability); without it the request fails with :class:`BackendUnavailable` rather
than silently running fp32. The graph is first rewritten by :func:`export.openvino.openvino_graph`
so the homography algebra stays fp32 under bf16 (the parity loop checks it, with MACE).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from export.openvino import import_openvino, inference_hint, openvino_graph, runtime_has_bf16
from export.runtime import Backend, BackendInfo, BackendUnavailable, cpu_threads
from models.spec import ModelSpec

PRECISIONS = ("fp32", "bf16", "int8")


class OpenVinoBackend(Backend):
    def __init__(
        self,
        spec: ModelSpec,
        onnx_path: str | Path,
        device: str = "cpu",
        precision: str = "fp32",
        rewrite_matmuls: bool = True,  # False only to measure what the rewrite fixes (docs/performance.md)
        max_static_shapes: int = 4,
        int8_model: str | Path | None = None,  # the quantised IR for precision "int8" (export.int8.cached_int8)
    ) -> None:
        super().__init__(spec, BackendInfo("openvino", device, precision))
        if device != "cpu":
            raise ValueError(f"openvino backend runs on the CPU only, not {device!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"openvino backend: precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if (precision == "int8") != (int8_model is not None):
            raise ValueError("openvino backend: int8 runs the quantised IR (int8_model), and only int8 does")
        self.int8_model = Path(int8_model) if int8_model is not None else None
        self.onnx_path = Path(onnx_path)
        self.rewrite_matmuls = rewrite_matmuls
        self.threads = cpu_threads()
        self.max_static_shapes = max_static_shapes
        self._compiled: dict[tuple[int, ...], tuple[object, object]] = {}  # shape key -> (compiled, request)
        self._dynamic: tuple[object, object] | None = None  # every shape beyond max_static_shapes
        self._lock = threading.Lock()

    def _load(self) -> None:
        ov = import_openvino()
        self.core = ov.Core()
        if self.info.precision == "bf16" and not runtime_has_bf16(self.core):
            raise BackendUnavailable("openvino backend: bf16 needs a CPU with AVX512-BF16 or AMX; this one has neither")
        self.float_hint = inference_hint(self.core, self.info.precision)
        if self.int8_model is not None:  # quantised from the rewritten graph already
            self.model = self.core.read_model(str(self.int8_model))
            return
        # MatMuls rewritten element-wise so the geometry stays fp32 under bf16 (see export.openvino).
        graph = openvino_graph(self.onnx_path) if self.rewrite_matmuls else self.onnx_path
        self.model = self.core.read_model(str(graph))

    def _compile(self, model: object) -> tuple[object, object]:
        config = {
            "INFERENCE_PRECISION_HINT": self.float_hint,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": self.threads,
        }
        compiled = self.core.compile_model(model, "CPU", config)
        return compiled, compiled.create_infer_request()

    def _request_for(self, feed: Mapping[str, np.ndarray]):  # noqa: ANN202 - openvino InferRequest
        frame = feed[self.spec.frame.name]
        key = tuple(frame.shape)
        if key in self._compiled:
            return self._compiled[key]
        if len(self._compiled) < self.max_static_shapes:
            model = self.model.clone()
            model.reshape({n: list(np.shape(feed[n])) for n in self.spec.input_names})
            self._compiled[key] = self._compile(model)
            return self._compiled[key]
        if self._dynamic is None:
            self._dynamic = self._compile(self.model.clone())  # the exported graph's dynamic batch, H, W
        return self._dynamic

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        """Frame shapes with their own static compilation (each one cost a compile)."""
        return list(self._compiled)

    @property
    def uses_dynamic(self) -> bool:
        """Whether some shape beyond ``max_static_shapes`` has run on the shared dynamic compilation."""
        return self._dynamic is not None

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {n: np.ascontiguousarray(feed[n], np.float32) for n in self.spec.input_names}
        with self._lock:  # one request per shape: callers on several threads take turns
            compiled, request = self._request_for(inputs)
            results = request.infer(inputs)
            # The request reuses its output buffers on the next call: copy out.
            return {n: np.array(results[compiled.output(n)], np.float32, copy=True) for n in self.spec.output_names}

    def _close(self) -> None:
        self._compiled.clear()
        self._dynamic = None
