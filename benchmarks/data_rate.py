"""Does the data path keep up with training? Clips per second generated against clips per second consumed.

Generation: the training stream (``models.training.run.training_batches``: content mix, per-clip
degradations, crops of full-size renders) through a DataLoader with ``--workers`` processes.
Consumption: optimisation steps of the model on one fixed batch (no data loading), clips per second
= batch / seconds per step. A ratio above 1 means the loader can feed the trainer with that many
workers; since rendering is per-clip and independent, generation scales with workers up to the
cores left beside the trainer (a GPU machine with 16 cores can give it 12-14).

    python -m benchmarks.data_rate --model most-nss --workers 1 --batches 6 --steps 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from models.data.dataset import ContentMix
from models.data.synth import DEGRADATIONS
from models.hardware import cpu_model
from models.training.run import training_batches
from models.training.trainer import TrainConfig, Trainer
from service.commands.common import frame_size, prefixes


def generation_rate(cfg: TrainConfig, mix: ContentMix, degradation: str, render: tuple[int, int], workers: int,
                    batches: int) -> float:  # fmt: skip
    """Clips per second the training stream delivers (the first batch, worker start-up, not counted)."""
    stream = training_batches(cfg, workers=workers, render_size=render, mix=mix, degradation=degradation)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * cfg.batch / (time.perf_counter() - start)


def consumption_rate(cfg: TrainConfig, mix: ContentMix, degradation: str, render: tuple[int, int],
                     steps: int) -> float:  # fmt: skip
    """Clips per second the trainer consumes: steps on one fixed batch, after one warm-up step."""
    batch = next(training_batches(cfg, workers=0, render_size=render, mix=mix, degradation=degradation))
    trainer = Trainer(cfg, iter(()))
    trainer.train_step(batch)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    return steps * cfg.batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="most-nss")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=frame_size, default=(128, 160), help="training crop")
    p.add_argument("--render-size", type=frame_size, default=(320, 416))
    p.add_argument("--clip-length", type=int, default=3)
    p.add_argument("--mix", type=ContentMix.parse, default=ContentMix.parse("dental=0.4,dead-leaves=0.35,photos=0.25"))
    p.add_argument("--degradation", default="wide", choices=DEGRADATIONS)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-only", type=prefixes, default=(), metavar="PREFIX,...",
                   help="as `vident train --train-only`")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:  # the trainer writes its log there; nothing is kept
        cfg = TrainConfig(model=args.model, out=Path(scratch), batch=args.batch, clip_length=args.clip_length,
                          height=args.size[0], width=args.size[1], device=args.device, amp=args.amp,
                          train_only=args.train_only)  # fmt: skip
        generated = generation_rate(cfg, args.mix, args.degradation, args.render_size, args.workers, args.batches)
        consumed = consumption_rate(cfg, args.mix, args.degradation, args.render_size, args.steps)
    result = {
        "model": args.model, "device": args.device, "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "batch": args.batch, "crop": list(args.size), "render": list(args.render_size), "mix": str(args.mix),
        "degradation": args.degradation, "workers": args.workers, "amp": args.amp,
        "train_only": ",".join(args.train_only) or None,
        "clips_per_s_generated": round(generated, 3), "clips_per_s_consumed": round(consumed, 3),
        "ratio": round(generated / consumed, 2),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
