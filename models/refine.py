"""Photometric refinement of a predicted homography: inverse-compositional Lucas-Kanade, in the graph.

The homography head regresses H_{t-1->t} from features; on content unlike its training scenes it
lands within a few pixels but not on the sub-pixel alignment a photometric method reaches (OpenCV's
ECC on the same frames). This module starts from the head's estimate and takes a few Gauss-Newton
steps that minimise the brightness difference between the previous and the current restored frame
(Baker & Matthews 2004, inverse compositional), coarse to fine over an average-pooled pyramid.

Written with plain tensor ops (grid_sample, products and sums, an unrolled 8x8 Gauss-Jordan solve) so the ONNX,
OpenVINO and TensorRT graphs carry it like any other layer; no step is data dependent. A refined
homography is kept per sample only where it lowers the photometric error of the head's estimate at
the finest level, so the refinement never makes a frame's alignment worse by its own measure; with
``accept`` > 0 it is blended in by how much it lowers that error, so the output is continuous in the
frames (a near tie no longer switches between two estimates pixels apart).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.layers import adjugate3x3, normalize_homography, rescale_homography, size_tensor, warp_by_homography

LUMA = (0.299, 0.587, 0.114)
HIGHPASS = 5  # side of the local mean removed at every level, in that level's pixels
HUBER = 1.5  # Huber threshold in mean absolute residuals
DAMPING = 1e-4  # relative Levenberg-Marquardt damping: keeps the solve well posed on flat images
PRIOR_SCALES = ("hessian", "residual")
REFINE_FRAMES = ("restored", "restored+input")  # the luma channels a MOST network refines on, in order


def luma(image: Tensor) -> Tensor:
    """(b, 3, h, w) RGB -> (b, 1, h, w), clipped to the displayable range first. Python-float weights: a
    tensor made from host data would break CUDA-graph capture of the step."""
    r, g, b = image.clamp(0, 1).split(1, dim=1)
    return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b


def _standardise(image: Tensor, highpass: int) -> Tensor:
    """Local mean removed, then unit deviation per sample: light that moves with the camera (a ring
    light's falloff, vignetting, auto exposure) varies slowly across the frame and would otherwise pull
    the alignment towards the identity."""
    if highpass > 1:
        image = image - F.avg_pool2d(image, highpass, stride=1, padding=highpass // 2, count_include_pad=False)
    mean = image.mean(dim=(2, 3), keepdim=True)
    std = (image - mean).square().mean(dim=(2, 3), keepdim=True).sqrt()
    return (image - mean) / (std + 1e-3)


def _standardise_all(image: Tensor, highpass: tuple[int, ...]) -> Tensor:
    """Every channel standardised at every local-mean side, side-major: (b, c, h, w) -> (b, c * k, h, w).
    A small side keeps only fine detail, which large things moving on their own (instruments, spray)
    barely carry; a large one keeps the coarser structure that aligns noisy or soft content. As
    channels of one problem, balanced by their starting residuals, each pair leans on whichever matches."""
    return torch.cat([_standardise(image, side) for side in highpass], dim=1)


def _pixel_to_unit(height: Tensor, width: Tensor, like: Tensor) -> Tensor:
    """N: pixel coordinates (corners at 0 and W, H) -> [-1, 1]; the solve is better conditioned there."""
    zero, one = torch.zeros_like(height), torch.ones_like(height)
    rows = [
        torch.stack((2 / width, zero, -one)),
        torch.stack((zero, 2 / height, -one)),
        torch.stack((zero, zero, one)),
    ]
    return torch.stack(rows).to(like.dtype)


def _unit_to_pixel(height: Tensor, width: Tensor, like: Tensor) -> Tensor:
    zero, one = torch.zeros_like(height), torch.ones_like(height)
    rows = [
        torch.stack((width / 2, zero, width / 2)),
        torch.stack((zero, height / 2, height / 2)),
        torch.stack((zero, zero, one)),
    ]
    return torch.stack(rows).to(like.dtype)


def _steepest_descent(template: Tensor) -> Tensor:
    """(b, c, h, w) -> (b, 8, c, h, w): grad T . dW/dp at p = 0, in unit coordinates, per channel.

    p parameterises W = [[1+p0, p2, p4], [p1, 1+p3, p5], [p6, p7, 1]]."""
    _, _, h, w = template.shape
    padded = F.pad(template, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) * (size_tensor(w, template) / 4)  # d/du, u = 2x/W - 1
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) * (size_tensor(h, template) / 4)
    ys = (torch.arange(h, device=template.device, dtype=template.dtype) + 0.5) * (2 / size_tensor(h, template)) - 1
    xs = (torch.arange(w, device=template.device, dtype=template.dtype) + 0.5) * (2 / size_tensor(w, template)) - 1
    v, u = torch.meshgrid(ys, xs, indexing="ij")
    u, v = u[None, None], v[None, None]
    return torch.stack((gx * u, gy * u, gx * v, gy * v, gx, gy, -(gx * u + gy * v) * u, -(gx * u + gy * v) * v), dim=1)


def _solve(a: Tensor, b: Tensor) -> Tensor:
    """(n, 8, 8) SPD, (n, 8) -> (n, 8): Gauss-Jordan without pivoting (the damped normal matrix is
    positive definite), unrolled so every runtime exports it. The system is scaled to a unit diagonal
    first (Jacobi): the parameters' scales differ by orders of magnitude, and unscaled float32
    elimination loses as much precision as a float64 solve would keep."""
    size = a.shape[-1]
    eye = torch.eye(size, device=a.device, dtype=a.dtype)
    scale = (a * eye).sum(dim=2).clamp_min(1e-12).rsqrt()  # (n, 8); no diag ops in ONNX
    m = torch.cat((a * scale[:, :, None] * scale[:, None, :], (b * scale).unsqueeze(-1)), dim=-1)  # (n, 8, 9)
    for k in range(size):
        row = m[:, k : k + 1, :] / m[:, k : k + 1, k : k + 1]  # (n, 1, 9)
        column = m[:, :, k : k + 1] - eye[:, k : k + 1]  # (n, 8, 1): eliminates others, leaves row k = row
        m = m - column * row
    return m[:, :, size] * scale


def _matrix_to_parameters(m: Tensor) -> Tensor:
    """Inverse of :func:`_parameters_to_matrix` for a matrix normalised to m[2, 2] = 1."""
    return torch.stack(
        (m[:, 0, 0] - 1, m[:, 1, 0], m[:, 0, 1], m[:, 1, 1] - 1, m[:, 0, 2], m[:, 1, 2], m[:, 2, 0], m[:, 2, 1]), dim=1
    )


def _parameters_to_matrix(p: Tensor) -> Tensor:
    one = torch.ones_like(p[:, 0])
    rows = (
        torch.stack((1 + p[:, 0], p[:, 2], p[:, 4]), dim=-1),
        torch.stack((p[:, 1], 1 + p[:, 3], p[:, 5]), dim=-1),
        torch.stack((p[:, 6], p[:, 7], one), dim=-1),
    )
    return torch.stack(rows, dim=1)


def _residual(template: Tensor, image: Tensor, h_level: Tensor) -> tuple[Tensor, Tensor]:
    """I(W(x; p)) - T(x) and its weight: the current image sampled at H x for every template pixel
    (``h_level`` in this level's pixels).

    The weight ramps from 0 to 1 as a pixel's sample moves inside the image (coverage 1/2 to 1) and the
    sample is divided by its coverage: both are continuous in H. A hard inside/outside cut switches
    border pixels on and off between steps, and the iteration then cycles instead of converging, on
    a path that rounding decides."""
    back = adjugate3x3(h_level)  # warp_by_homography samples at G^-1 x; G = H^-1 samples at H x
    # The image and its coverage through one sampling grid.
    channels = image.shape[1]
    both = torch.cat((image, torch.ones_like(image[:, :1])), dim=1)
    warped, coverage = warp_by_homography(both, back).split((channels, 1), dim=1)
    valid = ((coverage - 0.5) * 2).clamp(0, 1).expand_as(warped)
    return (warped / coverage.clamp_min(0.5) - template) * valid, valid


def _huber_threshold(residual: Tensor, valid: Tensor, huber: float) -> Tensor:
    """A multiple of the mean absolute residual, (b, 1, 1, 1)."""
    scale = residual.abs().sum(dim=(1, 2, 3), keepdim=True) / valid.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1)
    return huber * scale + 1e-6


def _huber_weights(residual: Tensor, threshold: Tensor) -> Tensor:
    """Huber's IRLS weights: pixels that do not follow the camera (instruments, spray, highlights) pull
    the solution less than a square would."""
    return threshold / residual.abs().clamp_min(threshold)


def _mean_square(residual: Tensor, weights: Tensor, valid: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The weighted mean squared residual over ``dims`` (kept), per valid pixel."""
    total = (weights * residual.square()).sum(dim=dims, keepdim=True)
    return total / valid.sum(dim=dims, keepdim=True).clamp_min(1)


def _cost(template: Tensor, image: Tensor, h_level: Tensor) -> Tensor:
    residual, valid = _residual(template, image, h_level)
    return residual.square().sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3)).clamp_min(1)


