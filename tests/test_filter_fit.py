"""``vident fit-filter``: the least-squares scale-1 restoration filter of a MOST checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoints import load_model, read_metadata, save_checkpoint
from models.data.format import write_sequence
from models.data.synth import SynthConfig, render_sequence
from models.registry import create_model
from models.streaming import as_stream
from models.training.card import write_card
from models.training.filter_fit import filter_fit_of
from service.cli import main as vident


@torch.no_grad()
def _restored(model: torch.nn.Module, frames: np.ndarray) -> np.ndarray:
    """The network's restored frames of a uint8 (T, H, W, 3) clip as uint8, state carried."""
    state = [torch.from_numpy(v) for v in model.spec.initial_state(1, *frames.shape[1:3]).values()]
    out = []
    for t, frame in enumerate(as_stream(frames)):
        restored, _, _, *state = model(torch.from_numpy(frame), torch.full((1, 1, 1, 1), float(t == 0)), *state)
        out.append(np.clip(restored[0].permute(1, 2, 0).numpy() * 255 + 0.5, 0, 255).astype(np.uint8))
    return np.stack(out)


def test_fit_recovers_a_planted_filter_through_the_cli(tmp_path: Path) -> None:
    """Targets made by a network whose scale-1 filter is known: fitting the same network with a zero
    filter recovers that filter (up to the targets' 8-bit rounding), on the held-out clip too; the
    run folder ships with a card that says how the filter was made."""
    torch.manual_seed(0)
    model = create_model("most-nss-tiny", colour_transform=False).eval()
    planted = model.restoration_filters["1"]
    with torch.no_grad():
        planted.weight.normal_(std=0.05)
        planted.bias.fill_(-0.02)
    for i in range(4):
        seq = render_sequence(SynthConfig(height=48, width=64, frames=3, noise="moderate"), seed=i)
        write_sequence(replace(seq, target=_restored(model, seq.input)), tmp_path / "fit" / f"seq_{i:03d}")
    truth = (planted.weight.detach().clone(), planted.bias.detach().clone())
    with torch.no_grad():
        planted.weight.zero_()
        planted.bias.zero_()
    weights = save_checkpoint(model, tmp_path / "zero.safetensors", {"steps": "3"})

    code = vident(["fit-filter", str(weights), "--data", str(tmp_path / "fit"), "--out", str(tmp_path / "run"),
                   "--holdout", "1", "--frames", "3", "--subsample", "1", "--quiet"])  # fmt: skip
    assert code == 0
    fitted_path = tmp_path / "run" / "last.safetensors"
    meta = read_metadata(fitted_path)
    fit = filter_fit_of(meta)
    assert fit is not None and (fit.fit_sequences, fit.holdout_sequences, fit.kernel) == (3, 1, 5)
    assert meta["steps"] == "3" and meta["restoration_filter"] == "5"  # the trunk's record is kept
    assert json.loads((tmp_path / "run" / "filter_fit.json").read_text())["pixels"] == fit.pixels
    fitted, _ = load_model(str(fitted_path))
    conv = fitted.restoration_filters["1"].requires_grad_(False)
    assert float((conv.weight - truth[0]).norm() / truth[0].norm()) < 0.05  # 8-bit targets: not exact
    torch.testing.assert_close(conv.weight, truth[0], atol=0.03, rtol=0)
    torch.testing.assert_close(conv.bias, truth[1], atol=0.01, rtol=0)  # clipped dark pixels pull it
    assert fit.fit_psnr_after > 45 and fit.fit_psnr_after > fit.fit_psnr_before + 5
    assert fit.holdout_psnr_after is not None and fit.holdout_psnr_after > 45

    report = {"frames": 3, "sequences": ["seq_003"], "data": "d", "backend": "torch", "device": "cpu",
              "rows": [{"name": "most-nss-tiny", "psnr": 30.0}]}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(report))
    card = write_card(fitted_path, tmp_path / "eval.json", "vident eval ...").read_text()
    assert "5x5 linear filter" in card and "least squares" in card and f"{fit.fit_psnr_after:.2f} dB" in card


def test_fit_filter_refuses_the_test_split_and_missing_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    weights = save_checkpoint(create_model("most-nss-tiny"), tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    assert vident(["fit-filter", str(weights), "--data", "data/test", "--out", "run"]) == 2
    assert "refusing to fit on data/test" in capsys.readouterr().out
    assert vident(["fit-filter", "nope.safetensors", "--data", "d", "--out", "run"]) == 2
    assert "no checkpoint" in capsys.readouterr().out
    (tmp_path / "d").mkdir()
    assert vident(["fit-filter", str(weights), "--data", "d", "--out", "run"]) == 2
    assert "cannot fit" in capsys.readouterr().out
    r2d4 = save_checkpoint(create_model("r2-d4-tiny"), tmp_path / "r.safetensors")
    assert vident(["fit-filter", str(r2d4), "--data", "d", "--out", "run"]) == 2
    assert "not a MOST checkpoint" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_load_for_fit_resizes_only_what_the_fit_replaces(tmp_path: Path) -> None:
    """A fitted scale-1 filter may be refitted at another size; non-zero coarser filters may not be
    resized (that would change the mask and the homography); no filter at all gets zero ones."""
    from models.training.filter_fit import load_for_fit

    model = create_model("most-nss-tiny")
    with torch.no_grad():
        model.restoration_filters["1"].weight.fill_(0.1)
    weights = save_checkpoint(model, tmp_path / "w.safetensors")
    same, _ = load_for_fit(weights)
    assert same.cfg.restoration_filter == 5
    assert float(same.restoration_filters["1"].weight.detach().sum()) == pytest.approx(22.5)
    smaller, _ = load_for_fit(weights, 3)
    assert smaller.restoration_filters["1"].weight.shape == (3, 3, 3, 3)
    assert not smaller.restoration_filters["1"].weight.any()
    with pytest.raises(ValueError, match="odd"):
        load_for_fit(weights, 4)
    with torch.no_grad():
        model.restoration_filters["3"].bias.fill_(0.1)
    with pytest.raises(ValueError, match="restoration_filters.3.bias"):
        load_for_fit(save_checkpoint(model, tmp_path / "w3.safetensors"), 3)
    legacy = save_checkpoint(create_model("most-nss-tiny", restoration_filter=0), tmp_path / "old.safetensors")
    added, _ = load_for_fit(legacy)
    assert added.cfg.restoration_filter == 5 and not added.restoration_filters["1"].weight.any()
