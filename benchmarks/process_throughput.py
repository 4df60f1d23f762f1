"""Throughput of offline processing (``vident process``) against the raw speed of the same backend.

Raw: :func:`service.pipeline.run_streams` alone on frames already in memory, one stream, one frame per
call (pad, infer, crop: what a backend can give a video at best). Process: :func:`process_video` on an
H.264 clip of the same frames, with decoding, the engine, and the encoding of restored/mask/overlay
videos all included. The target is process >= 90% of raw on the CPU backend: decode and encode must
hide behind inference.

    python -m benchmarks.process_throughput --model most-nss --backend torch --frames 300 --size 320x416

The clip is synthetic dental video (``models.data.synth``, one sub-frame per frame to render fast),
written once to ``--clip`` (default: a temporary folder) and reused when it exists.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def make_clip(path: Path, frames: int, height: int, width: int, fps: int = 30) -> Path:
    from models.data.synth import SynthConfig, render_sequence
    from service.video import VideoWriter

    sequence = render_sequence(SynthConfig(height, width, frames=frames, subframes=1, exposure=1), 2024)
    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, width, height, fps) as writer:
        for frame in sequence.input:
            writer.write(frame)
    return path


def raw_fps(backend: object, frames: list[np.ndarray]) -> float:
    from service.pipeline import Geometry, Stream, run_streams

    height, width = frames[0].shape[:2]
    stream = Stream(backend.spec, Geometry(height, width))  # type: ignore[attr-defined]
    start = time.perf_counter()
    for frame in frames:
        run_streams(backend, [stream], [frame])  # type: ignore[arg-type]
    return len(frames) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="most-nss")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", default="320x416", help="HxW of the clip")
    parser.add_argument("--warmup", type=int, default=10, help="untimed frames first (allocations, autotuning)")
    parser.add_argument("--rounds", type=int, default=1, help="raw and process runs, alternated; best of each")
    parser.add_argument("--clip", type=Path, default=None, help="input clip (made if missing)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))

    from service.backends.factory import create_backend
    from service.engine import InferenceEngine
    from service.process import ProcessOptions, process_video
    from service.video import read_video_frames

    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip or Path(tmp) / f"clip_{args.frames}_{height}x{width}.mp4"
        if not clip.exists():
            start = time.perf_counter()
            make_clip(clip, args.frames, height, width)
            print(f"made {clip} in {time.perf_counter() - start:.1f} s")
        _, decoded = read_video_frames(clip)
        frames = [f.rgb for f in decoded]
        backend = create_backend(args.model, args.backend, args.device, args.precision)
        raw_fps(backend, frames[: args.warmup])
        raws, reports = [], []
        engine = InferenceEngine(backend, max_batch=1)
        # Alternate the two in ABBA order so that a busy neighbour or a drifting clock slows both alike;
        # keep each one's best round.
        try:
            for round_index in range(args.rounds):
                for kind in ("raw", "process") if round_index % 2 == 0 else ("process", "raw"):
                    if kind == "raw":
                        raws.append(raw_fps(backend, frames))
                    else:
                        out = Path(tmp) / f"out{len(reports)}"
                        reports.append(process_video(clip, out, engine, ProcessOptions(), model_label=args.model))
        finally:
            engine.close()
        backend.close()
    raw = max(raws)
    report = max(reports, key=lambda r: r["timing"]["frames_per_s"])
    timing = report["timing"]
    result = {
        "model": args.model,
        "backend": args.backend,
        "device": args.device,
        "precision": args.precision,
        "frames": report["frames"],
        "size": [height, width],
        "raw_fps": round(raw, 3),
        "raw_fps_rounds": [round(r, 3) for r in raws],
        "process_fps_rounds": [r["timing"]["frames_per_s"] for r in reports],
        "process_fps": timing["frames_per_s"],
        "ratio": round(timing["frames_per_s"] / raw, 3),
        "process_timing": timing,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
    }
    print(
        f"{args.model} on {args.backend}/{args.device} {args.precision}, {report['frames']} frames {height}x{width}: "
        f"raw {raw:.2f} frames/s, vident process {timing['frames_per_s']:.2f} frames/s "
        f"({100 * result['ratio']:.1f}% of raw); decode {timing['decode_s']:.2f} s, "
        f"encode {timing['encode_s']:.2f} s, backend {timing['infer_s']:.2f} s, wall {timing['wall_s']:.2f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
