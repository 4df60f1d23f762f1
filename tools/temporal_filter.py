"""Would a motion-compensated recursive filter on a MOST network's output recover what it leaves?

Classic endoscope video denoising averages each frame with the previous output warped onto it,
weighted per pixel by how well the two agree: ``out_t = (1 - k) r_t + k W(out_{t-1})`` with
``k = k0 exp(-d^2 / 2 s^2)``, ``d`` the RMS colour difference (0-255) of the pixel and ``W`` the warp
by ``H_{t-1->t}`` (``k = 0`` where the warp leaves the frame). The network already returns ``H``, so
such a filter would cost one warp per frame. This streams the model over a data set once, then
filters its restored frames with the estimated and with the true homographies (the latter: what
perfect alignment would buy) and reports PSNR and colour-aligned PSNR for each ``(k0, s)``.

::

    python -m tools.temporal_filter --model most-nss --data data/val-wide --sequences 8
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from models.data.format import find_sequences, read_sequence
from models.layers import warp_by_homography
from models.metrics import colour_aligned_psnr, psnr
from models.streaming import as_stream, run_stream
from tools.restoration_error import data_benchmark


def recursive_filter(restored: np.ndarray, homographies: np.ndarray, k0: float, s: float) -> np.ndarray:
    """(T, H, W, 3) frames in 0..255 and (T, 3, 3) previous-to-current homographies -> filtered frames."""
    out = [restored[0]]
    for t in range(1, len(restored)):
        prev = np.concatenate((out[-1], np.ones_like(out[-1][..., :1])), -1)
        prev_t = torch.from_numpy(np.ascontiguousarray(prev.transpose(2, 0, 1)[None], np.float32))
        h = torch.from_numpy(np.asarray(homographies[t], np.float32)[None])
        warped = warp_by_homography(prev_t, h)[0].numpy().transpose(1, 2, 0)
        d2 = ((warped[..., :3] - restored[t]) ** 2).mean(-1, keepdims=True)
        k = k0 * np.exp(-d2 / (2 * s * s)) * (warped[..., 3:] > 0.999)
        out.append((1 - k) * restored[t] + k * warped[..., :3])
    return np.stack(out)


def main() -> None:
    args, _, backend = data_benchmark(__doc__ or "", sequences=8, frames=True)
    clips = []
    for folder in find_sequences(args.data)[: args.sequences]:
        seq = read_sequence(folder)
        outputs = run_stream(backend, as_stream(seq.input[: args.frames]))
        restored = np.stack([np.clip(o["restored"][0], 0, 1).transpose(1, 2, 0) * 255 for o in outputs])
        clips.append((seq, restored, np.stack([o["homography"][0] for o in outputs])))
    target = np.concatenate([seq.target[: args.frames] for seq, _, _ in clips]).astype(np.float64)

    def score(frames: list[np.ndarray]) -> str:
        joined = np.concatenate(frames)
        return f"{psnr(joined, target).mean():.2f} | {colour_aligned_psnr(joined, target).mean():.2f}"

    print(f"{args.model} ({args.checkpoint}) on {args.data}, {len(clips)} sequences x {args.frames} frames")
    print("| frames | homography | k0 | s | PSNR | PSNR c.a. |\n|---|---|---|---|---|---|")
    print(f"| input | | | | {score([seq.input[: args.frames].astype(np.float64) for seq, _, _ in clips])} |")
    print(f"| model | | | | {score([r for _, r, _ in clips])} |")
    for which, (k0, s) in itertools.product(("estimated", "true"), itertools.product((0.5, 0.7, 0.85), (8, 16, 32))):
        filtered = [recursive_filter(r, h if which == "estimated" else seq.homographies[: args.frames], k0, s)
                    for seq, r, h in clips]  # fmt: skip
        print(f"| filtered | {which} | {k0} | {s} | {score(filtered)} |", flush=True)


if __name__ == "__main__":
    main()
