"""The sample clip the browser demo ships (``service/static/samples/``), and small synthetic clips for
tests and the load benchmark.

The shipped clip is a sequence of the project's synthetic intra-oral video generator
(:mod:`models.data.synth`: teeth, instruments, spray, camera motion, blur, colour cast, noise), fixed
by seed. :func:`synthetic_clip` is a much simpler and faster stand-in (textured gums, shaded teeth,
a smooth camera move, blur, noise) for tests and benchmarks that only need frames with structure
and motion.

    python -m benchmarks.make_sample            # writes service/static/samples/dental-synthetic/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "service" / "static" / "samples"


def _scene(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A large RGB canvas (uint8) the camera moves over: gums with teeth."""
    texture = cv2.resize(rng.random((height // 16, width // 16)), (width, height), interpolation=cv2.INTER_CUBIC)
    fine = cv2.resize(rng.random((height // 4, width // 4)), (width, height), interpolation=cv2.INTER_CUBIC)
    t = np.clip(0.7 * texture + 0.3 * fine, 0, 1)[..., None]
    canvas = (1 - t) * np.array([150.0, 45, 60]) + t * np.array([225.0, 120, 130])  # gum reds to pinks
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    count = int(rng.integers(3, 6))
    for k in range(count):
        cx = width * (0.2 + 0.6 * (k + rng.random() * 0.5) / count)
        cy = height * (0.45 + 0.15 * rng.standard_normal())
        ax, ay = width * rng.uniform(0.06, 0.09), height * rng.uniform(0.14, 0.2)
        angle = rng.uniform(-0.3, 0.3)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / ax
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ay
        r2 = u**2 + v**2
        inside = r2 < 1
        shade = np.clip(1.05 - 0.35 * r2 + 0.15 * u, 0.55, 1.1)[..., None]  # enamel shading, light from the left
        tooth = shade * np.array([238.0, 232, 212])
        canvas = np.where(inside[..., None], tooth, canvas)
        rim = (r2 >= 1) & (r2 < 1.15)
        canvas = np.where(rim[..., None], canvas * 0.55, canvas)  # dark gap around the tooth
    return np.clip(canvas, 0, 255).astype(np.uint8)


def synthetic_clip(frames: int = 48, height: int = 240, width: int = 320, seed: int = 0) -> list[np.ndarray]:
    """``frames`` degraded RGB uint8 (height, width, 3) frames of one smooth camera move."""
    rng = np.random.default_rng(seed)
    big_h, big_w = height * 2, width * 2
    scene = _scene(big_h, big_w, rng)
    clip = []
    for i in range(frames):
        phase = 2 * np.pi * i / max(frames, 1)
        angle = 0.12 * np.sin(phase)
        zoom = 1.0 + 0.15 * np.sin(0.5 * phase)
        cx = big_w / 2 + 0.18 * width * np.sin(phase) + 2 * rng.standard_normal()  # pan + handpiece shake
        cy = big_h / 2 + 0.12 * height * np.cos(phase) + 2 * rng.standard_normal()
        c, s = np.cos(angle) / zoom, np.sin(angle) / zoom
        # frame pixel -> scene pixel: rotate and scale about the frame centre, then move to (cx, cy)
        to_scene = np.array([[c, -s, cx - c * width / 2 + s * height / 2], [s, c, cy - s * width / 2 - c * height / 2]])
        frame = cv2.warpAffine(scene, to_scene, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        frame = cv2.GaussianBlur(frame, (0, 0), 1.2).astype(np.float64)
        frame = 0.75 * frame + 50  # pale, low-contrast camera response
        frame += rng.normal(0, 6, frame.shape)  # sensor noise
        clip.append(np.clip(frame, 0, 255).astype(np.uint8))
    return clip


def write_sample(
    out: Path, frames: int, height: int, width: int, fps: float, seed: int, quality: int = 85
) -> dict[str, object]:
    """Writes ``out/NNNNNN.jpg`` and returns the manifest entry the demo page reads."""
    from models.data.synth import SynthConfig, render_sequence, sequence_seed

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jpg"):
        old.unlink()
    config = SynthConfig(height=height, width=width, frames=frames, noise="moderate")
    sequence = render_sequence(config, sequence_seed(seed, "test", 0))
    for i, rgb in enumerate(sequence.input):
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(out / f"{i:06d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return {
        "name": out.name,
        "title": "Synthetic intra-oral video (models.data.synth, test split seed 0, moderate noise)",
        "path": f"samples/{out.name}/",
        "frames": frames,
        "fps": fps,
        "width": width,
        "height": height,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR / "dental-synthetic")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", default="240x320", help="HxW")
    parser.add_argument("--fps", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    entry = write_sample(args.out, args.frames, height, width, args.fps, args.seed)
    manifest = args.out.parent / "index.json"
    manifest.write_text(json.dumps([entry], indent=1) + "\n")
    total = sum(p.stat().st_size for p in args.out.glob("*.jpg"))
    print(f"wrote {args.frames} frames to {args.out} ({total / 1024:.0f} KiB) and {manifest}")


if __name__ == "__main__":
    main()
