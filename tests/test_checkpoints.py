"""Every shipped checkpoint loads strictly into its registered network and has a card; checkpoints of
older layouts load, and convert, through their family's filter to the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from parity import assert_same_outputs
from safetensors.torch import load_file, save_file

from models.checkpoints import CHECKPOINT_DIR, load_model, read_checkpoint, read_metadata, save_checkpoint
from models.registry import checkpoint_filter, create_model

SHIPPED = sorted(CHECKPOINT_DIR.glob("*.safetensors"))


@pytest.mark.skipif(not SHIPPED, reason="no checkpoint is shipped yet")
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_checkpoint_loads_and_has_a_card(path) -> None:
    meta = read_metadata(path)
    assert meta["model"] == path.stem and int(meta["steps"]) > 0
    model, used = load_model(path.stem)
    assert used == path
    stored = load_file(str(path))
    assert set(stored) == set(model.state_dict())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, stored[name].to(value.dtype), msg=name)  # every tensor really loaded
    card = path.with_suffix(".md")
    assert card.is_file() and "vident eval" in card.read_text()


# ----------------------------------------------------------------------------------------------
# Layouts: a registered name builds what ships; older layouts convert in the family's filter
# ----------------------------------------------------------------------------------------------

LAYOUT_OPTIONS = (
    "structure",
    "homography_pool",
    "restoration_input",
    "restoration_filter",
    "homography_refine",
    "homography_refine_prior",
    "homography_refine_prior_scale",
    "homography_refine_frames",
    "homography_refine_highpass",
    "colour_transform",
    "detail_return",
)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_registered_name_builds_the_shipped_layout(path) -> None:
    """``create_model(name)`` takes the shipped weights strictly, no kwargs: the name is the layout users run."""
    model = create_model(path.stem)
    model.load_state_dict(load_file(str(path)), strict=True)
    kwargs, _ = read_checkpoint(path)
    assert kwargs == {key: getattr(model.cfg, key) for key in kwargs}


@pytest.mark.parametrize("name", ["most-net", "most-nss"])
def test_tiny_variants_follow_their_big_siblings_layout(name: str) -> None:
    big, tiny = create_model(name).cfg, create_model(f"{name}-tiny").cfg
    assert {k: getattr(tiny, k) for k in LAYOUT_OPTIONS} == {k: getattr(big, k) for k in LAYOUT_OPTIONS}


@pytest.mark.parametrize("name", ["most-nss-tiny", "r2-d4-tiny"])
def test_every_family_records_its_layout_version(name: str, tmp_path: Path) -> None:
    meta = read_metadata(save_checkpoint(create_model(name), tmp_path / "w.safetensors", {"layout_version": "0"}))
    assert int(meta["layout_version"]) >= 1  # the model's own, never one copied from another checkpoint's metadata
    with pytest.raises(ValueError, match="newer"):
        checkpoint_filter(name)({}, {**meta, "layout_version": str(int(meta["layout_version"]) + 1)})


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero weights everywhere (zero-initialised readouts and filters would hide a wrong conversion)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _as_version_0(path: Path, out: Path, dropped: tuple[str, ...]) -> Path:
    """``path`` as a checkpoint written before ``layout_version`` and the ``dropped`` keys existed."""
    meta = {k: v for k, v in read_metadata(path).items() if k not in ("layout_version", *dropped)}
    save_file(load_file(str(path)), str(out), metadata=meta)
    return out


@torch.no_grad()
def _stream(model: torch.nn.Module, clip: torch.Tensor) -> list[torch.Tensor]:
    """Every output of every step of a (time, 1, 3, h, w) clip, the state carried."""
    state = [torch.from_numpy(v) for v in model.spec.initial_state(1, *clip.shape[-2:]).values()]
    n = len(model.spec.outputs)
    streamed: list[torch.Tensor] = []
    for t, frame in enumerate(clip):
        result = model(frame, torch.full((1, 1, 1, 1), float(t == 0)), *state)
        streamed += result[:n]
        state = list(result[n:])
    return streamed


@pytest.mark.parametrize(
    ("name", "layout", "dropped"),
    [
        # most-net's first shipped layout: written before any option, it has none of their keys
        (
            "most-net-tiny",
            {"restoration_filter": 0, "homography_refine": (), "colour_transform": False},
            ("homography_pool", "restoration_input", "restoration_filter"),
        ),
        ("most-net-tiny", {}, ()),
        # most-nss's shipped file: every key there, only the version missing
        ("most-nss-tiny", {}, ()),
        (
            "most-nss-tiny",
            {"homography_pool": "global", "restoration_filter": 0},
            ("homography_pool", "restoration_filter"),
        ),
        # most-nss files written before the refinement's local-mean sides
        ("most-nss-tiny", {"homography_refine_highpass": (5,)}, ("homography_refine_highpass",)),
        ("r2-d4-tiny", {}, ()),
        # r2-d4 files written before the detail gate, and before the colour map
        ("r2-d4-tiny", {"detail_return": False}, ("detail_return",)),
        ("r2-d4-tiny", {"colour_transform": False, "detail_return": False}, ("colour_transform", "detail_return")),
    ],
)
def test_checkpoints_older_than_layout_versions_load_to_the_same_outputs(
    name: str, layout: dict[str, object], dropped: tuple[str, ...], tmp_path: Path
) -> None:
    model = _perturbed(create_model(name, **layout))
    old = _as_version_0(save_checkpoint(model, tmp_path / "new.safetensors"), tmp_path / "old.safetensors", dropped)
    loaded, used = load_model(str(old))
    assert used == old and type(loaded) is type(model) and loaded.cfg == model.cfg
    clip = torch.rand(3, 1, 3, 32, 48)
    for a, b in zip(_stream(model, clip), _stream(loaded, clip), strict=True):
        assert torch.equal(a, b)


def test_old_weights_convert_into_the_registered_layout_computing_the_same(tmp_path: Path) -> None:
    """Version-0 most-nss weights without corner pooling or input filters, converted by the filter into
    the registered most-nss layout (``vident train --init-from``), give the same outputs (up to rounding,
    where the regressor's last map has even sides: 64x64); the other way round does not convert."""
    model = _perturbed(create_model("most-nss-tiny", homography_pool="global", restoration_filter=0))
    old = _as_version_0(save_checkpoint(model, tmp_path / "new.safetensors"), tmp_path / "old.safetensors",
                        ("homography_pool", "restoration_filter"))  # fmt: skip
    registered = create_model("most-nss-tiny").eval()
    kwargs, state = read_checkpoint(old, into=registered.cfg)
    assert kwargs == {key: getattr(registered.cfg, key) for key in LAYOUT_OPTIONS}
    registered.load_state_dict(state, strict=True)
    clip = torch.rand(3, 1, 3, 64, 64)
    names = [o.name for o in model.spec.outputs] * len(clip)
    assert_same_outputs(names, _stream(registered, clip), _stream(model, clip), 64, 64)
    back = save_checkpoint(registered, tmp_path / "registered.safetensors")
    with pytest.raises(ValueError, match="homography_pool='corners' do not convert"):
        read_checkpoint(back, into=model.cfg)
