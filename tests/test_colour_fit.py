"""The per-frame colour map of MOST networks and ``vident fit-colour``, its least-squares fit."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models import most, r2d4
from models.checkpoints import load_model, read_metadata, save_checkpoint
from models.data.format import write_sequence
from models.data.synth import SynthConfig, render_sequence
from models.layers import COLOUR_FEATURES, apply_colour_transform, colour_features
from models.most import MostNet
from models.r2d4 import R2D4
from models.registry import create_model
from models.streaming import as_stream
from models.training.card import colour_map_text
from models.training.colour_fit import (
    ColourFit,
    colour_fit_of,
    frame_psnr,
    frame_stats,
    solve,
    theta_to_linear,
    with_colour_map,
)
from models.training.detail_fit import with_detail_gate
from service.cli import main as vident


def _coloured(model: torch.nn.Module) -> MostNet | R2D4:
    """``model`` (a MOST or R2-D4 network without the colour map) with a zero colour map added."""
    assert isinstance(model, MostNet | R2D4)
    return with_colour_map(model).eval()


@torch.no_grad()
def _stream(model: torch.nn.Module, frames: np.ndarray) -> list[torch.Tensor]:
    state = [torch.from_numpy(v) for v in model.spec.initial_state(1, *frames.shape[1:3]).values()]
    out = []
    for t, frame in enumerate(as_stream(frames)):
        outputs = model(torch.from_numpy(frame), torch.full((1, 1, 1, 1), float(t == 0)), *state)
        out.append(outputs)  # the outputs, then the next state
        state = list(outputs[len(model.spec.outputs) :])
    return out


def _write_targets_of(model: torch.nn.Module, seeds: range, folder: Path) -> None:
    """Rendered sequences whose targets are ``model``'s own restored frames (8-bit), one folder each."""
    for i in seeds:
        seq = render_sequence(SynthConfig(height=48, width=64, frames=3, noise="moderate"), seed=i)
        restored = np.stack([
            np.clip(out[0][0].permute(1, 2, 0).numpy() * 255 + 0.5, 0, 255).astype(np.uint8)
            for out in _stream(model, seq.input)
        ])  # fmt: skip
        write_sequence(replace(seq, target=restored), folder / f"seq_{i:03d}")


@pytest.mark.parametrize("name", ["most-nss-tiny", "r2-d4-tiny"])
def test_the_added_colour_map_computes_the_same_function_and_records_its_layout(name: str) -> None:
    """Weights without the map convert to a zero map: the same outputs and state; a fitted map changes
    the restored frame only (R2-D4's recurrent state keeps the frame before it); removing it refuses."""
    torch.manual_seed(0)
    plain = create_model(name, colour_transform=False).eval()
    coloured = _coloured(plain)
    frames = render_sequence(SynthConfig(height=48, width=64, frames=3, noise="moderate"), seed=1).input
    for a, b in zip(_stream(plain, frames), _stream(coloured, frames), strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)
    assert coloured.layout_metadata()["colour_transform"] == "1"
    assert plain.layout_metadata()["colour_transform"] == "0"
    with torch.no_grad():
        coloured.colour_transform.bias.fill_(0.1)  # type: ignore[union-attr]
    restored = plain.spec.output_names.index("restored")
    for a, b in zip(_stream(plain, frames), _stream(coloured, frames), strict=True):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if i == restored:
                torch.testing.assert_close(y, x + 0.1 * x.sum(dim=1, keepdim=True) + 0.1)  # A = 0.1, offset 0.1
            else:
                torch.testing.assert_close(x, y)
    family = most if isinstance(plain, MostNet) else r2d4
    with pytest.raises(ValueError, match="colour map would be lost"):
        family.checkpoint_filter_fn(coloured.state_dict(), coloured.layout_metadata(), plain.cfg)  # type: ignore[arg-type]


def test_colour_map_is_the_3x4_matrix_its_parameters_say() -> None:
    restored = torch.rand(2, 3, 5, 7)
    params = torch.randn(2, 12)
    out = apply_colour_transform(restored, params)
    for i in range(2):
        a = np.eye(3) + params[i, :9].numpy().reshape(3, 3)
        expected = np.einsum("cj,jhw->chw", a, restored[i].numpy()) + params[i, 9:].numpy()[:, None, None]
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-5)
    features = colour_features(restored, restored)
    assert features.shape == (2, COLOUR_FEATURES)
    np.testing.assert_allclose(features[:, :3].numpy(), restored.mean(dim=(2, 3)).numpy(), atol=1e-6)


