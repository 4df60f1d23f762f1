"""PyTorch eager backend (CPU or CUDA, fp32 or fp16/bf16 autocast): the reference every other runtime matches."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from service.backends.base import Backend, BackendInfo, BackendUnavailable

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    def __init__(self, model: nn.Module, device: str = "cpu", precision: str = "fp32") -> None:
        super().__init__(model.spec, BackendInfo("torch", device, precision))  # type: ignore[arg-type]
        if precision not in ("fp32", *_AUTOCAST):
            raise ValueError(f"torch backend: precision must be fp32, fp16 or bf16, not {precision!r}")
        self.model = model

    def _load(self) -> None:
        if self.info.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch backend: device 'cuda' requested but torch sees no CUDA GPU")
        self.model = self.model.to(self.info.device).eval()

    @torch.inference_mode()
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        device = self.info.device
        args = [torch.from_numpy(np.ascontiguousarray(feed[n], np.float32)).to(device) for n in self.spec.input_names]
        dtype = _AUTOCAST.get(self.info.precision)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            results = self.model(*args)
        return {n: r.float().cpu().numpy() for n, r in zip(self.spec.output_names, results, strict=True)}
