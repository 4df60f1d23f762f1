"""How much a detail return whose share varies over the frame could gain over the per-frame one.

``--dump``: streams a MOST or R2-D4 checkpoint over a labelled split and keeps, per frame, the input,
the output before the detail return and the target (``.npz`` per sequence). Then, from the dumps,
fits by least squares (exact: each pixel's error is quadratic in its share) a gate read from
per-frame features only (the shipped form, ``models.layers.detail_features``) and one that adds
local features (the local size of what the network removed, the output's local gradient), on the
first sequences, and scores both, clamped to [0, 1], on the last ``--holdout`` ones: PSNR and the
mean share. Training splits fit; run it on training data (``vident synth --split train``).

::

    python -m tools.pixel_gate_probe --model models/checkpoints/most-nss.safetensors --data data/dfit-W32 \\
        --dump runs/probe-most --frames 6
    python -m tools.pixel_gate_probe --dump runs/probe-most --holdout 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.data.format import find_sequences, read_sequence
from models.layers import detail_features, input_matched
from models.streaming import stream_intermediates
from models.training.detail_fit import load_for_detail_fit

RIDGE = 1e-4


def dump(model_path: str, data: Path, out: Path, frames: int) -> None:
    model, _ = load_for_detail_fit(model_path)
    out.mkdir(parents=True, exist_ok=True)
    for path in find_sequences(data):
        seq = read_sequence(path, count=frames)
        rs = []
        with torch.no_grad():
            for _, _, found in stream_intermediates(model, seq.input):
                rs.append(found["restored_before_detail"][0].float().numpy())
        np.savez(out / f"{path.name}.npz", x=seq.input, r=np.stack(rs), y=seq.target)
        print("dumped", path.name, flush=True)


def box(t: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(t, (k // 2,) * 4, mode="replicate"), k, stride=1)


def frame_terms(x: np.ndarray, r: np.ndarray, y: np.ndarray, local: bool) -> tuple[np.ndarray, ...]:
    """Per pixel: the feature rows g (n, K), D = |d|^2, C = <d, r - y>, E0 = |r - y|^2 (summed over channels)."""
    xt = torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32) / 255)
    rt = torch.from_numpy(r[None]).float()
    yt = torch.from_numpy(y.transpose(2, 0, 1)[None].astype(np.float64) / 255)
    matched = input_matched(xt, rt)
    f = detail_features(xt, matched, rt)[0].double()
    d = (matched - rt).double()
    e = rt.double() - yt
    n = d.shape[2] * d.shape[3]
    cols = [torch.ones(n, dtype=torch.float64), f[0].expand(n), f[1].expand(n)]
    if local:
        dl = (d * d).sum(1, keepdim=True)
        local_removed = 0.5 * torch.log(box(dl.float(), 7).double() * 255**2 + 0.25)  # log local std of d
        lum = rt.mean(1, keepdim=True)
        gy = lum[..., 1:, :] - lum[..., :-1, :]
        gx = lum[..., :, 1:] - lum[..., :, :-1]
        grad = F.pad(gy, (0, 0, 0, 1)) ** 2 + F.pad(gx, (0, 1, 0, 0)) ** 2
        local_grad = 0.5 * torch.log(box(grad, 5).double() * 255**2 + 0.25)
        lr_ = local_removed.flatten()
        lg = local_grad.flatten()
        cols += [lr_, lg, lr_ * lr_, lg * lg, lr_ * f[0], lg * f[0]]
    g = torch.stack(cols, dim=1).numpy()
    big_d = (d * d).sum(1).flatten().numpy()
    c = (d * e).sum(1).flatten().numpy()
    e0 = (e * e).sum(1).flatten().numpy()
    return g, big_d, c, e0


def solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    k = gram.shape[0]
    return np.linalg.solve(gram + RIDGE * np.trace(gram) / k * np.eye(k), -rhs)


def analyse(folder: Path, holdout: int, frames: int | None) -> None:
    """``holdout`` 0: fit and score on every sequence (the in-sample room of each form, a diagnostic)."""
    files = sorted(folder.glob("*.npz"))
    fit_files, held_files = (files[:-holdout], files[-holdout:]) if holdout else (files, files)
    results = {}
    for local in (False, True):
        gram, rhs = None, None
        for p in fit_files:
            z = np.load(p)
            for t in range(len(z["r"]) if frames is None else frames):
                g, big_d, c, _ = frame_terms(z["x"][t], z["r"][t], z["y"][t], local)
                gg = (g * big_d[:, None]).T @ g
                gram = gg if gram is None else gram + gg
                rc = (g * c[:, None]).sum(0)
                rhs = rc if rhs is None else rhs + rc
        w = solve(gram, rhs)
        psnrs, base, shares = [], [], []
        for p in held_files:
            z = np.load(p)
            for t in range(len(z["r"]) if frames is None else frames):
                g, big_d, c, e0 = frame_terms(z["x"][t], z["r"][t], z["y"][t], local)
                a = np.clip(g @ w, 0, 1)
                values = 3 * len(e0)
                psnrs.append(10 * np.log10(values / (e0 + 2 * a * c + a * a * big_d).sum()))
                base.append(10 * np.log10(values / e0.sum()))
                shares.append(a.mean())
        results["local" if local else "frame"] = (np.mean(base), np.mean(psnrs), np.mean(shares), w)
    for name, (b, p, s, w) in results.items():
        print(f"{name:6s} held-out PSNR {b:.3f} -> {p:.3f} dB, mean share {s:.3f}, w {np.round(w, 3).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint to dump (with --data)")
    parser.add_argument("--data", type=Path, help="labelled training split to dump")
    parser.add_argument("--dump", type=Path, required=True, help="folder of the dumps")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--holdout", type=int, default=4, help="0: fit and score in sample (a diagnostic)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model is not None:
        dump(args.model, args.data, args.dump, args.frames)
    analyse(args.dump, args.holdout, None)


if __name__ == "__main__":
    main()
