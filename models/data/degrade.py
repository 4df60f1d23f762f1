"""What a dental microcamera does to a clean, vivid frame: a pale colour-cast response and noise.

Motion blur is made where the frames are rendered (``synth.py`` averages sub-frames along the
camera path, as section 5.3.1 does with 8x temporal interpolation and a 17-frame window); this
module holds the per-pixel stages that follow it:

* :class:`CameraResponse`: the small sensor's low-contrast, desaturated, colour-cast rendering,
  i.e. the inverse of the colour mapping (CM) that section 5.3.1 learns from the beam-splitter
  pairs. Drawn at random per sequence so a network cannot memorise one cast.
* :func:`poisson_gaussian`: eq. 3.1's noise, ``x = a * Poisson(z / a) + N(0, sigma^2)`` on 0-255
  values, at the three levels of section 3.3.1.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import cv2
import numpy as np

# (a, sigma) of section 3.3.1 in 0-255 units: typical of bright, dark and low-light images.
NOISE_LEVELS: dict[str, tuple[float, float]] = {
    "low": (0.5, 0.9),
    "moderate": (1.9, 1.7),
    "severe": (7.1, 3.3),
}
NOISE_CHOICES = (*NOISE_LEVELS, "mixed")

# Rec. 601 luma, the weights a sensor pipeline's saturation control uses.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class CameraResponse:
    """``black + contrast * (gains * desaturate(rgb)) ** gamma``: pale, flat and colour-cast."""

    black: float  # lifted black level: the washed-out look of the microcamera
    contrast: float  # < 1: flat
    saturation: float  # < 1: colours pulled toward grey
    gains: tuple[float, float, float]  # per-channel cast (white balance error)
    gamma: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> CameraResponse:
        return cls(
            black=float(rng.uniform(0.05, 0.16)),
            contrast=float(rng.uniform(0.58, 0.82)),
            saturation=float(rng.uniform(0.35, 0.75)),
            gains=(float(rng.uniform(0.80, 0.98)), float(rng.uniform(0.92, 1.08)), float(rng.uniform(0.95, 1.20))),
            gamma=float(rng.uniform(0.8, 1.15)),
        )

    @classmethod
    def identity(cls) -> CameraResponse:
        return cls(black=0.0, contrast=1.0, saturation=1.0, gains=(1.0, 1.0, 1.0), gamma=1.0)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """float RGB (..., 3) in [0, 1] -> float32 (..., 3) in [0, 1]."""
        rgb = rgb.astype(np.float32, copy=False)
        luma = rgb @ _LUMA  # (...)
        grey = luma[..., None]
        x = grey + np.float32(self.saturation) * (rgb - grey)
        x = np.clip(x * np.asarray(self.gains, np.float32), 0.0, 1.0)
        if self.gamma != 1.0:
            x = x ** np.float32(self.gamma)
        return np.float32(self.black) + np.float32(self.contrast) * x

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def poisson_gaussian(rng: np.random.Generator, clean: np.ndarray, a: float, sigma: float) -> np.ndarray:
    """Eq. 3.1 on 0-255 values: ``a * Poisson(z / a) + N(0, sigma^2)``, rounded and clipped to uint8.

    ``clean`` is float in [0, 1] (any shape); the Poisson part makes the noise signal dependent
    (brighter pixels noisier in absolute terms), which a plain Gaussian would miss. Drawn exactly
    (a normal approximation of the Poisson part was tried and was not faster in numpy).
    """
    return _to_uint8(_eq_3_1(rng, clean, a, sigma))


def _eq_3_1(rng: np.random.Generator, clean: np.ndarray, a: float, sigma: float) -> np.ndarray:
    """Unrounded float64 ``a * Poisson(255 z / a) + N(0, sigma^2)`` of ``clean`` in [0, 1]."""
    lam = np.clip(clean, 0.0, 1.0).astype(np.float64) * (255.0 / a)
    return a * rng.poisson(lam) + sigma * rng.standard_normal(lam.shape)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def pick_noise_level(rng: np.random.Generator, noise: str) -> str:
    """``noise`` itself, or one of the three levels drawn uniformly for ``mixed``."""
    if noise == "mixed":
        return str(rng.choice(list(NOISE_LEVELS)))
    if noise not in NOISE_LEVELS:
        raise ValueError(f"noise must be one of {', '.join(NOISE_CHOICES)}, got {noise!r}")
    return noise




# ----------------------------------------------------------------------------------------------
# Randomised degradations: the ranges a real microcamera and its streaming client span
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A closed interval a parameter is drawn from; ``log`` draws it log-uniformly (scale parameters)."""

    low: float
    high: float
    log: bool = False

    def draw(self, rng: np.random.Generator) -> float:
        if self.log:
            return float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def __contains__(self, value: float) -> bool:
        return self.low - 1e-9 <= value <= self.high + 1e-9


