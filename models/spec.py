"""Typed descriptions of a streaming network's tensors.

The same names are used by the torch model, the ONNX graph, every backend and the service, so a
parity check or a session is one loop over a spec instead of a set of loose dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Kind = Literal["map", "homography", "flag"]


@dataclass(frozen=True)
class TensorSpec:
    """One named float32 tensor of a streaming graph.

    ``map``: (batch, channels, H / stride, W / stride), ``stride`` relative to the input frame;
    ``homography``: (batch, 3, 3); ``flag``: (batch, 1, 1, 1), broadcastable over maps.
    """

    name: str
    channels: int = 1
    stride: int = 1
    kind: Kind = "map"
    doc: str = ""

    def shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        if self.kind == "homography":
            return (batch, 3, 3)
        if self.kind == "flag":
            return (batch, 1, 1, 1)
        return (batch, self.channels, height // self.stride, width // self.stride)


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor: its input name, the output name of its next value, and its shape."""

    tensor: TensorSpec
    next_name: str

    @property
    def name(self) -> str:
        return self.tensor.name


@dataclass(frozen=True)
class ModelSpec:
    """Everything a runtime needs to drive ``forward(frame, reset, *state) -> (*outputs, *new_state)``.

    ``reset`` is a (batch, 1, 1, 1) float: 1 starts a new stream for that sample (the network then
    treats the current frame as its own predecessor, so the initial state values do not matter and
    are zeros), 0 continues it. Keeping the flag a tensor lets sessions at different points of
    their streams share one batched call.
    """

    name: str
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]
    size_multiple: int = 8
    frame: TensorSpec = field(default_factory=lambda: TensorSpec("frame", 3, doc="RGB in [0, 1]"))
    reset: TensorSpec = field(
        default_factory=lambda: TensorSpec("reset", kind="flag", doc="1 = first frame of a stream")
    )
    # Module paths whose convolutions may run in int8 (export/int8.py): a measured choice per network,
    # empty = no int8 variant.
    int8_modules: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return (self.frame.name, self.reset.name, *(s.name for s in self.states))

    @property
    def output_names(self) -> tuple[str, ...]:
        return (*(o.name for o in self.outputs), *(s.next_name for s in self.states))

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"{self.name}: frame size {height}x{width} must be a positive multiple of {m}")

    def initial_state(self, batch: int, height: int, width: int) -> dict[str, np.ndarray]:
        """Zeros for every state tensor: valid together with reset = 1."""
        self.check_size(height, width)
        return {s.name: np.zeros(s.tensor.shape(batch, height, width), np.float32) for s in self.states}
