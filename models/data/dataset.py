"""Torch datasets of clips, rendered on the fly or read from disk, in the form the trainer consumes.

Every sample is a dict of float32 tensors (the default collate stacks them to (batch, time, ...),
the fields of ``models.training.trainer.ClipBatch``)::

    input          (T, 3, H, W) in [0, 1]   B_t
    target         (T, 3, H, W) in [0, 1]   R_t
    target_blurry  (T, 3, H, W) in [0, 1]   R'_t (absent for on-disk data without target_blurry/)
    mask           (T, 1, H, W) 0 / 1       M_t; -1 where the clip has no teeth labels (mask loss skipped)
    homography     (T, 3, 3)                H_{t-1->t}, identity at t = 0

Synthetic clips are a pure function of (config, seed, split, index), so a map-style dataset is
reproducible with any number of DataLoader workers; the iterable form never repeats a clip.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from models.data.format import DataFormatError, SequenceInfo, find_sequences, read_sequence, validate_sequence
from models.data.scenes import VALIDATION_SETS
from models.data.synth import (
    CONTENTS,
    DEFAULT_SEED,
    LabelledSequence,
    SynthConfig,
    crop_sequence,
    render_sequence,
    sequence_seed,
)


def _images(frames: np.ndarray) -> Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))).float().div_(255.0)


UNLABELLED = -1.0  # mask value of clips without teeth labels


def clip_tensors(seq: LabelledSequence) -> dict[str, Tensor]:
    """A sequence as the dict of tensors described in the module docstring."""
    mask = torch.from_numpy(seq.mask.astype(np.float32)).unsqueeze(1)
    if not seq.meta.get("has_mask", True):
        mask.fill_(UNLABELLED)
    clip = {
        "input": _images(seq.input),
        "target": _images(seq.target),
        "mask": mask,
        "homography": torch.from_numpy(seq.homographies.astype(np.float32)),
    }
    if seq.target_blurry is not None:
        clip["target_blurry"] = _images(seq.target_blurry)
    return clip


@dataclass(frozen=True)
class ContentMix:
    """Which scene content each clip gets, drawn per clip from its own seed: ``{content: weight}``.

    Written as ``dental=0.5,dead-leaves=0.3,photos=0.2`` (the form ``vident train --mix`` takes and
    checkpoint metadata records)."""

    weights: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("a content mix needs at least one content")
        for name, weight in self.weights:
            if name not in CONTENTS:
                raise ValueError(f"unknown content {name!r} in the mix; choose from {', '.join(CONTENTS)}")
            if not weight >= 0:
                raise ValueError(f"content weight must be >= 0, got {name}={weight}")
        if sum(w for _, w in self.weights) <= 0:
            raise ValueError("content weights must not all be 0")

    @classmethod
    def parse(cls, text: str) -> ContentMix:
        pairs = []
        for part in text.split(","):
            name, sep, weight = part.strip().partition("=")
            try:
                value = float(weight) if sep else 1.0
            except ValueError as exc:
                raise ValueError(f"expected CONTENT=WEIGHT in the mix, got {part!r}") from exc
            pairs.append((name.strip(), value))
        return cls(tuple(pairs))

    @classmethod
    def of(cls, weights: Mapping[str, float]) -> ContentMix:
        return cls(tuple(weights.items()))

    def __str__(self) -> str:
        return ",".join(f"{name}={weight:g}" for name, weight in self.weights)

    def pick(self, rng: np.random.Generator) -> str:
        probabilities = np.array([w for _, w in self.weights], float)
        return self.weights[int(rng.choice(len(self.weights), p=probabilities / probabilities.sum()))][0]

    def photo_contents(self) -> set[str]:
        """The contents in the mix that read the training photographs (dead leaves take half their
        palettes from them)."""
        return {"photos", "soft-photos", "dead-leaves"} & {name for name, weight in self.weights if weight > 0}

    def check_split(self, split: str) -> None:
        """Validation photographs only render into the validation split, so they never reach a fit."""
        for name, weight in self.weights:
            if split != "val" and name in VALIDATION_SETS and weight > 0:
                raise ValueError(f"{name} is validation content; a {split!r} split cannot use it")

    def for_clip(self, cfg: SynthConfig, seed: int, split: str, index: int) -> SynthConfig:
        """``cfg`` with the content of clip ``index``, drawn from a stream of the clip's own seed."""
        self.check_split(split)
        return replace(cfg, content=self.pick(np.random.default_rng(sequence_seed(seed, split, index).spawn(3)[2])))


