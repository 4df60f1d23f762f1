"""r2-d4's two stages against each other on a data set, per content kind: its restored frame R and its
denoised, still blurry R', raw and colour-aligned PSNR, and the least-squares ``alpha`` of
``R + alpha (R' - R)`` against the target (negative: the deblurring stage should go further, positive:
back towards R'). Run it on a training split: it says whether the deblurring stage helps on content
the network was trained on, apart from what an evaluation split shows.

::

    python -m tools.r2d4_stages --data data/hfit-F --sequences 80 --frames 6
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from models.checkpoints import load_model
from models.data.format import find_sequences, read_sequence
from models.metrics import colour_aligned_psnr, psnr
from models.streaming import ModelRunner, as_stream, run_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="r2-d4", help="registered name or r2-d4 checkpoint")
    parser.add_argument("--data", required=True, help="a split in the on-disk format")
    parser.add_argument("--sequences", type=int, default=16, help="the first N sequences")
    parser.add_argument("--frames", type=int, default=6, help="the first N frames of each")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model(args.model)
    runner = ModelRunner(model)
    rows: dict[str, dict[str, list[float]]] = {}
    sums: dict[str, list[float]] = {}
    for folder in find_sequences(args.data)[: args.sequences]:
        seq = read_sequence(folder, 0, args.frames)
        content = str(seq.meta.get("content", "dental"))
        row = rows.setdefault(content, {"R": [], "R'": [], "R c.a.": [], "R' c.a.": []})
        total = sums.setdefault(content, [0.0, 0.0])
        for outputs, target in zip(run_stream(runner, as_stream(seq.input)), seq.target, strict=True):
            target = target.astype(np.float64)
            restored, denoised = (np.clip(outputs[k][0].transpose(1, 2, 0), 0, 1).astype(np.float64) * 255
                                  for k in ("restored", "denoised"))  # fmt: skip
            row["R"].append(float(psnr(restored, target)[0]))
            row["R'"].append(float(psnr(denoised, target)[0]))
            row["R c.a."].append(float(colour_aligned_psnr(restored, target)[0]))
            row["R' c.a."].append(float(colour_aligned_psnr(denoised, target)[0]))
            step, residual = (denoised - restored).ravel(), (target - restored).ravel()
            total[0] += float(step @ residual)
            total[1] += float(step @ step)
    for content, row in sorted(rows.items()):
        means = {k: round(float(np.mean(v)), 2) for k, v in row.items()}
        alpha = sums[content][0] / max(sums[content][1], 1e-12)
        print(json.dumps({"content": content, "frames": len(row["R"]), **means, "alpha": round(alpha, 3)}))


if __name__ == "__main__":
    main()
