"""TensorRT backend: a serialized FP16 engine run with pre-allocated device buffers.

One execution context per backend instance (the inference engine runs one worker thread per
backend, so that is one context per worker). Buffers are torch CUDA tensors, allocated once per
input shape and reused, so steady-state inference does no allocation; inputs are copied in and
outputs copied out on the backend's own CUDA stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from export.runtime import Backend, BackendInfo, BackendUnavailable
from export.trt import import_tensorrt
from models.spec import ModelSpec


class TrtBackend(Backend):
    def __init__(self, spec: ModelSpec, engine_path: str | Path, device: str = "cuda", precision: str = "fp16") -> None:
        super().__init__(spec, BackendInfo("tensorrt", device, precision))
        if not device.startswith("cuda"):
            raise BackendUnavailable(f"tensorrt backend needs a CUDA device, not {device!r}")
        self.engine_path = Path(engine_path)
        self._shape_key: tuple[int, ...] | None = None
        self._buffers: dict[str, object] = {}

    def _load(self) -> None:
        trt = import_tensorrt()
        self.device = torch.device(self.info.device)
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"{self.engine_path}: TensorRT could not deserialize it (built for another GPU or version?)"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        missing = set(self.spec.input_names + self.spec.output_names) - names
        if missing:
            raise RuntimeError(f"{self.engine_path}: engine lacks tensors {sorted(missing)}")

    def _bind(self, feed: Mapping[str, np.ndarray]) -> None:
        """(Re)allocates buffers and sets shapes when the input shape changes; a no-op otherwise."""
        key = tuple(feed[self.spec.frame.name].shape)
        if key == self._shape_key:
            return
        self._buffers = {}
        for name in self.spec.input_names:
            shape = tuple(np.shape(feed[name]))
            if not self.context.set_input_shape(name, shape):
                raise ValueError(f"tensorrt: shape {shape} of {name} is outside the engine's optimisation profile")
            self._buffers[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
        for name in self.spec.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            self._buffers[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
        for name, buffer in self._buffers.items():
            self.context.set_tensor_address(name, buffer.data_ptr())  # type: ignore[attr-defined]
        self._shape_key = key

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._bind(feed)
        with torch.cuda.stream(self.stream):
            for name in self.spec.input_names:
                host = torch.from_numpy(np.ascontiguousarray(feed[name], np.float32))
                self._buffers[name].copy_(host, non_blocking=True)  # type: ignore[attr-defined]
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("tensorrt: execute_async_v3 failed")
            outputs = {n: self._buffers[n].to("cpu", non_blocking=True) for n in self.spec.output_names}  # type: ignore[attr-defined]
        self.stream.synchronize()
        return {n: t.numpy() for n, t in outputs.items()}

    def _close(self) -> None:
        self._buffers.clear()
        self._shape_key = None
        self.context = None
        self.engine = None
