"""Where a MOST checkpoint's restoration error lies: colour, low frequencies or leftover noise.

Runs the model in streaming mode over the first sequences of a data set and splits the error of the
restored frames against the targets per sequence:

- ``psnr`` of the output and of the input;
- ``psnr colour-fit``: after the best per-sequence affine map per channel from output to target
  (least squares), i.e. what a perfect global colour correction would add;
- ``psnr low-pass``: both images blurred by a Gaussian of sigma 3 px, i.e. the error of the
  colour and the coarse structure alone;
- ``hf rms output / target``: RMS of the high-pass part (image minus its blur) of output and target.
  An output with more high-frequency energy than its target still carries noise.

::

    python -m tools.restoration_error --model most-nss --data data/test --sequences 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from torch import nn

from models.checkpoints import load_model
from models.data.format import find_sequences, read_sequence
from models.metrics import psnr
from models.streaming import as_stream, stream_steps
from service.backends.torch import TorchBackend


def _low_pass(frames: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    return np.stack([gaussian_filter(f, (sigma, sigma, 0)) for f in frames])


def _colour_fit(out: np.ndarray, target: np.ndarray) -> np.ndarray:
    fitted = np.empty_like(out)
    for c in range(3):
        design = np.stack([out[..., c].ravel(), np.ones(out[..., c].size)], 1)
        gain, offset = np.linalg.lstsq(design, target[..., c].ravel(), rcond=None)[0]
        fitted[..., c] = out[..., c] * gain + offset
    return fitted


def restored_frames(backend: TorchBackend, frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, H, W, 3) float in 0..255, streaming with the state carried."""
    return np.stack([np.clip(outputs["restored"][0], 0, 1).transpose(1, 2, 0) * 255
                     for _, outputs in stream_steps(backend, as_stream(frames))])  # fmt: skip


def data_benchmark(
    description: str, sequences: int, crop: bool = False, frames: bool = False
) -> tuple[argparse.Namespace, nn.Module, TorchBackend]:
    """The command line the data-set diagnostics share (--model, --data, --sequences), and the model
    run on torch fp32, the reference every backend is checked against."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="most-nss", help="registered name or checkpoint .safetensors")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--sequences", type=int, default=sequences)
    if crop:
        from service.commands.common import frame_size

        p.add_argument("--crop", type=frame_size, help="HxW: measure on the centre crop of every frame")
    if frames:
        p.add_argument("--frames", type=int, default=6, help="only the first N frames of each sequence")
    args = p.parse_args()
    model, args.checkpoint = load_model(args.model)
    return args, model, TorchBackend(model.eval()).load()


def main() -> None:
    args, _, backend = data_benchmark(__doc__ or "", sequences=4)
    print(f"{args.model} ({args.checkpoint}) on {args.data}")
    print("| sequence | psnr input | psnr | psnr colour-fit | psnr low-pass | hf rms output | hf rms target |")
    print("|---|---|---|---|---|---|---|")
    for folder in find_sequences(args.data)[: args.sequences]:
        seq = read_sequence(folder)
        target = seq.target.astype(np.float32)
        out = restored_frames(backend, seq.input)
        low_out, low_target = _low_pass(out), _low_pass(target)
        row = (
            psnr(seq.input.astype(np.float32), target).mean(),
            psnr(out, target).mean(),
            psnr(_colour_fit(out, target), target).mean(),
            psnr(low_out, low_target).mean(),
            np.sqrt(np.mean((out - low_out) ** 2)),
            np.sqrt(np.mean((target - low_target) ** 2)),
        )
        print(f"| {folder.name} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
