"""The per-frame detail return (MOST and R2-D4) and ``vident fit-detail``, its least-squares fit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models import most, r2d4
from models.checkpoints import load_model, read_metadata, save_checkpoint
from models.data.format import write_sequence
from models.data.synth import SynthConfig, render_sequence
from models.layers import DETAIL_FEATURES, detail_features, input_matched
from models.most import MostNet
from models.r2d4 import R2D4
from models.registry import create_model
from models.streaming import as_stream
from models.training.detail_fit import DetailFit, detail_fit_of, frame_stats, solve, with_detail_gate
from service.cli import main as vident


@torch.no_grad()
def _stream(model: torch.nn.Module, frames: np.ndarray) -> list[tuple[torch.Tensor, ...]]:
    state = [torch.from_numpy(v) for v in model.spec.initial_state(1, *frames.shape[1:3]).values()]
    out = []
    for t, frame in enumerate(as_stream(frames)):
        outputs = model(torch.from_numpy(frame), torch.full((1, 1, 1, 1), float(t == 0)), *state)
        out.append(outputs)
        state = list(outputs[len(model.spec.outputs) :])
    return out


FAMILIES = ["most-nss-tiny", "r2-d4-tiny"]


def _plain(name: str = "most-nss-tiny") -> MostNet | R2D4:
    torch.manual_seed(0)
    model = create_model(name, detail_return=False).eval()
    assert isinstance(model, MostNet | R2D4)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_the_added_detail_gate_computes_the_same_function_and_records_its_layout(name: str) -> None:
    """A zero gate is the network without it; a gate of one gives back the whole input in the output's
    colours and changes nothing else (the recurrent state included); removing a non-zero gate refuses."""
    plain = _plain(name)
    gated = with_detail_gate(plain).eval()
    assert gated.layout_metadata()["detail_return"] == "1" and plain.layout_metadata()["detail_return"] == "0"
    frames = render_sequence(SynthConfig(height=48, width=64, frames=3, noise="moderate"), seed=1).input
    for a, b in zip(_stream(plain, frames), _stream(gated, frames), strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)
    with torch.no_grad():
        gated.detail_gate.bias.fill_(3.0)  # type: ignore[union-attr]  # clamped to a share of 1
    restored = plain.spec.output_names.index("restored")
    for frame, a, b in zip(as_stream(frames), _stream(plain, frames), _stream(gated, frames), strict=True):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            expected = input_matched(torch.from_numpy(frame), x) if i == restored else x
            torch.testing.assert_close(y, expected)
    family = most if isinstance(plain, MostNet) else r2d4
    with pytest.raises(ValueError, match="detail return would be lost"):
        family.checkpoint_filter_fn(gated.state_dict(), gated.layout_metadata(), plain.cfg)  # type: ignore[arg-type]


def test_the_matched_input_takes_the_output_colours_and_the_noise_feature_reads_the_noise() -> None:
    rng = np.random.default_rng(0)
    restored = torch.from_numpy(rng.random((1, 3, 60, 80)))
    gains, offsets = torch.tensor([0.5, 1.3, 0.8]), torch.tensor([0.2, -0.1, 0.05])
    frame = restored * gains.reshape(1, 3, 1, 1) + offsets.reshape(1, 3, 1, 1)  # a camera's per-channel cast
    torch.testing.assert_close(input_matched(frame, restored), restored)
    y, x = torch.meshgrid(torch.linspace(0, 1, 120), torch.linspace(0, 1, 160), indexing="ij")
    smooth = (0.3 + 0.4 * x * y).expand(1, 3, 120, 160).float()
    for sigma in (2.0, 5.0, 12.0):  # 0-255 units
        noisy = smooth + torch.from_numpy(rng.normal(0, sigma / 255, (1, 1, 120, 160))).float()
        features = detail_features(noisy, noisy, smooth)
        assert features.shape == (1, DETAIL_FEATURES)
        assert abs(features[0, 0].exp().item() / sigma - 1) < 0.1, features  # Immerkaer's estimate
        assert abs(features[0, 1].exp().item() / sigma - 1) < 0.05, features  # std of what was removed
    assert detail_features(smooth, smooth, smooth)[0, 0].exp().item() < 0.1  # structure alone reads no noise


def test_normal_equations_recover_a_planted_gate() -> None:
    """Targets that take a known, feature-dependent share of the input's detail: the solve gives the gate
    back, and a frame's PSNR from its statistics is the PSNR of the gated frame."""
    rng = np.random.default_rng(0)
    w = np.array([0.05, 0.1, 0.2])
    stats = []
    for i in range(30):
        restored = torch.from_numpy(rng.random((1, 3, 20, 24)) * 0.5 + 0.25)
        frame = restored + torch.from_numpy(rng.normal(0, (1 + i) / 255, (1, 3, 20, 24)))
        matched = input_matched(frame, restored)
        share = float(np.clip(w @ np.append(detail_features(frame, matched, restored)[0].numpy(), 1), 0, 1))
        assert 0 < share < 1
        target = (restored + share * (matched - restored))[0].numpy()
        stats.append(frame_stats(frame, restored, target))
    got = solve(stats, 1e-12)
    np.testing.assert_allclose(got, w, atol=1e-6)
    assert stats[3].psnr(got) > 100 > stats[3].psnr(None)


