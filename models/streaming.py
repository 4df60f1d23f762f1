"""The one loop that streams frames through a network with the recurrent state carried.

A stream starts with ``reset = 1`` on its first frame (the state inputs are then zeros and ignored)
and feeds each step's next-state outputs back as the following step's state inputs, exactly as a
deployment does; drift that accumulates through the state therefore shows up in whatever reads the
steps. The loop runs anything with a spec and ``infer(feed) -> outputs`` (numpy in and out, names
from the spec): every runtime backend (:class:`export.runtime.Backend`), and :class:`ModelRunner`,
the network itself, for code in ``models`` that must not depend on the runtimes.
:func:`stream_intermediates` is the same loop on a network's own ``forward_intermediates``, for fits and
probes that read features inside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from models.spec import ModelSpec


class Runner(Protocol):
    """What the stream loop needs from a runtime: the spec's names, and one step on numpy feeds."""

    spec: ModelSpec

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class ModelRunner:
    """A network as a :class:`Runner`: its streaming ``forward`` in fp32, eagerly, on the CPU.

    The same arithmetic as the torch backend's CPU reference (``service/backends/torch.py``), without
    its GPU machinery, so code below the service can stream a network through the same loop as every
    runtime."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.spec: ModelSpec = model.spec  # type: ignore[assignment]

    @torch.inference_mode()
    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [torch.from_numpy(np.ascontiguousarray(feed[n], np.float32)) for n in self.spec.input_names]
        outputs = self.model(*inputs)
        return {n: r.float().contiguous().numpy() for n, r in zip(self.spec.output_names, outputs, strict=True)}


def stream_steps(
    runner: Runner, frames: Iterable[np.ndarray]
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(feed, outputs) of every step of one stream of (b, 3, H, W) float32 frames (reset on the first),
    the state fed back each step. A generator, so a caller keeps only what it needs (int8 calibration
    keeps the feeds, a parity check the outputs)."""
    spec = runner.spec
    state: dict[str, np.ndarray] | None = None
    for t, frame in enumerate(frames):
        batch, _, height, width = frame.shape
        if state is None:
            state = spec.initial_state(batch, height, width)
        reset = np.full((batch, 1, 1, 1), 1.0 if t == 0 else 0.0, np.float32)
        feed = {spec.frame.name: frame, spec.reset.name: reset, **state}
        outputs = runner.infer(feed)
        state = {s.name: outputs[s.next_name] for s in spec.states}
        yield feed, outputs


def run_stream(runner: Runner, frames: Iterable[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Outputs of every step of one stream (reset on the first frame), the state fed back each step."""
    return [outputs for _, outputs in stream_steps(runner, frames)]


@torch.no_grad()
def stream_intermediates(
    model: nn.Module, frames: np.ndarray, scales: tuple[int, ...] | None = None
) -> Iterator[tuple[Tensor, Any, dict[str, Tensor]]]:
    """Per frame of a uint8 (T, H, W, 3) clip: the (1, 3, H, W) float32 frame and what the network's
    ``forward_intermediates(frame, reset, state, scales)`` returns for it but the state, which is carried
    (reset on the first frame) as :func:`stream_steps` carries it. The network runs as it is (eval mode
    and dtype are the caller's); ``scales`` decodes only the coarsest scales, whose state alone moves on."""
    state = {k: torch.from_numpy(v) for k, v in model.spec.initial_state(1, *frames.shape[1:3]).items()}  # type: ignore[operator]
    for t, array in enumerate(as_stream(frames)):
        frame = torch.from_numpy(array)
        reset = torch.full((1, 1, 1, 1), float(t == 0))
        outputs, new_state, intermediates = model.forward_intermediates(frame, reset, state, scales)  # type: ignore[operator]
        state = {**state, **new_state}
        yield frame, outputs, intermediates


def as_stream(frames: np.ndarray) -> list[np.ndarray]:
    """uint8 (T, H, W, 3) frames, as data sets hold them -> the (1, 3, H, W) floats in [0, 1] a stream feeds."""
    return [np.ascontiguousarray(f.transpose(2, 0, 1)[None], np.float32) / 255 for f in frames]


__all__ = ["ModelRunner", "Runner", "as_stream", "run_stream", "stream_intermediates", "stream_steps"]
