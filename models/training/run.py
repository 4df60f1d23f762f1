"""What ``vident train`` runs: data streams for the trainer, validation, and the NSS schedule.

The NSS schedule of 6.2.2: pretrain MOST-NET++ -> search (gates and weights together, from the
pretrained weights) -> derive the scales-to-tasks table (alpha > 0.5; scale 3 always kept) ->
retrain the derived network from scratch. Each phase is a resumable run in its own folder.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.checkpoints import read_metadata, save_checkpoint
from models.data.dataset import ContentMix, SequenceFolderClips, SyntheticClips, SyntheticStream
from models.data.synth import MIXED_RECIPE_SHARE, SynthConfig
from models.metrics import iou, mace, psnr
from models.training.trainer import ClipBatch, TrainConfig, Trainer

VALIDATION_SEED = 7  # validation clips come from the "val" split with this seed
# --whole-every: whole-frame clips come from this disjoint index range of the same training stream,
# so they never repeat a scene the crop batches are cut from.
WHOLE_INDEX_BASE = 1 << 40
# --keep-best: the validation metric that ranks checkpoints, and whether higher is better.
BEST_METRICS = {"psnr": ("val_psnr", True), "iou": ("val_iou", True), "mace": ("val_mace", False)}


def _to_batch(sample: dict[str, torch.Tensor]) -> ClipBatch:
    blurry = sample.get("target_blurry", sample["target"])
    return ClipBatch(sample["input"], sample["target"], blurry, sample["mask"], sample["homography"])


def _render_plan(cfg: TrainConfig, render_size: tuple[int, int] | None) -> tuple[int, int, tuple[int, int] | None]:
    """(height, width) to render synthetic clips at, and the crop to cut from them (None: none)."""
    if render_size is None:
        return cfg.height, cfg.width, None
    return render_size[0], render_size[1], (cfg.height, cfg.width)


def _synthetic_batches(synth: SynthConfig, cfg: TrainConfig, start: int, batch: int, workers: int,
                       crop: tuple[int, int] | None, mix: ContentMix | None) -> Iterator[ClipBatch]:  # fmt: skip
    stream = SyntheticStream(synth, seed=cfg.seed, split="train", start=start, crop=crop, mix=mix)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers, prefetch_factor=4 if workers else None)
    for sample in loader:
        yield _to_batch(sample)


def training_batches(
    cfg: TrainConfig,
    data: Path | None = None,
    noise: str = "mixed",
    workers: int = 1,
    start_step: int = 0,
    motion: float = 1.0,
    render_size: tuple[int, int] | None = None,
    whole_every: int = 0,
    whole_batch: int = 2,
    mix: ContentMix | None = None,
    degradation: str = "recipe",
    recipe_share: float = MIXED_RECIPE_SHARE,
    recipe_codec: float = 0.0,
) -> Iterator[ClipBatch]:
    """Endless batches: fresh synthetic clips, continuing after ``start_step`` batches on resume so a
    resumed run sees the clips an uninterrupted one would; or shuffled clips of on-disk sequences.

    ``whole_every`` > 0: every that many steps (counted from 1) the batch is ``whole_batch`` whole
    ``render_size`` clips instead of crops. Crops teach restoration cheaply at the test's scene
    scale; only whole frames show the rotation and zoom the test's field of view carries."""
    if data is not None:
        dataset = SequenceFolderClips(data, clip_frames=cfg.clip_length)
        generator = torch.Generator().manual_seed(cfg.seed)
        while True:
            loader = DataLoader(dataset, batch_size=cfg.batch, shuffle=True, drop_last=True, generator=generator,
                                num_workers=workers, persistent_workers=False)  # fmt: skip
            for sample in loader:
                yield _to_batch(sample)
    height, width, crop = _render_plan(cfg, render_size)
    synth = SynthConfig(height=height, width=width, frames=cfg.clip_length, noise=noise, motion=motion,
                        degradation=degradation, recipe_share=recipe_share, recipe_codec=recipe_codec)  # fmt: skip
    if not whole_every:
        yield from _synthetic_batches(synth, cfg, start_step * cfg.batch, cfg.batch, workers, crop, mix)
        return
    whole_before = start_step // whole_every
    crops = _synthetic_batches(synth, cfg, (start_step - whole_before) * cfg.batch, cfg.batch, workers, crop, mix)
    wholes = _synthetic_batches(synth, cfg, WHOLE_INDEX_BASE + whole_before * whole_batch, whole_batch, workers,
                                None, mix)  # fmt: skip
    for step in itertools.count(start_step + 1):
        yield next(wholes) if step % whole_every == 0 else next(crops)


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    cfg: TrainConfig,
    sequences: int = 2,
    frames: int = 8,
    motion: float = 1.0,
    render_size: tuple[int, int] | None = None,
) -> dict[str, float]:
    """PSNR / IoU / MACE of streaming inference on fixed validation clips at the training size and
    motion (crops of ``render_size`` renders when training uses them)."""
    model.eval()
    height, width, crop = _render_plan(cfg, render_size)
    synth = SynthConfig(height=height, width=width, frames=frames, noise="moderate", motion=motion)
    dataset = SyntheticClips(synth, sequences, seed=VALIDATION_SEED, split="val", crop=crop)
    spec = model.spec  # type: ignore[attr-defined]
    scores: dict[str, list[float]] = {"val_psnr": [], "val_psnr_input": [], "val_iou": [], "val_mace": [],
                                      "val_mace_identity": []}  # fmt: skip
    for index in range(len(dataset)):
        clip = dataset[index]
        state = {k: torch.from_numpy(v).to(cfg.device) for k, v in spec.initial_state(1, cfg.height, cfg.width).items()}
        for t in range(frames):
            frame = clip["input"][t : t + 1].to(cfg.device)
            outputs = model(frame, torch.full((1, 1, 1, 1), float(t == 0), device=cfg.device), *state.values())
            named = dict(zip(spec.output_names, outputs, strict=True))
            state = {s.name: named[s.next_name] for s in spec.states}
            target = clip["target"][t].numpy().transpose(1, 2, 0) * 255
            restored = named["restored"][0].clamp(0, 1).float().cpu().numpy().transpose(1, 2, 0) * 255
            scores["val_psnr"].append(float(psnr(restored, target)[0]))
            scores["val_psnr_input"].append(float(psnr(clip["input"][t].numpy().transpose(1, 2, 0) * 255, target)[0]))
            if "teeth_mask" in named and t > 0:
                scores["val_iou"].append(
                    float(iou(named["teeth_mask"][0, 0].cpu().numpy(), clip["mask"][t, 0].numpy())[0])
                )
                h_true = clip["homography"][t].double().numpy()
                h_est = named["homography"][0].double().cpu().numpy()
                scores["val_mace"].append(float(mace(h_est, h_true, cfg.height, cfg.width)[0]))
                scores["val_mace_identity"].append(float(mace(np.eye(3), h_true, cfg.height, cfg.width)[0]))
    model.train()
    return {k: float(np.mean(v)) for k, v in scores.items() if v}


