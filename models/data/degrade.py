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

from dataclasses import asdict, dataclass

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
    lam = np.clip(clean, 0.0, 1.0).astype(np.float64) * (255.0 / a)
    x = a * rng.poisson(lam) + sigma * rng.standard_normal(lam.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def pick_noise_level(rng: np.random.Generator, noise: str) -> str:
    """``noise`` itself, or one of the three levels drawn uniformly for ``mixed``."""
    if noise == "mixed":
        return str(rng.choice(list(NOISE_LEVELS)))
    if noise not in NOISE_LEVELS:
        raise ValueError(f"noise must be one of {', '.join(NOISE_CHOICES)}, got {noise!r}")
    return noise


__all__ = ["NOISE_LEVELS", "NOISE_CHOICES", "CameraResponse", "poisson_gaussian", "pick_noise_level"]
