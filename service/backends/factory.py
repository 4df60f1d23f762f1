"""Backend by name: the one place that maps configuration strings to runtime classes."""

from __future__ import annotations

from pathlib import Path

from models.checkpoints import load_model
from service.backends.base import Backend

BACKENDS = ("torch",)


def create_backend(
    model: str,
    backend: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    checkpoint: str | Path | None = None,
) -> Backend:
    """A loaded backend for a registered model name or checkpoint path."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    network, _ = load_model(model, checkpoint)
    if backend == "torch":
        from service.backends.torch import TorchBackend

        return TorchBackend(network, device=device, precision=precision).load()
    raise AssertionError(backend)