@dataclass(frozen=True)
class DegradationRanges:
    """Per-clip degradation ranges. Sources and reasoning for each: docs/data.md ("Degradations").

    Lengths are in pixels at 320 rows and scale with the frame height. The dissertation's recipe
    (exposure 17 of 8 sub-frames, the three (a, sigma) levels, the pale response, no compression)
    is one point inside every range.
    """

    exposure: tuple[int, int] = (1, 25)  # odd sub-frame counts (8 per frame interval): 0-3 frame times
    defocus_probability: float = 0.3
    defocus_radius: Range = Range(0.5, 2.5)  # disc radius, px at 320 rows
    noise_a: Range = Range(0.2, 10.0, log=True)  # Poisson scale (eq. 3.1), 0-255 units
    noise_sigma: Range = Range(0.5, 6.0, log=True)  # read noise std, 0-255 units
    row_noise_probability: float = 0.2
    row_sigma: Range = Range(0.5, 3.0)  # per-row offset std, 0-255 units, new every frame
    fixed_pattern_probability: float = 0.2
    fixed_pattern_sigma: Range = Range(0.5, 2.5)  # per-pixel offset std, fixed over the clip
    black: Range = Range(0.0, 0.16)
    contrast: Range = Range(0.55, 1.1)
    saturation: Range = Range(0.3, 1.3)
    gain: Range = Range(0.75, 1.3, log=True)  # per channel: white-balance casts either way
    gamma: Range = Range(0.7, 1.4, log=True)
    vignetting: Range = Range(0.0, 0.5)  # fall-off at the corners, camera side (not in the target)
    codec_probabilities: tuple[tuple[str, float], ...] = (("none", 0.35), ("jpeg", 0.35), ("h264", 0.3))
    jpeg_quality: tuple[int, int] = (30, 95)
    h264_crf: tuple[int, int] = (18, 36)


WIDE = DegradationRanges()
CODECS = ("none", "jpeg", "h264")


