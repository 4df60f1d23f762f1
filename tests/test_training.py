"""Training pieces: ATB obeys eq. 6.6, NSS derives the table its gates say, the loss falls, and
checkpoints round-trip bit-exact."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models import create_model
from models.checkpoints import load_model, read_metadata, save_checkpoint
from models.layers import offsets_to_homography
from models.most import MOST_NSS_STRUCTURE, Structure
from models.training.balancing import AdaptiveTaskBalancing, DynamicWeightAverage, create_balancer
from models.training.nss import GATED_SCALES, ScaleGates
from models.training.trainer import ClipBatch, TrainConfig, Trainer


def test_atb_weights_solve_eq_6_6() -> None:
    losses = {"restoration": torch.tensor(0.3), "segmentation": torch.tensor(0.05), "homography": torch.tensor(7.0)}
    weights = AdaptiveTaskBalancing(tuple(losses)).weights(losses)
    weighted = [weights[t] * float(v) for t, v in losses.items()]
    total = sum(float(v) for v in losses.values())
    assert sum(weighted) == pytest.approx(total)  # the magnitude V is kept
    for a, b in itertools.combinations(weighted, 2):
        assert a == pytest.approx(b)  # every pair of tasks trains at the same pace


def test_balancers_by_name() -> None:
    tasks = ("restoration", "segmentation", "homography")
    for name in ("ls", "atb", "dwa", "rwl"):
        weights = create_balancer(name, tasks).weights({t: torch.tensor(1.0) for t in tasks})
        assert set(weights) == set(tasks) and all(w > 0 for w in weights.values())
    with pytest.raises(ValueError, match="unknown task balancing"):
        create_balancer("magic", tasks)
    dwa = DynamicWeightAverage(tasks, window=2)
    for value in (1.0, 1.0, 1.0, 1.0):  # restoration stalls while the others halve
        weights = dwa.weights({"restoration": torch.tensor(value), "segmentation": torch.tensor(value / 2 ** 0),
                               "homography": torch.tensor(value)})  # fmt: skip
    dwa = DynamicWeightAverage(tasks, window=1)
    dwa.weights({"restoration": torch.tensor(1.0), "segmentation": torch.tensor(1.0), "homography": torch.tensor(1.0)})
    weights = dwa.weights(
        {"restoration": torch.tensor(1.0), "segmentation": torch.tensor(0.5), "homography": torch.tensor(0.5)}
    )
    assert weights["restoration"] > weights["segmentation"]  # the slower task gets more weight


def test_nss_derives_the_table_of_fixed_gates() -> None:
    gates = ScaleGates()
    with torch.no_grad():
        # keep probability = softmax(keep, drop)[keep]; set them to the dissertation's result
        wanted = {"restoration": (1,), "segmentation": (2,), "homography": ()}
        for i, task in enumerate(("restoration", "segmentation", "homography")):
            for j, s in enumerate(GATED_SCALES):
                gates.logits[i, j, 0] = 2.0 if s in wanted[task] else -2.0
                gates.logits[i, j, 1] = 0.0
    assert gates.derive() == MOST_NSS_STRUCTURE
    assert gates.sparsity() < 0


def _fixed_batch(b: int = 2, t: int = 3, h: int = 32, w: int = 48) -> ClipBatch:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(b, t, 3, h, w, generator=g)
    mask = (target.mean(dim=2, keepdim=True) > 0.5).float()
    offsets = torch.randn(b * t, 8, generator=g)
    homography = offsets_to_homography(offsets, h, w).view(b, t, 3, 3)
    homography[:, 0] = torch.eye(3)
    noisy = (0.7 * target + 0.1 + 0.05 * torch.randn(b, t, 3, h, w, generator=g)).clamp(0, 1)
    return ClipBatch(noisy, target, target, mask, homography)


@pytest.mark.parametrize("name", ["most-nss-tiny", "r2-d4-tiny"])
def test_smoke_training_reduces_the_loss(name: str, tmp_path: Path) -> None:
    batch = _fixed_batch()
    cfg = TrainConfig(model=name, out=tmp_path, steps=30, batch=2, clip_length=3, height=32, width=48,
                      lr=3e-3, warmup=1, amp="off", checkpoint_every=15, log_every=1)  # fmt: skip
    trainer = Trainer(cfg, itertools.repeat(batch))
    first = trainer.train_step(batch)
    trainer.fit(progress=False)
    _, last = trainer._clip_losses(batch)
    task_losses = [k for k in first if k.startswith("loss_")]
    assert len(task_losses) >= 2
    for key in task_losses:  # every task learns, not just the total
        assert last[key] < first[key], key
    assert last["loss"] < 0.9 * first["loss"]
    assert (tmp_path / "last.safetensors").is_file() and (tmp_path / "log.jsonl").read_text().count("\n") >= 29


def test_r2d4_trainer_weighs_the_stages_as_the_dissertation(tmp_path: Path) -> None:
    """R2-D4's clip loss is MSE(R) + 0.6 MSE(R') (eq. 3.25), whether a frame's total comes from
    r2d4_loss or the trainer sums the parts over a clip first."""
    from models.training.losses import r2d4_loss

    cfg = TrainConfig(model="r2-d4-tiny", out=tmp_path, batch=2, clip_length=3, height=32, width=48, amp="off")
    total, logs = Trainer(cfg, iter(()))._clip_losses(_fixed_batch())
    assert float(total) == pytest.approx(logs["loss_blur"] + 0.6 * logs["loss_noise"], rel=1e-5)
    frame = torch.rand(1, 3, 8, 8)
    one, parts = r2d4_loss({"restored": frame, "denoised": frame.flip(-1)}, frame.flip(-2), frame)
    assert float(one) == pytest.approx(float(parts["blur"] + 0.6 * parts["noise"]), rel=1e-6)


@pytest.mark.parametrize("name", ["most-nss-tiny", "r2-d4-tiny"])
def test_the_detail_gate_is_fitted_not_trained(name: str, tmp_path: Path) -> None:
    """The losses read the frame before the detail return: a fitted gate changes no loss and gets no
    gradient, so training from a gated file keeps its gate as ``vident fit-detail`` left it."""
    torch.manual_seed(0)
    model = create_model(name, detail_return=True)
    with torch.no_grad():
        model.detail_gate.bias.fill_(0.5)  # type: ignore[union-attr]
    weights = save_checkpoint(model, tmp_path / "gated.safetensors", {"steps": "1"})
    batch = _fixed_batch()
    cfg = TrainConfig(model=name, out=tmp_path / "run", batch=2, clip_length=3, height=32, width=48, amp="off",
                      init_from=weights)  # fmt: skip
    trainer = Trainer(cfg, iter(()))
    gate = trainer.model.detail_gate  # type: ignore[union-attr]
    assert gate.bias.item() == 0.5
    total, logs = trainer._clip_losses(batch)
    total.backward()
    assert gate.weight.grad is None and gate.bias.grad is None
    with torch.no_grad():
        gate.bias.zero_()
    assert trainer._clip_losses(batch)[1] == logs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (`vident train --device cuda`)")
def test_cuda_mixed_precision_training_reduces_the_loss(tmp_path: Path) -> None:
    """On GPU machines `--device cuda` with automatic mixed precision trains, and its checkpoint
    loads on the CPU. Skips without CUDA (CI has none); run it on a GPU machine to check it."""
    batch = _fixed_batch()
    cfg = TrainConfig(model="most-nss-tiny", out=tmp_path, steps=30, batch=2, clip_length=3, height=32, width=48,
                      lr=3e-3, warmup=1, amp="auto", device="cuda", checkpoint_every=15, log_every=1)  # fmt: skip
    trainer = Trainer(cfg, itertools.repeat(batch))
    assert trainer.amp_dtype in (torch.bfloat16, torch.float16)
    first = trainer.train_step(batch.to("cuda"))
    trainer.fit(progress=False)
    _, last = trainer._clip_losses(batch.to("cuda"))
    assert last["loss"] < 0.9 * first["loss"]
    model, _ = load_model(str(tmp_path / "last.safetensors"))
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_train_on_cuda_without_cuda_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main as vident

    argv = ["train", "--model", "most-nss-tiny", "--device", "cuda", "--steps", "1", "--out", str(tmp_path)]
    assert vident(argv) == 2
    assert "cannot train on --device cuda" in capsys.readouterr().out
    assert not (tmp_path / "last.safetensors").exists()


def test_resume_continues_exactly(tmp_path: Path) -> None:
    batch = _fixed_batch()
    kwargs = dict(model="most-nss-tiny", steps=6, batch=2, height=32, width=48, amp="off", warmup=1,
                  checkpoint_every=3, log_every=1)  # fmt: skip
    straight = Trainer(TrainConfig(out=tmp_path / "a", **kwargs), itertools.repeat(batch))
    straight.fit(progress=False)
    interrupted = Trainer(TrainConfig(out=tmp_path / "b", **kwargs), itertools.repeat(batch))
    interrupted.fit(progress=False, until=3)
    resumed = Trainer(TrainConfig(out=tmp_path / "b", **kwargs), itertools.repeat(batch))
    resumed.load()
    assert resumed.step_index == 3
    resumed.fit(progress=False)
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


def test_train_minutes_budget_stops_early_with_a_resumable_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vident train --minutes` stops after the step in progress once the budget is spent, saves (though
    --checkpoint-every is never reached) and keeps the --steps schedule, so --resume goes on."""
    from service.cli import main

    run = tmp_path / "run"
    argv = ["train", "--model", "most-nss-tiny", "--out", str(run), "--steps", "100000", "--size", "32x48",
            "--batch", "1", "--clip-length", "2", "--amp", "off", "--workers", "0", "--validate-every", "0",
            "--checkpoint-every", "100000"]  # fmt: skip
    start = time.monotonic()
    assert main([*argv, "--minutes", "0.05"]) == 0
    assert time.monotonic() - start < 60
    assert "budget ran out (--resume goes on)" in capsys.readouterr().out
    meta = read_metadata(run / "last.safetensors")
    steps = int(meta["steps"])
    assert 1 <= steps < 100000 and json.loads(meta["train_config"])["steps"] == 100000
    assert (run / "resume.pt").is_file()
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == steps
    assert main([*argv, "--minutes", "0.01", "--resume"]) == 0
    assert int(read_metadata(run / "last.safetensors")["steps"]) > steps
    assert main([*argv, "--minutes", "0"]) == 2  # refused before anything runs


