"""MOST-NET++ and MOST-NSS++: multi-output, multi-scale, multi-task video enhancement.

Katsaros 2024, chapter 6.2.1 (chapter 5.2.1 for what chapter 6 keeps). Per frame the network
returns the restored frame (denoised, deblurred, colour-mapped), the teeth mask and the homography
H_{t-1->t}. Scales are s = 1 (full), 2 (1/2), 3 (1/4); features at scale s have 2^(s+4) channels.

MOST-NET++ and MOST-NSS++ are one class: which task is predicted at which scale is a
:class:`Structure` (data saved with checkpoints). MOST-NET++ predicts every task at every scale;
MOST-NSS++ keeps what Neural Scale Search found (Fig. 6.6): restoration at s = 1 and 3,
segmentation at s = 2 and 3, homography at s = 3. Heads no scale uses are never built.

Streaming: ``forward(frame, reset, *state)``. The state holds the previous frame's encoder
features f_{t-1}^s (each step encodes only the new frame, as the text reuses them) and the
previous homography-head features h_{t-1}^s. ``reset = 1`` makes the frame its own predecessor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import (
    COLOUR_FEATURES,
    DETAIL_FEATURES,
    ResBlock,
    SqueezeExcitation,
    apply_colour_transform,
    apply_detail_return,
    colour_features,
    colour_transform_state,
    conv1x1,
    conv3x3,
    detail_return_state,
    identity_homography,
    offsets_to_homography,
    rescale_homography,
    size_tensor,
    warp_by_homography,
    zero_linear,
)
from models.refine import HIGHPASS, PRIOR_SCALES, REFINE_FRAMES, luma, refine_homography
from models.registry import register_model
from models.spec import ModelSpec, StateSpec, TensorSpec

SCALES = (1, 2, 3)
TASKS = ("restoration", "segmentation", "homography")


@dataclass(frozen=True)
class Structure:
    """Scales-to-tasks table: the scales at which each task has a head.

    The lowest scale (3) is always kept: it is the baseline every higher-scale output refines.
    """

    restoration: tuple[int, ...] = (1, 2, 3)
    segmentation: tuple[int, ...] = (1, 2, 3)
    homography: tuple[int, ...] = (1, 2, 3)

    def __post_init__(self) -> None:
        for task in TASKS:
            scales = getattr(self, task)
            if 3 not in scales or any(s not in SCALES for s in scales) or len(set(scales)) != len(scales):
                raise ValueError(f"{task}: scales {scales} must be distinct values of {SCALES} including 3")
            object.__setattr__(self, task, tuple(sorted(scales)))

    def scales(self, task: str) -> tuple[int, ...]:
        return getattr(self, task)

    def has(self, task: str, scale: int) -> bool:
        return scale in getattr(self, task)

    @property
    def top_scale(self) -> int:
        """The finest scale any task needs; decoding stops there."""
        return min(min(getattr(self, t)) for t in TASKS)

    def table(self) -> list[list[int]]:
        """Rows are tasks, columns scales 1..3, 1 where a head exists (the form Fig. 6.6 shows)."""
        return [[int(self.has(t, s)) for s in SCALES] for t in TASKS]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Structure:
        return cls(**{k: tuple(v) for k, v in json.loads(text).items()})


MOST_NET_STRUCTURE = Structure()
MOST_NSS_STRUCTURE = Structure(restoration=(1, 3), segmentation=(2, 3), homography=(3,))


@dataclass(frozen=True)
class MostConfig:
    structure: Structure = field(default_factory=Structure)
    width: int = 32  # channels at s = 1; 2^(s+4) with the default
    regressor_widths: tuple[int, ...] = (64, 128, 256, 256, 256)  # s = 1; s = 2, 3 start later
    encoder_blocks: int = 5
    decoder_blocks: int = 2
    dropout: float = 0.2
    # How the homography regressor pools before its linear layer: "corners" keeps one cell per image
    # quadrant (the corner whose offset it mostly predicts); "global" averages everything, as
    # checkpoints made before the change did. A global average keeps only what all positions share,
    # i.e. translation: trained most-nss recovered none of the rotation/zoom part (docs/models.md).
    homography_pool: str = "corners"
    # Whether the restoration heads also read the input at their scale, B^s. The output is residual
    # on B^s either way; without B^s among the head's inputs the residual must rebuild the input's
    # pixel noise from decoded features to cancel it, and trained most-nss (7000 steps) passed the
    # noise through: a 3x3 linear probe on its scale-1 head input removed none of it, the same
    # probe given B^1 as well cut the high-frequency error from 12.86 to 3.67 (docs/models.md;
    # tools/restoration_probe.py). 900 steps of training did not yet teach the heads to use it
    # (docs/experiments.md). False rebuilds checkpoints made before the change.
    restoration_input: bool = True
    # Side of a linear filter of B^s added to each restored frame (0: none): restored^s =
    # B^s + head(...) + filter(B^s). A 5x5 colour filter of the input is the classical denoiser the
    # heads failed to learn by gradient descent in 900 steps; `vident fit-filter` solves it by least
    # squares on training clips given the rest of the network, and training can refine it. It
    # starts at zero, the same function as without it; 0 rebuilds checkpoints made before it.
    restoration_filter: int = 5
    # Photometric refinement of the output homography (models/refine.py): (downsampling factor,
    # Gauss-Newton steps) per pyramid level, coarse to fine, on the restored frames' luma; the state then
    # keeps the previous frame's luma at the finest factor. Empty: the head's estimate as it is.
    homography_refine: tuple[tuple[int, int], ...] = ()
    # The refinement's pull towards the head's estimate (``refine_homography``'s ``prior``; 0: none), and
    # what its weight is relative to (``prior_scale``: "hessian", or "residual": frames that match each
    # other badly hold closer to the head).
    homography_refine_prior: float = 0.0
    homography_refine_prior_scale: str = "hessian"
    # Which frames the refinement matches: "restored" (their luma), or "restored+input" (the degraded
    # input's luma as a second channel, each weighed by how well it matched at the head's estimate): the
    # restoration removes the dental camera's drift and noise, the input keeps natural content's detail
    # that the restoration smooths away. The state keeps one luma channel per frame kind.
    homography_refine_frames: str = "restored"
    # The local-mean sides the refinement standardises each frame at (``refine_homography``'s
    # ``highpass``), in the finest level's pixels: (5,) matches fine detail only, which instruments and
    # spray moving on their own barely carry; adding a larger side also matches the coarser structure
    # that aligns noisy or soft content, each pair leaning on whichever matches (docs/models.md).
    homography_refine_highpass: tuple[int, ...] = (HIGHPASS,)
    # A per-frame 3x4 colour map of the restored frame, read linearly from the frame's colour statistics
    # (``colour_features``): restored + A(f) [restored; 1]. The heads see one neighbourhood at a time and
    # apply one average camera inverse; on cameras unlike the recipe's that over-saturated the output,
    # and a 3x4 map per frame recovered 2 dB of most-nss's colour-aligned PSNR on real content
    # (tools/colour_error.py). ``vident fit-colour`` solves it by least squares on training clips, and
    # the scale-1 loss trains it. It starts at zero, the same function as without it; False rebuilds
    # checkpoints made before it.
    colour_transform: bool = False
    # A share of the input's own detail given back after the colour map, per frame: restored + a (x~ -
    # restored), x~ the input mapped onto the output's colours per channel, a = clamp(linear(f), 0, 1)
    # from the input's noise level and the size of what the network removed (``detail_features``). The
    # heads smooth clean and lightly compressed frames of content unlike training's; the input's detail is
    # what they lost. ``vident fit-detail`` solves the gate by least squares on training clips; training
    # does not move it. It starts at zero, the same function as without it; False rebuilds checkpoints
    # made before it.
    detail_return: bool = False

    def __post_init__(self) -> None:
        factors = [f for f, _ in self.homography_refine]
        if any(f < 1 or (f & (f - 1)) for f in factors) or factors != sorted(factors, reverse=True):
            raise ValueError(f"homography_refine factors must be powers of two, coarse to fine: {factors}")
        if any(steps < 0 for _, steps in self.homography_refine):
            raise ValueError("homography_refine steps must be >= 0")
        if self.homography_refine_prior < 0:
            raise ValueError(f"homography_refine_prior must be >= 0, not {self.homography_refine_prior}")
        if self.homography_refine_prior_scale not in PRIOR_SCALES:
            raise ValueError(f"homography_refine_prior_scale must be one of {', '.join(PRIOR_SCALES)}, "
                             f"not {self.homography_refine_prior_scale!r}")  # fmt: skip
        if not self.homography_refine_highpass or any(side < 0 for side in self.homography_refine_highpass):
            raise ValueError(f"homography_refine_highpass needs sides >= 0: {self.homography_refine_highpass}")
        if self.homography_refine_frames not in REFINE_FRAMES:
            raise ValueError(f"homography_refine_frames must be one of {', '.join(REFINE_FRAMES)}, "
                             f"not {self.homography_refine_frames!r}")  # fmt: skip

    def channels(self, scale: int) -> int:
        return self.width * 2 ** (scale - 1)


# ----------------------------------------------------------------------------------------------
# Blocks only MOST uses
# ----------------------------------------------------------------------------------------------


class ShallowImageFeatures(nn.Module):
    """MIMO-UNet's shallow convolutional module: image-level features of the downsampled input."""

    def __init__(self, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(3, out_ch // 4), nn.ReLU(inplace=True),
            conv1x1(out_ch // 4, out_ch // 2), nn.ReLU(inplace=True),
            conv3x3(out_ch // 2, out_ch // 2), nn.ReLU(inplace=True),
            conv1x1(out_ch // 2, out_ch - 3), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.merge = conv1x1(out_ch, out_ch)

    def forward(self, image: Tensor) -> Tensor:
        return self.merge(torch.cat((image, self.body(image)), dim=1))


class AsymmetricFeatureFusion(nn.Module):
    """MIMO-UNet AFF: all scales resized to one, concatenated, 1x1 + 3x3 convolution."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv1x1(in_ch, out_ch), nn.ReLU(inplace=True), conv3x3(out_ch, out_ch))

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.body(torch.cat(features, dim=1))


def resize_to(x: Tensor, scale_from: int, scale_to: int) -> Tensor:
    """Moves a map between scales: average pooling down, bilinear up (both export as plain ops)."""
    if scale_to > scale_from:
        return F.avg_pool2d(x, 2 ** (scale_to - scale_from))
    if scale_to < scale_from:
        return F.interpolate(x, scale_factor=2.0 ** (scale_from - scale_to), mode="bilinear", align_corners=False)
    return x


class MostEncoder(nn.Module):
    """Feature extraction (6.2.1): strided 3x3 convs, image-level features, 5 residual blocks, AFF."""

    def __init__(self, cfg: MostConfig) -> None:
        super().__init__()
        c = [cfg.channels(s) for s in SCALES]
        self.stem = nn.ModuleList(
            nn.Sequential(conv3x3(3 if i == 0 else c[i - 1], c[i], stride=1 if i == 0 else 2), nn.ReLU(inplace=True))
            for i in range(3)
        )
        self.image_features = nn.ModuleList(ShallowImageFeatures(c[i]) for i in (1, 2))
        self.merge = nn.ModuleList(conv1x1(2 * c[i], c[i]) for i in (1, 2))
        self.blocks = nn.ModuleList(
            nn.Sequential(*(ResBlock(c[i]) for _ in range(cfg.encoder_blocks))) for i in range(3)
        )
        self.fusion = nn.ModuleList(AsymmetricFeatureFusion(sum(c), c[i]) for i in (0, 1))

    def forward(self, frame: Tensor) -> list[Tensor]:
        """Returns [f^1, f^2, f^3] for one frame."""
        encoded: list[Tensor] = []
        image = frame
        x = frame
        for i in range(3):
            x = self.stem[i](x)
            if i > 0:
                image = F.avg_pool2d(image, 2)
                x = self.merge[i - 1](torch.cat((x, self.image_features[i - 1](image)), dim=1))
            x = self.blocks[i](x)
            encoded.append(x)
        fused = [self.fusion[i]([resize_to(e, j + 1, i + 1) for j, e in enumerate(encoded)]) for i in (0, 1)]
        return [fused[0], fused[1], encoded[2]]


class FeatureAlignment(nn.Module):
    """Fuses f_t^s with the homography-warped f_{t-1}^s through channel attention -> F_t^s."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.attention = SqueezeExcitation(2 * channels)
        self.reduce = conv1x1(2 * channels, channels)

    def forward(self, current: Tensor, previous_warped: Tensor) -> Tensor:
        return self.reduce(self.attention(torch.cat((current, previous_warped), dim=1)))


class DenseHead(nn.Module):
    """Three 3x3 convolutions with ReLU between (6.2.1: the task heads gained one layer over ch. 5)."""

    def __init__(self, in_ch: int, hidden: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(in_ch, hidden), nn.ReLU(inplace=True),
            conv3x3(hidden, hidden), nn.ReLU(inplace=True),
            conv3x3(hidden, out_ch),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class CornerPool(nn.Module):
    """(b, c, h, w) -> (b, 4c): the means of the four quadrants, in the DLT's corner order.

    Adaptive average pooling to 2x2 (odd sizes overlap by a row / column, as adaptive pooling
    does), written with slices so the exported graph keeps dynamic input sizes.
    """

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        top, bottom = x[..., : (h + 1) // 2, :], x[..., h // 2 :, :]
        left, right = slice(None, (w + 1) // 2), slice(w // 2, None)
        cells = (top[..., left], top[..., right], bottom[..., right], bottom[..., left])
        return torch.cat([c.mean(dim=(2, 3)) for c in cells], dim=1)


def zero_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A convolution that starts as the zero function (a path added to a trained network)."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def filtered_restoration_state(state: dict[str, Tensor], kernel: int) -> dict[str, Tensor]:
    """Weights made with ``restoration_filter=0`` as a network with ``kernel`` x ``kernel`` input
    filters on its restoration heads, computing the same (the filters are zero)."""
    out = dict(state)
    for key, weight in state.items():
        if key.startswith("restoration_heads.") and key.endswith("body.0.weight"):
            scale = key.split(".")[1]
            out[f"restoration_filters.{scale}.weight"] = weight.new_zeros(3, 3, kernel, kernel)
            out[f"restoration_filters.{scale}.bias"] = weight.new_zeros(3)
    return out


def input_fed_restoration_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights made with ``restoration_input=False`` as a network whose restoration heads also read
    B^s, computing the same: the first convolution gets zero weights for the three new input
    channels (appended last), so training starts from the old function and learns to use them."""
    out = dict(state)
    for key, weight in state.items():
        if key.startswith("restoration_heads.") and key.endswith("body.0.weight"):
            out[key] = torch.cat((weight, weight.new_zeros(weight.shape[0], 3, *weight.shape[2:])), dim=1)
    return out


def corner_pooled_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights of a "global"-pooled homography head as a "corners"-pooled one computing the same.

    The mean of the four quadrant means is the global mean (exactly for even sizes), so each cell
    gets a quarter of the old weights; training then learns what differs between corners.
    """
    out = dict(state)
    for key, weight in state.items():
        if key.startswith("homography_heads.") and key.endswith("offsets.weight"):
            out[key] = weight.repeat(1, 4) / 4
    return out


class HomographyHead(nn.Module):
    """Motion-gated homography estimation at one scale (6.2.1, "Decoders: Homography Outputs").

    g^s * sigmoid(M^s) keeps context on the teeth; a 3x3 conv halves it; a second 3x3 conv reads
    R^s; together they form h_t^s. Offsets come from concat(h_t^s, W(h_{t-1}^s)) through
    conv-BN-ReLU-maxpool blocks (64, 128, 256, 256, 256 at s = 1; s = 2 starts at the 2nd block,
    s = 3 at the 3rd), adaptive average pooling to one cell per corner (any size divisible by 8;
    ``MostConfig.homography_pool``), dropout and a linear layer regressing the 4 corner offsets in
    pixels of scale s. The linear layer starts at zero so an untrained head predicts the identity.
    """

    def __init__(self, channels: int, scale: int, cfg: MostConfig) -> None:
        super().__init__()
        half = channels // 2
        self.gate_conv = conv3x3(channels, half)
        self.restored_conv = conv3x3(3, channels - half)
        widths = cfg.regressor_widths[scale - 1 :]
        blocks: list[nn.Module] = []
        in_ch = 2 * channels
        for w in widths:
            blocks += [
                conv3x3(in_ch, w, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            in_ch = w
        if cfg.homography_pool == "corners":
            pool: list[nn.Module] = [CornerPool()]
            in_ch *= 4
        elif cfg.homography_pool == "global":
            pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        else:
            raise ValueError(f"homography_pool must be 'corners' or 'global', not {cfg.homography_pool!r}")
        self.regressor = nn.Sequential(*blocks, *pool, nn.Dropout(cfg.dropout))
        self.offsets = nn.Linear(in_ch, 8)
        nn.init.zeros_(self.offsets.weight)
        nn.init.zeros_(self.offsets.bias)

    def features(self, decoded: Tensor, mask_logits: Tensor, restored: Tensor) -> Tensor:
        gated = decoded * torch.sigmoid(mask_logits)
        return torch.cat((F.relu(self.gate_conv(gated)), F.relu(self.restored_conv(restored))), dim=1)

    def pooled(self, h_current: Tensor, h_previous_warped: Tensor) -> Tensor:
        """(b, F) features the linear readout ``offsets`` reads (what ``vident fit-homography`` fits it on)."""
        return self.regressor(torch.cat((h_current, h_previous_warped), dim=1))

    def forward(self, h_current: Tensor, h_previous_warped: Tensor) -> Tensor:
        """(b, 8) corner offsets."""
        return self.offsets(self.pooled(h_current, h_previous_warped))


@dataclass
class MostStep:
    """Per-scale outputs of one step, what training and NSS need.

    ``restored`` / ``mask_logits`` / ``homography`` hold only the scales that have a head;
    homographies are in pixels of their own scale. ``final_*`` are at full resolution.
    """

    restored: dict[int, Tensor]
    mask_logits: dict[int, Tensor]
    homography: dict[int, Tensor]
    final_restored: Tensor
    final_mask_logits: Tensor
    final_homography: Tensor


class MostNet(nn.Module):
    """MOST-NET++ / MOST-NSS++ (one class; the structure decides which heads exist)."""

    def __init__(self, cfg: MostConfig | None = None, name: str = "most") -> None:
        super().__init__()
        self.cfg = cfg = cfg or MostConfig()
        st = cfg.structure
        self.top = st.top_scale
        self.decoded_scales = tuple(s for s in (3, 2, 1) if s >= self.top)
        self.encoder = MostEncoder(cfg)
        self.alignment = nn.ModuleDict({str(s): FeatureAlignment(cfg.channels(s)) for s in self.decoded_scales})
        self.decoder = nn.ModuleDict()
        self.upsample = nn.ModuleDict()
        for s in self.decoded_scales:
            c = cfg.channels(s)
            blocks = [ResBlock(c) for _ in range(cfg.decoder_blocks)]
            if s < 3:  # concat(F^s, up(g^{s+1})) -> 3x3 conv halving the channels -> residual blocks
                self.upsample[str(s)] = nn.Sequential(
                    nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.ReLU(inplace=True)
                )
                blocks.insert(0, nn.Sequential(conv3x3(2 * c, c), nn.ReLU(inplace=True)))
            self.decoder[str(s)] = nn.Sequential(*blocks)
        # Dense heads also see the upsampled lower-scale restoration (3) and mask (1) (bottom-up).
        image_ch = 3 if cfg.restoration_input else 0
        self.restoration_heads = nn.ModuleDict(
            {
                str(s): DenseHead(cfg.channels(s) + (4 if s < 3 else 0) + image_ch, cfg.channels(s), 3)
                for s in st.restoration
            }
        )
        k = cfg.restoration_filter
        if k < 0 or (k and k % 2 == 0):
            raise ValueError(f"restoration_filter must be 0 (none) or an odd filter side, not {k}")
        self.restoration_filters = nn.ModuleDict(
            {str(s): zero_conv(nn.Conv2d(3, 3, k, padding=k // 2)) for s in st.restoration} if k else {}
        )
        self.segmentation_heads = nn.ModuleDict(
            {str(s): DenseHead(cfg.channels(s) + (4 if s < 3 else 0), cfg.channels(s), 1) for s in st.segmentation}
        )
        self.homography_heads = nn.ModuleDict({str(s): HomographyHead(cfg.channels(s), s, cfg) for s in st.homography})
        self.colour_transform = zero_linear(nn.Linear(COLOUR_FEATURES, 12)) if cfg.colour_transform else None
        self.detail_gate = zero_linear(nn.Linear(DETAIL_FEATURES, 1)) if cfg.detail_return else None
        self.spec = ModelSpec(
            name=name,
            outputs=(
                TensorSpec("restored", 3, doc="RGB in [0, 1] (not clipped by the network)"),
                TensorSpec("teeth_mask", 1, doc="teeth probability"),
                TensorSpec("homography", kind="homography", doc="H_{t-1->t}, full-resolution pixels"),
            ),
            states=tuple(
                StateSpec(TensorSpec(f"prev_features_s{s}", cfg.channels(s), 2 ** (s - 1)), f"next_features_s{s}")
                for s in self.decoded_scales[::-1]
            )
            + tuple(
                StateSpec(TensorSpec(f"prev_motion_s{s}", cfg.channels(s), 2 ** (s - 1)), f"next_motion_s{s}")
                for s in st.homography
            )
            + (
                (StateSpec(TensorSpec("prev_luma", len(cfg.homography_refine_frames.split("+")),
                                      cfg.homography_refine[-1][0]), "next_luma"),)
                if cfg.homography_refine
                else ()
            ),
            # Measured (docs/performance.md): int8 here keeps the restored frame >= 40 dB of fp32; the
            # scale-3 path that feeds the homography and the restoration heads must stay bf16/fp32.
            int8_modules=("encoder", "alignment.1", "alignment.2", "decoder.1", "decoder.2", "segmentation_heads"),
        )

    @property
    def structure(self) -> Structure:
        return self.cfg.structure

    def layout_metadata(self) -> dict[str, str]:
        """The layout a checkpoint records (strings, as safetensors metadata); :func:`checkpoint_filter_fn`
        reads it back."""
        return {
            "layout_version": str(LAYOUT_VERSION),
            "structure": self.structure.to_json(),
            "homography_pool": self.cfg.homography_pool,
            "restoration_input": str(int(self.cfg.restoration_input)),
            "restoration_filter": str(self.cfg.restoration_filter),
            "homography_refine": json.dumps([list(level) for level in self.cfg.homography_refine]),
            "homography_refine_prior": repr(float(self.cfg.homography_refine_prior)),
            "homography_refine_prior_scale": self.cfg.homography_refine_prior_scale,
            "homography_refine_frames": self.cfg.homography_refine_frames,
            "homography_refine_highpass": json.dumps(list(self.cfg.homography_refine_highpass)),
            "colour_transform": str(int(self.cfg.colour_transform)),
            "detail_return": str(int(self.cfg.detail_return)),
        }

    def step(
        self, frame: Tensor, reset: Tensor, state: dict[str, Tensor], scales: tuple[int, ...] | None = None
    ) -> tuple[MostStep, dict[str, Tensor]]:
        """One frame: (b, 3, H, W) in [0, 1], reset (b, 1, 1, 1) -> per-scale outputs and the state for the
        next step, keyed by the state's input names so training loops can feed it straight back.

        ``scales`` decodes only the coarsest scales (a leading run of ``decoded_scales``, e.g. ``(3,)``):
        what those scales output does not depend on the finer ones, so a fit that reads only the coarse
        homography head skips the full-resolution decoder, about half of a step's time. The state
        returned then holds only those scales."""
        step, new_state, _ = self.forward_intermediates(frame, reset, state, scales)
        return step, new_state

    def forward_intermediates(
        self, frame: Tensor, reset: Tensor, state: dict[str, Tensor], scales: tuple[int, ...] | None = None
    ) -> tuple[MostStep, dict[str, Tensor], dict[str, Tensor]]:
        """:meth:`step` that also returns named intermediate features (timm's ``forward_intermediates``),
        so fits and probes read inside the network without hooking its modules. Per decoded scale s:

        - ``head_features_s{s}`` (b, C, h, w): what the dense heads read, the decoded features and the
          upsampled coarser restoration and mask probability (the restoration head also reads B^s when
          ``cfg.restoration_input``);
        - ``restoration_residual_s{s}`` (b, 3, h, w): the restoration head's output, added to B^s (the
          input filter's term comes on top);
        - ``homography_pooled_s{s}`` (b, F): the pooled features the homography readout
          (``HomographyHead.offsets``) reads.

        With ``cfg.colour_transform`` also ``colour_features`` (b, COLOUR_FEATURES) and
        ``restored_before_colour`` (b, 3, H, W), the full-resolution frame the colour map applies to.

        Only the heads a scale has give their entries."""
        if scales is not None and tuple(scales) != self.decoded_scales[: len(scales)]:
            raise ValueError(f"scales must be a leading run of {self.decoded_scales}, not {scales}")
        st = self.structure
        b, _, height, width = frame.shape
        keep = 1.0 - reset
        encoded = self.encoder(frame)  # [f^1, f^2, f^3]
        images = {1: frame, 2: F.avg_pool2d(frame, 2), 3: F.avg_pool2d(frame, 4)}
        new_state: dict[str, Tensor] = {}
        intermediates: dict[str, Tensor] = {}
        restored: dict[int, Tensor] = {}
        mask_logits: dict[int, Tensor] = {}
        homography: dict[int, Tensor] = {}
        h_current = identity_homography(b, frame.float())  # H~ at the scale being decoded
        decoded: Tensor | None = None
        latest_restored: tuple[int, Tensor] | None = None
        latest_mask: tuple[int, Tensor] | None = None
        for s in self.decoded_scales if scales is None else scales:
            if s < 3:
                h_current = rescale_homography(h_current, 2.0)
            f_t = encoded[s - 1]
            f_prev = reset * f_t + keep * state[f"prev_features_s{s}"]
            new_state[f"prev_features_s{s}"] = f_t
            aligned = self.alignment[str(s)](f_t, warp_by_homography(f_prev, h_current))  # F_t^s
            if decoded is None:
                decoded = self.decoder[str(s)](aligned)
            else:
                decoded = self.decoder[str(s)](torch.cat((aligned, self.upsample[str(s)](decoded)), dim=1))
            lower: list[Tensor] = []
            if latest_restored is not None and latest_mask is not None:
                lower = [
                    resize_to(latest_restored[1], latest_restored[0], s),
                    torch.sigmoid(resize_to(latest_mask[1], latest_mask[0], s)),
                ]
            head_in = torch.cat((decoded, *lower), dim=1)
            intermediates[f"head_features_s{s}"] = head_in
            if st.has("restoration", s):
                restoration_in = torch.cat((head_in, images[s]), dim=1) if self.cfg.restoration_input else head_in
                correction = self.restoration_heads[str(s)](restoration_in)
                intermediates[f"restoration_residual_s{s}"] = correction
                restored[s] = images[s] + correction
                if self.cfg.restoration_filter:
                    restored[s] = restored[s] + self.restoration_filters[str(s)](images[s])
            if st.has("segmentation", s):
                residual = self.segmentation_heads[str(s)](head_in)
                # Segmentation is refined residually across scales (6.2.1).
                mask_logits[s] = (
                    residual if latest_mask is None else residual + resize_to(latest_mask[1], latest_mask[0], s)
                )
            if s in restored:
                latest_restored = (s, restored[s])
            if s in mask_logits:
                latest_mask = (s, mask_logits[s])
            if st.has("homography", s):
                assert latest_restored is not None and latest_mask is not None  # scale 3 always has both
                head = self.homography_heads[str(s)]
                m_s = resize_to(latest_mask[1], latest_mask[0], s)
                r_s = resize_to(latest_restored[1], latest_restored[0], s)
                h_t = head.features(decoded, m_s, r_s)
                h_prev = reset * h_t + keep * state[f"prev_motion_s{s}"]
                new_state[f"prev_motion_s{s}"] = h_t
                pooled = head.pooled(h_t, warp_by_homography(h_prev, h_current))
                intermediates[f"homography_pooled_s{s}"] = pooled
                offsets = head.offsets(pooled)
                factor = 2 ** (s - 1)  # scale s has (H / factor) x (W / factor) pixels
                with torch.autocast(frame.device.type, enabled=False):  # homography algebra in float32
                    size_h = size_tensor(height, h_current) / factor
                    size_w = size_tensor(width, h_current) / factor
                    delta = offsets_to_homography(offsets.float(), size_h, size_w)
                    h_current = delta @ h_current  # cascade: H^s = dH^s . H~^s
                homography[s] = h_current
        assert latest_restored is not None and latest_mask is not None
        final_h = rescale_homography(h_current, 2.0 ** (self.top - 1))
        final_restored = resize_to(latest_restored[1], latest_restored[0], 1)
        if self.cfg.homography_refine and scales is None:
            factor = self.cfg.homography_refine[-1][0]
            current = luma(final_restored.detach())
            if self.cfg.homography_refine_frames == "restored+input":
                current = torch.cat((current, luma(frame)), dim=1)
            current = F.avg_pool2d(current, factor) if factor > 1 else current
            previous = reset * current + keep * state["prev_luma"]
            new_state["prev_luma"] = current
            final_h = refine_homography(
                previous, current, final_h.detach(), self.cfg.homography_refine, self.cfg.homography_refine_prior,
                prior_scale=self.cfg.homography_refine_prior_scale, highpass=self.cfg.homography_refine_highpass,
            )
        if self.colour_transform is not None:
            features = colour_features(frame, final_restored)
            intermediates["colour_features"] = features
            intermediates["restored_before_colour"] = final_restored
            final_restored = apply_colour_transform(final_restored, self.colour_transform(features))
            if 1 in restored:  # the scale-1 loss then trains the map with the rest
                restored[1] = final_restored
        if self.detail_gate is not None:  # after the losses' frame: fitted, not trained
            intermediates["restored_before_detail"] = final_restored
            final_restored, features = apply_detail_return(frame, final_restored, self.detail_gate)
            intermediates["detail_features"] = features
        step = MostStep(
            restored=restored,
            mask_logits=mask_logits,
            homography=homography,
            final_restored=final_restored,
            final_mask_logits=resize_to(latest_mask[1], latest_mask[0], 1),
            final_homography=final_h,
        )
        return step, new_state, intermediates

    def forward(self, frame: Tensor, reset: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """Streaming form: (restored, teeth_mask, homography, *next_state) in spec order."""
        names = [s.name for s in self.spec.states]
        out, new_state = self.step(frame, reset, dict(zip(names, state, strict=True)))
        next_state = tuple(new_state[s.name] for s in self.spec.states)
        return (out.final_restored, torch.sigmoid(out.final_mask_logits), out.final_homography, *next_state)


# ----------------------------------------------------------------------------------------------
# Checkpoint layouts
# ----------------------------------------------------------------------------------------------

# Bumped with each layout option added to ``MostNet.layout_metadata``. Checkpoints written before
# ``layout_version`` existed are version 0.
LAYOUT_VERSION = 8
# Option -> (the version from which every checkpoint records it, what a checkpoint without its key was
# made with: the network from before the option, and how its string reads). Before version 1 each key
# appeared with its option. Version 2 added the photometric homography refinement, 3 its prior, 4 the
# prior's scale, 5 the frames it matches, 6 the colour map, 7 the detail return, 8 the refinement's
# local-mean sides.
LAYOUT_OPTIONS: dict[str, tuple[int, str, Callable[[str], object]]] = {
    "homography_pool": (1, "global", str),
    "restoration_input": (1, "0", lambda text: text == "1"),
    "restoration_filter": (1, "0", int),
    # No weights: any checkpoint converts to any refinement.
    "homography_refine": (2, "[]", lambda text: tuple(tuple(level) for level in json.loads(text))),
    "homography_refine_prior": (3, "0.0", float),
    "homography_refine_prior_scale": (4, "hessian", str),
    "homography_refine_frames": (5, "restored", str),
    "colour_transform": (6, "0", lambda text: text == "1"),
    "detail_return": (7, "0", lambda text: text == "1"),
    "homography_refine_highpass": (8, f"[{HIGHPASS}]", lambda text: tuple(json.loads(text))),
}


def checkpoint_filter_fn(
    state_dict: dict[str, Tensor], metadata: dict[str, str], into: MostConfig | None = None
) -> tuple[dict[str, object], dict[str, Tensor]]:
    """A MOST checkpoint's layout as ``create_model`` kwargs and its weights for that layout (timm's
    ``checkpoint_filter_fn``, keyed by the metadata's ``layout_version``).

    ``into``: the weights converted to that config's layout instead (``vident train --init-from``), where a
    conversion computes the same function: global to corner pooling (``corner_pooled_state``), heads
    that read B^s (``input_fed_restoration_state``), input filters added, resized or removed while they
    are zero (``filtered_restoration_state``), the colour map or the detail gate added, or removed while
    zero. Other changes, and another structure, raise."""
    version = int(metadata.get("layout_version", "0"))
    if version > LAYOUT_VERSION:
        raise ValueError(f"layout version {version} is newer than this code reads ({LAYOUT_VERSION})")
    if "structure" not in metadata:
        raise ValueError("not a MOST checkpoint: its metadata has no scales-to-tasks structure")
    made: dict[str, object] = {"structure": Structure.from_json(metadata["structure"])}
    for key, (since, before, parse) in LAYOUT_OPTIONS.items():
        if key not in metadata and version >= since:
            raise ValueError(f"layout version {version} metadata without {key}")
        made[key] = parse(metadata.get(key, before))
    state = dict(state_dict)
    if into is None:
        return made, state
    wanted: dict[str, object] = {key: getattr(into, key) for key in made}

    def unconvertible(key: str) -> ValueError:
        return ValueError(f"weights made with {key}={made[key]!r} do not convert to {key}={wanted[key]!r}")

    if made["structure"] != wanted["structure"]:
        raise unconvertible("structure")
    if made["homography_pool"] != wanted["homography_pool"]:
        if (made["homography_pool"], wanted["homography_pool"]) != ("global", "corners"):
            raise unconvertible("homography_pool")
        state = corner_pooled_state(state)  # the corners then learn apart
    if made["restoration_input"] != wanted["restoration_input"]:
        if made["restoration_input"]:
            raise unconvertible("restoration_input")
        state = input_fed_restoration_state(state)  # the heads then learn to read B^s
    if made["restoration_filter"] != wanted["restoration_filter"]:
        filters = [key for key in state if key.startswith("restoration_filters.")]
        trained = [key for key in filters if state[key].any()]
        if trained:
            side = wanted["restoration_filter"]
            raise ValueError(f"{', '.join(trained)} not zero: the filters would be lost by making them "
                             f"{f'{side}x{side}' if side else 'none'}")  # fmt: skip
        state = {key: value for key, value in state.items() if key not in filters}
        if wanted["restoration_filter"]:
            state = filtered_restoration_state(state, wanted["restoration_filter"])  # type: ignore[arg-type]
    if made["colour_transform"] != wanted["colour_transform"]:
        state = colour_transform_state(state, add=bool(wanted["colour_transform"]))
    if made["detail_return"] != wanted["detail_return"]:
        state = detail_return_state(state, add=bool(wanted["detail_return"]))
    return wanted, state


# ----------------------------------------------------------------------------------------------
# Registered variants
# ----------------------------------------------------------------------------------------------

TINY = {"width": 8, "regressor_widths": (8, 16, 32, 32, 32), "encoder_blocks": 1, "decoder_blocks": 1}

# The layout each registered name builds is the one its shipped checkpoint has
# (models/checkpoints/<name>.safetensors), so ``create_model(name)`` loads it strictly and ``vident info``
# counts what users run; tiny variants follow their big siblings. Both ship the filter, the photometric
# refinement and the colour map, not the input, and most-nss the detail return; most-net's weights were
# made before corner pooling. The refinement's levels and prior were chosen for most-nss on held-out
# sequences of a training split (docs/experiments.md) and most-net uses the same; the second
# local-mean side was chosen for most-nss on the validation splits.
MOST_NET = MostConfig(
    structure=MOST_NET_STRUCTURE,
    homography_pool="global",
    restoration_input=False,
    restoration_filter=5,
    homography_refine=((8, 10), (4, 20)),
    homography_refine_prior=0.1,
    homography_refine_prior_scale="residual",
    homography_refine_frames="restored+input",
    homography_refine_highpass=(5, 11),
    colour_transform=True,
)
MOST_NSS = replace(MOST_NET, structure=MOST_NSS_STRUCTURE, homography_pool="corners", detail_return=True)
VARIANTS: Mapping[str, MostConfig] = MappingProxyType(
    {
        "most-net": MOST_NET,
        "most-nss": MOST_NSS,
        "most-net-tiny": replace(MOST_NET, **TINY),  # type: ignore[arg-type]
        "most-nss-tiny": replace(MOST_NSS, **TINY),  # type: ignore[arg-type]
    }
)


def build_most(name: str, structure: Structure | None = None, **overrides: object) -> MostNet:
    """The registered layout of ``name`` with ``overrides`` (``MostConfig`` fields) on top."""
    if structure is not None:
        overrides["structure"] = structure
    return MostNet(replace(VARIANTS[name], **overrides), name=name)  # type: ignore[arg-type]


@register_model("most-net", checkpoint_filter=checkpoint_filter_fn)
def most_net(structure: Structure | None = None, **overrides: object) -> MostNet:
    """MOST-NET++: every task at every scale."""
    return build_most("most-net", structure, **overrides)


@register_model("most-nss", checkpoint_filter=checkpoint_filter_fn)
def most_nss(structure: Structure | None = None, **overrides: object) -> MostNet:
    """MOST-NSS++: the scales-to-tasks structure NSS found in the dissertation (Fig. 6.6)."""
    return build_most("most-nss", structure, **overrides)


@register_model("most-net-tiny", checkpoint_filter=checkpoint_filter_fn)
def most_net_tiny(structure: Structure | None = None, **overrides: object) -> MostNet:
    return build_most("most-net-tiny", structure, **overrides)


@register_model("most-nss-tiny", checkpoint_filter=checkpoint_filter_fn)
def most_nss_tiny(structure: Structure | None = None, **overrides: object) -> MostNet:
    return build_most("most-nss-tiny", structure, **overrides)