@pytest.mark.parametrize("name", FAMILIES)
def test_fit_detail_cli_recovers_a_planted_share_and_ships_its_record(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Targets made by the network with half of the input's detail given back: fitting the same network
    from a zero gate brings the held-out clip close to them, through ``vident fit-detail``; the file
    loads with the gate and records the fit."""
    plain = _plain(name)
    source = with_detail_gate(plain).eval()
    with torch.no_grad():
        source.detail_gate.bias.fill_(0.5)  # type: ignore[union-attr]
    for i in range(5):
        seq = render_sequence(SynthConfig(height=48, width=64, frames=3, noise="moderate"), seed=i)
        restored = np.stack([
            np.clip(out[0][0].permute(1, 2, 0).numpy() * 255 + 0.5, 0, 255).astype(np.uint8)
            for out in _stream(source, seq.input)
        ])  # fmt: skip
        write_sequence(replace(seq, target=restored), tmp_path / "fit" / f"seq_{i:03d}")
    weights = save_checkpoint(plain, tmp_path / "plain.safetensors", {"steps": "1"})
    out = tmp_path / "run"
    code = vident(["fit-detail", str(weights), "--data", str(tmp_path / "fit"), "--holdout", "1",
                   "--frames", "3", "--out", str(out), "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "detail gate fitted on 4 sequences x 3 frames" in printed
    fit = detail_fit_of(read_metadata(out / "last.safetensors"))
    assert fit is not None and fit.kept
    assert fit.holdout_psnr_after > fit.holdout_psnr_before + 3 and fit.holdout_psnr_after > 40
    assert fit.mean_share is not None and abs(fit.mean_share - 0.5) < 0.05
    model, _ = load_model(str(out / "last.safetensors"))
    assert type(model) is type(plain) and model.cfg.detail_return
    assert json.loads((out / "detail_fit.json").read_text())["ridge"] == fit.ridge


def test_fit_detail_refuses_a_non_validation_chooser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seq = render_sequence(SynthConfig(height=48, width=64, frames=2), seed=0)
    for i in range(2):
        write_sequence(seq, tmp_path / "d" / f"seq_{i:03d}")
    weights = save_checkpoint(_plain(), tmp_path / "most.safetensors", {"steps": "1"})
    write_sequence(seq, tmp_path / "real" / "seq_000")
    (tmp_path / "real" / "dataset.json").write_text(json.dumps({"split": "real"}))
    assert vident(["fit-detail", str(weights), "--data", str(tmp_path / "d"), "--holdout", "1",
                   "--choose-on", str(tmp_path / "real"), "--out", str(tmp_path / "b")]) == 2  # fmt: skip
    assert "not a 'real' split" in capsys.readouterr().out


def test_the_summary_gives_the_gain_and_share_or_says_the_gate_was_not_kept() -> None:
    from service.commands.fit_detail import fit_summary

    fit = DetailFit(data="data/dfit", fit_sequences=32, holdout_sequences=4, frames=6, ridge=1e-4,
                    fit_psnr_before=21.5, fit_psnr_after=21.7, holdout_psnr_before=21.2, holdout_psnr_after=21.3,
                    chosen_on="data/val-a", chosen_psnr_before=20.3, chosen_psnr_after=20.6,
                    mean_share=0.21)  # fmt: skip
    assert "on data/val-a 20.30 -> 20.60 dB, mean share 0.21 (ridge 0.0001)" in fit_summary(fit)
    dropped = replace(fit, ridge=None, chosen_psnr_after=20.3, mean_share=0.0)
    assert "detail return not kept: every ridge lowered PSNR on data/val-a (from 20.30 dB)" in fit_summary(dropped)
