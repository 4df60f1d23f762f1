"""Can the scale-1 restoration head of a MOST checkpoint see the noise it has to remove?

The restored frame is ``B^1 + head(...)``: to remove the input's noise the head must predict it,
pixel for pixel, from what it reads. This fits a linear probe, a 3x3 neighbourhood of the head's
inputs to ``target - B^1`` by least squares, on frames of one sequence and applies it to another:

- ``features``: the decoded features and the upsampled coarser restoration and mask (what the
  heads of checkpoints without ``restoration_input`` read);
- ``features + B^1``: the same with the input frame added (what the heads read with ``restoration_input``).

A probe that cannot lower the high-frequency error means the noise is not in those inputs in a
form a head can use. Also printed: how much of the model's own output high frequencies follow the
input's (correlation of the high-pass parts; near 1 = the noise passes through)::

    python -m tools.restoration_probe --model most-nss --data data/test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import Tensor

from models.checkpoints import load_model
from models.data.format import find_sequences, read_sequence
from models.most import MostNet
from models.training.filter_fit import scale1_head_stream, target_chw


def _high_pass(x: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """(C, H, W) minus its Gaussian blur: noise and fine texture."""
    return x - gaussian_filter(x, (0, sigma, sigma))


def head_inputs(model: MostNet, frames: np.ndarray) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per frame (streamed, state carried): the scale-1 head's features (without B^1), B^1 and what
    the model adds to B^1 (head and input filter), each (1, C, H, W)."""
    out = []
    for features, image, head_out in scale1_head_stream(model, frames):
        with torch.no_grad():  # "the head's output" is all the model adds to B^1, its input filter included
            added = head_out + (model.restoration_filters["1"](image) if model.cfg.restoration_filter else 0)
        out.append((features, image, added))
    return out


def _design(features: Tensor, image: Tensor, with_image: bool) -> np.ndarray:
    z = torch.cat((features, image), dim=1) if with_image else features
    cols = F.unfold(z, 3, padding=1)[0].T  # (H*W, C*9)
    return torch.cat((cols, torch.ones(cols.shape[0], 1)), dim=1).numpy().astype(np.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="most-nss", help="registered name or checkpoint .safetensors")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--fit-sequence", type=int, default=0, help="index of the sequence the probe is fitted on")
    p.add_argument("--test-sequence", type=int, default=1, help="index of the sequence it is measured on")
    p.add_argument("--frames", type=int, default=4, help="frames streamed per sequence; all but the first are used")
    p.add_argument("--subsample", type=int, default=3, help="fit on every Nth pixel (memory)")
    args = p.parse_args()
    model, checkpoint = load_model(args.model)
    if not isinstance(model, MostNet) or 1 not in model.structure.restoration:
        raise SystemExit(f"{args.model}: needs a MOST network with a scale-1 restoration head")
    model = model.float().eval()
    sequences = find_sequences(args.data)
    fit_seq, test_seq = (read_sequence(sequences[i]) for i in (args.fit_sequence, args.test_sequence))
    fit, test = head_inputs(model, fit_seq.input[: args.frames]), head_inputs(model, test_seq.input[: args.frames])
    print(f"{args.model} ({checkpoint}, restoration_input={model.cfg.restoration_input}) on {args.data}")
    print(f"fit on {sequences[args.fit_sequence].name}, measured on {sequences[args.test_sequence].name}, "
          f"frames 1..{args.frames - 1}; errors are RMS in 0-255 units")  # fmt: skip
    print("| head input | hf error | psnr |")
    print("|---|---|---|")

    def scores(restored: np.ndarray, t: int) -> tuple[float, float]:
        err = np.clip(restored, 0, 1) - target_chw(test_seq, t)
        return float(np.sqrt(np.mean(_high_pass(err) ** 2)) * 255), float(-10 * np.log10(np.mean(err**2)))

    frames = range(1, args.frames)
    height, width = test[0][1].shape[-2:]

    def row(name: str, measured: list[tuple[float, float]]) -> None:
        hf, db = np.mean(measured, axis=0)
        print(f"| {name} | {hf:.2f} | {db:.2f} |")

    row(
        "the model's own output (head and input filter)",
        [scores((image + out)[0].double().numpy(), t) for t, (_, image, out) in enumerate(test) if t in frames],
    )
    for with_image in (False, True):
        design = np.concatenate([_design(f, b, with_image)[:: args.subsample] for f, b, _ in (fit[t] for t in frames)])
        labels = np.concatenate([
            (target_chw(fit_seq, t) - fit[t][1][0].double().numpy()).reshape(3, -1).T[:: args.subsample] for t in frames
        ])  # fmt: skip
        weights = np.linalg.lstsq(design, labels, rcond=None)[0]
        probed = []
        for t in frames:
            features, image, _ = test[t]
            residual = (_design(features, image, with_image) @ weights).T.reshape(3, height, width)
            probed.append(scores(image[0].double().numpy() + residual, t))
        row(f"linear probe on features{' + B^1' if with_image else ''}", probed)
    outputs = np.stack([(image + out)[0].numpy() for _, image, out in test[1:]])
    inputs = np.stack([image[0].numpy() for _, image, _ in test[1:]])
    corr = np.corrcoef(np.stack([_high_pass(o) for o in outputs]).ravel(),
                       np.stack([_high_pass(i) for i in inputs]).ravel())[0, 1]  # fmt: skip
    print(f"correlation of the output's high frequencies with the input's: {corr:.3f}")


if __name__ == "__main__":
    main()