def test_fit_checkpoints_by_time_and_reports_each_save(tmp_path: Path) -> None:
    batch = _fixed_batch()
    cfg = TrainConfig(model="most-nss-tiny", out=tmp_path, steps=3, batch=2, height=32, width=48, amp="off",
                      warmup=1, checkpoint_every=100, log_every=100)  # fmt: skip
    saved: list[Path] = []
    Trainer(cfg, itertools.repeat(batch)).fit(progress=False, checkpoint_minutes=0.0, on_checkpoint=saved.append)
    assert saved == [tmp_path / "last.safetensors"] * 3  # every step: no step-count checkpoint was due


def test_search_needs_every_head(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every task at every scale"):
        Trainer(TrainConfig(model="most-nss-tiny", out=tmp_path, search=True), iter(()))
    trainer = Trainer(TrainConfig(model="most-net-tiny", out=tmp_path, search=True, steps=2, batch=2, height=32,
                                  width=48, amp="off", warmup=1), itertools.repeat(_fixed_batch()))  # fmt: skip
    logs = trainer.train_step(_fixed_batch())
    assert "alpha_homography_s1" in logs and trainer.gates is not None
    assert trainer.gates.logits.grad is not None and trainer.gates.logits.grad.abs().sum() > 0


def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path) -> None:
    custom = Structure(restoration=(1, 3), segmentation=(3,), homography=(2, 3))
    model = create_model("most-net-tiny", structure=custom)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"note": "test"})
    loaded, used = load_model(str(path))
    assert used == path and read_metadata(path)["note"] == "test"
    assert loaded.structure == custom  # the table travels with the weights
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert b"pickle" not in path.read_bytes()[:64]


