"""Shipped and trained weights: ``.safetensors`` with the metadata needed to rebuild the network.

Loading never unpickles. The metadata (all strings, as safetensors requires) holds the registered
model name and the network's layout (``layout_metadata()``: a ``layout_version`` and, for the MOST
family, the scales-to-tasks structure and the layout options). Each family's checkpoint filter (timm's
``checkpoint_filter_fn``, registered with its names) reads that back, converting checkpoints of older
layout versions, so a checkpoint rebuilds the network it was trained as (a structure found by NSS, or a
layout older than a change of the network).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.registry import checkpoint_filter, create_model

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The model's own layout last: metadata copied from another checkpoint must not describe this one.
    meta = {"model": model.spec.name, **(metadata or {}), **model.layout_metadata()}  # type: ignore[attr-defined,operator]
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Written aside and renamed: a run killed mid-write keeps its previous last/best weights whole.
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_checkpoint(
    path: str | Path, name: str | None = None, into: object | None = None
) -> tuple[dict[str, object], dict[str, Tensor]]:
    """A checkpoint through its family's filter: the ``create_model`` kwargs that rebuild its layout and its
    weights for them. ``name``: the registered model whose family reads it (default: the one it records);
    ``into``: a config of that family to convert the weights to instead (see the family's filter)."""
    meta = read_metadata(path)
    name = name or meta.get("model")
    if name is None:
        raise ValueError(f"{path}: no model name in its metadata")
    return checkpoint_filter(name)(load_file(str(path)), meta, into)


def checkpoint_config(meta: dict[str, str]) -> dict[str, object]:
    """The ``create_model`` kwargs a checkpoint's metadata fixes (its family's filter, without weights)."""
    return checkpoint_filter(meta["model"])({}, meta)[0]


def shipped_checkpoint(name: str) -> Path | None:
    """The checkpoint shipped for a registered model name, if there is one."""
    path = CHECKPOINT_DIR / f"{name}.safetensors"
    return path if path.is_file() else None


def load_model(name_or_path: str, checkpoint: str | Path | None = None) -> tuple[nn.Module, Path | None]:
    """A model by registered name (with its shipped weights when they exist) or by checkpoint path.

    Returns the model in eval mode and the checkpoint used (None: random initialisation).
    """
    candidate = Path(name_or_path)
    if checkpoint is None and candidate.suffix == ".safetensors":
        if not candidate.is_file():
            raise FileNotFoundError(f"checkpoint {candidate} does not exist")
        checkpoint = candidate
    if checkpoint is None:
        checkpoint = shipped_checkpoint(name_or_path)
    if checkpoint is None:
        return create_model(name_or_path).eval(), None
    name = read_metadata(checkpoint).get("model") or name_or_path
    kwargs, state = read_checkpoint(checkpoint, name)
    model = create_model(name, **kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: does not match {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), Path(checkpoint)


__all__ = [
    "checkpoint_config",
    "load_model",
    "read_checkpoint",
    "read_metadata",
    "save_checkpoint",
    "shipped_checkpoint",
]