def refine_homography(
    previous: Tensor,
    current: Tensor,
    h_prev_to_cur: Tensor,
    levels: tuple[tuple[int, int], ...],
    prior: float = 0.0,
    *,
    highpass: int | tuple[int, ...] = HIGHPASS,
    huber: float | None = HUBER,
    damping: float = DAMPING,
    prior_scale: str = "hessian",
    balance: bool = True,
    accept: float = 0.0,
) -> Tensor:
    """H_{t-1->t} in full-resolution pixels, refined so ``current`` at H x matches ``previous`` at x.

    ``previous`` and ``current`` are (b, c, h, w) at ``levels[-1][0]`` times below full resolution: luma,
    or several images of the same frames (each channel standardised on its own, all in one least-squares
    problem); ``levels`` lists (downsampling factor, Gauss-Newton steps) coarse to fine, each
    factor a multiple of the last one's. ``prior`` > 0 pulls the estimate towards the head's with that
    weight relative to the mean diagonal of the Gauss-Newton matrix (a Gaussian prior): content that
    constrains some direction poorly (flat regions, repeated texture) then keeps the head's value there
    instead of drifting along it. ``highpass``: the local mean's side (see the module constant), or
    several, each image then matched at each (``_standardise_all``). ``huber`` (None: plain least
    squares) and ``damping``: see the module constants. ``prior_scale``: what the prior's weight is relative to,
    "hessian" (the mean diagonal: one balance for every pair) or "residual" (that times the level's
    starting mean squared residual, in the standardised images' unit variance: frames that do not
    match each other, whose data term is least trustworthy, hold closer to the head; with several
    channels, their weighted mean). ``balance``: several channels are each weighed by their inverse
    starting mean squared residual at every level, so a channel that matches badly (noise, a change of
    light the standardisation does not undo) pulls less; False: equal weights. One channel: no effect.
    ``accept``: the relative drop of the finest level's photometric error at which the refined estimate
    is taken whole; below it the output is the head's and the refined estimate blended by the drop's
    share of ``accept`` (0: a hard switch, refined wherever the error drops at all, which jumps by the
    whole refinement step when rounding flips a near tie).
    """
    with torch.autocast(previous.device.type, enabled=False):
        if prior_scale not in PRIOR_SCALES:
            raise ValueError(f"prior_scale must be one of {', '.join(PRIOR_SCALES)}, not {prior_scale!r}")
        if accept < 0:
            raise ValueError(f"accept must be >= 0, not {accept}")
        sides = (highpass,) if isinstance(highpass, int) else tuple(highpass)
        if not sides or any(side < 0 for side in sides):
            raise ValueError(f"highpass sides must be >= 0 (0 or 1: no local mean removed), not {highpass!r}")
        knobs = (sides, huber, damping, prior_scale, balance)
        return _refine(previous.float(), current.float(), h_prev_to_cur.float(), levels, prior, knobs, accept)


