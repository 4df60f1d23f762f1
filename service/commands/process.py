"""``vident process``: enhance a recorded video (or a folder of frames) offline into a folder of results."""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.backends.factory import create_backend
    from service.engine import InferenceEngine
    from service.process import ProcessOptions, Progress, process_video
    from service.video import VideoError

    backend = create_backend(args.model, args.backend, args.device, args.precision, args.checkpoint)
    engine = InferenceEngine(backend, max_batch=1)
    bar = tqdm(unit="frame", desc=Path(args.input).name, dynamic_ncols=True, disable=args.quiet)

    def on_progress(progress: Progress) -> None:
        if progress.frames_total and bar.total != progress.frames_total:
            bar.total = progress.frames_total
        bar.update(progress.frames_done - bar.n)

    options = ProcessOptions(
        frames=args.frames,
        max_frames=args.max_frames,
        folder_fps=Fraction(args.fps).limit_denominator(1001) if args.fps else None,
    )
    try:
        report = process_video(args.input, args.out, engine, options, on_progress, model_label=args.model)
    except VideoError as exc:
        bar.close()
        print(f"vident process: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.close()
        backend.close()
    bar.close()
    timing = report["timing"]
    print(
        f"{report['frames']} frames at {report['fps']:.3f} fps -> {args.out}: {', '.join(report['outputs'])}\n"
        f"wall {timing['wall_s']:.2f} s ({timing['frames_per_s']} frames/s); backend {timing['infer_s']:.2f} s "
        f"({timing['infer_frames_per_s']} frames/s); decode {timing['decode_s']:.2f} s; "
        f"encode {timing['encode_s']:.2f} s"
    )
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "process",
        help="enhance a video file or folder of frames offline",
        description="Writes restored.mp4 (H.264, input frame rate and timing), mask.mp4 and overlay.mp4 for models "
        "with masks, homographies.json and report.json to --out.",
    )
    p.add_argument("input", help="video file (mp4, mkv, mov, avi, webm, ...) or a folder of PNG/JPEG frames")
    p.add_argument("--model", required=True, help="registered model name or .safetensors checkpoint")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--backend", default="torch", help="torch, onnxruntime, openvino, tensorrt or auto (default torch)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--precision", default="fp32", help="fp32, fp16, bf16, int8 (openvino) or auto (default fp32)")
    p.add_argument("--checkpoint", default=None, help="weights file for --model")
    p.add_argument("--frames", action="store_true", help="also write lossless PNG frames and masks")
    p.add_argument("--max-frames", type=_positive_int, default=None, help="process only the first N frames")
    p.add_argument("--fps", type=float, default=None, help="frame rate of a folder of frames (default 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