def train(
    cfg: TrainConfig,
    resume: bool = False,
    data: Path | None = None,
    noise: str = "mixed",
    workers: int = 1,
    validate_every: int = 200,
    progress: bool = True,
    stop_at: int | None = None,
    motion: float = 1.0,
    validate_sequences: int = 2,
    render_size: tuple[int, int] | None = None,
    keep_best: str | None = None,
    whole_every: int = 0,
    whole_batch: int = 2,
    keep_validated: bool = False,
    mix: ContentMix | None = None,
    degradation: str = "recipe",
    minutes: float | None = None,
    recipe_share: float = MIXED_RECIPE_SHARE,
    recipe_codec: float = 0.0,
) -> Path:
    """One resumable run; returns the final weights (``cfg.out / 'last.safetensors'``). ``stop_at`` ends
    it early with the learning-rate schedule of ``cfg.steps`` intact, as an interrupted run would;
    ``minutes`` does the same after that much wall-clock time of training (``Trainer.fit``).

    ``motion`` multiplies the synthetic camera speed. Speeds are quoted at 320x416 and scale with the
    crop, so a 128x160 crop sees 2.5 times fewer pixels of motion and blur than the 320x416 test
    split; ``motion=2.5`` there restores the test's pixel statistics (what a conv regressor sees).

    ``keep_best`` ("psnr", "iou" or "mace") also keeps ``best.safetensors``, the weights that scored
    best on that validation metric (see ``BestKeeper``).

    ``keep_validated`` also keeps the weights of every validated step, ``validated/step-N.safetensors``
    with the scores in their metadata: validation on a few sequences ranks checkpoints only roughly,
    so the candidates can then be compared on more data than it uses.

    ``whole_every`` mixes whole ``render_size`` frames into a run on crops (``training_batches``); its
    validation then runs on whole frames too, the test's frame rather than the crops'."""
    if keep_best is not None and not validate_every:
        raise ValueError("--keep-best ranks checkpoints by validation: it needs --validate-every > 0")
    if keep_validated and not validate_every:
        raise ValueError("--keep-validated keeps the validated steps' weights: it needs --validate-every > 0")
    # What the data was goes into the checkpoint metadata with the rest of the config (model cards read it).
    source = str(data) if data is not None else "synthetic"
    extra = {**cfg.extra, "noise": noise, "data": source, "motion": str(motion)}
    if data is None:
        extra["content_mix"] = str(mix) if mix is not None else "dental=1"
        if mix is not None and mix.photo_contents():
            from models.data.scenes import TRAINING_PHOTOS  # the set grows: record which one trained

            extra["training_photos"] = ",".join(TRAINING_PHOTOS)
        extra["degradation"] = degradation
        if degradation == "mixed":
            extra["recipe_share"] = str(recipe_share)
        if recipe_codec and degradation != "wide":
            extra["recipe_codec"] = str(recipe_codec)
    if render_size is not None:
        rendered = f"{render_size[0]}x{render_size[1]}"
        if render_size[0] < cfg.height or render_size[1] < cfg.width:
            raise ValueError(f"render size {rendered} is smaller than the {cfg.height}x{cfg.width} crops")
        extra["render_size"] = rendered
    if whole_every:
        if render_size is None or data is not None:
            raise ValueError("--whole-every mixes whole --render-size frames into synthetic crops: give --render-size")
        if whole_every < 2 or whole_batch < 1:
            raise ValueError("--whole-every must be at least 2 (1 would be all whole frames: --size) and "
                             "--whole-batch at least 1")  # fmt: skip
        extra["whole_frames"] = f"every {whole_every} steps, batch {whole_batch}"
    cfg = replace(cfg, extra=extra)
    # What validation measures: the crops trained on, or whole frames when the run mixes them in.
    val_cfg, val_render = cfg, render_size
    if whole_every and render_size is not None:
        val_cfg, val_render = replace(cfg, height=render_size[0], width=render_size[1]), None
    trainer = Trainer(cfg, iter(()))
    resumed = resume and trainer.resume_path.is_file()
    if resumed:
        trainer.load()
        # A resumed run may change the motion; the card must say which steps saw which.
        before = json.loads(read_metadata(cfg.out / "last.safetensors").get("train_config", "{}")).get("extra") or {}
        previous = before.get("motion", "1.0")
        changed = previous.split()[-1] != str(motion)
        record = f"{previous} to step {trainer.step_index}, then {motion}" if changed else previous
        trainer.cfg = replace(cfg, extra={**cfg.extra, "motion": record})
    trainer.batches = training_batches(cfg, data, noise, workers, start_step=trainer.step_index, motion=motion,
                                       render_size=render_size, whole_every=whole_every,
                                       whole_batch=whole_batch, mix=mix, degradation=degradation,
                                       recipe_share=recipe_share, recipe_codec=recipe_codec)  # fmt: skip
    original_log = trainer.log
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    keeper = BestKeeper(trainer, keep_best, carry_over=resumed) if keep_best is not None else None

    def log_with_validation(record: dict[str, float]) -> None:
        if validate_every and (record["step"] % validate_every == 0 or record["step"] == last):
            record.update(validate(trainer.model, val_cfg, validate_sequences, motion=motion, render_size=val_render))
            if keeper is not None:
                keeper.offer(record)
            if keep_validated:
                step = int(record["step"])
                save_checkpoint(trainer.model, cfg.out / "validated" / f"step-{step}.safetensors",
                                validated_metadata(trainer, record))  # fmt: skip
        original_log(record)

    trainer.log = log_with_validation  # type: ignore[method-assign]
    return trainer.fit(progress=progress, until=stop_at, minutes=minutes)


