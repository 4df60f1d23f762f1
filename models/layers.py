"""Blocks shared by R2-D4 and the MOST family, and the geometry both need.

Everything here exports to ONNX (opset 17) and builds in TensorRT without plugins: deformable
convolution is written with ``grid_sample`` and a 1x1 reduction, homography warping with
``grid_sample``, and the 4-point DLT and 3x3 inversion as closed-form arithmetic (``torch.linalg``
solvers and ``torch.inverse`` do not export).

Pixel-coordinate convention (used by models, data, metrics and the service alike): a point
``(x, y)`` is continuous, the image spans ``[0, W] x [0, H]`` and pixel ``(i, j)`` has its centre at
``(j + 0.5, i + 0.5)``. With it, changing scale by 2 is exactly ``S = diag(2, 2, 1)`` and the four
image corners are ``(0, 0), (W, 0), (W, H), (0, H)``. An OpenCV homography (pixel centres at
integers) converts with ``T^-1 H T``, ``T`` a translation by +0.5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# Convolution blocks
# ----------------------------------------------------------------------------------------------


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)


def conv1x1(in_ch: int, out_ch: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, bias=bias)


def zero_linear(linear: nn.Linear) -> nn.Linear:
    """A linear layer that starts as the zero function (a path added to a trained network)."""
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


# Per frame: the input's and the restored frame's channel means and standard deviations, and the
# input's three channel correlations (how saturated the camera left it).
COLOUR_FEATURES = 15


def colour_features(frame: Tensor, restored: Tensor) -> Tensor:
    """(b, COLOUR_FEATURES) float32 statistics of (b, 3, H, W) frames: what tells one camera's colour
    response from another's without looking at any one neighbourhood."""
    with torch.autocast(frame.device.type, enabled=False):
        stats = []
        for x in (frame.float(), restored.float()):
            mean = x.mean(dim=(2, 3))
            centred = x - mean[:, :, None, None]
            stats += [mean, (centred * centred).mean(dim=(2, 3)).clamp_min(1e-8).sqrt()]
        centred = frame.float() - stats[0][:, :, None, None]
        pairs = [(0, 1), (0, 2), (1, 2)]
        cov = torch.stack([(centred[:, i] * centred[:, j]).mean(dim=(1, 2)) for i, j in pairs], dim=1)
        scale = torch.stack([stats[1][:, i] * stats[1][:, j] for i, j in pairs], dim=1)
        return torch.cat((*stats, cov / (scale + 1e-6)), dim=1)


def zero_layer_state(
    state: dict[str, Tensor], layer: str, shapes: dict[str, tuple[int, ...]], add: bool, what: str
) -> dict[str, Tensor]:
    """Weights with a zero linear ``layer`` (parameter name -> shape) added (``add``), or the layer removed,
    which must then be zero: both compute the same function (the colour map, the detail gate; each
    family's ``checkpoint_filter_fn`` converts with it). ``what`` names the layer in the refusal."""
    if add:
        return {**state, **{f"{layer}.{name}": torch.zeros(shape) for name, shape in shapes.items()}}
    if any(state[f"{layer}.{name}"].any() for name in shapes):
        raise ValueError(f"{layer} not zero: the fitted {what} would be lost by removing it")
    return {k: v for k, v in state.items() if not k.startswith(f"{layer}.")}


def colour_transform_state(state: dict[str, Tensor], add: bool) -> dict[str, Tensor]:
    """Weights with a zero colour map added (``add``) or the map removed, which must then be zero."""
    shapes = {"weight": (12, COLOUR_FEATURES), "bias": (12,)}
    return zero_layer_state(state, "colour_transform", shapes, add, "colour map")


def apply_colour_transform(restored: Tensor, params: Tensor) -> Tensor:
    """restored + A [restored; 1] per frame, with ``params`` (b, 12) = A's 3x3 part row-major, then its
    offsets. A matrix product, so every runtime exports it as one MatMul."""
    b = restored.shape[0]
    matrix = params[:, :9].reshape(b, 3, 3).to(restored.dtype)
    offset = params[:, 9:].reshape(b, 3, 1, 1).to(restored.dtype)
    mapped = torch.matmul(matrix, restored.flatten(2)).reshape(restored.shape)
    return restored + mapped + offset


