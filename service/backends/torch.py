"""PyTorch backend: the fp32 eager reference on the CPU, and the GPU fast path on CUDA.

On the CPU it runs the network eagerly (fp32, or bf16/fp16 autocast): the reference every other
runtime is compared with (export/verify.py).

On CUDA it is what ``auto`` serves when TensorRT is absent (service/backends/factory.py):

- fp16 or bf16 autocast; the network itself keeps its geometry (warps, DLT, homography cascade)
  in float32 (models/layers.py);
- channels_last weights and activations, the layout tensor-core convolutions read;
- the streaming step captured in a CUDA graph per (batch, height, width): static input and state
  buffers, a few eager steps on a side stream first (cuDNN picks its algorithms and the allocator
  warms up outside the graph), then one capture. A call copies the feed into the static buffers,
  replays the graph and clones its outputs, which the next replay overwrites. One replay launches
  the step's hundreds of kernels at once, which is what small frames are bound by in eager mode;
- optionally ``torch.compile`` (Inductor) of the network.

The network is copied before it moves to the GPU, so the caller's module stays where it was: a
parity check keeps using it as the CPU reference while the graphs hold the copy's weights.

``infer`` keeps the Backend contract (host float32 arrays in and out). ``infer_tensors`` takes and
returns tensors on the backend's device, so a caller that carries the state on the GPU
(tools/gpu_run.py) saves the two host copies of the state per step.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from export.runtime import Backend, BackendInfo, BackendUnavailable

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Eager steps on a side stream before a capture, as PyTorch's CUDA-graph notes do: kernel and
# algorithm selection and the allocator's first allocations then happen outside the graph.
GRAPH_WARMUP_STEPS = 3
# Graphs kept at once (least recently used dropped first); each holds its own activation memory. The
# service batches up to max_batch sessions of one frame size: max_batch graphs per size in use.
MAX_GRAPHS = 16


@dataclass
class _CapturedStep:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]  # static buffers the replay reads, in spec input order
    outputs: list[Tensor]  # the graph's own outputs, overwritten by every replay


class TorchBackend(Backend):
    """``cuda_graphs`` and ``channels_last`` default to on for CUDA devices and off on the CPU (where
    graphs do not exist and the reference stays the plain contiguous fp32 network)."""

    def __init__(
        self,
        model: nn.Module,
        device: str = "cpu",
        precision: str = "fp32",
        cuda_graphs: bool | None = None,
        compile: bool = False,
        channels_last: bool | None = None,
        max_graphs: int = MAX_GRAPHS,
    ) -> None:
        super().__init__(model.spec, BackendInfo("torch", device, precision))  # type: ignore[arg-type]
        if precision not in ("fp32", *_AUTOCAST):
            raise ValueError(f"torch backend: precision must be fp32, fp16 or bf16, not {precision!r}")
        cuda = device.startswith("cuda")
        self.cuda_graphs = cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not cuda:
            raise ValueError(f"torch backend: CUDA graphs need a CUDA device, not {device!r}")
        if max_graphs < 1:
            raise ValueError("torch backend: max_graphs must be at least 1")
        self.channels_last = cuda if channels_last is None else channels_last
        self.compile = compile
        self.max_graphs = max_graphs
        self.model = model
        self._module: nn.Module = model  # what runs: the model or its compiled form
        self._graphs: OrderedDict[tuple[int, ...], _CapturedStep] = OrderedDict()

    @property
    def captured_shapes(self) -> list[tuple[int, ...]]:
        """(batch, height, width) of the CUDA graphs held, least recently used first."""
        return list(self._graphs)

    def _load(self) -> None:
        device = self.info.device
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BackendUnavailable("torch backend: device 'cuda' requested but torch sees no CUDA GPU")
            model = copy.deepcopy(self.model)  # the caller's module stays where it is (see the module doc)
        else:
            model = self.model
        model = model.to(device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._module = torch.compile(model) if self.compile else model

    @torch.inference_mode()
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [torch.from_numpy(np.ascontiguousarray(feed[n], np.float32)) for n in self.spec.input_names]
        outputs = self._run(inputs, clone=False)  # copied to the host before any further replay
        return {n: r.contiguous().cpu().numpy() for n, r in zip(self.spec.output_names, outputs, strict=True)}

    @torch.inference_mode()
    def infer_tensors(self, feed: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Like ``infer`` with tensors: inputs on any device, float32 outputs on the backend's device.

        With CUDA graphs the outputs are clones, so they stay valid after later calls. The call is
        asynchronous on the current CUDA stream; synchronise before timing it.
        """
        if not self.loaded:
            self.load()
        missing = [n for n in self.spec.input_names if n not in feed]
        if missing:
            raise KeyError(f"{self.spec.name}: feed lacks {missing}")
        outputs = self._run([feed[n] for n in self.spec.input_names])
        return dict(zip(self.spec.output_names, outputs, strict=True))

    def drop_graphs(self) -> None:
        """Frees every captured graph and its memory pool; the next call at a shape captures again."""
        self._graphs.clear()

    def _close(self) -> None:
        self.drop_graphs()

    # -- one step ---------------------------------------------------------------------------------

    def _run(self, inputs: Sequence[Tensor], clone: bool = True) -> list[Tensor]:
        """One streaming step; ``inputs`` in spec order on any device, float32 outputs on the device.
        ``clone=False`` returns a graph's own outputs, valid only until its next replay."""
        if self.cuda_graphs:
            with torch.cuda.device(self.info.device):
                return self._replay(inputs, clone)
        return self._forward([self._on_device(x) for x in inputs])

    def _on_device(self, tensor: Tensor) -> Tensor:
        tensor = tensor.to(self.info.device, torch.float32)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def _forward(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        dtype = _AUTOCAST.get(self.info.precision)
        # No autocast weight cache: a cache filled outside a capture would hand the graph tensors it
        # does not own (PyTorch requires cache_enabled=False with CUDA graphs); one step uses each
        # weight once, so eager steps lose nothing either.
        with torch.autocast(self.info.device.split(":")[0], dtype=dtype, enabled=dtype is not None,
                            cache_enabled=False):  # fmt: skip
            results = self._module(*inputs)
        return [r.float() for r in results]  # inside the graph when captured: no extra launches

    # -- CUDA graphs ------------------------------------------------------------------------------

    def _replay(self, inputs: Sequence[Tensor], clone: bool) -> list[Tensor]:
        key = tuple(inputs[0].shape[:1]) + tuple(inputs[0].shape[2:])  # (batch, height, width)
        step = self._graphs.get(key)
        if step is None:
            step = self._capture(key, inputs)
        else:
            self._graphs.move_to_end(key)
        for name, buffer, value in zip(self.spec.input_names, step.inputs, inputs, strict=True):
            if buffer.shape != value.shape:  # copy_ would broadcast a wrong shape silently
                raise ValueError(f"{self.spec.name}: {name} has shape {tuple(value.shape)}, the step "
                                 f"captured for {key} takes {tuple(buffer.shape)}")  # fmt: skip
            buffer.copy_(value, non_blocking=True)
        step.graph.replay()
        return [output.clone() for output in step.outputs] if clone else list(step.outputs)

    def _capture(self, key: tuple[int, ...], inputs: Sequence[Tensor]) -> _CapturedStep:
        while len(self._graphs) >= self.max_graphs:  # drop before capturing: the two never coexist
            self._graphs.popitem(last=False)
        static = [self._on_device(x).clone() for x in inputs]
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                self._forward(static)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the service runs one worker thread per backend, and another thread's CUDA calls
        # during this capture must neither fail nor be captured.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self._forward(static)
        step = _CapturedStep(graph, static, outputs)
        self._graphs[key] = step
        return step