def _saved_before(model: torch.nn.Module, key: str, value: str, folder: Path) -> Path:
    """``model`` saved as a checkpoint written before metadata ``key`` existed (it records ``value``), and so
    before ``layout_version`` (version 0)."""
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(model, folder / "old.safetensors")
    assert read_metadata(path)[key] == value
    legacy = folder / "legacy.safetensors"
    old = {k: v for k, v in read_metadata(path).items() if k not in (key, "layout_version")}
    save_file(load_file(str(path)), str(legacy), metadata=old)
    return legacy


def test_checkpoints_older_than_corner_pooling_load_and_train_on(tmp_path: Path) -> None:
    """Weights saved before ``homography_pool`` existed (no such metadata) load with the global
    average they were trained with; ``--init-from`` them converts to corner pooling."""
    old = create_model("most-nss-tiny", homography_pool="global")
    with torch.no_grad():
        old.homography_heads["3"].offsets.weight.normal_()
    legacy = _saved_before(old, "homography_pool", "global", tmp_path)
    loaded, _ = load_model(str(legacy))
    assert loaded.cfg.homography_pool == "global"
    new, _ = load_model(str(save_checkpoint(create_model("most-nss-tiny"), tmp_path / "new.safetensors")))
    assert new.cfg.homography_pool == "corners"
    trainer = Trainer(TrainConfig(model="most-nss-tiny", out=tmp_path / "run", init_from=legacy), iter(()))
    weight, before = trainer.model.homography_heads["3"].offsets.weight, old.homography_heads["3"].offsets.weight
    assert trainer.model.cfg.homography_pool == "corners" and weight.shape[1] == 4 * before.shape[1]
    torch.testing.assert_close(weight, before.repeat(1, 4) / 4)


def test_checkpoints_older_than_input_fed_restoration_load_and_convert(tmp_path: Path) -> None:
    """Weights saved before ``restoration_input`` existed load with heads that do not read B^s;
    converted to heads that do (the checkpoint filter with ``into``), the heads get zero weights for
    B^s, so training starts from the same function; checkpoints record the key. Weights without a run's
    resume state do not load into a network of another layout."""
    from models.checkpoints import read_checkpoint

    old = create_model("most-nss-tiny", restoration_input=False)
    legacy = _saved_before(old, "restoration_input", "0", tmp_path)
    loaded, _ = load_model(str(legacy))
    assert not loaded.cfg.restoration_input
    fed = create_model("most-nss-tiny", restoration_input=True)
    fed_path = save_checkpoint(fed, tmp_path / "fed.safetensors")
    assert read_metadata(fed_path)["restoration_input"] == "1" and load_model(str(fed_path))[0].cfg.restoration_input
    kwargs, state = read_checkpoint(legacy, into=fed.cfg)
    assert kwargs["restoration_input"] and fed.load_state_dict(state, strict=True)
    for s, head in fed.restoration_heads.items():
        weight, before = head.body[0].weight, old.restoration_heads[s].body[0].weight
        torch.testing.assert_close(weight[:, :-3], before)
        assert weight.shape[1] == before.shape[1] + 3 and not weight[:, -3:].any()
    kept = Trainer(TrainConfig(model="most-nss-tiny", out=tmp_path / "run", init_from=fed_path), iter(()))
    assert kept.model.cfg.restoration_input  # weights that do not convert keep their own layout
    (tmp_path / "fed-run").mkdir()
    (tmp_path / "fed-run" / "last.safetensors").write_bytes(fed_path.read_bytes())
    with pytest.raises(ValueError, match="--init-from"):
        Trainer(TrainConfig(model="most-nss-tiny", out=tmp_path / "fed-run"), iter(())).load()


def test_checkpoints_older_than_restoration_filters_load_and_train_on(tmp_path: Path) -> None:
    """Weights saved before ``restoration_filter`` existed load without filters; ``--init-from``
    them adds zero filters (the same function); --resume of such a run says to use --init-from."""
    old = create_model("most-nss-tiny", restoration_filter=0)
    legacy = _saved_before(old, "restoration_filter", "0", tmp_path)
    loaded, _ = load_model(str(legacy))
    assert loaded.cfg.restoration_filter == 0 and not loaded.restoration_filters
    new_path = save_checkpoint(create_model("most-nss-tiny"), tmp_path / "new.safetensors")
    assert read_metadata(new_path)["restoration_filter"] == "5"
    assert load_model(str(new_path))[0].cfg.restoration_filter == 5
    trainer = Trainer(TrainConfig(model="most-nss-tiny", out=tmp_path / "run", init_from=legacy), iter(()))
    assert set(trainer.model.restoration_filters) == {"1", "3"}
    assert not any(p.any() for p in trainer.model.restoration_filters.parameters())
    (tmp_path / "old-run").mkdir()
    (tmp_path / "old-run" / "last.safetensors").write_bytes(legacy.read_bytes())
    with pytest.raises(ValueError, match="--init-from"):
        Trainer(TrainConfig(model="most-nss-tiny", out=tmp_path / "old-run"), iter(())).load()


