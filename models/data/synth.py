"""Synthetic intra-oral microcamera video with exact labels (the Vident-lab recipe of section 5.3.1, simulated).

Vident-lab pairs a poor microcamera with a good one through a beam splitter, blurs the clean video
by averaging an 8x temporally interpolated copy over 17 frames, adds the camera's noise, colour
maps the good camera's frames onto the poor one's, and labels teeth masks and partial-affine
homographies fitted to optical flow. Those data cannot be reached from here, so this module renders
scenes that look alike and whose labels are exact by construction:

* a large textured *world* canvas (gums, tongue, mucosa, dark cavities; teeth with enamel shading,
  fissures, cracks, fillings, specular highlights and dark interproximal gaps; water drops) that
  a camera films through a partial-affine homography (rotation, uniform scale, translation) that
  follows a smooth random walk plus handpiece shake;
* instruments (bur on a handpiece, suction tube) and water spray that move on their own in front
  of the teeth, and lighting that drifts, vignettes and now and then goes dark;
* per frame: the sharp vivid frame ``R_t`` (central sub-frame), the motion-blurred noise-free frame
  ``R'_t`` (mean of ``exposure`` sub-frames, ``subframes`` per frame interval: 8 and 17 as in the
  text), the teeth mask ``M_t`` (teeth visible after occlusion at the central sub-frame) and
  ``H_{t-1->t} = C_t C_{t-1}^-1`` from the camera matrices (identity for the first frame);
* the input ``B_t = noise(response(R'_t))`` (see ``degrade.py``).

Everything is drawn from one ``numpy.random.Generator`` per sequence, seeded from
``(seed, split, index)``, so a sequence is a pure function of its seed. Pixel coordinates follow
the project's continuous convention (``models/layers.py``): pixel ``(i, j)`` has its centre at
``(j + 0.5, i + 0.5)``; OpenCV's warps (centres at integers) are wrapped accordingly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from models.data.degrade import (
    CODECS,
    NOISE_CHOICES,
    WIDE,
    CameraResponse,
    Degradation,
    compress,
    defocus_kernel,
    pick_noise_level,
    sample_codec,
    sensor_noise,
    vignette_field,
)
from models.data.scenes import (
    EVALUATION_PHOTOS,
    MIN_ENLARGEMENT,
    PHOTOS,
    TRAINING_PHOTOS,
    VALIDATION_SETS,
    dead_leaves,
    photo_palette,
    photo_world,
)

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "real": 3}
# content: the generator's dental scenes; dead leaves; a random training photograph (augmented; enlarged
# first for "soft-photos", ``scenes.MIN_ENLARGEMENT``); a random photograph of a validation set
# (augmented; validation splits only: ``scenes.VALIDATION_SETS``);
# or one named photograph as it is
# ("photo:NAME", what the real-content evaluation split films).
CONTENTS = ("dental", "dead-leaves", "photos", "soft-photos", *VALIDATION_SETS)
DEGRADATIONS = ("recipe", "wide", "mixed")
MIXED_RECIPE_SHARE = 0.5  # mixed: the default share of clips that keep the recipe's camera
DEFAULT_SEED = 2024  # the seed model cards and benchmarks quote (with the split mixed in)
WORLD_SCALE = 2.6  # world canvas size relative to the frame: room for the camera to wander

# ----------------------------------------------------------------------------------------------
# Configuration, seeds and the result
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    """What to render. Spatial quantities scale with the frame height, so 128x160 looks like 320x416."""

    height: int = 320
    width: int = 416
    frames: int = 24
    noise: str = "mixed"  # low | moderate | severe | mixed (drawn per sequence)
    subframes: int = 8  # temporal interpolation factor (section 5.3.1)
    exposure: int = 17  # sub-frames averaged into one blurry frame (section 5.3.1)
    motion: float = 1.0  # camera speed multiplier
    shake: float = 1.0  # handpiece shake multiplier
    instruments: bool = True
    spray: bool = True
    lighting: bool = True  # gain drift, vignetting, light gradient
    dark_frames: bool = True  # occasional near-black frames (needs lighting)
    content: str = "dental"  # see CONTENTS; "photo:NAME" for one named photograph
    degradation: str = "recipe"  # recipe | wide (degrade.DegradationRanges) | mixed (either, per clip)
    recipe_share: float = MIXED_RECIPE_SHARE  # mixed: the odds that a clip keeps the recipe's camera
    # The odds that a clip under the recipe's camera reaches the network through a client codec (JPEG
    # or H.264, drawn as the wide cameras draw theirs): a streaming client compresses whatever the camera.
    recipe_codec: float = 0.0

    def __post_init__(self) -> None:
        if self.content not in CONTENTS and not (
            self.content.startswith("photo:") and self.content.removeprefix("photo:") in PHOTOS
        ):
            raise ValueError(f"content must be one of {', '.join(CONTENTS)} or photo:NAME "
                             f"({', '.join(PHOTOS)}), got {self.content!r}")  # fmt: skip
        if self.degradation not in DEGRADATIONS:
            raise ValueError(f"degradation must be one of {', '.join(DEGRADATIONS)}, got {self.degradation!r}")
        if not 0.0 <= self.recipe_share <= 1.0:
            raise ValueError(f"recipe_share must be within [0, 1], got {self.recipe_share}")
        if not 0.0 <= self.recipe_codec <= 1.0:
            raise ValueError(f"recipe_codec must be within [0, 1], got {self.recipe_codec}")
        if self.height < 16 or self.width < 16:
            raise ValueError(f"frame size {self.height}x{self.width} is too small (16x16 at least)")
        if self.frames < 1:
            raise ValueError("frames must be >= 1")
        if self.subframes < 1 or self.exposure < 1 or self.exposure % 2 == 0:
            raise ValueError("subframes must be >= 1 and exposure a positive odd number (centred window)")
        if self.noise not in NOISE_CHOICES:
            raise ValueError(f"noise must be one of {', '.join(NOISE_CHOICES)}, got {self.noise!r}")


def crop_sequence(seq: LabelledSequence, top: int, left: int, height: int, width: int) -> LabelledSequence:
    """The ``height x width`` window at (top, left) of every frame and label; homographies in the
    window's pixel coordinates, ``T(-o) H T(o)`` with o = (left, top), so the motion is unchanged."""
    full_h, full_w = seq.input.shape[1:3]
    if top < 0 or left < 0 or top + height > full_h or left + width > full_w:
        raise ValueError(f"crop {height}x{width} at ({top}, {left}) does not fit {full_h}x{full_w}")
    window = (slice(None), slice(top, top + height), slice(left, left + width))
    shift = np.array([[1, 0, left], [0, 1, top], [0, 0, 1]], np.float64)
    back = np.array([[1, 0, -left], [0, 1, -top], [0, 0, 1]], np.float64)

    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a[window])

    homographies = back @ seq.homographies @ shift
    return replace(seq, input=cut(seq.input), target=cut(seq.target), target_blurry=cut(seq.target_blurry),
                   mask=cut(seq.mask), occluder=cut(seq.occluder), homographies=homographies)  # fmt: skip


def sequence_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of sequence ``index`` of ``split``: independent streams for every (seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return np.random.SeedSequence([int(seed), SPLITS[split], int(index)])


@dataclass
class LabelledSequence:
    """One rendered (or loaded) sequence: inputs and every label, frames RGB uint8."""

    input: np.ndarray  # (T, H, W, 3) uint8: noisy, blurry, pale B_t
    target: np.ndarray  # (T, H, W, 3) uint8: sharp vivid R_t
    target_blurry: np.ndarray | None  # (T, H, W, 3) uint8: blurry noise-free vivid R'_t
    mask: np.ndarray  # (T, H, W) bool: teeth visible M_t
    homographies: np.ndarray  # (T, 3, 3) float64: H_{t-1->t}, identity first
    occluder: np.ndarray | None = None  # (T, H, W) bool: instruments/spray (synthetic only, not stored)
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return int(self.input.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.input.shape[1]), int(self.input.shape[2])


# ----------------------------------------------------------------------------------------------
# Small helpers: noise fields, coordinate conventions, smooth random walks
# ----------------------------------------------------------------------------------------------


def fractal_noise(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int = 4) -> np.ndarray:
    """Zero-mean, unit-std value noise (h, w) float32 with ``cells`` features across the longer side."""
    out = np.zeros((h, w), np.float32)
    amp = 1.0
    for octave in range(octaves):
        n = cells * 2**octave
        gy, gx = max(2, int(round(n * h / max(h, w))) + 1), max(2, int(round(n * w / max(h, w))) + 1)
        grid = rng.standard_normal((gy, gx)).astype(np.float32)
        out += np.float32(amp) * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        amp *= 0.5
    return (out - out.mean()) / (out.std() + 1e-6)


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def warp_affine(image: np.ndarray, src_to_dst: np.ndarray, height: int, width: int, border: int) -> np.ndarray:
    """Samples ``image`` into a (height, width) canvas; ``src_to_dst`` (3x3 affine) in our pixel convention.

    OpenCV puts pixel centres at integers, so the inverse map is conjugated by a half-pixel shift.
    """
    dst_to_src_cv = _translate(-0.5, -0.5) @ np.linalg.inv(src_to_dst) @ _translate(0.5, 0.5)
    return cv2.warpAffine(
        image,
        dst_to_src_cv[:2],
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=border,
        borderValue=0,
    )


def _ou_path(
    rng: np.random.Generator, n: int, dims: int, sigma: float, rho: float, spring: float, step: float
) -> np.ndarray:
    """Position of a damped random walk: OU velocity (std ``sigma`` per frame) pulled back to 0 by a spring.

    Integrated at sub-frame steps (``step`` frames each) so the path is smooth inside a frame's exposure.
    """
    pos = np.zeros((n, dims))
    x = np.zeros(dims)
    v = rng.normal(0.0, sigma, dims)
    kick = sigma * math.sqrt(1.0 - rho * rho)
    for k in range(n):
        pos[k] = x
        v = rho * v + kick * rng.standard_normal(dims) - spring * x * step
        x = x + v * step
    return pos


def _shake(rng: np.random.Generator, times: np.ndarray, amplitude: float, dims: int) -> np.ndarray:
    """Handpiece tremor: a few sinusoids at 0.15-0.45 cycles per frame (about 5-13 Hz at 30 fps)."""
    out = np.zeros((times.size, dims))
    for _ in range(3):
        freq = rng.uniform(0.15, 0.45)
        phase = rng.uniform(0, 2 * math.pi, dims)
        amp = amplitude * rng.uniform(0.3, 1.0, dims)
        out += amp * np.sin(2 * math.pi * freq * times[:, None] + phase)
    return out


# ----------------------------------------------------------------------------------------------
# The world: tissue, teeth, drops
# ----------------------------------------------------------------------------------------------


@dataclass
class World:
    rgb: np.ndarray  # (Hw, Ww, 3) float32 in [0, 1]
    teeth: np.ndarray | None  # (Hw, Ww) float32 coverage in [0, 1]; None: no teeth labels (not dental)
    anchor: np.ndarray  # (2,) world point on the dental arch the camera hovers over
    arch_angle: float


def _superellipse(
    rng: np.random.Generator, centre: np.ndarray, a: float, b: float, angle: float, wobble: float
) -> np.ndarray:
    """(64, 2) outline of an irregular rounded shape: superellipse with low-order radial wobble."""
    theta = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    p = rng.uniform(2.2, 3.6)
    c, s = np.abs(np.cos(theta)), np.abs(np.sin(theta))
    radius = 1.0 / ((c / a) ** p + (s / b) ** p) ** (1.0 / p)
    for k in range(2, 6):
        radius *= 1.0 + wobble / k * rng.standard_normal() * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    x, y = radius * np.cos(theta), radius * np.sin(theta)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack((centre[0] + ca * x - sa * y, centre[1] + sa * x + ca * y), axis=1)


def _fill(shape: tuple[int, int], polygon: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (float32 0..1) of a polygon given in our convention, on a local canvas."""
    canvas = np.zeros(shape, np.uint8)
    pts = np.round((polygon - origin - 0.5) * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillPoly(canvas, [pts], 255, lineType=cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _polyline(
    rng: np.random.Generator, start: np.ndarray, heading: float, steps: int, length: float, turn: float
) -> np.ndarray:
    pts = [start]
    for _ in range(steps):
        heading += rng.normal(0, turn)
        pts.append(pts[-1] + length * np.array([math.cos(heading), math.sin(heading)]))
    return np.array(pts)


def _draw_lines(shape: tuple[int, int], lines: list[np.ndarray], thickness: int, origin: np.ndarray) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    for line in lines:
        pts = np.round((line - origin - 0.5) * 16).astype(np.int32)
        cv2.polylines(canvas, [pts], False, 255, thickness, lineType=cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _render_tooth(
    rng: np.random.Generator, outline: np.ndarray, size: float, unit: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """One tooth's colour and coverage on its bounding box: enamel dome, fissures, cracks, filling, highlights."""
    pad = 3
    x0, y0 = np.floor(outline.min(axis=0)).astype(int) - pad
    x1, y1 = np.ceil(outline.max(axis=0)).astype(int) + pad
    origin = np.array([x0, y0], float)
    shape = (y1 - y0, x1 - x0)
    cover = _fill(shape, outline, origin)
    dist = cv2.distanceTransform((cover > 0.5).astype(np.uint8), cv2.DIST_L2, 5)
    dome = np.clip(dist / (0.35 * size), 0.0, 1.0)
    profile = np.sqrt(1.0 - (1.0 - dome) ** 2)  # (h, w) spherical-ish enamel shading
    ivory = np.array([0.99, 0.96, 0.90]) * rng.uniform(0.93, 1.03) + rng.normal(0, 0.01, 3) * [1, 1, 2]
    edge = ivory * np.array([0.88, 0.78, 0.62]) * rng.uniform(0.85, 1.0)  # cervical yellowing
    w = profile[..., None] ** 0.8
    colour = (edge * (1 - w) + ivory * w).astype(np.float32)
    colour *= (0.68 + 0.32 * profile)[..., None]
    h, wd = shape
    texture = 0.035 * fractal_noise(rng, h, wd, max(3.0, wd / (0.08 * unit)), 3)
    colour *= (1.0 + texture)[..., None]
    centre = outline.mean(axis=0)
    # Occlusal fissures: a central groove along the tooth with short side branches, soft and brownish.
    axis_angle = math.atan2(*(outline[0] - centre)[::-1]) + rng.normal(0, 0.3)
    axis = np.array([math.cos(axis_angle), math.sin(axis_angle)])
    main = _polyline(rng, centre - 0.28 * size * axis, axis_angle, 6, 0.1 * size, 0.25)
    grooves = [main]
    for _ in range(rng.integers(1, 5)):
        root = main[rng.integers(1, len(main) - 1)]
        branch_angle = axis_angle + rng.choice([-1, 1]) * rng.uniform(0.8, 1.4)
        grooves.append(_polyline(rng, root, branch_angle, 3, 0.06 * size, 0.3))
    fiss = _draw_lines(shape, grooves, max(1, int(0.02 * size)), origin)
    fiss = cv2.GaussianBlur(fiss, (0, 0), 0.5 + 0.012 * size) * cover * rng.uniform(0.3, 0.6)
    colour = colour * (1 - fiss[..., None]) + fiss[..., None] * np.array([0.42, 0.32, 0.24], np.float32)
    if rng.random() < 0.4:  # crack: a thin dark line from the rim inward
        start = outline[rng.integers(len(outline))]
        heading = math.atan2(*(centre - start)[::-1]) + rng.normal(0, 0.4)
        crack = _draw_lines(shape, [_polyline(rng, start, heading, 8, 0.06 * size, 0.35)], 1, origin)
        colour *= (1 - 0.45 * crack)[..., None]
    if rng.random() < 0.2:  # filling: amalgam (grey, metallic) or composite (slightly off-shade)
        blob = _superellipse(rng, centre + rng.normal(0, 0.1 * size, 2), *(rng.uniform(0.1, 0.22, 2) * size), 0, 0.3)
        fill_cover = _fill(shape, blob, origin) * cover
        if rng.random() < 0.6:
            metal = np.array([0.52, 0.53, 0.57]) * (0.75 + 0.25 * profile[..., None])
            metal = metal * (1 + 0.08 * fractal_noise(rng, h, wd, wd / (0.03 * unit), 2))[..., None]
            rim = np.clip(cv2.Laplacian(fill_cover, cv2.CV_32F, ksize=3), 0, 1)
            colour = colour * (1 - fill_cover[..., None]) + metal * fill_cover[..., None]
            colour *= (1 - 0.5 * rim)[..., None]
        else:
            colour = colour * (1 - 0.12 * fill_cover[..., None] * np.array([0.0, 0.3, 1.0]))
    # Specular highlights on the wet enamel, where the dome faces the light.
    yy, xx = np.mgrid[0:h, 0:wd].astype(np.float32)
    spec = np.zeros(shape, np.float32)
    for _ in range(rng.integers(1, 5)):
        cy, cx = np.unravel_index(rng.choice(h * wd, p=(profile**4).ravel() / (profile**4).sum()), shape)
        sx, sy = rng.uniform(0.03, 0.1, 2) * size
        spec += rng.uniform(0.8, 1.3) * np.exp(-(((xx - cx) / sx) ** 2) - ((yy - cy) / sy) ** 2)
    spec = np.clip(spec, 0, 1)[..., None]
    colour = colour + spec * (1.0 - colour)
    return (slice(y0, y1), slice(x0, x1)), np.clip(colour, 0, 1).astype(np.float32), cover


def make_world(rng: np.random.Generator, cfg: SynthConfig) -> World:
    """Renders the static scene the camera films; ``unit`` = frame height at zoom 1."""
    unit = float(cfg.height)
    hw, ww = int(round(cfg.height * WORLD_SCALE)), int(round(cfg.width * WORLD_SCALE))
    centre = np.array([ww / 2, hw / 2])
    arch_angle = rng.uniform(0, 2 * math.pi)
    direction = np.array([math.cos(arch_angle), math.sin(arch_angle)])
    normal = np.array([-direction[1], direction[0]])
    curvature = rng.uniform(-0.25, 0.25) / unit
    tooth_w = unit * rng.uniform(0.35, 0.6)
    tooth_h = tooth_w * rng.uniform(0.8, 1.25)

    # Tissue: gum band along the arch, tongue on one side and cheek mucosa on the other.
    yy, xx = np.mgrid[0:hw, 0:ww].astype(np.float32) + np.float32(0.5)
    # Python floats, not numpy float64 scalars: they keep the (large) arrays in float32.
    cx, cy = float(centre[0]), float(centre[1])
    dx, dy, bend = float(direction[0]), float(direction[1]), float(curvature)
    along = (xx - cx) * dx + (yy - cy) * dy
    across = (xx - cx) * -dy + (yy - cy) * dx - bend * along**2
    wander = fractal_noise(rng, hw, ww, 6, 3)
    gum_extent = tooth_h / 2 + unit * rng.uniform(0.1, 0.3) + 0.05 * unit * wander
    gum = 0.5 + 0.5 * np.tanh((gum_extent - np.abs(across)) / (0.04 * unit))  # logistic, no overflow
    gum_col = (np.array([0.88, 0.50, 0.52]) * rng.uniform(0.9, 1.05) + rng.normal(0, 0.02, 3)).astype(np.float32)
    tongue_col = (np.array([0.82, 0.40, 0.44]) * rng.uniform(0.85, 1.05) + rng.normal(0, 0.02, 3)).astype(np.float32)
    mucosa_col = (np.array([0.72, 0.24, 0.27]) * rng.uniform(0.8, 1.05) + rng.normal(0, 0.02, 3)).astype(np.float32)
    side = (across > 0) if rng.random() < 0.5 else (across < 0)
    tongue_w = side.astype(np.float32)[..., None]
    far = tongue_col * tongue_w + mucosa_col * (1 - tongue_w)
    rgb = gum[..., None] * gum_col + (1 - gum[..., None]) * far
    rgb *= (1 + 0.10 * fractal_noise(rng, hw, ww, 8, 4))[..., None]
    rgb *= 1 + np.stack([0.04 * fractal_noise(rng, hw, ww, 5, 2) for _ in range(3)], axis=-1)
    stipple = fractal_noise(rng, hw, ww, ww / (0.012 * unit), 1)
    papillae = np.clip(stipple - 1.6, 0, 1) * tongue_w[..., 0] * (1 - gum)
    rgb += (0.25 * papillae)[..., None] * (np.array([1.0, 0.9, 0.9], np.float32) - rgb)
    rgb *= (1 + 0.03 * stipple * gum)[..., None]
    # Vessels on the mucosa, dark cavities (throat, vestibule) far from the arch.
    vessels = [
        _polyline(rng, centre + rng.uniform(-0.5, 0.5, 2) * [ww, hw], rng.uniform(0, 2 * math.pi), 12, 0.05 * unit, 0.4)
        for _ in range(rng.integers(2, 7))
    ]
    vein = cv2.GaussianBlur(_draw_lines((hw, ww), vessels, max(1, int(0.006 * unit)), np.zeros(2)), (0, 0), 1.0)
    vein *= 1 - gum
    rgb = rgb * (1 - 0.45 * vein[..., None]) + 0.45 * vein[..., None] * np.array([0.45, 0.05, 0.1], np.float32)
    cavity = np.clip((fractal_noise(rng, hw, ww, 3, 2) - 0.6) * 2.0, 0, 1)
    cavity *= np.clip((np.abs(across) - (tooth_h / 2 + 0.5 * unit)) / (0.3 * unit), 0, 1)
    rgb *= (1 - 0.85 * cavity)[..., None]

    # Teeth along the arch with gaps (missing teeth show gum), dark shadow around each.
    teeth_rgb = np.zeros_like(rgb)
    teeth = np.zeros((hw, ww), np.float32)
    span = math.hypot(hw, ww) / 2 + tooth_w
    pos = -span + rng.uniform(0, tooth_w)
    while pos < span:
        gap = tooth_w * rng.uniform(0.03, 0.15)
        width = tooth_w * rng.uniform(0.85, 1.15)
        if rng.random() > 0.12:
            c = centre + direction * (pos + width / 2) + normal * (curvature * (pos + width / 2) ** 2)
            c += normal * rng.normal(0, 0.05 * tooth_h)
            a, b = width / 2, tooth_h / 2 * rng.uniform(0.85, 1.1)
            outline = _superellipse(rng, c, a, b, arch_angle + rng.normal(0, 0.08), 0.12)
            lo, hi = outline.min(axis=0), outline.max(axis=0)
            if hi[0] > 2 and hi[1] > 2 and lo[0] < ww - 2 and lo[1] < hw - 2:
                outline = np.clip(outline, -4, [ww + 4, hw + 4])
                region, colour, cover = _render_tooth(rng, outline, min(a, b) * 2, unit)
                region, colour, cover = _clip_region(region, colour, cover, hw, ww)
                teeth_rgb[region] = teeth_rgb[region] * (1 - cover[..., None]) + colour * cover[..., None]
                teeth[region] = np.maximum(teeth[region], cover)
        pos += width + gap
    shadow_sigma = 0.03 * unit
    shadow = cv2.GaussianBlur(cv2.dilate(teeth, np.ones((3, 3), np.uint8)), (0, 0), shadow_sigma)
    rgb *= (1 - 0.75 * np.clip(shadow * 1.6, 0, 1))[..., None]
    rgb = teeth_rgb * teeth[..., None] + rgb * (1 - teeth[..., None])

    # Water drops resting on surfaces: a darker body with a bright rim highlight.
    for _ in range(rng.integers(3, 12)):
        c = rng.uniform([0, 0], [ww, hw])
        r = rng.uniform(0.006, 0.02) * unit
        y0, y1 = int(max(0, c[1] - 2 * r - 2)), int(min(hw, c[1] + 2 * r + 3))
        x0, x1 = int(max(0, c[0] - 2 * r - 2)), int(min(ww, c[0] + 2 * r + 3))
        if y1 <= y0 or x1 <= x0:
            continue
        dy, dx = yy[y0:y1, x0:x1] - c[1], xx[y0:y1, x0:x1] - c[0]
        inside = np.clip(r - np.sqrt(dx * dx + dy * dy) + 0.5, 0, 1)[..., None]
        glint = np.exp(-((dx + 0.35 * r) ** 2 + (dy + 0.35 * r) ** 2) / (0.1 * r * r + 0.3))[..., None]
        patch = rgb[y0:y1, x0:x1]
        rgb[y0:y1, x0:x1] = patch * (1 - 0.15 * inside) + glint * inside * (1 - patch)
    return World(np.clip(rgb, 0, 1).astype(np.float32), teeth, centre.copy(), arch_angle)


def content_world(rng: np.random.Generator, cfg: SynthConfig) -> World:
    """The world of a non-dental scene: dead leaves or a photograph, without teeth labels."""
    if cfg.content == "dead-leaves":
        hw, ww = int(round(cfg.height * WORLD_SCALE)), int(round(cfg.width * WORLD_SCALE))
        px = cfg.height / 320.0
        palette = photo_palette(TRAINING_PHOTOS) if rng.random() < 0.5 else None
        rgb = dead_leaves(rng, hw, ww, r_min=1.5 * px, r_max=rng.uniform(0.15, 0.5) * cfg.height, palette=palette)
    elif cfg.content in ("photos", "soft-photos") or cfg.content in VALIDATION_SETS:
        names = VALIDATION_SETS.get(cfg.content, TRAINING_PHOTOS)
        name = names[int(rng.integers(0, len(names)))]
        enlarge = MIN_ENLARGEMENT.get(cfg.content, 0.0)
        rgb = photo_world(rng, name, cfg.height, cfg.width, augment=True, min_scale=enlarge)
    elif cfg.content.startswith("photo:"):
        rgb = photo_world(rng, cfg.content.removeprefix("photo:"), cfg.height, cfg.width, augment=False)
    else:
        raise ValueError(f"content_world: {cfg.content!r} is the dental generator's (make_world)")
    hw, ww = rgb.shape[:2]
    return World(rgb, None, np.array([ww / 2, hw / 2]), float(rng.uniform(-0.3, 0.3)))


def _clip_region(
    region: tuple[slice, slice], colour: np.ndarray, cover: np.ndarray, hw: int, ww: int
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Crops a tooth's local canvas to the world bounds."""
    ys, xs = region
    top, left = max(0, -ys.start), max(0, -xs.start)
    bottom = ys.stop - ys.start - max(0, ys.stop - hw)
    right = xs.stop - xs.start - max(0, xs.stop - ww)
    new = (slice(ys.start + top, ys.start + bottom), slice(xs.start + left, xs.start + right))
    return new, colour[top:bottom, left:right], cover[top:bottom, left:right]


# ----------------------------------------------------------------------------------------------
# Camera: world -> frame partial-affine homographies per sub-frame
# ----------------------------------------------------------------------------------------------


def camera_path(rng: np.random.Generator, cfg: SynthConfig, world: World, n_sub: int) -> np.ndarray:
    """(n_sub, 3, 3) world -> frame matrices ``s R (w - c) + frame centre`` along a smooth walk with shake."""
    sf = cfg.subframes
    step = 1.0 / sf  # in frames
    px = cfg.height / 320.0  # speeds are quoted at Vident-lab's 320x416
    times = np.arange(n_sub) * step
    rho = math.exp(-step / rng.uniform(5.0, 20.0))  # velocity correlation time of 5-20 frames
    speed = cfg.motion * px * rng.uniform(1.0, 7.0)  # px per frame
    spring = (2 * math.pi / rng.uniform(30.0, 60.0)) ** 2  # keeps the camera over the arch
    centre = world.anchor + _ou_path(rng, n_sub, 2, speed, rho, spring, step)
    centre += rng.normal(0, 0.1 * cfg.height, 2)
    angle = world.arch_angle + rng.uniform(-0.5, 0.5) + math.pi * (rng.random() < 0.5)
    angle += _ou_path(rng, n_sub, 1, cfg.motion * math.radians(rng.uniform(0.2, 1.5)), rho, 0.0, step)[:, 0]
    log_zoom = math.log(rng.uniform(0.9, 1.25))
    log_zoom += _ou_path(rng, n_sub, 1, cfg.motion * rng.uniform(0.002, 0.015), rho, spring, step)[:, 0]
    shake_px = cfg.shake * px * rng.uniform(0.2, 1.5)
    centre += _shake(rng, times, shake_px, 2)
    angle += _shake(rng, times, cfg.shake * math.radians(0.15), 1)[:, 0]
    zoom = np.exp(np.clip(log_zoom, math.log(0.8), math.log(1.45)))
    cos, sin = zoom * np.cos(angle), zoom * np.sin(angle)
    cams = np.zeros((n_sub, 3, 3))
    cams[:, 0, 0], cams[:, 0, 1], cams[:, 1, 0], cams[:, 1, 1] = cos, -sin, sin, cos
    cams[:, 0, 2] = cfg.width / 2 - (cos * centre[:, 0] - sin * centre[:, 1])
    cams[:, 1, 2] = cfg.height / 2 - (sin * centre[:, 0] + cos * centre[:, 1])
    cams[:, 2, 2] = 1.0
    return cams


# ----------------------------------------------------------------------------------------------
# Things that move on their own: instruments, spray; and lighting
# ----------------------------------------------------------------------------------------------


@dataclass
class Sprite:
    """A premultiplied RGBA image and its pose (sprite -> frame affine) at every sub-frame."""

    rgba: np.ndarray  # (h, w, 4) float32, rgb premultiplied by alpha
    poses: np.ndarray  # (n_sub, 3, 3)

    def footprint(self, k: int, height: int, width: int) -> tuple[int, int, int, int] | None:
        """(y0, y1, x0, x1) of the frame pixels the sprite can touch at sub-frame ``k``; None if none."""
        sh, sw = self.rgba.shape[:2]
        corners = np.array([[0, 0, 1], [sw, 0, 1], [sw, sh, 1], [0, sh, 1]], float) @ self.poses[k].T
        x0, y0 = np.floor(corners[:, :2].min(axis=0)).astype(int) - 1
        x1, y1 = np.ceil(corners[:, :2].max(axis=0)).astype(int) + 1
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        return (y0, y1, x0, x1) if x1 > x0 and y1 > y0 else None


def _capsule(xx: np.ndarray, yy: np.ndarray, x0: float, x1: float, yc: float, r: float) -> tuple[np.ndarray, ...]:
    """Coverage, sphere/cylinder shading and the signed across-axis coordinate of a capsule along x."""
    dx = np.clip(xx, x0, x1) - xx
    dy = yy - yc
    dist = np.sqrt(dx * dx + dy * dy)
    cover = np.clip(r - dist + 0.5, 0, 1)
    shade = np.sqrt(np.clip(1 - (dist / r) ** 2, 0, 1))
    return cover, shade, np.clip(dy / r, -1, 1)


def _instrument_sprite(rng: np.random.Generator, kind: str, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rgba, tip) of a bur on its handpiece or a suction tube, lying along +x from the tip."""
    unit = float(cfg.height)
    length = math.hypot(cfg.height, cfg.width) * 1.4
    r_max = 0.1 * unit if kind == "suction" else 0.075 * unit
    h, w = int(2 * r_max + 8), int(length)
    yc, tip_x = h / 2, 4.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)
    rgba = np.zeros((h, w, 4), np.float32)

    def over(cover: np.ndarray, colour: np.ndarray) -> None:
        rgba[..., :3] = colour * cover[..., None] + rgba[..., :3] * (1 - cover[..., None])
        rgba[..., 3] = cover + rgba[..., 3] * (1 - cover)

    if kind == "suction":
        r = rng.uniform(0.06, 0.1) * unit
        base = np.array([[0.93, 0.94, 0.96], [0.62, 0.76, 0.92], [0.88, 0.86, 0.62], [0.75, 0.88, 0.78]])[
            rng.integers(4)
        ]
        cover, shade, v = _capsule(xx, yy, tip_x + r, w + r, yc, r)
        colour = base * (0.35 + 0.65 * shade[..., None]) + 0.5 * np.exp(-(((v - 0.4) / 0.15) ** 2))[..., None]
        opening = np.clip(0.8 * r - np.hypot((xx - tip_x - r) * 1.6, yy - yc) + 0.5, 0, 1)[..., None]
        colour = colour * (1 - opening) + opening * np.array([0.08, 0.06, 0.06])
        over(cover, np.clip(colour, 0, 1))
    else:
        head_r = rng.uniform(0.018, 0.032) * unit
        head_len = rng.uniform(0.05, 0.11) * unit
        shaft_r = max(1.0, 0.45 * head_r)
        neck = tip_x + head_len + rng.uniform(0.08, 0.16) * unit
        body_r = rng.uniform(0.045, 0.07) * unit
        chrome = np.array([0.72, 0.74, 0.78])
        cover, shade, v = _capsule(xx, yy, neck + body_r, w + body_r, yc, body_r)
        body = chrome * (0.3 + 0.6 * shade[..., None]) + 0.6 * np.exp(-(((v + 0.3) / 0.12) ** 2))[..., None]
        over(cover, np.clip(body, 0, 1))
        cover, shade, v = _capsule(xx, yy, tip_x + head_len, neck + body_r, yc, shaft_r)
        over(cover, np.clip(chrome * (0.35 + 0.65 * shade[..., None]), 0, 1))
        grit_col = np.array([0.85, 0.70, 0.36]) if rng.random() < 0.5 else np.array([0.74, 0.75, 0.78])
        grit = 1 + 0.35 * fractal_noise(rng, h, w, w / max(2.0, 0.6 * head_r), 1)
        cover, shade, v = _capsule(xx, yy, tip_x + head_r, tip_x + head_len, yc, head_r)
        over(cover, np.clip(grit_col * (0.3 + 0.7 * shade[..., None]) * grit[..., None], 0, 1))
    rgba[..., :3] *= rgba[..., 3:]
    return rgba, np.array([tip_x, yc])


def make_instruments(rng: np.random.Generator, cfg: SynthConfig, n_sub: int) -> list[Sprite]:
    """0-2 instruments; each tip wanders (own smooth walk) and its body points away from the frame centre."""
    if not cfg.instruments:
        return []
    sprites = []
    step = 1.0 / cfg.subframes
    frame_centre = np.array([cfg.width / 2, cfg.height / 2])
    for kind, prob in (("bur", 0.6), ("suction", 0.45)):
        if rng.random() >= prob:
            continue
        rgba, tip = _instrument_sprite(rng, kind, cfg)
        start = rng.uniform([-0.1, -0.1], [1.1, 1.1]) * [cfg.width, cfg.height]
        end = rng.uniform([-0.2, -0.2], [1.2, 1.2]) * [cfg.width, cfg.height]
        frac = np.linspace(0, 1, n_sub)[:, None]
        rho = math.exp(-step / rng.uniform(3.0, 10.0))
        wander = _ou_path(rng, n_sub, 2, cfg.height / 320 * rng.uniform(2, 10), rho, 0.05, step)
        tips = start * (1 - frac) + end * frac + wander
        out = start - frame_centre
        heading0 = math.atan2(out[1], out[0]) + rng.uniform(-0.6, 0.6)
        heading = heading0 + _ou_path(rng, n_sub, 1, math.radians(rng.uniform(0.5, 3)), rho, 0.02, step)[:, 0]
        cos, sin = np.cos(heading), np.sin(heading)
        poses = np.zeros((n_sub, 3, 3))
        poses[:, 0, 0], poses[:, 0, 1], poses[:, 1, 0], poses[:, 1, 1] = cos, -sin, sin, cos
        poses[:, 0, 2] = tips[:, 0] - (cos * tip[0] - sin * tip[1])
        poses[:, 1, 2] = tips[:, 1] - (sin * tip[0] + cos * tip[1])
        poses[:, 2, 2] = 1.0
        sprites.append(Sprite(rgba, poses))
    return sprites


@dataclass
class Spray:
    """Flying drops (position, velocity, radius, opacity, birth, life, in sub-frames) and a drifting mist."""

    drops: np.ndarray  # (n, 8): x, y, vx, vy, radius, alpha, birth, life
    mist: np.ndarray  # (n_sub, 4): x, y, sigma, alpha


def make_spray(rng: np.random.Generator, cfg: SynthConfig, n_sub: int) -> Spray | None:
    if not cfg.spray or rng.random() >= 0.5:
        return None
    px = cfg.height / 320
    births = []
    for _ in range(rng.integers(1, 4)):  # bursts
        t0 = rng.integers(0, n_sub)
        births.append(t0 + rng.integers(0, 3 * cfg.subframes, size=rng.integers(5, 40)))
    born = np.concatenate(births).astype(float)
    n = born.size
    angle = rng.uniform(0, 2 * math.pi, n)
    speed = rng.uniform(2, 12, n) * px * 8 / cfg.subframes  # px per sub-frame at 8 sub-frames per frame
    drops = np.stack(
        (
            rng.uniform(0, cfg.width, n),
            rng.uniform(0, cfg.height, n),
            speed * np.cos(angle),
            speed * np.sin(angle),
            rng.uniform(0.8, 3.5, n) * px,
            rng.uniform(0.55, 0.9, n),
            born,
            rng.uniform(0.5, 3.0, n) * cfg.subframes,
        ),
        axis=1,
    )
    mist = np.zeros((n_sub, 4))
    if rng.random() < 0.6:
        step = 1.0 / cfg.subframes
        path = _ou_path(rng, n_sub, 2, 6 * px, math.exp(-step / 10), 0.0, step)
        mist[:, :2] = rng.uniform([0, 0], [cfg.width, cfg.height]) + path
        mist[:, 2] = rng.uniform(0.25, 0.5) * cfg.height
        peak, t0, dur = rng.uniform(0.15, 0.4), rng.integers(0, n_sub), rng.uniform(1, 6) * cfg.subframes
        mist[:, 3] = peak * np.exp(-(((np.arange(n_sub) - t0) / dur) ** 2))
    return Spray(drops, mist)


def _spray_layer(spray: Spray, k: int, h: int, w: int) -> np.ndarray:
    """Opacity (h, w) float32 of drops and mist at sub-frame ``k``."""
    canvas = np.zeros((h, w), np.uint8)
    d = spray.drops
    live = (k >= d[:, 6]) & (k < d[:, 6] + d[:, 7])
    for x, y, vx, vy, r, a, birth, _ in d[live]:
        age = k - birth
        cx, cy = x + vx * age, y + vy * age
        centre = (int(round((cx - 0.5) * 16)), int(round((cy - 0.5) * 16)))
        cv2.circle(canvas, centre, int(round(r * 16)), int(a * 255), -1, lineType=cv2.LINE_AA, shift=4)
    alpha = canvas.astype(np.float32) / 255.0
    mx, my, sigma, peak = spray.mist[k]
    if peak > 0.01:
        gx = np.exp(-0.5 * ((np.arange(w) + 0.5 - mx) / sigma) ** 2).astype(np.float32)
        gy = np.exp(-0.5 * ((np.arange(h) + 0.5 - my) / sigma) ** 2).astype(np.float32)
        mist = np.float32(peak) * np.outer(gy, gx)
        alpha = 1 - (1 - alpha) * (1 - mist)
    return alpha


@dataclass
class Lighting:
    """Per-frame illumination field = gain(t) * vignette * (1 + gradient(t) . xy)."""

    gain: np.ndarray  # (T,)
    gradient: np.ndarray  # (T, 2)
    vignette: np.ndarray  # (H, W) float32
    dark: list[int]

    def field(self, t: int) -> np.ndarray:
        h, w = self.vignette.shape
        gx = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
        gy = (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
        ramp = 1 + self.gradient[t, 0] * gx[None, :] + self.gradient[t, 1] * gy[:, None]
        return (np.float32(self.gain[t]) * self.vignette * ramp).astype(np.float32)


def make_lighting(rng: np.random.Generator, cfg: SynthConfig) -> Lighting:
    t = cfg.frames
    if not cfg.lighting:
        return Lighting(np.ones(t), np.zeros((t, 2)), np.ones((cfg.height, cfg.width), np.float32), [])
    rho = math.exp(-1 / rng.uniform(5, 20))
    gain = np.clip(np.exp(rng.normal(0, 0.08) + _ou_path(rng, t, 1, 0.04, rho, 0.05, 1.0)[:, 0]), 0.7, 1.2)
    gradient = np.clip(rng.normal(0, 0.12, 2) + _ou_path(rng, t, 2, 0.05, rho, 0.05, 1.0), -0.35, 0.35)
    yy, xx = np.mgrid[0 : cfg.height, 0 : cfg.width].astype(np.float32) + np.float32(0.5)
    cx = cfg.width * (0.5 + rng.normal(0, 0.08))
    cy = cfg.height * (0.5 + rng.normal(0, 0.08))
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (0.25 * (cfg.width**2 + cfg.height**2))
    vignette = (1 - rng.uniform(0.15, 0.45) * r2).astype(np.float32)
    dark: list[int] = []
    if cfg.dark_frames and t >= 3 and rng.random() < min(0.5, t / 100):  # about one episode per 100 frames
        start, length = int(rng.integers(1, t)), int(rng.integers(1, 5))
        depth = rng.uniform(0.08, 0.3)
        for i in range(start, min(t, start + length)):
            gain[i] *= depth
            dark.append(i)
    return Lighting(gain, gradient, vignette, dark)


# ----------------------------------------------------------------------------------------------
# Rendering a sequence
# ----------------------------------------------------------------------------------------------


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _degradation_rng(seed: int | np.random.SeedSequence | list[int], key: int = 0xDE6) -> np.random.Generator:
    """A stream for the per-clip degradation draw (``key`` 0xDE7: the mixed choice; 0xDE8: the recipe's
    client codec), apart from the scene's, so drawing it leaves the scene (and the recipe's test split)
    exactly as before."""
    base = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return np.random.default_rng(np.random.SeedSequence(base.entropy, spawn_key=(*base.spawn_key, key)))


def render_sequence(
    cfg: SynthConfig, seed: int | np.random.SeedSequence | list[int], degradation: Degradation | None = None
) -> LabelledSequence:
    """Renders one labelled sequence; the same (cfg, seed, degradation) always gives identical arrays.

    ``degradation`` None: the dissertation's recipe (``cfg.degradation == "recipe"``) or one drawn
    per clip from ``degrade.WIDE`` (``"wide"``), or either with odds ``cfg.recipe_share`` per clip
    (``"mixed"``: a network keeps the recipe's camera while it learns the wide ones); a given one is
    applied as it is (evaluation splits).
    """
    rng = np.random.default_rng(seed)
    dental = cfg.content == "dental"
    world = make_world(rng, cfg) if dental else content_world(rng, cfg)
    drawn = degradation is not None
    if degradation is None and cfg.degradation != "recipe":
        if cfg.degradation == "wide" or _degradation_rng(seed, 0xDE7).random() >= cfg.recipe_share:
            degradation, drawn = Degradation.sample(_degradation_rng(seed)), True
    sf = cfg.subframes
    exposure = cfg.exposure if degradation is None else degradation.exposure
    half = exposure // 2
    n_sub = (cfg.frames - 1) * sf + exposure
    cams = camera_path(rng, cfg, world, n_sub)
    instruments = make_instruments(rng, cfg, n_sub) if dental else []
    spray = make_spray(rng, cfg, n_sub) if dental else None
    lighting = make_lighting(rng, cfg)
    response = CameraResponse.random(rng)
    level = pick_noise_level(rng, cfg.noise)
    if degradation is None:
        degradation = Degradation.recipe(response, level, exposure=cfg.exposure)
        codec_rng = _degradation_rng(seed, 0xDE8) if cfg.recipe_codec > 0 else None
        if codec_rng is not None and codec_rng.random() < cfg.recipe_codec:
            codec, quality = sample_codec(codec_rng, compressed=True)
            degradation = replace(degradation, codec=codec, quality=quality)
    h, w = cfg.height, cfg.width
    px = h / 320.0
    kernel = defocus_kernel(degradation.defocus * px) if degradation.defocus > 0 else None
    vignette = vignette_field(h, w, degradation.vignetting)[..., None] if degradation.vignetting > 0 else None
    fixed_pattern = None
    if degradation.fixed_pattern_sigma > 0:
        fixed_pattern = degradation.fixed_pattern_sigma * rng.standard_normal((h, w, 1))

    def render(k: int) -> tuple[np.ndarray, np.ndarray]:
        """Sub-frame ``k``: colour (h, w, 3) and the opacity of everything in front of the world."""
        rgb = warp_affine(world.rgb, cams[k], h, w, cv2.BORDER_REFLECT_101)
        occ = np.zeros((h, w), np.float32)
        for sprite in instruments:
            box = sprite.footprint(k, h, w)
            if box is None:
                continue
            y0, y1, x0, x1 = box
            layer = warp_affine(sprite.rgba, _translate(-x0, -y0) @ sprite.poses[k], y1 - y0, x1 - x0, 0)
            alpha = layer[..., 3:]
            rgb[y0:y1, x0:x1] = rgb[y0:y1, x0:x1] * (1 - alpha) + layer[..., :3]
            occ[y0:y1, x0:x1] = 1 - (1 - occ[y0:y1, x0:x1]) * (1 - alpha[..., 0])
        if spray is not None:
            alpha = _spray_layer(spray, k, h, w)
            rgb = rgb * (1 - alpha[..., None]) + alpha[..., None] * np.float32([0.9, 0.93, 0.96])
            occ = 1 - (1 - occ) * (1 - alpha)
        return rgb, occ

    shape = (cfg.frames, h, w)
    out_input = np.empty((*shape, 3), np.uint8)
    out_target = np.empty((*shape, 3), np.uint8)
    out_blurry = np.empty((*shape, 3), np.uint8)
    out_mask = np.empty(shape, bool)
    out_occ = np.empty(shape, bool)
    homographies = np.empty((cfg.frames, 3, 3))
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for t in range(cfg.frames):
        first = t * sf
        for k in range(first, first + exposure):
            if k not in cache:
                cache[k] = render(k)
        blurry = sum(cache[k][0] for k in range(first, first + exposure)) / np.float32(exposure)
        sharp, occ = cache[first + half]
        centre = first + half
        if world.teeth is None:
            out_mask[t] = False
        else:
            teeth = warp_affine(world.teeth, cams[centre], h, w, cv2.BORDER_REFLECT_101)
            out_mask[t] = (teeth > 0.5) & (occ < 0.5)
        out_occ[t] = occ > 0.02
        homographies[t] = np.eye(3) if t == 0 else cams[centre] @ np.linalg.inv(cams[centre - sf])
        light = lighting.field(t)[..., None]
        blurry_lit = np.clip(blurry * light, 0, 1)
        if kernel is not None:  # optics: defocus blurs what reaches the sensor (and R2-D4's R')
            blurry_lit = cv2.filter2D(blurry_lit, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
        out_target[t] = _to_uint8(sharp * light)
        out_blurry[t] = _to_uint8(blurry_lit)
        camera = degradation.response.apply(blurry_lit)
        if vignette is not None:
            camera = camera * vignette
        out_input[t] = sensor_noise(rng, camera, degradation.noise_a, degradation.noise_sigma,
                                    degradation.row_sigma, fixed_pattern)  # fmt: skip
        for k in [k for k in cache if k < first + sf]:
            del cache[k]
    out_input = compress(out_input, degradation.codec, degradation.quality)
    homographies /= homographies[:, 2:3, 2:3]
    meta: dict[str, object] = {
        "content": cfg.content,
        "has_mask": world.teeth is not None,
        "noise": "drawn" if drawn else level,
        "noise_a": degradation.noise_a,
        "noise_sigma": degradation.noise_sigma,
        "camera_response": degradation.response.to_dict(),
        "instruments": len(instruments),
        "spray": spray is not None,
        "dark_frames": lighting.dark,
    }
    if drawn or degradation.codec != "none" or degradation.defocus > 0:
        meta["degradation"] = degradation.to_dict()
    return LabelledSequence(out_input, out_target, out_blurry, out_mask, homographies, out_occ, meta)


def real_content_sequence(cfg: SynthConfig, seed: int, index: int) -> LabelledSequence:
    """Sequence ``index`` of the real-content evaluation split: a camera filming one of the evaluation
    photographs (``scenes.EVALUATION_PHOTOS``, in turn), degraded by settings drawn from the "real"
    split's own seed stream over the same physical ranges as training (``degrade.WIDE``), with the
    codec taken in turn (none, JPEG, H.264) so every client path is measured. No training source
    draws from that stream or films those photographs."""
    photo = EVALUATION_PHOTOS[index % len(EVALUATION_PHOTOS)]
    sequence = sequence_seed(seed, "real", index)
    degradation = Degradation.sample(_degradation_rng(sequence))
    codec = CODECS[(index // len(EVALUATION_PHOTOS)) % len(CODECS)]
    quality = {"none": 0, "jpeg": int(np.mean(WIDE.jpeg_quality)), "h264": int(np.mean(WIDE.h264_crf))}[codec]
    if codec == degradation.codec:
        quality = degradation.quality
    degradation = replace(degradation, codec=codec, quality=quality)
    photo_cfg = replace(cfg, content=f"photo:{photo}", degradation="wide", instruments=False, spray=False)
    return render_sequence(photo_cfg, sequence, degradation)


__all__ = [
    "real_content_sequence",
    "DEFAULT_SEED",
    "SPLITS",
    "CONTENTS",
    "DEGRADATIONS",
    "SynthConfig",
    "content_world",
    "LabelledSequence",
    "sequence_seed",
    "render_sequence",
    "make_world",
    "camera_path",
    "warp_affine",
]
