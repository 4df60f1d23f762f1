"""What a scene cut costs a streaming network when nobody resets it: two sequences of a validation
split played back to back, the frames after the cut scored with the state carried over the cut
against a reset at the cut (what a client's ``{"type": "reset"}`` does). Validation data only.

    .venv/bin/python -m tools.scene_cut --model most-nss --data data/val-wide --frames 4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from models.checkpoints import load_model
from models.data.format import find_sequences, read_sequence
from models.metrics import psnr
from models.streaming import as_stream, run_stream
from service.backends.torch import TorchBackend


def restored(runner: TorchBackend, frames: np.ndarray) -> list[np.ndarray]:
    """The restored frames (H, W, 3) in 0-255 of one stream (a reset, ``reset = 1``, on its first frame)."""
    outputs = run_stream(runner, as_stream(frames))
    return [np.clip(out["restored"][0].transpose(1, 2, 0) * 255, 0, 255) for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered name or .safetensors")
    parser.add_argument("--data", required=True, help="a validation split; sequences are paired in order")
    parser.add_argument("--frames", type=int, default=4, help="frames of each sequence")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model(args.model)
    runner = TorchBackend(model.float().eval())
    paths, n, rows = find_sequences(args.data), args.frames, []
    for a, b in zip(paths[0::2], paths[1::2], strict=False):
        first, second = read_sequence(a, count=n), read_sequence(b, count=n)
        frames, targets = np.concatenate([first.input, second.input]), np.concatenate([first.target, second.target])
        carried = restored(runner, frames)
        reset = restored(runner, frames[:n]) + restored(runner, frames[n:])  # a new stream at the cut
        rows.append([psnr(carried[t], targets[t])[0] - psnr(reset[t], targets[t])[0] for t in range(n, 2 * n)])
        print(f"{a.name} -> {b.name}: carried minus reset, dB per frame after the cut: {np.round(rows[-1], 2)}")
    print(f"mean over {len(rows)} cuts: {np.round(np.mean(rows, axis=0), 2)}")


if __name__ == "__main__":
    main()