_Knobs = tuple[tuple[int, ...], float | None, float, str, bool]  # highpass sides, huber, damping, prior_scale, balance


def _refine(
    previous: Tensor, current: Tensor, start: Tensor, levels: tuple[tuple[int, int], ...], prior: float,
    knobs: _Knobs, accept: float,
) -> Tensor:
    h_full, template, image = _iterate(previous, current, start, levels, prior, knobs)
    # Judged at the finest level, where the photometric error is best resolved.
    scale = 1.0 / levels[-1][0]
    initial_cost = _cost(template, image, rescale_homography(start, scale))
    finite = torch.isfinite(h_full).flatten(1).all(dim=1).view(-1, 1, 1)
    h_full = torch.where(finite, h_full, start)
    final_cost = _cost(template, image, rescale_homography(h_full, scale))
    if accept > 0:
        gain = (initial_cost - final_cost) / initial_cost.clamp_min(1e-12)
        weight = (gain / accept).clamp(0, 1).view(-1, 1, 1)
        return normalize_homography(weight * h_full + (1 - weight) * start)
    return torch.where((final_cost < initial_cost).view(-1, 1, 1), h_full, start)


def _iterate(
    previous: Tensor, current: Tensor, start: Tensor, levels: tuple[tuple[int, int], ...], prior: float,
    knobs: _Knobs,
) -> tuple[Tensor, Tensor, Tensor]:
    """The Gauss-Newton steps alone: the refined homography and the finest level's standardised images."""
    highpass, huber, damping, prior_scale, balance = knobs
    finest = levels[-1][0]
    h_full = start
    template = image = start  # bound by the loop (levels is never empty)
    for factor, steps in levels:
        pool = factor // finest
        template = _standardise_all(F.avg_pool2d(previous, pool) if pool > 1 else previous, highpass)
        image = _standardise_all(F.avg_pool2d(current, pool) if pool > 1 else current, highpass)
        height = size_tensor(template.shape[-2], template)
        width = size_tensor(template.shape[-1], template)
        n = _pixel_to_unit(height, width, template)
        n_inv = _unit_to_pixel(height, width, template)
        h_unit = n @ rescale_homography(h_full, 1.0 / factor) @ n_inv
        head_inverse = adjugate3x3(n @ rescale_homography(start, 1.0 / factor) @ n_inv) if prior > 0 else None
        sd = _steepest_descent(template)  # (b, 8, c, h, w)
        eye = torch.eye(8, device=sd.device, dtype=sd.dtype)
        threshold = level_residual = channel_weights = None
        for _ in range(steps):
            residual, valid = _residual(template, image, n_inv @ h_unit @ n)
            robust = valid
            if huber is not None:
                if threshold is None:
                    # Fixed per level: every step then descends one robust cost, which converges; a scale
                    # re-estimated every step moves the cost under the iteration and can stall it.
                    threshold = _huber_threshold(residual, valid, huber)
                robust = valid * _huber_weights(residual, threshold)
            if balance and residual.shape[1] > 1:
                if channel_weights is None:  # fixed per level: each channel's inverse starting residual
                    inverse = 1 / (_mean_square(residual, robust, valid, (2, 3)) + 1e-6)  # (b, c, 1, 1)
                    channel_weights = inverse / inverse.mean(dim=1, keepdim=True)
                robust = robust * channel_weights
            weighted = sd * robust.unsqueeze(1)  # (b, 8, c, h, w)
            # Products and sums, not einsum: OpenVINO lowers an einsum to a MatMul, which it runs in bf16.
            hessian = (weighted.unsqueeze(2) * sd.unsqueeze(1)).sum(dim=(3, 4, 5))
            gradient = (weighted * residual.unsqueeze(1)).sum(dim=(2, 3, 4))
            diagonal = (hessian * eye).sum(dim=2, keepdim=True)  # (b, 8, 1); no diag ops in ONNX
            damped = hessian + (diagonal * damping + 1e-6) * eye
            if head_inverse is not None:
                # A Gaussian prior at the head's estimate: the update d of h_unit o W(d)^-1 also minimises
                # prior * |offset - d|^2, offset = the parameters of head^-1 o h_unit (first order), which
                # bounds drift along directions the images do not constrain. Off: not in the graph at all.
                weight = prior * diagonal.mean(dim=1, keepdim=True)  # (b, 1, 1)
                if prior_scale == "residual":
                    if level_residual is None:  # fixed per level, like the Huber threshold
                        level_residual = _mean_square(residual, robust, valid, (1, 2, 3))
                    weight = weight * level_residual.view(-1, 1, 1)
                offset = _matrix_to_parameters(normalize_homography(head_inverse @ h_unit))
                damped = damped + weight * eye
                gradient = gradient + weight[:, :, 0] * offset
            delta = _solve(damped, gradient)
            h_unit = normalize_homography(h_unit @ adjugate3x3(_parameters_to_matrix(delta)))
        h_full = normalize_homography(rescale_homography(n_inv @ h_unit @ n, float(factor)))
    return h_full, template, image
