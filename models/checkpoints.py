"""Shipped and trained weights: ``.safetensors`` with the metadata needed to rebuild the network.

Loading never unpickles. The metadata (all strings, as safetensors requires) holds the registered
model name and, for the MOST family, the scales-to-tasks structure, the homography pooling and
whether the restoration heads read the input and filter it, so a checkpoint rebuilds the heads it was trained
with (a structure found by NSS, or a layout older than a change of the network).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from models.most import MostNet, Structure
from models.registry import create_model

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model.spec.name, **(metadata or {})}  # type: ignore[attr-defined]
    if isinstance(model, MostNet):
        meta["structure"] = model.structure.to_json()
        meta["homography_pool"] = model.cfg.homography_pool
        meta["restoration_input"] = str(int(model.cfg.restoration_input))
        meta["restoration_filter"] = str(model.cfg.restoration_filter)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Written aside and renamed: a run killed mid-write keeps its previous last/best weights whole.
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def most_config_of(meta: dict[str, str]) -> dict[str, object]:
    """The MostConfig fields a checkpoint's metadata fixes; metadata older than a key means the
    network as it was before that option existed (global pooling, heads without the input or its filter)."""
    return {
        "homography_pool": meta.get("homography_pool", "global"),
        "restoration_input": meta.get("restoration_input", "0") == "1",
        "restoration_filter": int(meta.get("restoration_filter", "0")),
    }


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
    meta = read_metadata(checkpoint)
    name = meta.get("model") or name_or_path
    kwargs: dict[str, object] = {}
    if "structure" in meta:  # the MOST family; checkpoints older than the keys are rebuilt as they were made
        kwargs = {"structure": Structure.from_json(meta["structure"]), **most_config_of(meta)}
    model = create_model(name, **kwargs)
    state = load_file(str(checkpoint))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: does not match {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), Path(checkpoint)


__all__ = ["load_model", "save_checkpoint", "read_metadata", "most_config_of", "shipped_checkpoint"]
