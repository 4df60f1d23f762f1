"""Does the homography head learn, and how fast? Two probes on fresh synthetic clips.

``--probe most``: a registered MOST network trained on the homography loss alone (the other task
weights 0), so nothing else competes for the gradient; prints the training MACE at scale 3 against
the identity's on the same batches every 25 steps.

``--probe raw``: the head's regressor alone (conv-BN-ReLU-maxpool blocks, pooling, linear to the
4-corner offsets, 4-point DLT) on a pair of frames averaged down to scale 3, to see what the
regression itself needs when it is given the images directly.

Both use the MACE loss of training. Results and what they mean are in docs/experiments.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from models.data.dataset import SyntheticStream
from models.data.synth import SynthConfig
from models.layers import identity_homography, mean_corner_error, offsets_to_homography, rescale_homography
from models.training.balancing import LinearScalarization
from models.training.losses import homography_at_scale, mace_loss
from models.training.run import _to_batch
from models.training.trainer import TrainConfig, Trainer


def _report(step: int, window: list[tuple[float, float]], start: float) -> None:
    """Prints the mean MACE of the model and of the identity over the last steps, and empties the window."""
    model_mace, identity_mace = (sum(v) / len(v) for v in zip(*window, strict=True))
    seconds = time.perf_counter() - start
    print(f"step {step}: MACE at scale 3 {model_mace:.3f} px, identity {identity_mace:.3f} px, "
          f"ratio {model_mace / identity_mace:.3f} ({seconds:.0f} s)", flush=True)  # fmt: skip
    window.clear()


def probe_most(args: argparse.Namespace, loader: DataLoader) -> None:
    cfg = TrainConfig(model=args.model, out=Path(args.out), steps=args.steps, batch=args.batch,
                      clip_length=args.clip_length, height=args.height, width=args.width, lr=args.lr,
                      warmup=20, grad_clip=100.0)  # fmt: skip
    trainer = Trainer(cfg, iter(()))
    trainer.balancer = LinearScalarization(trainer.balancer.tasks, {"restoration": 0.0, "segmentation": 0.0,
                                                                    "homography": 1.0})  # fmt: skip
    h3, w3 = args.height // 4, args.width // 4
    window: list[tuple[float, float]] = []
    start = time.perf_counter()
    for step, sample in zip(range(1, args.steps + 1), loader, strict=False):
        batch = _to_batch(sample)
        logs = trainer.train_step(batch)
        t = batch.homography.shape[1]
        identity = sum(
            float(mace_loss(identity_homography(batch.homography.shape[0], batch.homography[:, k]),
                            homography_at_scale(batch.homography[:, k], 3), h3, w3))  # fmt: skip
            for k in range(t)
        ) / t
        window.append((logs["loss_homography"], identity))
        if step % 25 == 0:
            _report(step, window, start)


def probe_raw(args: argparse.Namespace, loader: DataLoader) -> None:
    def block(i: int, o: int) -> list[nn.Module]:
        conv = nn.Conv2d(i, o, 3, padding=1, bias=False)
        return [conv, nn.BatchNorm2d(o), nn.ReLU(True), nn.MaxPool2d(2, ceil_mode=True)]

    h3, w3 = args.height // 4, args.width // 4
    net = nn.Sequential(*block(6, 64), *block(64, 128), *block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(128, 8))  # fmt: skip
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    optimizer = torch.optim.Adam(net.parameters(), args.lr)
    window: list[tuple[float, float]] = []
    start = time.perf_counter()
    for step, sample in zip(range(1, args.steps + 1), loader, strict=False):
        x = sample[args.source]  # float32 in [0, 1], as SyntheticStream yields it
        pair = torch.cat((F.avg_pool2d(x[:, 1], 4), F.avg_pool2d(x[:, 0], 4)), dim=1)
        truth = rescale_homography(sample["homography"][:, 1].float(), 0.25)
        estimate = offsets_to_homography(net(pair), float(h3), float(w3))
        loss = mean_corner_error(estimate, truth, h3, w3).mean()
        identity = mean_corner_error(identity_homography(truth.shape[0], truth), truth, h3, w3).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        window.append((float(loss.detach()), float(identity)))
        if step % 25 == 0:
            _report(step, window, start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", choices=("most", "raw"), required=True)
    parser.add_argument("--model", default="most-nss", help="--probe most: registered MOST model")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--clip-length", type=int, default=3)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise", default="mixed")
    parser.add_argument("--motion", type=float, default=1.0, help="camera speed multiplier of the generator")
    parser.add_argument("--source", choices=("input", "target"), default="input", help="--probe raw: which frames")
    parser.add_argument("--out", default="/tmp/homography-probe", help="--probe most: scratch run folder")
    args = parser.parse_args()
    torch.manual_seed(0)
    frames = args.clip_length if args.probe == "most" else 2
    synth = SynthConfig(height=args.height, width=args.width, frames=frames, noise=args.noise, motion=args.motion)
    loader = DataLoader(SyntheticStream(synth, seed=0, split="train"), batch_size=args.batch, num_workers=1)
    (probe_most if args.probe == "most" else probe_raw)(args, loader)


if __name__ == "__main__":
    main()
