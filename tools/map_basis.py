"""Which per-frame output map generalises: the shipped 3x4 colour map against maps that also read the
input frame (so a frame the network over-processes can lean back towards it) or the squared output (a
tone curve), and against features that add the size of what the network removed (a noise level).

Every variant is ``r + A(f) b(r, x)`` with ``r`` the restored frame before the network's map, ``x``
the input, ``b`` the per-pixel basis and ``A`` linear in ``[f; 1]``: exact least squares over a
training split (the last ``--holdout`` sequences choose the ridge), then PSNR and colour-aligned PSNR
on validation splits. Nothing here is fitted on a test or evaluation split.

    .venv/bin/python -m tools.map_basis --model most-nss --fit data/cfit-K --sequences 40 \\
        --val data/val-wide data/val-recipe
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.data.format import find_sequences, read_sequence
from models.metrics import colour_aligned_psnr, psnr
from models.streaming import stream_intermediates
from models.training.colour_fit import RIDGES, load_for_colour_fit
from models.training.filter_fit import target_chw

BASES = {"r": [0, 1, 2, 9], "r+x": [0, 1, 2, 3, 4, 5, 9], "r+r2": [0, 1, 2, 6, 7, 8, 9],
         "r+x+r2": list(range(10))}  # fmt: skip
FEATURES = {"f15": list(range(15)) + [18], "f15+noise": list(range(19))}


def frames_of(model: torch.nn.Module, path: Path, frames: int | None) -> list[tuple[np.ndarray, ...]]:
    """Per frame: features (19,) [the map's 15, then the std of input minus output per channel], the
    basis (10, P) [r, x, r^2, 1], the residual target - r (3, P), and the target (3, H, W)."""
    seq = read_sequence(path, count=frames)
    out = []
    frames = len(seq.input)
    with torch.no_grad():
        for t, (frame, _, found) in enumerate(stream_intermediates(model, seq.input[:frames])):
            r = found["restored_before_colour"][0].double().numpy()
            x = frame[0].double().numpy()
            noise = (x - r).reshape(3, -1).std(axis=1)
            f = np.concatenate((found["colour_features"][0].double().numpy(), noise, [1.0]))
            rr = r.reshape(3, -1)
            basis = np.concatenate((rr, x.reshape(3, -1), rr * rr, np.ones((1, rr.shape[1]))))
            target = target_chw(seq, t)
            out.append((f, basis, target.reshape(3, -1) - rr, target))
    return out


def index(bsub: list[int], fsub: list[int]) -> np.ndarray:
    return np.array([j * 19 + k for j in bsub for k in fsub])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--fit", type=Path, required=True, help="training split")
    parser.add_argument("--sequences", type=int, default=40, help="first N sequences of --fit")
    parser.add_argument("--holdout", type=int, default=4)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--val", type=Path, nargs="+", required=True, help="validation splits")
    parser.add_argument("--val-frames", type=int, default=None, help="first N frames of each (default all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_for_colour_fit(args.model)
    paths = find_sequences(args.fit)[: args.sequences]
    grams, crosses = [], []
    for p in tqdm(paths, desc="fit"):
        per = []
        for f, basis, resid, _ in frames_of(model, p, args.frames):
            cross = np.einsum("jp,cp,k->jkc", basis, resid, f).reshape(-1, 3)
            per.append((np.kron(basis @ basis.T, np.outer(f, f)), cross))
        grams.append(sum(g for g, _ in per))
        crosses.append(sum(c for _, c in per))
    val = {v: [fr for p in find_sequences(v) for fr in frames_of(model, p, args.val_frames)] for v in args.val}
    held = [fr for p in find_sequences(args.fit)[args.sequences : args.sequences + args.holdout]
            for fr in frames_of(model, p, args.frames)]  # fmt: skip
    fit_gram, fit_cross = sum(grams), sum(crosses)

    def apply(theta: np.ndarray, bsub: list[int], fsub: list[int], fr: tuple) -> np.ndarray:
        f, basis, _, target = fr
        coeff = theta.reshape(len(bsub), len(fsub), 3)  # A[c, j] = sum_k theta[j, k, c] f_k
        a = np.einsum("jkc,k->cj", coeff, f[fsub])
        out = basis[[0, 1, 2]] + a @ basis[bsub]
        return np.clip(out.reshape(target.shape), 0, 1)

    def scores(frames: list, fn) -> tuple[float, float]:
        outs = [(fn(fr) * 255).transpose(1, 2, 0) for fr in frames]
        tgts = [(fr[3] * 255).transpose(1, 2, 0) for fr in frames]
        return (float(np.mean([psnr(o, t)[0] for o, t in zip(outs, tgts, strict=True)])),
                float(np.mean([colour_aligned_psnr(o, t)[0] for o, t in zip(outs, tgts, strict=True)])))  # fmt: skip

    header = "| basis | features | ridge | held-out | " + " | ".join(f"{v.name} PSNR / c.a." for v in args.val) + " |"
    print(header)
    base = {v: scores(val[v], lambda fr: np.clip(fr[1][:3].reshape(fr[3].shape), 0, 1)) for v in args.val}
    print("| none | - | - | " + f"{scores(held, lambda fr: np.clip(fr[1][:3].reshape(fr[3].shape), 0, 1))[0]:.2f} | "
          + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in base.values()) + " |", flush=True)  # fmt: skip
    for (bname, bsub), (fname, fsub) in itertools.product(BASES.items(), FEATURES.items()):
        idx = index(bsub, fsub)
        g, c = fit_gram[np.ix_(idx, idx)], fit_cross[idx]
        best = None
        for ridge in RIDGES:
            theta = np.linalg.solve(g + ridge * np.trace(g) / len(idx) * np.eye(len(idx)), c)
            h = scores(held, partial(apply, theta, bsub, fsub))[0]
            if best is None or h > best[0]:
                best = (h, ridge, theta)
        h, ridge, theta = best  # type: ignore[misc]
        vals = [scores(val[v], partial(apply, theta, bsub, fsub)) for v in args.val]
        cells = " | ".join(f"{a:.2f} / {b:.2f}" for a, b in vals)
        print(f"| {bname} | {fname} | {ridge:g} | {h:.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