# Per frame: the log noise level of the input's luma and the log size of what the network removed
# from it (``detail_features``), the two things that say how much of the input's detail to give back.
DETAIL_FEATURES = 2


def input_matched(frame: Tensor, restored: Tensor) -> Tensor:
    """The input mapped onto the restored frame's colours, per channel and frame (the least-squares gain
    and offset): the input's detail and noise in the output's colours."""
    x_mean = frame.mean(dim=(2, 3), keepdim=True)
    r_mean = restored.mean(dim=(2, 3), keepdim=True)
    x = frame - x_mean
    variance = (x * x).mean(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    gain = (x * (restored - r_mean)).mean(dim=(2, 3), keepdim=True) / variance
    return gain * x + r_mean


def detail_features(frame: Tensor, matched: Tensor, restored: Tensor) -> Tensor:
    """(b, DETAIL_FEATURES) float32: log of the input luma's noise level (Immerkaer 1996: the mean absolute
    response to a Laplacian difference, which cancels smooth image structure) and log of the standard
    deviation of what the network removed (``matched - restored``), both in 0-255 units."""
    with torch.autocast(frame.device.type, enabled=False):
        # Python-float weights and slices, no tensor from host data (CUDA-graph capture of the step).
        r, g, b = frame.float().split(1, dim=1)
        y = (0.299 * r + 0.587 * g + 0.114 * b) * 255.0
        across = y[:, :, :, :-2] - 2.0 * y[:, :, :, 1:-1] + y[:, :, :, 2:]
        laplace = across[:, :, :-2] - 2.0 * across[:, :, 1:-1] + across[:, :, 2:]  # the 3x3 kernel, separated
        noise = laplace.abs().mean(dim=(1, 2, 3)) * (math.sqrt(math.pi / 2) / 6)
        removed = (matched.float() - restored.float()).flatten(1).std(dim=1) * 255.0
        return torch.stack((noise.clamp_min(0.05).log(), removed.clamp_min(0.05).log()), dim=1)


def detail_return_state(state: dict[str, Tensor], add: bool) -> dict[str, Tensor]:
    """Weights with a zero detail gate added (``add``) or the gate removed, which must then be zero."""
    return zero_layer_state(state, "detail_gate", {"weight": (1, DETAIL_FEATURES), "bias": (1,)}, add, "detail return")


def apply_detail_return(frame: Tensor, restored: Tensor, gate: nn.Linear) -> tuple[Tensor, Tensor]:
    """``restored + a (matched - restored)`` per frame, ``a = clamp(gate(features), 0, 1)``: a share of the
    input's own detail given back, in the output's colours. Returns the frame and the features."""
    matched = input_matched(frame.float(), restored.float())
    features = detail_features(frame, matched, restored)
    share = gate(features).clamp(0.0, 1.0).reshape(-1, 1, 1, 1)
    out = restored.float() + share * (matched - restored.float())
    return out.to(restored.dtype), features


class MECA(nn.Module):
    """Modulated efficient channel attention (eq. 3.8).

    ECA (eq. 3.5) looks only at the channel means; MECA adds the channel maxima as a second
    input channel of the 1-D convolution so the attention does not collapse to uniform weights.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        avg = x.mean(dim=(2, 3))  # (b, c)
        mx = x.amax(dim=(2, 3))  # (b, c)
        weights = torch.sigmoid(self.conv(torch.stack((avg, mx), dim=1)))  # (b, 1, c)
        return x * weights.transpose(1, 2).unsqueeze(-1)  # (b, c, 1, 1) broadcast


class RDB(nn.Module):
    """Residual dense block RDB_{c,g} (eq. 3.11); with dilations (1, 2, 3) it is MS-RDB (eq. 3.12).

    Three 3x3 layers each add ``growth`` channels to a dense concatenation; a 1x1 convolution
    brings ``c + 3g`` back to ``c`` before the residual sum. The text's dilation rates "0, 1, 2"
    are read as no dilation, then 2, then 3 (spec decision).
    """

    def __init__(self, channels: int, growth: int, dilations: tuple[int, ...] = (1, 1, 1)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(conv3x3(channels + i * growth, growth, dilation=d) for i, d in enumerate(dilations))
        self.fuse = conv1x1(channels + len(dilations) * growth, channels)

    def forward(self, x: Tensor) -> Tensor:
        features = x
        for layer in self.layers:
            features = torch.cat((features, F.relu(layer(features))), dim=1)  # (b, c + k*g, h, w)
        return x + self.fuse(features)


class MSRDM(nn.Module):
    """Multiscale residual dense module MS-RDM_{c,g} (eq. 3.13).

    Coarse (dilated MS-RDB) then fine (plain RDB) features are concatenated, re-weighted by MECA_7
    and reduced by a 1x1 convolution; the module is residual as RDMs are.
    """

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.coarse = RDB(channels, growth, dilations=(1, 2, 3))
        self.fine = RDB(channels, growth)
        self.attention = MECA(7)
        self.fuse = conv1x1(2 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        coarse = self.coarse(x)
        fine = self.fine(coarse)
        return x + self.fuse(self.attention(torch.cat((coarse, fine), dim=1)))


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity: MIMO-UNet's residual block with the batch norm of 6.2.1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(channels, channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            conv3x3(channels, channels, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class SqueezeExcitation(nn.Module):
    """Channel attention used to fuse current and warped previous features (ESTRNN-style, spec: SE)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = conv1x1(channels, hidden)
        self.fc2 = conv1x1(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * weights


# ----------------------------------------------------------------------------------------------
# Modulated deformable convolution (DCNv2) without custom ops
# ----------------------------------------------------------------------------------------------


def size_tensor(value: int | float | Tensor, like: Tensor) -> Tensor:
    """A spatial size as a 0-d tensor. While tracing for export a shape is already a tensor and stays a
    Shape op in the graph, so graphs built from it stay dynamic in height and width (``torch.tensor([...])``
    or Python float arithmetic on sizes would freeze the traced size into a constant). In eager mode the
    size is filled on the device: a tensor made from host data would be a host-to-device copy, which a
    CUDA graph cannot capture (service/backends/torch.py)."""
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.full((), float(value), device=like.device, dtype=like.dtype)


def _kernel_offsets(kernel_size: int, dilation: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(k*k, 2) displacements (dy, dx) of a regular kernel grid, row-major."""
    r = torch.arange(kernel_size, device=device, dtype=dtype) - (kernel_size - 1) / 2
    dy, dx = torch.meshgrid(r * dilation, r * dilation, indexing="ij")
    return torch.stack((dy.reshape(-1), dx.reshape(-1)), dim=1)


def modulated_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    dilation: int = 1,
) -> Tensor:
    """DCNv2 (stride 1, 'same' padding) as one ``grid_sample`` and one matrix product.

    ``offset`` is (b, 2*k*k, h, w) with (dy, dx) pairs per kernel tap in row-major order (the
    torchvision layout), ``mask`` (b, k*k, h, w) the modulation scalars, ``weight`` (out, in, k, k).
    Every tap samples ``x`` bilinearly at ``p + p_k + dp_k`` with zeros outside; the k*k sampled
    maps are stacked along the channel axis and reduced by ``weight`` reshaped to a 1x1 kernel.
    """
    with torch.autocast(x.device.type, enabled=False):
        # Sampling positions are hundreds of pixels: in bf16/fp16 they would snap to whole pixels,
        # so the geometry always runs in float32 whatever autocast is doing around it.
        return _modulated_deform_conv2d_fp32(
            x.float(), offset.float(), mask.float(), weight.float(), None if bias is None else bias.float(), dilation
        )


def _modulated_deform_conv2d_fp32(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None, dilation: int
) -> Tensor:
    b, c, h, w = x.shape
    _, _, k, _ = weight.shape
    taps = k * k
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
    kernel = _kernel_offsets(k, dilation, x.device, x.dtype)  # (taps, 2)
    offset = offset.view(b, taps, 2, h, w)
    sample_y = ys + kernel[:, 0].view(1, taps, 1, 1) + offset[:, :, 0]  # (b, taps, h, w)
    sample_x = xs + kernel[:, 1].view(1, taps, 1, 1) + offset[:, :, 1]
    # Normalised coordinates for align_corners=False: pixel centre i lies at (2i + 1) / n - 1.
    h_t, w_t = size_tensor(h, x), size_tensor(w, x)
    grid = torch.stack(((2 * sample_x + 1) / w_t - 1, (2 * sample_y + 1) / h_t - 1), dim=-1)
    grid = grid.reshape(b, taps * h, w, 2)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(b, c, taps, h, w) * mask.unsqueeze(1)  # (b, c, taps, h, w)
    columns = sampled.flatten(1, 2)  # (b, c * taps, h, w)
    # flatten, not reshape(out_ch, c * taps, 1, 1): a reshape to traced sizes hides the kernel's static
    # shape from the ONNX exporter ("convolution for kernel of unknown shape"); the values are the same.
    return F.conv2d(columns, weight.flatten(1)[:, :, None, None], bias)


class DeformableAlignment(nn.Module):
    """Aligns a neighbour's features to the reference ones (eq. 3.16-3.17).

    A 3x3 convolution on the concatenated pair predicts 2k^2 offsets and k^2 modulation logits
    (27 channels for k = 3); the modulated deformable convolution then samples the neighbour.
    The offset branch starts at zero so training begins from a plain convolution (DCNv2 practice).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        taps = kernel_size * kernel_size
        self.offset_mask = conv3x3(2 * in_ch, 3 * taps)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, reference: Tensor, neighbour: Tensor) -> Tensor:
        taps = self.kernel_size * self.kernel_size
        offset_mask = self.offset_mask(torch.cat((reference, neighbour), dim=1))
        offset, mask_logits = offset_mask.split((2 * taps, taps), dim=1)
        return modulated_deform_conv2d(neighbour, offset, torch.sigmoid(mask_logits), self.weight, self.bias)


# ----------------------------------------------------------------------------------------------
# Homographies: closed-form 3x3 algebra, 4-point DLT, scale changes and warping
# ----------------------------------------------------------------------------------------------


def adjugate3x3(m: Tensor) -> Tensor:
    """Adjugate of (..., 3, 3) matrices: the inverse up to the determinant, which a homography ignores."""
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    rows = (
        torch.stack((e * i - f * h, c * h - b * i, b * f - c * e), dim=-1),
        torch.stack((f * g - d * i, a * i - c * g, c * d - a * f), dim=-1),
        torch.stack((d * h - e * g, b * g - a * h, a * e - b * d), dim=-1),
    )
    return torch.stack(rows, dim=-2)


def normalize_homography(h: Tensor) -> Tensor:
    """Scale so that h[..., 2, 2] == 1 (the DLT parametrisation's gauge)."""
    return h / h[..., 2:3, 2:3]


def image_corners(height: float | Tensor, width: float | Tensor, like: Tensor) -> Tensor:
    """(4, 2) corners (x, y) in the order the DLT expects: top-left, top-right, bottom-right, bottom-left."""
    h, w = size_tensor(height, like), size_tensor(width, like)
    zero = torch.zeros_like(h)
    return torch.stack((torch.stack((zero, zero)), torch.stack((w, zero)), torch.stack((w, h)), torch.stack((zero, h))))


def square_to_quad(quad: Tensor) -> Tensor:
    """Projective map of the unit square onto ``quad`` (..., 4, 2) (Heckbert 1989), plain arithmetic.

    Corners map as (0,0)->q0, (1,0)->q1, (1,1)->q2, (0,1)->q3. Exact for affine quads too, where
    the projective terms vanish.
    """
    x0, x1, x2, x3 = quad[..., 0, 0], quad[..., 1, 0], quad[..., 2, 0], quad[..., 3, 0]
    y0, y1, y2, y3 = quad[..., 0, 1], quad[..., 1, 1], quad[..., 2, 1], quad[..., 3, 1]
    sx = x0 - x1 + x2 - x3
    sy = y0 - y1 + y2 - y3
    dx1, dx2 = x1 - x2, x3 - x2
    dy1, dy2 = y1 - y2, y3 - y2
    den = dx1 * dy2 - dx2 * dy1
    g = (sx * dy2 - dx2 * sy) / den
    h = (dx1 * sy - sx * dy1) / den
    one = torch.ones_like(x0)
    rows = (
        torch.stack((x1 - x0 + g * x1, x3 - x0 + h * x3, x0), dim=-1),
        torch.stack((y1 - y0 + g * y1, y3 - y0 + h * y3, y0), dim=-1),
        torch.stack((g, h, one), dim=-1),
    )
    return torch.stack(rows, dim=-2)


def dlt_4point(src: Tensor, dst: Tensor) -> Tensor:
    """Homography mapping the 4 points ``src`` onto ``dst`` (both (..., 4, 2)), differentiable and exportable.

    ``H = Q(dst) . Q(src)^-1`` with Q the square-to-quad map; when ``src`` is a constant (the image
    corners) the inverse is constant-folded by the exporter.
    """
    return normalize_homography(square_to_quad(dst) @ adjugate3x3(square_to_quad(src)))


def offsets_to_homography(offsets: Tensor, height: float | Tensor, width: float | Tensor) -> Tensor:
    """(b, 8) corner displacements in pixels (HomographyNet parametrisation) -> (b, 3, 3)."""
    src = image_corners(height, width, offsets)
    dst = src.unsqueeze(0) + offsets.view(-1, 4, 2)
    return dlt_4point(src.expand_as(dst), dst)


def homography_to_offsets(h: Tensor, height: float | Tensor, width: float | Tensor) -> Tensor:
    """(b, 3, 3) -> (b, 8) corner displacements in pixels: the inverse of ``offsets_to_homography``."""
    src = image_corners(height, width, h).expand(h.shape[0], 4, 2)
    return (apply_homography(h, src) - src).reshape(-1, 8)


def apply_homography(h: Tensor, points: Tensor) -> Tensor:
    """Maps (..., n, 2) points by (..., 3, 3) homographies."""
    ones = torch.ones_like(points[..., :1])
    mapped = torch.cat((points, ones), dim=-1) @ h.transpose(-1, -2)  # (..., n, 3)
    return mapped[..., :2] / mapped[..., 2:3]


def rescale_homography(h: Tensor, factor: float) -> Tensor:
    """H expressed at a resolution ``factor`` times larger: S H S^-1 with S = diag(f, f, 1)."""
    # Entry (i, j) is scaled by s_i / s_j; written with slices rather than a tensor of the scales, which
    # would be a host-to-device copy (not CUDA-graph capturable). Same values for the powers of two used.
    top = torch.cat((h[..., :2, :2], h[..., :2, 2:] * factor), dim=-1)
    bottom = torch.cat((h[..., 2:, :2] / factor, h[..., 2:, 2:]), dim=-1)
    return torch.cat((top, bottom), dim=-2)


def identity_homography(batch: int, like: Tensor) -> Tensor:
    return torch.eye(3, device=like.device, dtype=like.dtype).expand(batch, 3, 3)


def warp_by_homography(image: Tensor, h_prev_to_cur: Tensor) -> Tensor:
    """Warps a previous frame's map into the current frame's coordinates.

    ``h_prev_to_cur`` maps previous-frame points to current-frame points; the output pixel at
    ``p`` samples the input at ``H^-1 p`` (bilinear, zeros outside).
    """
    with torch.autocast(image.device.type, enabled=False):  # sampling grid in float32, see DCN above
        return _warp_by_homography_fp32(image.float(), h_prev_to_cur.float()).to(image.dtype)


def _warp_by_homography_fp32(image: Tensor, h_prev_to_cur: Tensor) -> Tensor:
    b, _, height, width = image.shape
    ys = torch.arange(height, device=image.device, dtype=image.dtype) + 0.5
    xs = torch.arange(width, device=image.device, dtype=image.dtype) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack((gx.reshape(-1), gy.reshape(-1)), dim=-1)  # (h*w, 2)
    source = apply_homography(adjugate3x3(h_prev_to_cur), points.expand(b, -1, -1))  # (b, h*w, 2)
    norm = 2.0 / torch.stack((size_tensor(width, image), size_tensor(height, image)))
    grid = (source * norm - 1).view(b, height, width, 2)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def mean_corner_error(h_est: Tensor, h_true: Tensor, height: float | Tensor, width: float | Tensor) -> Tensor:
    """MACE: mean distance between the image corners mapped by two homographies, per sample (b,)."""
    corners = image_corners(height, width, h_est).expand(h_est.shape[0], 4, 2)
    diff = apply_homography(h_est, corners) - apply_homography(h_true, corners)
    return diff.norm(dim=-1).mean(dim=-1)
