"""Which part of the camera motion a MOST checkpoint's homography gets right: translation or the rest.

Streams the model over the sequences of a data set and compares, per frame pair, the corner
displacements ``d = H(c) - c`` of the four image corners ``c`` under the estimated and the true
``H_{t-1->t}``. Each displacement splits into its mean over the four corners (the translation
part) and what is left (rotation, zoom, perspective: the corners move apart). MACE is the mean
corner distance in pixels, so:

- ``identity``: MACE of predicting no motion; ``model``: MACE of the estimate; ``ratio`` = model /
  identity (the training target is at most 0.5);
- ``translation`` / ``rest``: the size of the two parts of the true motion (MACE of a perfect
  translation-only estimate = ``rest``, so ``rest / identity`` is the best ratio a translation-only
  estimator can reach);
- ``model err translation`` / ``model err rest``: the estimate's error on each part. An error on the
  rest as large as the rest itself means that part was not estimated at all;
- ``slope x`` / ``slope y``: least-squares slope of estimated on true translation (1 = right size,
  below 1 = motion underestimated).

``--crop HxW`` runs on the centre crop of every frame instead (the homographies conjugated by the
crop's offset), so the same content and pixel motion can be measured at a smaller frame size.

::

    python -m tools.homography_error --model most-nss --data data/test
    python -m tools.homography_error --model most-nss --data data/test --crop 128x160
"""

from __future__ import annotations

import numpy as np
import torch

from models.data.format import find_sequences, read_sequence
from models.data.synth import crop_sequence
from models.layers import apply_homography, image_corners
from models.streaming import as_stream, stream_steps
from tools.restoration_error import data_benchmark


def corner_displacements(h: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, 3, 3) homographies -> (n, 4, 2) displacements of the image corners, pixels (float64)."""
    hs = torch.as_tensor(np.asarray(h, np.float64))
    corners = image_corners(height, width, hs)  # the 4-point parametrisation's corners, (4, 2)
    return (apply_homography(hs, corners) - corners).numpy()


def decompose(estimated: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """The figures of the module docstring from (n, 4, 2) estimated and true corner displacements."""

    def size(d: np.ndarray) -> float:
        return float(np.linalg.norm(d, axis=-1).mean())

    true_t, est_t = true.mean(1, keepdims=True), estimated.mean(1, keepdims=True)
    identity = size(true)
    model = size(estimated - true)
    slopes = [float(np.polyfit(true_t[:, 0, a], est_t[:, 0, a], 1)[0]) for a in range(2)]
    return {
        "pairs": float(len(true)),
        "identity": identity,
        "model": model,
        "ratio": model / identity,
        "translation": size(np.broadcast_to(true_t, true.shape)),
        "rest": size(true - true_t),
        "model err translation": size(np.broadcast_to(est_t - true_t, true.shape)),
        "model err rest": size((estimated - est_t) - (true - true_t)),
        "slope x": slopes[0],
        "slope y": slopes[1],
    }


def main() -> None:
    args, model, backend = data_benchmark(__doc__ or "", sequences=8, crop=True)
    estimated, true = [], []
    for folder in find_sequences(args.data)[: args.sequences]:
        seq = read_sequence(folder)
        if args.crop is not None:
            height, width = args.crop
            top, left = (seq.input.shape[1] - height) // 2, (seq.input.shape[2] - width) // 2
            seq = crop_sequence(seq, top, left, height, width)
        height, width = seq.input.shape[1:3]
        steps = list(stream_steps(backend, as_stream(seq.input)))[1:]  # frame 0: no predecessor
        estimated.append(corner_displacements(np.concatenate([o["homography"] for _, o in steps]), height, width))
        true.append(corner_displacements(seq.homographies[1:], height, width))
    figures = decompose(np.concatenate(estimated), np.concatenate(true))
    print(f"{args.model} ({args.checkpoint}, homography pooling {model.cfg.homography_pool}) on {args.data}"
          + (f", centre crop {args.crop[0]}x{args.crop[1]}" if args.crop else ""))
    print("| " + " | ".join(figures) + " |")
    print("|" + "---|" * len(figures))
    print("| " + " | ".join(f"{v:.0f}" if k == "pairs" else f"{v:.3f}" for k, v in figures.items()) + " |")


if __name__ == "__main__":
    main()
