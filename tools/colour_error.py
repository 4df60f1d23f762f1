"""How much of a restoration's colour-aligned error is colour mapping and how much is structure.

The colour-aligned PSNR (``models.metrics.colour_aligned_psnr``) forgives a per-channel gain and
offset, the part of a camera's colour a single frame cannot determine. A restoration that mixes
channels (a saturation change) or bends the tone curve is still penalised for it. Per frame, this
fits three colour models of growing freedom from a frame to its target by least squares and reports
the PSNR after each, for the input, the model's output and the NL-means comparator:

- ``ca``: per-channel gain and offset, the metric's map; clipped to 0-255 like the other two, so it
  reads up to a few tenths of a dB above ``colour_aligned_psnr`` where the fit overshoots;
- ``3x4``: any affine map of RGB (cross-channel: saturation, white balance, colour mixing);
- ``quad``: a full quadratic in RGB (a tone curve and colour mixing together).

What is left after ``quad`` is structure: noise, blur and artefacts, which no colour map can undo.
Each row also shows the sequence's camera from its ``meta.json`` (shot and read noise, exposure in
sub-frames, defocus radius, codec and quality) so the losses can be read against the degradations.

::

    python -m tools.colour_error --model most-nss --data data/val-wide --sequences 8 --frames 6
"""

from __future__ import annotations

import json

import numpy as np

from models.data.format import find_sequences, read_sequence
from service.evaluation import nl_means
from tools.restoration_error import data_benchmark, restored_frames

KINDS = ("ca", "3x4", "quad")


def _design(x: np.ndarray, kind: str) -> np.ndarray:
    one = np.ones((len(x), 1))
    if kind == "3x4":
        return np.concatenate((x, one), 1)
    r, g, b = x[:, :1], x[:, 1:2], x[:, 2:]
    return np.concatenate((x, x * x, r * g, r * b, g * b, one), 1)


def fitted_psnr(frame: np.ndarray, target: np.ndarray, kind: str) -> float:
    """PSNR (0-255) of ``frame`` after the least-squares colour map of ``kind`` onto ``target``."""
    x = frame.reshape(-1, 3).astype(np.float64)
    y = target.reshape(-1, 3).astype(np.float64)
    if kind == "ca":
        fitted = np.empty_like(y)
        for c in range(3):
            design = np.stack((x[:, c], np.ones(len(x))), 1)
            fitted[:, c] = design @ np.linalg.lstsq(design, y[:, c], rcond=None)[0]
    else:
        design = _design(x, kind)
        fitted = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    mse = float(((np.clip(fitted, 0, 255) - y) ** 2).mean())
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def camera_text(meta: dict) -> str:
    d = meta.get("degradation") or {}
    if not d:
        return f"recipe ({meta.get('noise', '?')} noise)"
    return (f"a {d['noise_a']:.2f}, sigma {d['noise_sigma']:.2f}, exp {d['exposure']}, defocus {d['defocus']:.1f}, "
            f"{d['codec']}{' ' + str(d['quality']) if d['codec'] != 'none' else ''}")  # fmt: skip


def main() -> None:
    args, _, backend = data_benchmark(__doc__ or "", sequences=8, frames=True)
    print(f"{args.model} ({args.checkpoint}) on {args.data}, {args.frames} frames per sequence")
    methods = ("input", "model", "NL-means")
    header = " | ".join(f"{m} {k}" for m in methods for k in KINDS)
    print(f"| sequence | content | camera | {header} |\n|---|---|---|" + "---|" * 9)
    totals: dict[tuple[str, str], list[float]] = {}
    for folder in find_sequences(args.data)[: args.sequences]:
        seq = read_sequence(folder)
        meta = json.loads((folder / "meta.json").read_text())
        frames, targets = seq.input[: args.frames], seq.target[: args.frames]
        outputs = {"input": frames.astype(np.float32), "model": restored_frames(backend, frames),
                   "NL-means": np.stack([nl_means(f) for f in frames]).astype(np.float32)}  # fmt: skip
        cells = []
        for method in methods:
            for kind in KINDS:
                value = float(np.mean([fitted_psnr(o, t, kind) for o, t in zip(outputs[method], targets, strict=True)]))
                totals.setdefault((method, kind), []).append(value)
                cells.append(f"{value:.2f}")
        content = meta.get("content", "dental")
        print(f"| {folder.name} | {content} | {camera_text(meta)} | {' | '.join(cells)} |", flush=True)
    means = " | ".join(f"**{np.mean(totals[m, k]):.2f}**" for m in methods for k in KINDS)
    print(f"| mean | | | {means} |")


if __name__ == "__main__":
    main()
