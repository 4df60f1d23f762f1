"""Corner error of the homography head, and of its photometric refinement under several settings, on
held-out sequences of a training split or a validation split (never the test or real-content split: this
chooses a setting).

The network runs once per frame (without refinement); the refinement (``models/refine.py``) is then
applied to the cached restored frames, so many settings cost one pass of the network.

    .venv/bin/python -m tools.refine_tune --model runs/most-nss-mixed-D2/last.safetensors \\
        --data data/hfit-mixed-256 --sequences 16 --levels "4:5,2:3" "8:5,4:3,2:2" --highpass 0 5 5,11 --huber 0 1.5
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import refine
from models.checkpoints import read_checkpoint, read_metadata
from models.data.format import find_sequences, read_sequence
from models.layers import mean_corner_error
from models.refine import luma, refine_homography
from models.registry import create_model
from models.streaming import stream_intermediates


def parse_levels(text: str) -> tuple[tuple[int, int], ...]:
    return tuple((int(f), int(s)) for f, s in (level.split(":") for level in text.split(",")))


def parse_sides(text: str) -> tuple[int, ...]:
    return tuple(int(side) for side in text.split(","))


def head_only(path: str) -> torch.nn.Module:
    """The checkpoint's network with its own refinement, if any, switched off: the head's estimate."""
    kwargs, state = read_checkpoint(path)
    model = create_model(read_metadata(path)["model"], **{**kwargs, "homography_refine": ()})
    model.load_state_dict(state, strict=True)
    return model.eval()


def cache_pairs(model: torch.nn.Module, folders: list[Path]) -> list[dict[str, object]]:
    pairs: list[dict[str, object]] = []
    for folder in folders:
        seq = read_sequence(folder)
        height, width = seq.input.shape[1:3]
        content = str(seq.meta.get("content", "dental"))
        previous = None
        for t, (_, step, _) in enumerate(stream_intermediates(model, seq.input)):
            current = luma(step.final_restored)
            if previous is not None:
                true = torch.from_numpy(seq.homographies[t]).float()[None]
                pairs.append({"previous": previous, "current": current, "head": step.final_homography,
                              "true": true, "content": content, "size": (height, width)})  # fmt: skip
            previous = current
    return pairs


def with_input_luma(
    pairs: list[dict[str, object]], folders: list[Path], keep_restored: bool = False
) -> list[dict[str, object]]:
    """The same pairs (same head estimates) with the degraded input frames' luma in place of the restored
    frames' (or beside them, as a second channel), in the order :func:`cache_pairs` made them."""
    frames = []
    for folder in folders:
        seq = read_sequence(folder)
        lumas = [luma(torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255) for f in seq.input]
        frames.extend(zip(lumas[:-1], lumas[1:], strict=True))
    if len(frames) != len(pairs):
        raise ValueError(f"{len(frames)} input pairs for {len(pairs)} cached pairs: not the cache's sequences")
    if keep_restored:
        frames = [(torch.cat((p["previous"], a), dim=1), torch.cat((p["current"], b), dim=1))  # type: ignore[list-item]
                  for p, (a, b) in zip(pairs, frames, strict=True)]  # fmt: skip
    return [{**p, "previous": a, "current": b} for p, (a, b) in zip(pairs, frames, strict=True)]