def test_a_run_from_trained_weights_carries_their_budget_to_the_card(tmp_path: Path) -> None:
    """--init-from weights that were themselves fine-tuned: the new checkpoint records the steps and
    hours of the whole ancestry, and the card states them."""
    import json

    from models.training.card import write_card

    before = {"steps": "7", "train_seconds": "3600", "prior_steps": "3", "prior_seconds": "1800"}
    parent = save_checkpoint(create_model("most-nss-tiny"), tmp_path / "parent.safetensors", before)
    trainer = Trainer(TrainConfig(model="most-nss-tiny", out=tmp_path / "run", init_from=parent), iter(()))
    trainer.step_index, trainer.seconds = 5, 900.0
    meta = trainer.metadata()
    assert (meta["prior_steps"], meta["prior_seconds"], meta["prior_weights"]) == ("10", "5400", str(parent))
    child = save_checkpoint(trainer.model, tmp_path / "child.safetensors", meta)
    report = {"model": "most-nss-tiny", "frames": 2, "sequences": ["seq_000"], "data": "d", "backend": "torch",
              "device": "cpu", "rows": [{"name": "most-nss-tiny", "psnr": 20.0}]}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(report))
    card = write_card(child, tmp_path / "eval.json", "vident eval ...").read_text()
    assert "steps: 5 x batch 4" in card
    assert f"started from `{parent}`, trained 10 steps (1.50 h) before (15 in all)" in card


def test_the_budget_follows_init_from_through_weights_older_than_prior_metadata(tmp_path: Path) -> None:
    """Weights written before ``prior_*`` existed still name their own --init-from in the training
    config; the ancestry is followed through it, so a third run's card does not drop the first."""
    import json

    from models.training.trainer import prior_training

    first = save_checkpoint(create_model("most-nss-tiny"), tmp_path / "a.safetensors",
                            {"steps": "2600", "train_seconds": "16524"})  # fmt: skip
    legacy = {"steps": "1400", "train_seconds": "6455", "train_config": json.dumps({"init_from": str(first)})}
    second = save_checkpoint(create_model("most-nss-tiny"), tmp_path / "b.safetensors", legacy)
    assert prior_training(second) == {"prior_steps": "4000", "prior_seconds": "22979", "prior_weights": str(second)}
    first.unlink()  # the ancestor is gone: only what the file itself records can be counted
    assert prior_training(second)["prior_steps"] == "1400"


def test_validation_size_is_a_flag(tmp_path: Path) -> None:
    """--validate-sequences sets how many validation sequences (of 7 frame pairs each) the log's
    MACE is averaged over; 2, the default, is too few to see a change in it. --keep-validated keeps
    each validated step's weights."""
    import json
    from unittest import mock

    import models.training.run as run

    seen: list[int] = []
    real = run.validate

    def spy(model, cfg, sequences=2, frames=8, motion=1.0, render_size=None):  # noqa: ANN001, ANN202
        seen.append(sequences)
        return real(model, cfg, sequences=sequences, frames=3, motion=motion, render_size=render_size)

    argv = ["train", "--model", "most-nss-tiny", "--out", str(tmp_path), "--steps", "2", "--size", "32x48", "--batch",
            "2", "--amp", "off", "--validate-every", "2", "--validate-sequences", "3", "--noise", "low"]  # fmt: skip
    from service.cli import main

    with mock.patch.object(run, "validate", spy):
        assert main([*argv, "--keep-validated"]) == 0
    assert seen == [3]
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert "val_mace" in last and "val_psnr" in last
    # --keep-validated: the validated step's weights, with its scores, beside last.safetensors
    kept = tmp_path / "validated" / "step-2.safetensors"
    assert [p.name for p in (tmp_path / "validated").iterdir()] == [kept.name]
    assert float(read_metadata(kept)["val_mace"]) == pytest.approx(last["val_mace"], rel=1e-5)
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "last.safetensors"))
    assert all(torch.equal(value, final[name]) for name, value in load_file(str(kept)).items())
    with pytest.raises(ValueError, match="--keep-validated keeps"):
        main([*argv[:-6], "--validate-every", "0", "--keep-validated"])


def test_train_on_crops_of_larger_renders(tmp_path: Path) -> None:
    """--render-size: clips rendered larger and cropped to --size; recorded for the card; a render
    smaller than the crops is refused before anything runs."""
    import json

    from service.cli import main

    argv = ["train", "--model", "most-nss-tiny", "--out", str(tmp_path / "run"), "--steps", "2", "--size", "32x48",
            "--batch", "2", "--amp", "off", "--validate-every", "2", "--noise", "low"]  # fmt: skip
    assert main([*argv, "--render-size", "64x96"]) == 0
    config = json.loads(read_metadata(tmp_path / "run" / "last.safetensors")["train_config"])
    assert config["extra"]["render_size"] == "64x96" and (config["height"], config["width"]) == (32, 48)
    assert "val_mace" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    with pytest.raises(ValueError, match="smaller than the 32x48 crops"):
        main([*argv[:4], str(tmp_path / "other"), *argv[5:], "--render-size", "16x96"])


def test_train_stop_at_then_ship_writes_a_measured_card(tmp_path: Path) -> None:
    """`vident train --stop-at` keeps the schedule and stops; `vident ship` writes fp16 weights and a
    card whose table is the evaluation of that very file."""
    from safetensors.torch import load_file

    from service.cli import main

    run = tmp_path / "run"
    common = ["train", "--model", "most-nss-tiny", "--out", str(run), "--steps", "4", "--size", "32x48",
              "--batch", "1", "--clip-length", "2", "--amp", "off", "--checkpoint-every", "2", "--workers", "0",
              "--validate-every", "0", "--noise", "low"]  # fmt: skip
    assert main([*common, "--stop-at", "2"]) == 0
    meta = read_metadata(run / "last.safetensors")
    assert meta["steps"] == "2" and '"noise": "low"' in meta["train_config"]
    assert main([*common, "--resume", "--motion", "2.5"]) == 0
    meta = read_metadata(run / "last.safetensors")
    assert meta["steps"] == "4"
    # a resumed run that changed the camera motion says which steps saw which
    assert '"motion": "1.0 to step 2, then 2.5"' in meta["train_config"]

    data = tmp_path / "test"
    assert main(["synth", "--out", str(data), "--split", "test", "--sequences", "1", "--frames", "3",
                 "--size", "32x48"]) == 0  # fmt: skip
    status = tmp_path / "status.md"
    status.write_text("**Status: test run.**")
    shipped_dir = tmp_path / "ckpt"
    shipped_dir.mkdir()
    assert main(["ship", str(run), "--name", "most-nss-tiny", "--data", str(data), "--no-comparators",
                 "--status", str(status), "--checkpoint-dir", str(shipped_dir)]) == 0  # fmt: skip
    weights = load_file(str(shipped_dir / "most-nss-tiny.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    card = (shipped_dir / "most-nss-tiny.md").read_text()
    assert card.startswith("# most-nss-tiny") and "**Status: test run.**" in card and "noise low" in card
    assert "camera motion x1.0 to step 2, then 2.5" in card
    assert "| BASELINE |" in card and "| most-nss-tiny |" in card and "--no-comparators" in card


def test_reship_keeps_the_hand_written_parts_of_the_card(tmp_path: Path) -> None:
    """A re-ship regenerates the card but carries its `## Notes...` sections and `<!-- keep -->` blocks
    across, once each, after the generated part; hand edits elsewhere are regenerated away."""
    from service.cli import main

    run, data, shipped = tmp_path / "run", tmp_path / "test", tmp_path / "ckpt"
    assert main(["train", "--model", "most-nss-tiny", "--out", str(run), "--steps", "1", "--size", "32x48",
                 "--batch", "1", "--clip-length", "2", "--amp", "off", "--workers", "0", "--validate-every", "0",
                 "--noise", "low"]) == 0  # fmt: skip
    assert main(["synth", "--out", str(data), "--split", "test", "--sequences", "1", "--frames", "2",
                 "--size", "32x48"]) == 0  # fmt: skip
    ship = ["ship", str(run), "--data", str(data), "--no-comparators", "--checkpoint-dir", str(shipped)]
    assert main(ship) == 0
    card_path = shipped / "most-nss-tiny.md"
    notes = "## Notes on the comparison\n\nWhy no longer run exists.\n\n```bash\n## not a heading\n```"
    block = "<!-- keep -->\nMeasured by hand: 1.23 dB.\n<!-- /keep -->"
    edited = card_path.read_text().replace("## Training", f"{block}\n\n## Training")
    edited = edited.replace("- mixed precision", "- EDITED")  # a hand edit of the generated part
    card_path.write_text(f"{edited}\n{notes}\n")
    for _ in range(2):  # twice: what was carried across once is carried across again, not doubled
        assert main(ship) == 0
        card = card_path.read_text()
        assert card.count("## Notes on the comparison") == 1 and card.count("Why no longer run exists.") == 1
        assert card.count("Measured by hand: 1.23 dB.") == 1 and "## not a heading" in card
        assert card.index("## Targets") < card.index(block) < card.index(notes)
        assert "- EDITED" not in card and "- mixed precision" in card  # the generated part is regenerated


def test_emphasis_multiplies_the_balanced_weights() -> None:
    """--emphasis homography=3: ATB still equalises the losses, then the homography weight is tripled."""
    losses = {"restoration": torch.tensor(0.3), "segmentation": torch.tensor(0.05), "homography": torch.tensor(7.0)}
    plain = create_balancer("atb", tuple(losses))
    emphasised = create_balancer("atb", tuple(losses), {"homography": 3.0})
    total_plain, w_plain = plain.combine(losses)
    total, w = emphasised.combine(losses)
    assert w["homography"] == pytest.approx(3 * w_plain["homography"])
    assert w["restoration"] == pytest.approx(w_plain["restoration"])
    assert float(total) == pytest.approx(float(total_plain) + 2 * w_plain["homography"] * 7.0)
    with pytest.raises(ValueError, match="no task 'teeth'"):
        create_balancer("atb", tuple(losses), {"teeth": 2.0})
    with pytest.raises(ValueError, match="must be positive"):
        create_balancer("atb", tuple(losses), {"homography": 0.0})


def test_emphasis_flag_parses_task_and_factor() -> None:
    import argparse

    from service.commands.train import task_factor

    assert task_factor("homography=2.5") == ("homography", 2.5)
    for bad in ("homography", "homography=", "=2", "homography=-1", "homography=two"):
        with pytest.raises(argparse.ArgumentTypeError, match="TASK=FACTOR"):
            task_factor(bad)


def test_emphasis_is_refused_for_r2d4(tmp_path: Path) -> None:
    cfg = TrainConfig(model="r2-d4-tiny", out=tmp_path, emphasis={"homography": 2.0})
    with pytest.raises(ValueError, match="R2-D4 has fixed stage weights"):
        Trainer(cfg, iter(()))


def test_keep_best_keeps_the_best_validated_weights(tmp_path: Path) -> None:
    """--keep-best mace: best.safetensors holds the weights of the step with the lowest validation
    MACE (not the last step), says so in its metadata, survives --resume, and `vident ship --best`
    ships it. The validation is replaced by a script of scores so the ranking is known."""
    import json
    from unittest import mock

    from safetensors.torch import load_file

    import models.training.run as run
    from service.cli import main

    scores = iter([5.0, 3.0, 4.0, 2.5, 9.0])  # steps 1..5: best at 2, then at 4

    def scripted(model, cfg, sequences=2, frames=8, motion=1.0, render_size=None):  # noqa: ANN001, ANN202
        return {"val_psnr": 20.0, "val_iou": 0.5, "val_mace": next(scores), "val_mace_identity": 6.0}

    out = tmp_path / "run"
    cfg = TrainConfig(model="most-nss-tiny", out=out, steps=5, batch=1, clip_length=2, height=32, width=48,
                      amp="off", checkpoint_every=1, log_every=1)  # fmt: skip
    kept: dict[int, dict[str, torch.Tensor]] = {}
    real_offer = run.BestKeeper.offer

    def spy_offer(self, record):  # noqa: ANN001, ANN202
        kept[int(record["step"])] = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}
        return real_offer(self, record)

    common = {"noise": "low", "workers": 0, "validate_every": 1, "progress": False, "keep_best": "mace"}
    with mock.patch.object(run, "validate", scripted), mock.patch.object(run.BestKeeper, "offer", spy_offer):
        run.train(cfg, stop_at=3, **common)
        assert read_metadata(out / "best.safetensors")["steps"] == "2"
        run.train(cfg, resume=True, **common)
    meta = read_metadata(out / "best.safetensors")
    assert (meta["steps"], meta["best_metric"], float(meta["best_value"])) == ("4", "mace", 2.5)
    assert float(meta["val_mace"]) == 2.5
    best = load_file(str(out / "best.safetensors"))
    assert all(torch.equal(best[k], kept[4][k]) for k in best)
    assert not all(torch.equal(best[k], kept[5][k]) for k in best)  # the last step is not the best
    assert json.loads(meta["train_config"])["steps"] == 5

    data = tmp_path / "test"
    assert main(["synth", "--out", str(data), "--split", "test", "--sequences", "1", "--frames", "2",
                 "--size", "32x48"]) == 0  # fmt: skip
    shipped = tmp_path / "ship"
    assert main(["ship", str(out), "--best", "--data", str(data), "--no-comparators", "--checkpoint-dir",
                 str(shipped)]) == 0  # fmt: skip
    card = (shipped / "most-nss-tiny.md").read_text()
    assert "- checkpoint: the run's best validation mace (2.5)" in card
    assert read_metadata(shipped / "most-nss-tiny.safetensors")["steps"] == "4"
    with pytest.raises(ValueError, match="needs --validate-every"):
        run.train(cfg, **{**common, "validate_every": 0})
    # a fresh run (no --resume) in the same folder does not compete with the old run's best
    scores = iter([7.0, 8.0])
    with mock.patch.object(run, "validate", scripted):
        run.train(replace(cfg, steps=2), **common)
    meta = read_metadata(out / "best.safetensors")
    assert (meta["steps"], meta["best_value"]) == ("1", "7.0")
    r2d4 = TrainConfig(model="r2-d4-tiny", out=tmp_path / "r2d4", steps=1, height=32, width=48)
    with pytest.raises(ValueError, match="has no mask or homography; use psnr"):
        run.train(r2d4, **common)


def test_whole_frames_every_nth_step(tmp_path: Path) -> None:
    """--whole-every: steps N, 2N, ... get whole --render-size frames at --whole-batch, the others
    --size crops; a resumed run picks both streams up where they stopped; validation runs on whole
    frames; the mix is recorded for the card; without --render-size it is refused."""
    import json

    from models.data.dataset import rendered_clip
    from models.data.synth import SynthConfig
    from models.training.run import training_batches
    from models.training.trainer import TrainConfig

    cfg = TrainConfig(height=32, width=48, batch=3, clip_length=2)
    stream = training_batches(cfg, noise="low", workers=0, render_size=(64, 96), whole_every=3, whole_batch=2)
    shapes = [tuple(next(stream).input.shape) for _ in range(6)]
    crop, whole = (3, 2, 3, 32, 48), (2, 2, 3, 64, 96)
    assert shapes == [crop, crop, whole, crop, crop, whole]
    # Resuming after 4 steps: step 5 is the 4th crop batch, step 6 the 2nd whole one.
    again = training_batches(cfg, noise="low", workers=0, start_step=4, render_size=(64, 96), whole_every=3,
                             whole_batch=2)  # fmt: skip
    fresh = training_batches(cfg, noise="low", workers=0, render_size=(64, 96), whole_every=3, whole_batch=2)
    batches = [next(fresh) for _ in range(6)]
    for got, want in zip([next(again), next(again)], batches[4:], strict=True):
        assert torch.equal(got.input, want.input)
    # Whole clips are other scenes than the ones the crops are cut from (clip 0 is the first crop's).
    synth = SynthConfig(height=64, width=96, frames=2, noise="low")
    assert not torch.equal(batches[2].input[0], rendered_clip(synth, cfg.seed, "train", 0)["input"])

    from service.cli import main

    argv = ["train", "--model", "most-nss-tiny", "--out", str(tmp_path / "run"), "--steps", "2", "--size", "32x48",
            "--batch", "2", "--amp", "off", "--validate-every", "2", "--noise", "low",
            "--whole-every", "2"]  # fmt: skip
    with pytest.raises(ValueError, match="give --render-size"):
        main(argv)
    assert main([*argv, "--render-size", "64x96", "--whole-batch", "1"]) == 0
    meta = read_metadata(tmp_path / "run" / "last.safetensors")
    assert json.loads(meta["train_config"])["extra"]["whole_frames"] == "every 2 steps, batch 1"
    from models.training.card import write_card

    report = {"model": "most-nss-tiny", "frames": 2, "sequences": ["seq_000"], "data": "d", "backend": "torch",
              "device": "cpu", "rows": [{"name": "most-nss-tiny", "psnr": 20.0}]}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(report))
    card = write_card(tmp_path / "run" / "last.safetensors", tmp_path / "eval.json", "vident eval ...").read_text()
    assert "(crops of 64x96 renders; whole 64x96 frames every 2 steps, batch 1)" in card
    assert "Homography pooling: corners; the restoration heads do not read the input frame B^s and add a 5x5" in card
    from models.hardware import cpu_model

    assert meta["hardware"] == cpu_model() and f"optimisation on {cpu_model()}" in card
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    # Whole 64x96 frames: the identity's MACE grows with the frame, so it differs from a 32x48 crop's.
    from models.registry import create_model
    from models.training.run import validate

    model = create_model("most-nss-tiny")
    whole = validate(model, TrainConfig(height=64, width=96), 2, frames=8)
    crops = validate(model, TrainConfig(height=32, width=48), 2, frames=8, render_size=(64, 96))
    assert record["val_mace_identity"] == pytest.approx(whole["val_mace_identity"])
    assert record["val_mace_identity"] != pytest.approx(crops["val_mace_identity"])


def test_a_run_keeps_the_layout_of_weights_that_do_not_convert(tmp_path: Path) -> None:
    """Candidates trained with heads reading B^s do not convert to the registered layout (the new input
    weights are not zero): --init-from and --resume go on in the layout the weights were made with."""
    candidate = create_model("most-nss-tiny", restoration_input=True)
    with torch.no_grad():
        for p in candidate.parameters():
            p.add_(0.01)
    weights = save_checkpoint(candidate, tmp_path / "candidate.safetensors")
    trainer = Trainer(TrainConfig(model="most-nss-tiny", out=tmp_path / "run", init_from=weights), iter(()))
    assert trainer.model.cfg.restoration_input
    torch.testing.assert_close(trainer.model.state_dict(), candidate.state_dict())
    trainer.save()
    resumed = Trainer(TrainConfig(model="most-nss-tiny", out=tmp_path / "run"), iter(()))
    assert resumed.model.cfg.restoration_input
    resumed.load()


def test_train_only_moves_the_named_branch_and_nothing_else(tmp_path: Path) -> None:
    """most-nss's full-resolution branch feeds only the restored frame: training it alone must leave
    every other weight and batch-norm statistic, and so the mask, bit for bit; the card says so."""
    from models.training.card import write_card

    batch = _fixed_batch()
    branch = ("alignment.1", "upsample.1", "decoder.1", "restoration_heads.1", "restoration_filters.1")
    cfg = TrainConfig(model="most-nss-tiny", out=tmp_path, steps=3, batch=2, clip_length=3, height=32, width=48,
                      lr=3e-3, warmup=1, amp="off", train_only=branch)  # fmt: skip
    trainer = Trainer(cfg, itertools.repeat(batch))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.eval()
    mask_before = trainer._clip_losses(batch)[1]["loss_segmentation"]
    trainer.fit(progress=False)
    after = trainer.model.state_dict()
    inside = [k for k in before if k.startswith(tuple(p + "." for p in branch))]
    assert any(k.startswith("decoder.1.") and k.endswith("running_mean") for k in inside)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in inside)
    assert any(not torch.equal(before[k], after[k]) for k in inside if "running" not in k)
    trainer.model.eval()
    assert trainer._clip_losses(batch)[1]["loss_segmentation"] == mask_before
    report = {"model": "most-nss-tiny", "frames": 2, "sequences": ["seq_000"], "data": "d", "backend": "torch",
              "device": "cpu", "rows": [{"name": "most-nss-tiny", "psnr": 20.0}]}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(report))
    card = write_card(tmp_path / "last.safetensors", tmp_path / "eval.json", "vident eval ...").read_text()
    assert f"trained only: {', '.join(branch)} (the rest frozen)" in card
    with pytest.raises(ValueError, match="decoder.9 matches no parameter"):
        Trainer(replace(cfg, out=tmp_path / "bad", train_only=("decoder.9",)), iter(()))


def test_train_only_typo_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", "most-nss-tiny", "--out", str(run), "--train-only", "decoder.1,restoraton_heads.1",
                 "--steps", "1", "--size", "32x48", "--workers", "0"]) == 2  # fmt: skip
    out = capsys.readouterr().out
    assert "--train-only restoraton_heads.1 matches no parameter of most-nss-tiny" in out
    assert "restoration_heads.1" in out  # the names there are
    assert not run.exists()


def test_colour_aligned_loss_ignores_colour_and_sees_noise() -> None:
    """The aligned term must be blind to a per-channel gain/offset (what the colour map fixes) and
    still charge the noise the same as the raw term does, so it trains structure, not colour."""
    from models.training.losses import charbonnier, colour_aligned

    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 24, 32, generator=g)
    tinted = target * torch.tensor([0.6, 1.1, 0.8])[:, None, None] + torch.tensor([0.2, -0.05, 0.1])[:, None, None]
    assert charbonnier(tinted, target) > 0.05
    assert torch.allclose(colour_aligned(tinted, target), target, atol=1e-4)
    noisy = target + 0.1 * torch.randn(target.shape, generator=g)
    raw, aligned = charbonnier(noisy, target), charbonnier(colour_aligned(noisy, target), target)
    assert 0.7 * raw < aligned < raw  # the fit shrinks noise a little toward the mean, never removes it
    fitted = colour_aligned(noisy.requires_grad_(), target)
    fitted.sum().backward()
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0  # gradients reach the prediction


def test_r2d4_aligned_loss_fits_each_stage_to_its_own_target() -> None:
    """Each R2-D4 stage's aligned term must be blind to a tint of that stage's output against its
    own target (the blurry target for the denoising stage) and still charge noise."""
    from models.training.losses import r2d4_loss

    g = torch.Generator().manual_seed(0)
    target, blurry = torch.rand(2, 3, 16, 20, generator=g), torch.rand(2, 3, 16, 20, generator=g)
    gain, offset = torch.tensor([0.7, 1.2, 0.9]).view(1, 3, 1, 1), torch.tensor([0.05, -0.1, 0.02]).view(1, 3, 1, 1)
    tinted = {"restored": target * gain + offset, "denoised": blurry * gain + offset}
    _, plain = r2d4_loss(tinted, target, blurry)
    _, fitted = r2d4_loss(tinted, target, blurry, aligned=1.0)
    assert plain["blur"] > 1e-3 and plain["noise"] > 1e-3
    assert fitted["blur"] < 1e-8 and fitted["noise"] < 1e-8
    noisy = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in tinted.items()}
    _, half = r2d4_loss(noisy, target, blurry, aligned=0.5)
    _, raw = r2d4_loss(noisy, target, blurry)
    assert 1e-3 < half["blur"] < raw["blur"] and 1e-3 < half["noise"] < raw["noise"]


def test_colour_loss_charges_colour_and_not_noise() -> None:
    """The low-frequency term must hold what the aligned term leaves free (a tint) and barely see
    pixel noise, for MOST's per-scale loss and R2-D4's stage loss alike."""
    from models.most import MostStep
    from models.training.losses import MostTargets, charbonnier, low_frequency, most_task_losses, r2d4_loss

    g = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 32, 40, generator=g)
    tinted = target * torch.tensor([0.8, 1.1, 0.9]).view(1, 3, 1, 1) + 0.05
    noisy = target + 0.1 * torch.randn(target.shape, generator=g)
    assert low_frequency(target).shape[-2:] == (4, 5) and low_frequency(target, 3).shape[-2:] == (16, 20)

    def most(pred: torch.Tensor, colour: float) -> float:
        step = MostStep(restored={1: pred}, mask_logits={}, homography={}, final_restored=pred,
                        final_mask_logits=pred[:, :1], final_homography=torch.eye(3).expand(2, 3, 3))  # fmt: skip
        targets = MostTargets(target, torch.zeros_like(target[:, :1]), torch.eye(3).expand(2, 3, 3))
        return float(most_task_losses(step, targets, aligned=1.0, colour=colour)["restoration"])

    def added(pred: torch.Tensor) -> float:  # the colour term, as a share of a raw Charbonnier of the same error
        return (most(pred, 1.0) - most(pred, 0.0)) / float(charbonnier(pred, target))

    assert added(tinted) > 0.6 and added(noisy) < 0.2  # 8x8 means keep most of a tint, shrink noise about 8x
    assert most(tinted, 0.0) < 0.01  # the aligned term alone is blind to the tint
    _, tint = r2d4_loss({"restored": tinted, "denoised": tinted}, target, target, aligned=1.0, colour=1.0)
    _, noise = r2d4_loss({"restored": noisy, "denoised": noisy}, target, target, aligned=1.0, colour=1.0)
    _, noise_alone = r2d4_loss({"restored": noisy, "denoised": noisy}, target, target, aligned=1.0)
    assert tint["blur"] > 1e-3 and noise["blur"] - noise_alone["blur"] < 0.05 * (noise_alone["blur"])


def test_aligned_loss_is_recorded_and_refused_where_it_means_nothing(tmp_path: Path) -> None:
    from models.training.card import write_card

    cfg = TrainConfig(model="most-nss-tiny", out=tmp_path, steps=1, batch=2, clip_length=3, height=32, width=48,
                      lr=3e-3, warmup=1, amp="off", aligned_loss=0.5)  # fmt: skip
    Trainer(cfg, itertools.repeat(_fixed_batch())).fit(progress=False)
    report = {"model": "most-nss-tiny", "frames": 2, "sequences": ["seq_000"], "data": "d", "backend": "torch",
              "device": "cpu", "rows": [{"name": "most-nss-tiny", "psnr": 20.0}]}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(report))
    card = write_card(tmp_path / "last.safetensors", tmp_path / "eval.json", "vident eval ...").read_text()
    assert "restoration loss: 0.5 of it after a per-channel colour fit to the target" in card
    r2 = replace(cfg, model="r2-d4-tiny", out=tmp_path / "r2")
    Trainer(r2, itertools.repeat(_fixed_batch())).fit(progress=False)
    (r2.out / "eval.json").write_text(json.dumps({**report, "model": "r2-d4-tiny"}))
    card = write_card(r2.out / "last.safetensors", r2.out / "eval.json", "vident eval ...").read_text()
    assert "each stage loss: 0.5 of it after a per-channel colour fit to the target" in card
    coloured = replace(cfg, out=tmp_path / "colour", colour_loss=2.0)
    Trainer(coloured, itertools.repeat(_fixed_batch())).fit(progress=False)
    (coloured.out / "eval.json").write_text(json.dumps(report))
    card = write_card(coloured.out / "last.safetensors", coloured.out / "eval.json", "vident eval ...").read_text()
    assert "colour loss: weight 2 on 8x8-pixel block means, added to the restoration loss" in card
    with pytest.raises(ValueError, match=">= 0"):
        Trainer(replace(cfg, out=tmp_path / "neg", colour_loss=-1.0), iter(()))
    with pytest.raises(ValueError, match="0-1"):
        Trainer(replace(cfg, out=tmp_path / "big", aligned_loss=1.5), iter(()))
    with pytest.raises(ValueError, match="Neural Scale Search"):
        Trainer(replace(cfg, model="most-net-tiny", out=tmp_path / "nss", search=True), iter(()))
