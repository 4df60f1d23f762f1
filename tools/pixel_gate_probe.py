"""How much a detail return whose share varies over the frame could gain over the per-frame one.

``--dump``: streams a MOST or R2-D4 checkpoint over a labelled split and keeps, per frame, the input,
the output before the detail return and the target (``.npz`` per sequence). Then, from the dumps,
fits by least squares (exact: each pixel's error is quadratic in its share) a gate read from
per-frame features only (the shipped form, ``models.layers.detail_features``) and one that adds
local features (the local size of what the network removed, the output's local gradient), on the
first sequences, and scores both, clamped to [0, 1], on the last ``--holdout`` ones: PSNR and the
mean share. Training splits fit; run it on training data (``vident synth --split train``).

``--bands SIGMA``: instead, a per-frame gate with two shares, one for what the network removed
below a Gaussian of SIGMA pixels and one for the rest (texture against grain), fitted on one dump
folder and scored on another (``--score``), beside the one-share form; ``--aligned`` scores after
mapping the output onto the target's colours per channel (gain and offset fitted to the output
before the gate, the colour-aligned PSNR's map, held for the blend: an approximation).

::

    python -m tools.pixel_gate_probe --model models/checkpoints/most-nss.safetensors --data data/dfit-W32 \\
        --dump runs/probe-most --frames 6
    python -m tools.pixel_gate_probe --dump runs/probe-most --holdout 4
    python -m tools.pixel_gate_probe --dump runs/probe-most --bands 2 --score runs/probe-most-vu --aligned
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


def frame_tensors(x: np.ndarray, r: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, ...]:
    """One dumped frame as the gate sees it: the output r, the target y (float64), what the network
    removed d = x~ - r, and the two per-frame features."""
    xt = torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32) / 255)
    rt = torch.from_numpy(r[None]).float()
    yt = torch.from_numpy(y.transpose(2, 0, 1)[None].astype(np.float64) / 255)
    matched = input_matched(xt, rt)
    return rt, yt, (matched - rt).double(), detail_features(xt, matched, rt)[0].double()


def frame_terms(x: np.ndarray, r: np.ndarray, y: np.ndarray, local: bool) -> tuple[np.ndarray, ...]:
    """Per pixel: the feature rows g (n, K), D = |d|^2, C = <d, r - y>, E0 = |r - y|^2 (summed over channels)."""
    rt, yt, d, f = frame_tensors(x, r, y)
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


def gaussian(t: torch.Tensor, sigma: float) -> torch.Tensor:
    k = int(3 * sigma) * 2 + 1
    taps = torch.exp(-((torch.arange(k, dtype=t.dtype) - k // 2) ** 2) / (2 * sigma * sigma))
    taps = (taps / taps.sum()).to(t.dtype)
    c = t.shape[1]
    t = F.conv2d(F.pad(t, (k // 2,) * 4, mode="replicate"), taps.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(t, taps.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def band_terms(folder: Path, sigma: float, aligned: bool, holdout: int) -> list[tuple]:
    """Per frame: features [1, f], pixel count, |e|^2, and the 2x2 Gram and cross terms of (d_low, d_high)."""
    rows = []
    files = sorted(folder.glob("*.npz"))
    for p in files[: len(files) - holdout]:
        z = np.load(p)
        for t in range(len(z["r"])):
            rt, yt, d, features = frame_tensors(z["x"][t], z["r"][t], z["y"][t])
            f = np.concatenate(([1.0], features.flatten().numpy()))
            r = rt.double()
            if aligned:
                rr, yy = r[0].reshape(3, -1), yt[0].reshape(3, -1)
                cov = ((rr - rr.mean(1, keepdim=True)) * (yy - yy.mean(1, keepdim=True))).mean(1)
                gain = (cov / rr.var(1, unbiased=False).clamp_min(1e-8)).view(1, 3, 1, 1)
                r = gain * r + (yy.mean(1) - gain.flatten() * rr.mean(1)).view(1, 3, 1, 1)
                d = gain * d
            e = r - yt
            low = gaussian(d, sigma)
            parts = (low, d - low)
            gram = np.array([[float((a * b).sum()) for b in parts] for a in parts])
            cross = np.array([float((a * e).sum()) for a in parts])
            rows.append((f, e.numel(), float((e * e).sum()), gram, cross))
    return rows


def _shares(gram: np.ndarray, cross: np.ndarray, shares: int) -> tuple[np.ndarray, np.ndarray]:
    """One share blends d_low + d_high: its terms are the sums of the two-share ones."""
    return (gram, cross) if shares == 2 else (np.array([[gram.sum()]]), np.array([cross.sum()]))


def bands(fit_folder: Path, score_folder: Path, sigma: float, aligned: bool, holdout: int) -> None:
    """Fit on ``fit_folder`` but its last ``holdout`` sequences (as ``vident fit-detail``); score on another."""
    fit_rows = band_terms(fit_folder, sigma, False, holdout)
    score_rows = band_terms(score_folder, sigma, aligned, 0)
    for shares in (1, 2):
        gram, rhs = 0.0, 0.0
        for f, _, _, g, c in fit_rows:
            g, c = _shares(g, c, shares)
            gram, rhs = gram + np.kron(g, np.outer(f, f)), rhs + np.kron(c, f)
        w = solve(gram, rhs).reshape(shares, -1)
        base, out, mean_share = [], [], []
        for f, n, e0, g, c in score_rows:
            g, c = _shares(g, c, shares)
            a = np.clip(w @ f, 0, 1)
            base.append(10 * np.log10(n / e0))
            out.append(10 * np.log10(n / (e0 + 2 * a @ c + a @ g @ a)))
            mean_share.append(a)
        print(f"{shares} share(s): PSNR {np.mean(base):.3f} -> {np.mean(out):.3f} dB on {score_folder}, "
              f"mean share {np.round(np.mean(mean_share, axis=0), 3).tolist()}, w {np.round(w, 3).tolist()}")


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
    parser.add_argument("--bands", type=float, help="fit the two-share form with this Gaussian split instead")
    parser.add_argument("--score", type=Path, help="with --bands: the dump folder to score on")
    parser.add_argument("--aligned", action="store_true", help="with --bands: score colour-aligned")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model is not None:
        dump(args.model, args.data, args.dump, args.frames)
    if args.bands is not None:
        bands(args.dump, args.score or args.dump, args.bands, args.aligned, args.holdout)
    else:
        analyse(args.dump, args.holdout, None)


if __name__ == "__main__":
    main()