def validated_metadata(trainer: Trainer, record: dict[str, float]) -> dict[str, str]:
    """The run's metadata with the validation scores of ``record``, for weights kept because of them."""
    return {**trainer.metadata(), **{k: f"{v:.6g}" for k, v in record.items() if k.startswith("val_")}}


class BestKeeper:
    """Keeps ``best.safetensors`` beside ``last.safetensors``: the weights that scored best on the
    validation so far. Checkpoints a few hundred steps apart differ by more than the late steps
    gain (the homography most of all), so the end of a run is not necessarily its best point.
    The score lives in the file's metadata, so a resumed run (``carry_over``) goes on comparing
    against it; a fresh run in the same folder starts its own."""

    def __init__(self, trainer: Trainer, metric: str, carry_over: bool = False) -> None:
        if metric not in BEST_METRICS:
            raise ValueError(f"unknown --keep-best metric {metric!r}; choose from {', '.join(BEST_METRICS)}")
        if metric != "psnr" and not trainer.is_most:
            raise ValueError(f"--keep-best {metric}: {trainer.cfg.model} has no mask or homography; use psnr")
        self.trainer = trainer
        self.metric = metric
        self.key, self.higher = BEST_METRICS[metric]
        self.path = trainer.cfg.out / "best.safetensors"
        self.best: float | None = None
        if carry_over and self.path.is_file():
            meta = read_metadata(self.path)
            if meta.get("best_metric") == metric:
                self.best = float(meta["best_value"])

    def offer(self, record: dict[str, float]) -> bool:
        """Saves the current weights if ``record``'s validation beats the best so far."""
        value = float(record[self.key])
        if self.best is not None and (value <= self.best if self.higher else value >= self.best):
            return False
        self.best = value
        meta = {**validated_metadata(self.trainer, record), "best_metric": self.metric, "best_value": repr(value)}
        save_checkpoint(self.trainer.model, self.path, meta)
        return True


