"""One judgement of "the same outputs" for tests that compare two runs of a network in fp32."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from export.verify import FP32_MACE_PX
from models.layers import mean_corner_error


def assert_same_outputs(
    names: Iterable[str],
    got: Iterable[np.ndarray | torch.Tensor],
    expected: Iterable[np.ndarray | torch.Tensor],
    height: int,
    width: int,
    atol: float = 1e-5,
    rtol: float | None = None,
) -> None:
    """Every map within ``atol`` and ``rtol`` (default: ``atol``); the homography by its worst corner
    error against ``FP32_MACE_PX``, as parity judges it: its entries mix units, and the in-graph
    refinement carries rounding into them."""
    for name, a, b in zip(names, got, expected, strict=True):
        a_t, b_t = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
        if name == "homography":
            mace = float(mean_corner_error(a_t, b_t, height, width).max())
            assert mace <= FP32_MACE_PX, f"homography differs by {mace:.2e} px MACE (bar {FP32_MACE_PX})"
        else:
            torch.testing.assert_close(a_t, b_t, atol=atol, rtol=atol if rtol is None else rtol,
                                       msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip
