"""The on-disk layout of a labelled video data set, its writer and a reader that validates before it trusts.

One folder per sequence (``docs/data.md`` is the reference)::

    seq_000/
      input/000000.png ...           8-bit RGB, the camera's frames B_t
      target/000000.png ...          8-bit RGB, restored frames R_t (same names, same size)
      target_blurry/000000.png ...   optional: blurry noise-free R'_t (R2-D4's first-stage target)
      mask/000000.png ...            8-bit grey, 0 = not teeth, 255 = teeth (M_t)
      homography.json                [[3x3], ...] H_{t-1->t} per frame, pixel coordinates, first = identity
      meta.json                      optional, free-form (the generator writes its parameters here)

Real data (Vident-lab, in-house recordings) is converted into this layout once; from then on every
tool reads it the same way. Validation reads only PNG headers and the JSON, so a data set of
thousands of frames is checked in a moment, and it reports every problem it finds with the file
it concerns instead of failing in the middle of a training run.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from models.data.synth import LabelledSequence

IMAGE_FOLDERS = ("input", "target", "mask")
OPTIONAL_FOLDERS = ("target_blurry",)
HOMOGRAPHY_FILE = "homography.json"
META_FILE = "meta.json"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RGB_TYPES = {2: "RGB", 6: "RGBA"}  # PNG colour types accepted for frames (alpha is dropped)


class DataFormatError(ValueError):
    """A sequence folder does not follow the format; the message lists every problem with its file."""


@dataclass(frozen=True)
class SequenceInfo:
    """What validation learnt about one sequence folder."""

    path: Path
    frames: int
    height: int
    width: int
    has_target_blurry: bool
    meta: dict[str, object] = field(default_factory=dict, compare=False)


def frame_name(index: int) -> str:
    return f"{index:06d}.png"


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(height, width, bit depth, colour type) from a PNG's IHDR chunk, without decoding the image."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataFormatError(f"{path}: not a PNG file")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return height, width, depth, colour


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write_sequence(seq: LabelledSequence, folder: str | Path, meta: dict[str, object] | None = None) -> Path:
    """Writes one sequence in the layout above (PNG compression 1: fast, still lossless)."""
    folder = Path(folder)
    png = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    images = {"input": seq.input, "target": seq.target}
    if seq.target_blurry is not None:
        images["target_blurry"] = seq.target_blurry
    for name, frames in images.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(frames):
            cv2.imwrite(str(folder / name / frame_name(t)), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), png)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    for t, mask in enumerate(seq.mask):
        cv2.imwrite(str(folder / "mask" / frame_name(t)), np.where(mask, 255, 0).astype(np.uint8), png)
    (folder / HOMOGRAPHY_FILE).write_text(json.dumps([h.tolist() for h in seq.homographies]) + "\n")
    merged = {**seq.meta, **(meta or {})}
    if merged:
        (folder / META_FILE).write_text(json.dumps(merged, indent=2, default=str) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def dataset_split(root: str | Path) -> str | None:
    """The split ``vident synth`` wrote a data set as (``dataset.json``'s ``split``); None for data
    made otherwise (converted recordings, a folder of sequences)."""
    info = Path(root) / "dataset.json"
    return json.loads(info.read_text()).get("split") if info.is_file() else None


def find_sequences(root: str | Path) -> list[Path]:
    """Sequence folders under ``root``: ``root`` itself if it has ``input/``, else its sub-folders that do."""
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"{root}: no such directory")
    if (root / "input").is_dir():
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "input").is_dir())
    if not found:
        raise DataFormatError(f"{root}: no sequence folders (a folder with an input/ sub-folder) found")
    return found


def read_homographies(path: Path, frames: int) -> np.ndarray:
    """(frames, 3, 3) float64 from ``homography.json``, checked: shape, finite, invertible, first identity."""
    if not path.is_file():
        raise DataFormatError(f"{path}: missing (a list of 3x3 H_(t-1->t), one per frame, first = identity)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: must be a JSON list of 3x3 matrices, got {type(data).__name__}")
    if len(data) != frames:
        raise DataFormatError(f"{path}: {len(data)} homographies for {frames} frames")
    try:
        hs = np.array(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataFormatError(f"{path}: entries must be 3x3 lists of numbers") from None
    if hs.shape != (frames, 3, 3):
        raise DataFormatError(f"{path}: entries must be 3x3 lists of numbers, got array shape {hs.shape}")
    bad = [t for t in range(frames) if not np.isfinite(hs[t]).all()]
    if bad:
        raise DataFormatError(f"{path}: non-finite homography at frame(s) {bad[:10]}")
    singular = [t for t in range(frames) if abs(np.linalg.det(hs[t])) < 1e-12 or hs[t, 2, 2] == 0]
    if singular:
        raise DataFormatError(f"{path}: singular homography (or H[2][2] = 0) at frame(s) {singular[:10]}")
    hs /= hs[:, 2:3, 2:3]
    if frames and not np.allclose(hs[0], np.eye(3), atol=1e-6):
        raise DataFormatError(f"{path}: the first homography must be the identity (a sequence has no frame -1)")
    return hs


def validate_sequence(folder: str | Path) -> SequenceInfo:
    """Checks a sequence folder from headers and JSON; raises :class:`DataFormatError` listing every problem."""
    folder = Path(folder)
    problems: list[str] = []
    names: dict[str, list[str]] = {}
    for sub in (*IMAGE_FOLDERS, *OPTIONAL_FOLDERS):
        path = folder / sub
        if not path.is_dir():
            if sub in IMAGE_FOLDERS:
                problems.append(f"{path}/: missing folder")
            continue
        files = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        others = [n for n in files if not (n.endswith(".png") and n[:-4].isdigit() and len(n) == 10)]
        if others:
            problems.append(f"{path}/: unexpected files {others[:5]} (frames are 000000.png, 000001.png, ...)")
        names[sub] = [n for n in files if n not in others]
    frames = len(names.get("input", []))
    if "input" in names:
        expected = [frame_name(i) for i in range(frames)]
        if names["input"] != expected:
            gaps = sorted(set(frame_name(i) for i in range(len(names["input"]) + 1)) - set(names["input"]))[:5]
            problems.append(f"{folder / 'input'}/: frame numbers are not contiguous from 000000.png (missing {gaps})")
        if frames == 0:
            problems.append(f"{folder / 'input'}/: no frames")
    for sub, listed in names.items():
        if sub == "input" or "input" not in names:
            continue
        missing = sorted(set(names["input"]) - set(listed))
        extra = sorted(set(listed) - set(names["input"]))
        if missing:
            problems.append(f"{folder / sub}/: missing {len(missing)} frame(s) that input/ has, e.g. {missing[:5]}")
        if extra:
            problems.append(f"{folder / sub}/: {len(extra)} frame(s) that input/ lacks, e.g. {extra[:5]}")
    height = width = 0
    if frames and "input" in names:
        height, width, _, _ = _check_png(folder / "input" / names["input"][0], None, problems, rgb=True)
        for sub, listed in names.items():
            for name in listed:
                _check_png(folder / sub / name, (height, width), problems, rgb=sub != "mask")
        if "mask" in names and names["mask"]:
            _check_mask_values(folder / "mask" / names["mask"][0], problems)
    try:
        read_homographies(folder / HOMOGRAPHY_FILE, frames)
    except DataFormatError as exc:
        problems.append(str(exc))
    if problems:
        listing = "\n  - ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataFormatError(f"{folder}: not a valid sequence folder:\n  - {listing}{more}")
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return SequenceInfo(folder, frames, height, width, "target_blurry" in names, meta)


def _check_png(path: Path, size: tuple[int, int] | None, problems: list[str], rgb: bool) -> tuple[int, int, int, int]:
    try:
        header = png_header(path)
    except (DataFormatError, OSError) as exc:
        problems.append(str(exc))
        return (0, 0, 0, 0)
    height, width, depth, colour = header
    if depth != 8:
        problems.append(f"{path}: {depth}-bit PNG, expected 8-bit")
    if rgb and colour not in _RGB_TYPES:
        problems.append(f"{path}: PNG colour type {colour}, expected RGB (2) or RGBA (6)")
    if not rgb and colour != 0:
        problems.append(f"{path}: PNG colour type {colour}, a mask must be 8-bit grey (0)")
    if size is not None and (height, width) != size:
        problems.append(f"{path}: size {height}x{width}, expected {size[0]}x{size[1]} (the size of input/000000.png)")
    return header


def _check_mask_values(path: Path, problems: list[str]) -> None:
    """A mask written as 0/1 instead of 0/255 would read as all background: catch it on the first mask."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        problems.append(f"{path}: cannot be decoded")
        return
    values = np.unique(mask)
    if not np.isin(values, (0, 255)).all():
        problems.append(f"{path}: mask values must be 0 or 255, found {values[:8].tolist()}")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataFormatError(f"{path}: cannot be decoded as an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        raise DataFormatError(f"{path}: cannot be decoded as an 8-bit grey mask")
    return mask >= 128


def read_sequence(
    folder: str | Path, start: int = 0, count: int | None = None, info: SequenceInfo | None = None
) -> LabelledSequence:
    """Frames ``[start, start + count)`` of a validated sequence folder (validated here unless ``info`` is given).

    The homographies are sliced with the frames and the first one is replaced by the identity: a
    clip that starts mid-sequence has no predecessor either.
    """
    info = info or validate_sequence(folder)
    count = info.frames - start if count is None else count
    if start < 0 or count < 1 or start + count > info.frames:
        raise ValueError(f"{info.path}: frames [{start}, {start + count}) outside 0..{info.frames}")
    indices = range(start, start + count)
    path = info.path

    def stack(sub: str) -> np.ndarray:
        return np.stack([_read_rgb(path / sub / frame_name(t)) for t in indices])

    homographies = read_homographies(path / HOMOGRAPHY_FILE, info.frames)[start : start + count].copy()
    homographies[0] = np.eye(3)
    return LabelledSequence(
        input=stack("input"),
        target=stack("target"),
        target_blurry=stack("target_blurry") if info.has_target_blurry else None,
        mask=np.stack([_read_mask(path / "mask" / frame_name(t)) for t in indices]),
        homographies=homographies,
        meta=dict(info.meta),
    )


__all__ = [
    "DataFormatError",
    "SequenceInfo",
    "find_sequences",
    "frame_name",
    "read_homographies",
    "read_sequence",
    "validate_sequence",
    "write_sequence",
    "png_header",
]