def refine_pair(
    pair: dict[str, object],
    levels: tuple[tuple[int, int], ...],
    prior: float,
    offset_prev: object = 0.0,
    offset_cur: object = 0.0,
    **knobs: float | str | tuple[int, ...] | None,
) -> torch.Tensor:
    """The refinement of one cached pair, its full-resolution luma shifted by the offsets first; ``knobs``:
    ``refine_homography``'s highpass, huber and damping."""
    prev, cur = pair["previous"] + offset_prev, pair["current"] + offset_cur  # type: ignore[operator]
    finest = levels[-1][0]
    if finest > 1:
        prev, cur = F.avg_pool2d(prev, finest), F.avg_pool2d(cur, finest)
    return refine_homography(prev, cur, pair["head"], levels, prior, **knobs)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint (its own refinement, if any, is switched off)")
    parser.add_argument("--data", required=True, help="a training split in the on-disk format")
    parser.add_argument("--sequences", type=int, default=16, help="the last N sequences (a fit's holdout)")
    parser.add_argument("--levels", nargs="+", default=["4:5,2:3"], help="factor:steps,... coarse to fine")
    parser.add_argument("--highpass", nargs="+", type=parse_sides, default=[(refine.HIGHPASS,)],
                        help="local-mean side, or sides matched together (5,11)")
    parser.add_argument("--huber", nargs="+", type=float, default=[refine.HUBER], help="0: plain least squares")
    parser.add_argument("--damping", nargs="+", type=float, default=[refine.DAMPING], help="relative LM damping")
    parser.add_argument("--prior", nargs="+", type=float, default=[0.0], help="pull to the head's estimate")
    parser.add_argument("--prior-scale", nargs="+", choices=refine.PRIOR_SCALES, default=["hessian"],
                        help="what the prior's weight is relative to (refine_homography)")
    parser.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="also refine luma with this much Gaussian noise added and report how far the result "
        "moves (px): a runtime's rounding must not move the output homography",
    )
    parser.add_argument("--cache", type=Path, help="keep the network's pass here and reuse it")
    parser.add_argument("--accept", nargs="+", type=float, default=[0.0],
                        help="relative cost drop for the refined estimate whole (0: keep-or-replace switch)")
    parser.add_argument("--balance", nargs="+", type=int, choices=(0, 1), default=[1],
                        help="1: weigh each channel by its inverse starting residual (--source both; 0: equal)")
    parser.add_argument("--source", choices=("restored", "input", "both"), default="restored",
                        help="refine on the restored frames (the network's), on the degraded input frames, "
                        "or on both at once (two channels)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cache is not None and args.cache.is_file():
        pairs = torch.load(args.cache)
    else:
        pairs = cache_pairs(head_only(args.model), find_sequences(args.data)[-args.sequences :])
        if args.cache is not None:
            torch.save(pairs, args.cache)
    if args.source != "restored":
        pairs = with_input_luma(pairs, find_sequences(args.data)[-args.sequences :], args.source == "both")
    generator = torch.Generator().manual_seed(0)  # the same perturbation for every setting
    noises: list[tuple[torch.Tensor, torch.Tensor]] = []
    if args.noise > 0:
        for p in pairs:
            noise_prev = torch.randn(p["previous"].shape, generator=generator) * args.noise  # type: ignore[union-attr]
            noise_cur = torch.randn(p["current"].shape, generator=generator) * args.noise  # type: ignore[union-attr]
            noises.append((noise_prev, noise_cur))

    def report(label: str, errors: list[float], moved: list[float] | None = None) -> dict[str, object]:
        by_content = zip(errors, (p["content"] for p in pairs), strict=True)
        grouped: dict[str, list[float]] = {}
        for error, content in by_content:
            grouped.setdefault(str(content), []).append(error)
        per = {c: round(float(np.mean(v)), 2) for c, v in sorted(grouped.items())}
        row = {"setting": label, "mace": round(float(np.mean(errors)), 3), "median": round(float(np.median(errors)), 3)}
        if moved:
            row |= {"moved_mean": round(float(np.mean(moved)), 4), "moved_max": round(float(np.max(moved)), 4)}
        print(json.dumps({**row, **per}), flush=True)
        return row

    head = [float(mean_corner_error(p["head"], p["true"], *p["size"])) for p in pairs]  # type: ignore[misc]
    report(f"head ({len(pairs)} pairs)", head)
    settings = itertools.product(args.levels, args.highpass, args.huber, args.damping, args.prior, args.prior_scale,
                                 args.balance, args.accept)  # fmt: skip
    for text, highpass, huber, damping, prior, prior_scale, balance, accept in settings:
        levels = parse_levels(text)
        knobs = {"highpass": highpass, "huber": huber if huber > 0 else None, "damping": damping,
                 "prior_scale": prior_scale, "balance": bool(balance), "accept": accept}  # fmt: skip
        errors, moved = [], []
        for i, p in enumerate(pairs):
            clean = refine_pair(p, levels, prior, **knobs)
            errors.append(float(mean_corner_error(clean, p["true"], *p["size"])))  # type: ignore[misc]
            if noises:
                noisy = refine_pair(p, levels, prior, *noises[i], **knobs)
                moved.append(float(mean_corner_error(noisy, clean, *p["size"])))  # type: ignore[misc]
        label = f"levels {text}, highpass {highpass}, huber {huber}, damping {damping:g}, prior {prior:g}"
        label += f" ({prior_scale}){', balanced' if balance else ''}, accept {accept:g}"
        report(label, errors, moved)


if __name__ == "__main__":
    main()
