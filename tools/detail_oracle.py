"""How much a per-frame blend of the output with its input could gain, and what predicts the share.

Per frame of a labelled split: the colour-aligned PSNR (``models.metrics.colour_aligned_psnr``) of the
model's restored frame ``r`` (before its detail return, if it has one), of the input ``x`` and of the
best blend ``a x + (1 - a) r`` over ``a`` = 0, 0.1, ..., 1 (an oracle: the target chooses ``a``), beside
the input's noise level (Immerkaer's estimate, ``models.layers.detail_features``) and the sequence's
codec. Printed per sequence (means over its frames) and for the split. It measures the room a detail
return has (docs/models.md, "Why a per-frame detail return"); run it on validation splits, never the
test or real-content split, when it informs a choice.

::

    python -m tools.detail_oracle --model models/checkpoints/most-nss.safetensors --data data/val-unrelated
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from models.data.format import find_sequences, read_sequence
from models.layers import detail_features
from models.metrics import colour_aligned_psnr
from models.streaming import stream_intermediates
from models.training.colour_fit import load_for_colour_fit

SHARES = np.linspace(0.0, 1.0, 11)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MOST or R2-D4 checkpoint or shipped name")
    parser.add_argument("--data", type=Path, required=True, help="a labelled split")
    parser.add_argument("--frames", type=int, default=None, help="first N frames of each sequence (default all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_for_colour_fit(args.model)
    if getattr(model, "detail_gate", None) is not None:  # the room is measured on the output before it
        with torch.no_grad():
            model.detail_gate.weight.zero_()
            model.detail_gate.bias.zero_()
    totals: list[tuple[float, float, float]] = []
    for path in find_sequences(args.data):
        seq = read_sequence(path, count=args.frames)
        rows = []
        with torch.no_grad():
            for t, (frame, step, _) in enumerate(stream_intermediates(model, seq.input)):
                target = seq.target[t].astype(np.float64)
                x = frame.double()
                r = (step["restored"] if isinstance(step, dict) else step.final_restored).double()  # R2-D4 or MOST

                def aligned(image: torch.Tensor, target: np.ndarray = target) -> float:
                    array = (image.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
                    return float(colour_aligned_psnr(array, target)[0])

                blends = [aligned(a * x + (1 - a) * r) for a in SHARES]
                best = int(np.argmax(blends))
                noise = float(detail_features(frame, frame, frame)[0, 0].exp())
                rows.append((aligned(r), aligned(x), blends[best], SHARES[best], noise))
        mean = np.mean(rows, axis=0)
        degradation = seq.meta.get("degradation", {})
        codec = f"{degradation.get('codec', '-')} {degradation.get('quality', '')}".strip()
        print(f"{path.name}  noise {mean[4]:5.2f}  {codec:10s}  output {mean[0]:.2f}  input {mean[1]:.2f}  "
              f"best blend {mean[2]:.2f} (share {mean[3]:.2f})")  # fmt: skip
        totals += [(r[0], r[1], r[2]) for r in rows]
    output, inp, best = np.mean(totals, axis=0)
    print(f"{len(totals)} frames: colour-aligned PSNR output {output:.2f}, input {inp:.2f}, best blend {best:.2f} dB")


if __name__ == "__main__":
    main()