def test_normal_equations_recover_a_planted_map() -> None:
    """Targets made by a known linear map of per-frame features: the solve gives back its weights, and
    the sufficient statistics' PSNR matches the PSNR of the mapped frames."""
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(0, 0.05, (12, COLOUR_FEATURES)), rng.normal(0, 0.02, 12)
    stats = []
    for _ in range(40):
        restored = rng.random((3, 12, 10))
        features = rng.normal(0, 1, COLOUR_FEATURES)
        params = torch.from_numpy(weight @ features + bias)[None]
        target = apply_colour_transform(torch.from_numpy(restored)[None], params)[0].numpy()
        stats.append(frame_stats(features, restored, target))
    theta = solve(stats, 1e-12)
    got_weight, got_bias = theta_to_linear(theta)
    np.testing.assert_allclose(got_weight, weight, atol=1e-6)
    np.testing.assert_allclose(got_bias, bias, atol=1e-6)
    assert frame_psnr(stats[0], theta) > 100 > frame_psnr(stats[0], None)


@pytest.mark.parametrize("name", ["most-nss-tiny", "r2-d4-tiny"])
def test_fit_colour_cli_recovers_a_planted_map_and_ships_its_record(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Targets made by a network whose colour map is known: fitting the same network without the map
    brings the held-out clip close to those targets, through ``vident fit-colour``; the fitted file
    loads with the map and records the fit."""
    torch.manual_seed(0)
    plain = create_model(name, colour_transform=False).eval()
    if isinstance(plain, R2D4):  # an untrained R2-D4 strays far outside 0-1, where 8-bit targets clip
        with torch.no_grad():
            for decoder in (plain.denoise_decoder, plain.deblur_decoder):
                for param in decoder.parameters():  # type: ignore[union-attr]
                    param.mul_(0.3)
    model = _coloured(plain)
    layer = model.colour_transform
    assert layer is not None
    with torch.no_grad():
        layer.weight.normal_(std=0.02)
        layer.bias.copy_(torch.tensor([0.1, -0.05, 0, 0.05, 0.1, 0, 0, 0, -0.1, 0.02, -0.02, 0.01]))
    _write_targets_of(model, range(8), tmp_path / "fit")
    weights = save_checkpoint(plain, tmp_path / "plain.safetensors", {"steps": "3"})
    code = vident(["fit-colour", str(weights), "--data", str(tmp_path / "fit"), "--out", str(tmp_path / "run"),
                   "--holdout", "2", "--frames", "3", "--quiet"])  # fmt: skip
    assert code == 0
    meta = read_metadata(tmp_path / "run" / "last.safetensors")
    fit = colour_fit_of(meta)
    assert fit is not None and (fit.fit_sequences, fit.holdout_sequences) == (6, 2)
    assert meta["colour_transform"] == "1" and meta["steps"] == "3"
    assert json.loads((tmp_path / "run" / "colour_fit.json").read_text())["ridge"] == fit.ridge
    assert f"`vident fit-colour --data {tmp_path / 'fit'}`: 6 training sequences" in colour_map_text(meta)  # the card
    assert fit.holdout_psnr_after > 40 > fit.holdout_psnr_before  # only 8-bit rounding is left
    assert fit.holdout_psnr_after - fit.holdout_psnr_before > 10
    fitted, _ = load_model(str(tmp_path / "run" / "last.safetensors"))
    assert isinstance(fitted, type(plain)) and fitted.cfg.colour_transform
    # the same planted clips as a validation split choose the ridge instead of the held-out ones
    val = tmp_path / "val"
    for i in range(6, 8):
        shutil.copytree(tmp_path / "fit" / f"seq_{i:03d}", val / f"seq_{i:03d}")
    (val / "dataset.json").write_text(json.dumps({"generator": "vident synth", "split": "val"}))
    code = vident(["fit-colour", str(weights), "--data", str(tmp_path / "fit"), "--out", str(tmp_path / "run2"),
                   "--holdout", "2", "--frames", "3", "--choose-on", str(val), "--quiet"])  # fmt: skip
    chosen = colour_fit_of(read_metadata(tmp_path / "run2" / "last.safetensors"))
    assert code == 0 and chosen is not None and chosen.chosen_on == str(val)
    assert chosen.chosen_psnr_after is not None and chosen.chosen_psnr_after > 40 > (chosen.chosen_psnr_before or 99)
    assert f"the validation split {val} (PSNR" in colour_map_text(read_metadata(tmp_path / "run2" / "last.safetensors"))
    # a validation split whose targets are the network's own output without a map: every ridge lowers PSNR
    # there, so "no map" is chosen and the file computes the network without one
    capsys.readouterr()
    bare = tmp_path / "val-bare"
    _write_targets_of(plain, range(6, 8), bare)
    (bare / "dataset.json").write_text(json.dumps({"generator": "vident synth", "split": "val"}))
    code = vident(["fit-colour", str(weights), "--data", str(tmp_path / "fit"), "--out", str(tmp_path / "run3"),
                   "--holdout", "2", "--frames", "3", "--choose-on", str(bare), "--quiet"])  # fmt: skip
    meta3 = read_metadata(tmp_path / "run3" / "last.safetensors")
    none = colour_fit_of(meta3)
    assert code == 0 and none is not None and not none.kept and none.ridge is None
    assert none.best_ridge_psnr is not None and none.chosen_psnr_before is not None
    assert none.best_ridge_psnr < none.chosen_psnr_before == none.chosen_psnr_after
    assert f"colour map not kept: every ridge lowered PSNR on {bare}" in capsys.readouterr().out
    assert "left at zero" in colour_map_text(meta3)
    kept, _ = load_model(str(tmp_path / "run3" / "last.safetensors"))
    assert not any(t.abs().max() > 0 for t in kept.colour_transform.parameters())  # type: ignore[union-attr]


def test_fit_colour_refuses_the_test_split_and_too_few_sequences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = save_checkpoint(create_model("r2-d4-tiny"), tmp_path / "r2d4.safetensors", {"steps": "1"})
    assert vident(["fit-colour", str(weights), "--data", "data/test", "--out", str(tmp_path / "a")]) == 2
    assert "refusing to fit on data/test" in capsys.readouterr().out
    seq = render_sequence(SynthConfig(height=48, width=64, frames=2), seed=0)
    write_sequence(seq, tmp_path / "d" / "seq_000")
    assert vident(["fit-colour", str(weights), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "b")]) == 2
    assert "--holdout must be >= 1 and leave some to fit" in capsys.readouterr().out
    for split in ("real", "test", "train"):  # only a validation split may choose the ridge
        write_sequence(seq, tmp_path / split / "seq_000")
        (tmp_path / split / "dataset.json").write_text(json.dumps({"split": split}))
        assert vident(["fit-colour", str(weights), "--data", str(tmp_path / "d"), "--holdout", "0",
                       "--choose-on", str(tmp_path / split), "--out", str(tmp_path / "c")]) == 2  # fmt: skip
        assert f"not a '{split}' split" in capsys.readouterr().out


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("name", ["most-nss-tiny", "r2-d4-tiny"])
def test_exported_colour_map_matches_torch_over_a_stream(
    name: str, runtime: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map exports with the rest of the graph: a fitted (non-zero) map runs the same in each CPU runtime,
    and so does the detail gate after it."""
    from export.onnx import export_onnx
    from export.verify import compare_backends, exercise_untrained
    from service.backends.onnxrt import OrtBackend
    from service.backends.openvino import OpenVinoBackend
    from service.backends.torch import TorchBackend

    monkeypatch.setenv("VIDENT_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = _coloured(exercise_untrained(create_model(name, colour_transform=False).eval()))
    with torch.no_grad():
        model.colour_transform.weight.normal_(std=0.05)  # type: ignore[union-attr]
        model.colour_transform.bias.normal_(std=0.05)  # type: ignore[union-attr]
    model = with_detail_gate(model).eval()
    with torch.no_grad():
        model.detail_gate.weight.copy_(torch.tensor([[0.1, -0.1]]))  # type: ignore[union-attr]
        model.detail_gate.bias.fill_(0.4)  # type: ignore[union-attr]
    path = export_onnx(model, tmp_path / "coloured.onnx")
    backend = OrtBackend if runtime == "onnxruntime" else OpenVinoBackend
    with TorchBackend(model) as reference, backend(model.spec, path) as candidate:
        report = compare_backends(reference, candidate, 2, 48, 80, frames=3)
    assert report.within_fp32(), report.summary()


def test_the_summary_names_the_ridge_or_says_the_map_was_not_kept() -> None:
    from service.commands.fit_colour import fit_summary

    fit = ColourFit(data="data/cfit", fit_sequences=60, holdout_sequences=4, frames=6, ridge=0.1,
                    fit_psnr_before=21.51, fit_psnr_after=22.13, holdout_psnr_before=21.21, holdout_psnr_after=21.98,
                    chosen_on="data/val-a,data/val-b", chosen_psnr_before=20.30, chosen_psnr_after=20.72)  # fmt: skip
    assert "ridge 0.1, chosen on data/val-a,data/val-b: PSNR 20.30 -> 20.72 dB there" in fit_summary(fit)
    dropped = replace(fit, ridge=None, fit_psnr_after=21.51, holdout_psnr_after=21.21, chosen_psnr_before=20.72,
                      chosen_psnr_after=20.72, best_ridge_psnr=20.40)  # fmt: skip
    assert "every ridge lowered PSNR on data/val-a,data/val-b (20.72 -> 20.40 dB" in fit_summary(dropped)
    held = replace(dropped, chosen_on=None, chosen_psnr_before=None, chosen_psnr_after=None, best_ridge_psnr=20.9)
    assert "on the held-out sequences (21.21 -> 20.90 dB" in fit_summary(held)
