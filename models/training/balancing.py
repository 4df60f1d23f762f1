"""Task weighting for multi-task training: LS, DWA, RWL and ATB (Table 6.3).

Each balancer turns the detached task losses of the current step into weights; the trainer
multiplies and sums. ATB (eq. 6.6) needs no gradients and no history: it equalises the weighted
losses while keeping their sum, lambda_i = V / (T v_i).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

# The dissertation's linear-scalarisation weights (6.3.2): restoration, segmentation, homography.
LS_WEIGHTS = {"restoration": 0.1, "segmentation": 0.2, "homography": 1400.0}


class Balancer:
    name = "base"

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        # Fixed factors on top of the method's weights (``vident train --emphasis``): ATB equalises
        # the weighted losses, so it cannot be told that one task matters more than the others.
        self.emphasis = {t: 1.0 for t in self.tasks}

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def combine(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        weights = {t: w * self.emphasis[t] for t, w in self.weights(losses).items()}
        total = sum(weights[t] * losses[t] for t in self.tasks)
        return total, weights  # type: ignore[return-value]


class LinearScalarization(Balancer):
    name = "ls"

    def __init__(self, tasks: Sequence[str], fixed: Mapping[str, float] | None = None) -> None:
        super().__init__(tasks)
        self.fixed = {t: float((fixed or LS_WEIGHTS).get(t, 1.0)) for t in self.tasks}

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return dict(self.fixed)


class AdaptiveTaskBalancing(Balancer):
    """Eq. 6.6: lambda_i v_i = lambda_j v_j for all pairs and sum_i lambda_i v_i = V = sum_i v_i."""

    name = "atb"

    def __init__(self, tasks: Sequence[str], eps: float = 1e-12) -> None:
        super().__init__(tasks)
        self.eps = eps

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        # A task whose loss is exactly 0 has no labels in this batch (a clip mix without teeth):
        # it is left out of the balance instead of getting a weight of V / eps.
        values = {t: float(losses[t].detach()) for t in self.tasks}
        present = {t: max(v, self.eps) for t, v in values.items() if v > 0}
        total = sum(present.values())
        return {t: total / (len(present) * present[t]) if t in present else 0.0 for t in self.tasks}


class DynamicWeightAverage(Balancer):
    """DWA (Liu et al. 2019): weights from the ratio of each task's last two losses, softmax at temperature T."""

    name = "dwa"

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0, window: int = 50) -> None:
        super().__init__(tasks)
        self.temperature = temperature
        # Step-level losses are noisy; DWA's epoch averages are approximated by running windows.
        self.history: dict[str, deque[float]] = {t: deque(maxlen=2 * window) for t in self.tasks}
        self.window = window

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        for t in self.tasks:
            self.history[t].append(float(losses[t].detach()))
        if any(len(h) < 2 * self.window for h in self.history.values()):
            return {t: 1.0 for t in self.tasks}
        ratios = {}
        for t, h in self.history.items():
            values = list(h)
            previous = sum(values[: self.window]) / self.window
            recent = sum(values[self.window :]) / self.window
            ratios[t] = recent / max(previous, 1e-12)
        exps = {t: math.exp(r / self.temperature) for t, r in ratios.items()}
        norm = sum(exps.values())
        return {t: len(self.tasks) * e / norm for t, e in exps.items()}


class RandomLossWeighting(Balancer):
    """RWL (Lin et al. 2022): weights drawn each step from a standard normal through a softmax."""

    name = "rwl"

    def __init__(self, tasks: Sequence[str], generator: torch.Generator | None = None) -> None:
        super().__init__(tasks)
        self.generator = generator or torch.Generator().manual_seed(0)

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        draws = torch.softmax(torch.randn(len(self.tasks), generator=self.generator), dim=0)
        return {t: float(w) * len(self.tasks) for t, w in zip(self.tasks, draws, strict=True)}


BALANCERS: dict[str, type[Balancer]] = {
    cls.name: cls for cls in (LinearScalarization, AdaptiveTaskBalancing, DynamicWeightAverage, RandomLossWeighting)
}


def create_balancer(name: str, tasks: Sequence[str], emphasis: Mapping[str, float] | None = None) -> Balancer:
    """``emphasis``: task -> factor multiplying that task's weight (1 for tasks not named)."""
    try:
        balancer = BALANCERS[name](tasks)
    except KeyError:
        raise ValueError(f"unknown task balancing {name!r}; choose from {', '.join(BALANCERS)}") from None
    for task, factor in (emphasis or {}).items():
        if task not in balancer.emphasis:
            raise ValueError(f"no task {task!r} to emphasise; tasks: {', '.join(balancer.tasks)}")
        if not factor > 0:
            raise ValueError(f"emphasis of {task!r} must be positive, got {factor}")
        balancer.emphasis[task] = float(factor)
    return balancer