@dataclass(frozen=True)
class Degradation:
    """One clip's camera and client, from the scene to the bytes the service receives."""

    exposure: int  # sub-frames averaged into one frame (odd; 8 sub-frames per frame interval)
    defocus: float  # disc radius in pixels at 320 rows (0: in focus)
    response: CameraResponse
    vignetting: float  # relative fall-off at the frame corners (0: none)
    noise_a: float
    noise_sigma: float
    row_sigma: float = 0.0
    fixed_pattern_sigma: float = 0.0
    codec: str = "none"  # none | jpeg | h264, applied last
    quality: int = 0  # JPEG quality (1-100) or H.264 CRF (0-51)

    def __post_init__(self) -> None:
        if self.exposure < 1 or self.exposure % 2 == 0:
            raise ValueError(f"exposure must be a positive odd number of sub-frames, got {self.exposure}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")

    @classmethod
    def recipe(cls, response: CameraResponse, level: str, exposure: int = 17) -> Degradation:
        """The dissertation's recipe (section 5.3.1 with section 3.3.1's noise): the fixed point."""
        a, sigma = NOISE_LEVELS[level]
        return cls(exposure=exposure, defocus=0.0, response=response, vignetting=0.0, noise_a=a, noise_sigma=sigma)

    @classmethod
    def sample(cls, rng: np.random.Generator, ranges: DegradationRanges = WIDE) -> Degradation:
        low, high = ranges.exposure
        exposure = int(rng.integers(low // 2, high // 2 + 1)) * 2 + 1
        defocus = ranges.defocus_radius.draw(rng) if rng.random() < ranges.defocus_probability else 0.0
        response = CameraResponse(
            black=ranges.black.draw(rng),
            contrast=ranges.contrast.draw(rng),
            saturation=ranges.saturation.draw(rng),
            gains=(ranges.gain.draw(rng), ranges.gain.draw(rng), ranges.gain.draw(rng)),
            gamma=ranges.gamma.draw(rng),
        )
        noise_a, noise_sigma = ranges.noise_a.draw(rng), ranges.noise_sigma.draw(rng)
        row = ranges.row_sigma.draw(rng) if rng.random() < ranges.row_noise_probability else 0.0
        fpn = ranges.fixed_pattern_sigma.draw(rng) if rng.random() < ranges.fixed_pattern_probability else 0.0
        codec, quality = sample_codec(rng, ranges)
        return cls(exposure, defocus, response, ranges.vignetting.draw(rng), noise_a, noise_sigma, row, fpn,
                   codec, quality)  # fmt: skip

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def defocus_kernel(radius: float) -> np.ndarray:
    """A normalised disc (pillbox) of ``radius`` pixels, anti-aliased by 4x supersampling: the
    out-of-focus point spread function of a circular aperture."""
    half = int(np.ceil(radius))
    fine = (np.arange(-half * 4, half * 4 + 4) + 0.5) / 4 - 0.5  # sub-sample centres
    yy, xx = np.meshgrid(fine, fine, indexing="ij")
    inside = (xx * xx + yy * yy <= radius * radius).astype(np.float32)
    size = 2 * half + 1
    kernel = inside.reshape(size, 4, size, 4).mean(axis=(1, 3))
    if kernel.sum() == 0:  # a disc smaller than the sub-sample spacing: in focus
        kernel[half, half] = 1.0
    return kernel / kernel.sum()


def vignette_field(height: int, width: int, strength: float) -> np.ndarray:
    """(H, W) float32: 1 at the centre falling to ``1 - strength`` at the corners (cos^4-like, quadratic)."""
    yy = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
    xx = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
    r2 = (yy[:, None] ** 2 + xx[None, :] ** 2) / 0.5  # 1 at the corners
    return (1.0 - np.float32(strength) * r2).astype(np.float32)


def sensor_noise(
    rng: np.random.Generator,
    clean: np.ndarray,
    a: float,
    sigma: float,
    row_sigma: float = 0.0,
    fixed_pattern: np.ndarray | None = None,
) -> np.ndarray:
    """Eq. 3.1 plus the structured noise of cheap CMOS sensors, on 0-255 values, rounded to uint8.

    ``clean`` (H, W, 3) float in [0, 1]. Row noise: one offset per row (all channels), new each
    frame; ``fixed_pattern``: a (H, W, 1) offset field that stays for the whole clip.
    """
    x = _eq_3_1(rng, clean, a, sigma)
    if row_sigma > 0:
        x += row_sigma * rng.standard_normal((clean.shape[0], 1, 1))
    if fixed_pattern is not None:
        x += fixed_pattern
    return _to_uint8(x)


def sample_codec(
    rng: np.random.Generator, ranges: DegradationRanges = WIDE, compressed: bool = False
) -> tuple[str, int]:
    """A client codec and its quality (JPEG quality or H.264 CRF; 0 for none) drawn over ``ranges``;
    ``compressed`` leaves "none" out (the other odds keep their ratio)."""
    pairs = [(c, p) for c, p in ranges.codec_probabilities if not (compressed and c == "none")]
    weights = np.array([p for _, p in pairs], float)
    codec = str(pairs[int(rng.choice(len(pairs), p=weights / weights.sum()))][0])
    if codec == "jpeg":
        return codec, int(rng.integers(ranges.jpeg_quality[0], ranges.jpeg_quality[1] + 1))
    if codec == "h264":
        return codec, int(rng.integers(ranges.h264_crf[0], ranges.h264_crf[1] + 1))
    return codec, 0


def compress(frames: np.ndarray, codec: str, quality: int) -> np.ndarray:
    """What a streaming client's encoder does: JPEG per frame (OpenCV) or an H.264 round trip (PyAV,
    libx264, yuv420p, CRF ``quality``). ``frames`` (T, H, W, 3) uint8 RGB; same shape back."""
    if codec == "none":
        return frames
    if codec == "jpeg":
        out = np.empty_like(frames)
        for t, frame in enumerate(frames):
            ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            out[t] = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return out
    if codec == "h264":
        return _h264_round_trip(frames, quality)
    raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")


def _h264_round_trip(frames: np.ndarray, crf: int) -> np.ndarray:
    import av  # the video dependency the service uses anyway; deferred so data code imports without it

    t, h, w = frames.shape[:3]
    pad_h, pad_w = h % 2, w % 2  # yuv420p needs even sides
    padded = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = w + pad_w, h + pad_h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
        for frame in padded:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    buffer.seek(0)
    with av.open(buffer) as container:
        decoded = [f.to_ndarray(format="rgb24")[:h, :w] for f in container.decode(video=0)]
    if len(decoded) != t:
        raise RuntimeError(f"H.264 round trip returned {len(decoded)} frames for {t}")
    return np.stack(decoded)


__all__ = [
    "NOISE_LEVELS",
    "NOISE_CHOICES",
    "CODECS",
    "WIDE",
    "CameraResponse",
    "Degradation",
    "DegradationRanges",
    "Range",
    "compress",
    "defocus_kernel",
    "pick_noise_level",
    "poisson_gaussian",
    "sample_codec",
    "sensor_noise",
    "vignette_field",
]
