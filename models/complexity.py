"""Parameter counts and per-frame compute, measured on the streaming graph.

GFLOPs are reported as multiply-accumulates x 1e-9 (the convention of the dissertation's tables and
of most vision papers), counted by ``torch.utils.flop_counter`` on one streaming step with state
carried (not the first frame), so cached features are not counted twice. Operations the counter
does not model (grid_sample, element-wise ops) are left out; they are a small share here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Complexity:
    parameters: int
    gmacs: float
    height: int
    width: int


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_complexity(model: nn.Module, height: int = 320, width: int = 416) -> Complexity:
    """Counted on the model's device: a model on a GPU is counted there, where large frames are cheap."""
    spec = model.spec  # type: ignore[attr-defined]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    frame = torch.rand(1, 3, height, width, device=device)
    state = [torch.from_numpy(v).to(device) for v in spec.initial_state(1, height, width).values()]
    counter = FlopCounterMode(display=False)
    with counter:
        model(frame, torch.zeros(1, 1, 1, 1, device=device), *state)
    model.train(was_training)
    return Complexity(count_parameters(model), counter.get_total_flops() / 2e9, height, width)
