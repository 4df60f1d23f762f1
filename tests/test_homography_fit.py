"""``vident fit-homography``: the least-squares homography readout of a MOST checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoints import load_model, read_metadata, save_checkpoint
from models.data.format import read_sequence, write_sequence
from models.data.synth import SynthConfig, render_sequence
from models.layers import homography_to_offsets, offsets_to_homography
from models.metrics import mace
from models.registry import create_model
from models.streaming import as_stream
from models.training.card import write_card
from models.training.homography_fit import readout_stream
from service.cli import main as vident


@torch.no_grad()
def _homographies(model: torch.nn.Module, frames: np.ndarray) -> np.ndarray:
    """The network's full-resolution H_{t-1->t} over a uint8 clip, state carried, identity first."""
    state = [torch.from_numpy(v) for v in model.spec.initial_state(1, *frames.shape[1:3]).values()]
    out = [np.eye(3)]
    for t, frame in enumerate(as_stream(frames)):
        _, _, h, *state = model(torch.from_numpy(frame), torch.full((1, 1, 1, 1), float(t == 0)), *state)
        if t:
            out.append(h[0].double().numpy())
    return np.stack(out)


def test_offsets_round_trip() -> None:
    offsets = torch.tensor([[1.5, -2.0, 0.5, 1.0, -1.0, 3.0, 2.0, -0.5]], dtype=torch.float64)
    h = offsets_to_homography(offsets, 40.0, 52.0)
    torch.testing.assert_close(homography_to_offsets(h, 40.0, 52.0), offsets)


def test_coarse_only_step_matches_the_full_step() -> None:
    """Decoding only scale 3 gives the same scale-3 homography and state as the whole step."""
    torch.manual_seed(0)
    model = create_model("most-nss-tiny").eval()
    with torch.no_grad():
        model.homography_heads["3"].offsets.weight.normal_(std=0.1)
    frame = torch.rand(1, 3, 48, 64)
    state = {k: torch.rand(v.shape) for k, v in model.spec.initial_state(1, 48, 64).items()}
    reset = torch.zeros(1, 1, 1, 1)
    with torch.no_grad():
        full, full_state = model.step(frame, reset, state)
        coarse, coarse_state = model.step(frame, reset, state, scales=(3,))
    torch.testing.assert_close(coarse.homography[3], full.homography[3])
    assert set(coarse_state) == {"prev_features_s3", "prev_motion_s3"}
    for key, value in coarse_state.items():
        torch.testing.assert_close(value, full_state[key])
    with pytest.raises(ValueError, match="leading run"):
        model.step(frame, reset, state, scales=(2,))


def test_fit_recovers_a_planted_readout_through_the_cli(tmp_path: Path) -> None:
    """Labels made by a network whose readout is known: fitting the same network with a zero readout
    (the identity) brings the held-out MACE from the motion's size to near zero; the run folder keeps
    the trunk's record and ships with a card that says how the readout was made."""
    torch.manual_seed(0)
    # Without the photometric refinement, so the labels are the readout's alone.
    model = create_model("most-nss-tiny", homography_refine=()).eval()
    cfg = SynthConfig(height=48, width=64, frames=20, noise="moderate", instruments=False, spray=False)
    clips = [render_sequence(cfg, seed=i) for i in range(14)]
    # A planted readout of the standardised features, so the labels vary with the frames (a random
    # network's pooled features are nearly constant: a plain random readout would plant a constant).
    features = np.concatenate([readout_stream(model, c.input)[0] for c in clips])
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    weight = np.random.default_rng(0).normal(size=(8, len(mean))) / np.sqrt(len(mean)) / std
    readout = model.homography_heads["3"].offsets
    with torch.no_grad():
        readout.weight.copy_(torch.from_numpy(weight))
        readout.bias.copy_(torch.from_numpy(-weight @ mean))
    for i, clip in enumerate(clips):
        write_sequence(replace(clip, homographies=_homographies(model, clip.input)), tmp_path / "fit" / f"seq_{i:03d}")
    with torch.no_grad():
        readout.weight.zero_()
        readout.bias.zero_()
    weights = save_checkpoint(model, tmp_path / "zero.safetensors", {"steps": "3", "hardware": "Trunk GPU"})

    code = vident(["fit-homography", str(weights), "--data", str(tmp_path / "fit"), "--out", str(tmp_path / "run"),
                   "--holdout", "2", "--quiet"])  # fmt: skip
    assert code == 0
    fitted_path = tmp_path / "run" / "last.safetensors"
    meta = read_metadata(fitted_path)
    fit = json.loads(meta["homography_fit"])
    assert (fit["scale"], fit["fit_sequences"], fit["holdout_sequences"], fit["pairs"]) == (3, 12, 2, 12 * 19)
    assert meta["steps"] == "3"  # the trunk's record is kept
    assert json.loads((tmp_path / "run" / "homography_fit.json").read_text()) == fit
    assert fit["holdout_mace_before"] == pytest.approx(fit["holdout_mace_identity"])  # zero readout: identity
    assert fit["holdout_mace_identity"] > 1.0
    assert fit["holdout_mace_after"] < 0.1 * fit["holdout_mace_identity"]
    assert fit["fit_mace_after"] < 0.05 * fit["fit_mace_identity"]

    # The fitted file estimates the held-out clip's motion through the ordinary forward pass.
    fitted, _ = load_model(str(fitted_path))
    held = read_sequence(tmp_path / "fit" / "seq_013")
    error = mace(_homographies(fitted, held.input)[1:], held.homographies[1:], 48, 64).mean()
    assert error < 0.1 * mace(np.tile(np.eye(3), (19, 1, 1)), held.homographies[1:], 48, 64).mean()

    report = {"frames": 20, "sequences": ["seq_013"], "data": "d", "backend": "torch", "device": "cpu",
              "rows": [{"name": "most-nss-tiny", "mace": 0.1}]}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(report))
    card = write_card(fitted_path, tmp_path / "eval.json", "vident eval ...").read_text()
    assert "homography readout" in card and "least squares" in card and f"{fit['fit_mace_after']:.3f} px" in card
    assert "optimisation on Trunk GPU" in card  # the trunk's training machine, not the one that fitted


def test_fit_homography_refuses_what_it_cannot_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    weights = save_checkpoint(create_model("most-nss-tiny"), tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    assert vident(["fit-homography", str(weights), "--data", "data/test", "--out", "run"]) == 2
    assert "refusing to fit on data/test" in capsys.readouterr().out
    assert vident(["fit-homography", "nope.safetensors", "--data", "d", "--out", "run"]) == 2
    assert "no checkpoint" in capsys.readouterr().out
    (tmp_path / "d").mkdir()
    assert vident(["fit-homography", str(weights), "--data", "d", "--out", "run"]) == 2
    assert "cannot fit" in capsys.readouterr().out
    r2d4 = save_checkpoint(create_model("r2-d4-tiny"), tmp_path / "r.safetensors")
    assert vident(["fit-homography", str(r2d4), "--data", "d", "--out", "run"]) == 2
    assert "not a MOST checkpoint" in capsys.readouterr().out
    cascade = save_checkpoint(create_model("most-net-tiny"), tmp_path / "n.safetensors")
    assert vident(["fit-homography", str(cascade), "--data", "d", "--out", "run"]) == 2
    assert "cascade" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