def neural_scale_search(
    cfg: TrainConfig,
    pretrain_steps: int,
    search_steps: int,
    retrain_steps: int,
    data: Path | None = None,
    noise: str = "mixed",
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """pretrain -> search -> derive -> retrain; writes ``structure.json`` and ``gates.jsonl`` in cfg.out."""
    base = cfg.out
    # The search needs every head: MOST-NET++ (or its tiny form, for quick runs and tests).
    full = cfg.model if cfg.model.startswith("most-net") else "most-net"
    pre = replace(cfg, model=full, out=base / "pretrain", steps=pretrain_steps, search=False, structure=None)
    pretrained = train(pre, resume=True, data=data, noise=noise, workers=workers, progress=progress)
    search_cfg = replace(pre, out=base / "search", steps=search_steps, search=True, init_from=pretrained)
    train(search_cfg, resume=True, data=data, noise=noise, workers=workers, validate_every=0, progress=progress)
    searched = Trainer(search_cfg, iter(()))
    searched.load()
    assert searched.gates is not None
    structure = searched.gates.derive()
    (base / "structure.json").write_text(json.dumps({
        "structure": json.loads(structure.to_json()),
        "table": structure.table(),
        "alpha": searched.gates.snapshot(),
        "tau": cfg.gate_tau,
    }, indent=2))  # fmt: skip
    gate_lines = [line for line in (search_cfg.out / "log.jsonl").read_text().splitlines() if "alpha_" in line]
    (base / "gates.jsonl").write_text("\n".join(gate_lines) + "\n")
    final = replace(cfg, model=full, out=base / "retrain", steps=retrain_steps, search=False, structure=structure)
    return train(final, resume=True, data=data, noise=noise, workers=workers, progress=progress)