def rendered_clip(
    cfg: SynthConfig,
    seed: int,
    split: str,
    index: int,
    crop: tuple[int, int] | None = None,
    mix: ContentMix | None = None,
) -> dict[str, Tensor]:
    """Clip ``index`` of ``split``; with ``crop`` (h, w), a window of it at a position drawn from the
    same seed. Crops of a full-size render keep the scene at the scale the test frames show it,
    where a render at the crop size shrinks the whole scene into the crop. ``mix``: the clip's
    content is drawn from it (its own stream of the clip's seed) instead of ``cfg.content``."""
    if mix is not None:
        cfg = mix.for_clip(cfg, seed, split, index)
    seq = render_sequence(cfg, sequence_seed(seed, split, index))
    if crop is not None:
        rng = np.random.default_rng(sequence_seed(seed, split, index).spawn(1)[0])
        top = int(rng.integers(0, cfg.height - crop[0] + 1))
        left = int(rng.integers(0, cfg.width - crop[1] + 1))
        seq = crop_sequence(seq, top, left, *crop)
    return clip_tensors(seq)


class SyntheticClips(Dataset):
    """``length`` fixed synthetic clips: item ``i`` is sequence ``i`` of ``split`` (deterministic)."""

    def __init__(
        self,
        cfg: SynthConfig,
        length: int,
        seed: int = DEFAULT_SEED,
        split: str = "train",
        crop: tuple[int, int] | None = None,
        mix: ContentMix | None = None,
    ) -> None:
        sequence_seed(seed, split, 0)  # validates split
        self.cfg, self.length, self.seed, self.split, self.crop, self.mix = cfg, length, seed, split, crop, mix

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return rendered_clip(self.cfg, self.seed, self.split, index, self.crop, self.mix)


class SyntheticStream(IterableDataset):
    """Endless fresh clips: clip indices ``start, start + 1, ...`` split round-robin over DataLoader workers.

    Resuming a run at step ``s`` with batch ``b`` continues the same stream with ``start = s * b``.
    """

    def __init__(
        self,
        cfg: SynthConfig,
        seed: int = DEFAULT_SEED,
        split: str = "train",
        start: int = 0,
        crop: tuple[int, int] | None = None,
        mix: ContentMix | None = None,
    ) -> None:
        sequence_seed(seed, split, 0)
        self.cfg, self.seed, self.split, self.start, self.crop, self.mix = cfg, seed, split, start, crop, mix

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        worker = get_worker_info()
        offset, stride = (0, 1) if worker is None else (worker.id, worker.num_workers)
        index = self.start + offset
        while True:
            yield rendered_clip(self.cfg, self.seed, self.split, index, self.crop, self.mix)
            index += stride


class SequenceFolderClips(Dataset):
    """Clips of ``clip_frames`` consecutive frames from every sequence folder under ``root``.

    All folders are validated when the dataset is built (headers and JSON only), so a malformed data
    set fails at once with one message listing every problem, not at some step of an epoch.
    """

    def __init__(self, root: str | Path, clip_frames: int, stride: int | None = None) -> None:
        if clip_frames < 1:
            raise ValueError("clip_frames must be >= 1")
        infos, problems = [], []
        for folder in find_sequences(root):
            try:
                infos.append(validate_sequence(folder))
            except DataFormatError as exc:
                problems.append(str(exc))
        if problems:
            raise DataFormatError("\n".join(problems))
        with_blurry = [i.path.name for i in infos if i.has_target_blurry]
        if with_blurry and len(with_blurry) != len(infos):
            lacking = [i.path.name for i in infos if not i.has_target_blurry]
            raise DataFormatError(f"{root}: target_blurry/ is in some sequences but not in {lacking[:5]}")
        self.infos: list[SequenceInfo] = infos
        self.clip_frames = clip_frames
        step = stride or clip_frames
        self.windows = [(info, s) for info in infos for s in range(0, info.frames - clip_frames + 1, step)]
        if not self.windows:
            raise DataFormatError(f"{root}: no sequence has {clip_frames} frames")

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        info, start = self.windows[index]
        return clip_tensors(read_sequence(info.path, start, self.clip_frames, info=info))


__all__ = [
    "UNLABELLED",
    "ContentMix",
    "clip_tensors",
    "rendered_clip",
    "SyntheticClips",
    "SyntheticStream",
    "SequenceFolderClips",
]
