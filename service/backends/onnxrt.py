"""ONNX Runtime backend: the exported streaming graph on the CPU or CUDA execution provider.

fp32 only: ONNX Runtime has no bf16 CPU kernels for these ops, and fp16 on CUDA is TensorRT's job.
Missing pieces (no onnxruntime, or no CUDA provider because only the CPU wheel is installed) raise
:class:`BackendUnavailable` naming the package to install.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np

from export.runtime import Backend, BackendInfo, BackendUnavailable, cpu_threads, import_runtime
from models.spec import ModelSpec


def import_onnxruntime() -> ModuleType:
    return import_runtime("onnxruntime", "onnxruntime", "onnxruntime")


def require_cuda_provider() -> None:
    """Fails with the package to install when onnxruntime cannot run on CUDA (CPU-only wheel)."""
    if "CUDAExecutionProvider" not in import_onnxruntime().get_available_providers():
        raise BackendUnavailable(
            "onnxruntime backend: device 'cuda' needs the CUDA execution provider; install "
            "'onnxruntime-gpu' (pip install 'vident[gpu]') on a machine with an NVIDIA GPU"
        )


class OrtBackend(Backend):
    def __init__(self, spec: ModelSpec, onnx_path: str | Path, device: str = "cpu", precision: str = "fp32") -> None:
        super().__init__(spec, BackendInfo("onnxruntime", device, precision))
        if precision != "fp32":
            raise ValueError(f"onnxruntime backend runs fp32 only, not {precision!r} (bf16: openvino, fp16: tensorrt)")
        self.onnx_path = Path(onnx_path)
        self.session = None

    def _load(self) -> None:
        ort = import_onnxruntime()
        if self.info.device.startswith("cuda"):
            require_cuda_provider()
            device_id = int(self.info.device.split(":")[1]) if ":" in self.info.device else 0
            providers: list = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        self._output_names = list(self.spec.output_names)

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.session is not None
        inputs = {n: np.ascontiguousarray(feed[n], np.float32) for n in self.spec.input_names}
        results = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, results, strict=True))

    def _close(self) -> None:
        self.session = None
