"""R2-D4: joint video denoising and deblurring with dense deformable alignment.

Katsaros 2024, chapter 3.2.1 (eq. 3.8-3.22). Two-stage cascaded restoration: R'_t = B_t + D_den(F)
is the denoised (still blurry) frame, R_t = R'_t + D_deb(F) the restored one. F is the fusion of
the two past steps' features aligned to the current frame by modulated deformable convolutions.

Streaming (eq. 3.15): the current frame goes through E, each past pair (B, R^) through E' (shared
by both past steps). E'(B_{t-1}, R^_{t-1}) computed at step t is reused as the t-2 features at
step t+1, so each step runs E once and E' once. The state is therefore (B_{t-1}, R^_{t-1},
E'(B_{t-2}, R^_{t-2})); ``reset = 1`` substitutes the current frame for every past one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import (
    COLOUR_FEATURES,
    DETAIL_FEATURES,
    MSRDM,
    RDB,
    DeformableAlignment,
    apply_colour_transform,
    apply_detail_return,
    colour_features,
    colour_transform_state,
    conv1x1,
    conv3x3,
    detail_return_state,
    zero_linear,
)
from models.registry import register_model
from models.spec import ModelSpec, StateSpec, TensorSpec


@dataclass(frozen=True)
class R2D4Config:
    encoder_channels: tuple[int, int] = (16, 32)  # E: full resolution, then 1/2 (eq. 3.14)
    aligned_channels: int = 128  # deformable conv output per past frame (eq. 3.16)
    # "Channel-wise expansion of features upon fusion" (3.2.1): the fusion runs at 256 channels
    # (the spec's reading closest to the text; 128 gives 2.5 M parameters against the text's 5.1 M).
    fusion_channels: int = 256
    fusion_growth: int = 32
    decoder_widths: tuple[int, int] = (256, 128)  # convs before each x2 pixel shuffle (eq. 3.20)
    decoder_growth: tuple[int, int] = (32, 16)
    two_stage: bool = True  # False: R2-D3, one decoder (3.3.2 ablation)
    # A per-frame 3x4 colour map of the restored output, as MOST's (``MostConfig.colour_transform``):
    # fitted by ``vident fit-colour``, trained by the restoration loss. The recurrent state keeps the
    # frame before it, so the map never changes what the trunk sees. False rebuilds older checkpoints.
    colour_transform: bool = False
    # A share of the input's own detail given back after the colour map, per frame, as MOST's
    # (``MostConfig.detail_return``): fitted by ``vident fit-detail``, seen by no loss, kept out of the
    # recurrent state. False rebuilds older checkpoints.
    detail_return: bool = False


class R2D4Encoder(nn.Module):
    """E / E' (eq. 3.14): conv3x3 -> MS-RDM_{16,16} -> conv3x3 stride 2 -> MS-RDM_{32,32}."""

    def __init__(self, in_ch: int, channels: tuple[int, int]) -> None:
        super().__init__()
        c1, c2 = channels
        self.full_res = nn.Sequential(conv3x3(in_ch, c1), MSRDM(c1, c1))
        self.half_res = nn.Sequential(conv3x3(c1, c2, stride=2), MSRDM(c2, c2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        full = self.full_res(x)  # (b, c1, H, W)
        return full, self.half_res(full)  # (b, c2, H/2, W/2)


class Fusion(nn.Module):
    """Eq. 3.18: conv3x3 -> RDB -> RDB -> conv3x3 stride 2 -> RDB -> RDB, to 1/4 resolution."""

    def __init__(self, in_ch: int, channels: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(in_ch, channels),
            RDB(channels, growth),
            RDB(channels, growth),
            conv3x3(channels, channels, stride=2),
            RDB(channels, growth),
            RDB(channels, growth),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Decoder(nn.Module):
    """Eq. 3.20 with the split skip connections of 3.2.1.

    conv3x3 -> pixel shuffle x2 -> [skip at 1/2] -> RDB -> conv3x3 -> pixel shuffle x2 ->
    [skip at full resolution] -> RDB -> conv3x3 to RGB. Each skip is this decoder's half of the
    current frame's encoder features, concatenated after the shuffle and merged back to the
    decoder's width by a 1x1 conv (spec decision).
    """

    def __init__(self, in_ch: int, cfg: R2D4Config) -> None:
        super().__init__()
        w1, w2 = cfg.decoder_widths
        g1, g2 = cfg.decoder_growth
        s1, s2 = w1 // 4, w2 // 4  # channels after each pixel shuffle
        skip_full, skip_half = (c // 2 for c in cfg.encoder_channels)
        self.expand1 = conv3x3(in_ch, w1)
        self.merge1 = conv1x1(s1 + skip_half, s1)
        self.rdb1 = RDB(s1, g1)
        self.expand2 = conv3x3(s1, w2)
        self.merge2 = conv1x1(s2 + skip_full, s2)
        self.rdb2 = RDB(s2, g2)
        self.out = conv3x3(s2, 3)

    def forward(self, shared: Tensor, skip_half: Tensor, skip_full: Tensor) -> Tensor:
        x = F.pixel_shuffle(self.expand1(shared), 2)  # (b, s1, H/2, W/2)
        x = self.rdb1(self.merge1(torch.cat((x, skip_half), dim=1)))
        x = F.pixel_shuffle(self.expand2(x), 2)  # (b, s2, H, W)
        x = self.rdb2(self.merge2(torch.cat((x, skip_full), dim=1)))
        return self.out(x)


class R2D4(nn.Module):
    def __init__(self, cfg: R2D4Config | None = None, name: str = "r2-d4") -> None:
        super().__init__()
        self.cfg = cfg = cfg or R2D4Config()
        c1, c2 = cfg.encoder_channels
        self.encoder = R2D4Encoder(3, cfg.encoder_channels)  # E, current frame
        self.past_encoder = R2D4Encoder(6, cfg.encoder_channels)  # E', (B, R^) pairs
        self.align_prev1 = DeformableAlignment(c2, cfg.aligned_channels)
        self.align_prev2 = DeformableAlignment(c2, cfg.aligned_channels)
        self.fusion = Fusion(2 * cfg.aligned_channels, cfg.fusion_channels, cfg.fusion_growth)
        self.denoise_decoder = Decoder(cfg.fusion_channels, cfg)
        self.deblur_decoder = Decoder(cfg.fusion_channels, cfg) if cfg.two_stage else None
        self.colour_transform = zero_linear(nn.Linear(COLOUR_FEATURES, 12)) if cfg.colour_transform else None
        self.detail_gate = zero_linear(nn.Linear(DETAIL_FEATURES, 1)) if cfg.detail_return else None
        self.spec = ModelSpec(
            name=name,
            outputs=(
                TensorSpec("restored", 3, doc="R^_t, RGB in [0, 1] (not clipped by the network)"),
                TensorSpec("denoised", 3, doc="R^'_t, first-stage (denoised, still blurry) output"),
            ),
            states=(
                StateSpec(TensorSpec("prev_frame", 3, doc="B_{t-1}"), "next_frame"),
                StateSpec(TensorSpec("prev_restored", 3, doc="R^_{t-1}"), "next_restored"),
                StateSpec(TensorSpec("prev_past_features", c2, 2, doc="E'(B_{t-2}, R^_{t-2})"), "next_past_features"),
            ),
        )

    def layout_metadata(self) -> dict[str, str]:
        """What a checkpoint records of the layout (the name fixes the rest); see :func:`checkpoint_filter_fn`."""
        return {
            "layout_version": str(LAYOUT_VERSION),
            "colour_transform": str(int(self.cfg.colour_transform)),
            "detail_return": str(int(self.cfg.detail_return)),
        }

    def step(
        self, frame: Tensor, reset: Tensor, state: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        outputs, new_state, _ = self.forward_intermediates(frame, reset, state)
        return outputs, new_state

    def forward_intermediates(
        self, frame: Tensor, reset: Tensor, state: dict[str, Tensor], scales: tuple[int, ...] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """:meth:`step` that also returns, with ``cfg.colour_transform``, the ``colour_features`` and the
        ``restored_before_colour`` frame the colour map reads (MOST's names, for ``vident fit-colour``), and
        with ``cfg.detail_return`` the ``restored_before_detail`` frame and its ``detail_features`` (for
        ``vident fit-detail``). ``scales`` is MOST's; R2-D4 has one scale and takes None only."""
        if scales is not None:
            raise ValueError("R2-D4 decodes one scale: scales must be None")
        keep = 1.0 - reset
        prev_frame = reset * frame + keep * state["prev_frame"]
        prev_restored = reset * frame + keep * state["prev_restored"]
        skip_full, current = self.encoder(frame)  # f_t at 1/2, and the full-resolution features
        _, past1 = self.past_encoder(torch.cat((prev_frame, prev_restored), dim=1))  # f_{t-1}
        past2 = reset * past1 + keep * state["prev_past_features"]  # f_{t-2}, cached from the last step
        aligned = torch.cat((self.align_prev1(current, past1), self.align_prev2(current, past2)), dim=1)
        shared = self.fusion(aligned)  # F_shared, (b, fusion, H/4, W/4)
        den_full, deb_full = skip_full.chunk(2, dim=1)
        den_half, deb_half = current.chunk(2, dim=1)
        denoised = frame + self.denoise_decoder(shared, den_half, den_full)  # eq. 3.21 with the B_t residual
        if self.deblur_decoder is None:
            restored = denoised
        else:
            restored = denoised + self.deblur_decoder(shared, deb_half, deb_full)  # eq. 3.22
        new_state = {"prev_frame": frame, "prev_restored": restored, "prev_past_features": past1}
        intermediates: dict[str, Tensor] = {}
        if self.colour_transform is not None:
            features = colour_features(frame, restored)
            intermediates = {"colour_features": features, "restored_before_colour": restored}
            restored = apply_colour_transform(restored, self.colour_transform(features))
        if self.detail_gate is not None:  # after the losses' frame: fitted, not trained
            intermediates["restored_before_detail"] = restored
            restored, features = apply_detail_return(frame, restored, self.detail_gate)
            intermediates["detail_features"] = features
        return {"restored": restored, "denoised": denoised}, new_state, intermediates

    def forward(self, frame: Tensor, reset: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """Streaming form: (restored, denoised, *next_state) in spec order."""
        names = [s.name for s in self.spec.states]
        outputs, new_state = self.step(frame, reset, dict(zip(names, state, strict=True)))
        return (
            *(outputs[o.name] for o in self.spec.outputs),
            *(new_state[s.name] for s in self.spec.states),
        )


# Version 1 records ``layout_version``; version 0 (checkpoints written before it) has the same weights.
# Version 2 records ``colour_transform``, version 3 ``detail_return`` (older files have none).
LAYOUT_VERSION = 3
LAYOUT_OPTIONS: dict[str, int] = {"colour_transform": 2, "detail_return": 3}  # option -> the version that records it


def checkpoint_filter_fn(
    state_dict: dict[str, Tensor], metadata: dict[str, str], into: R2D4Config | None = None
) -> tuple[dict[str, object], dict[str, Tensor]]:
    """An R2-D4 checkpoint's ``create_model`` kwargs and weights (timm's ``checkpoint_filter_fn``).

    ``into``: the weights converted to that config's colour map and detail gate, each added (zero: the
    same function) or removed while it is zero; removing a fitted one raises."""
    version = int(metadata.get("layout_version", "0"))
    if version > LAYOUT_VERSION:
        raise ValueError(f"layout version {version} is newer than this code reads ({LAYOUT_VERSION})")
    made: dict[str, object] = {}
    for key, since in LAYOUT_OPTIONS.items():
        if version >= since and key not in metadata:
            raise ValueError(f"layout version {version} metadata without {key}")
        made[key] = metadata.get(key, "0") == "1"
    state = dict(state_dict)
    if into is None:
        return made, state
    if made["colour_transform"] != into.colour_transform:
        state = colour_transform_state(state, add=into.colour_transform)
    if made["detail_return"] != into.detail_return:
        state = detail_return_state(state, add=into.detail_return)
    return {key: getattr(into, key) for key in made}, state


# The layout each registered name builds is its shipped checkpoint's (models/checkpoints/r2-d4.safetensors
# has the colour map and the detail gate); the tiny variant follows; r2-d3, the ablation, ships no weights.
R2_D4 = R2D4Config(colour_transform=True, detail_return=True)


@register_model("r2-d4", checkpoint_filter=checkpoint_filter_fn)
def r2_d4(**overrides: object) -> R2D4:
    return R2D4(replace(R2_D4, **overrides), name="r2-d4")  # type: ignore[arg-type]


@register_model("r2-d3", checkpoint_filter=checkpoint_filter_fn)
def r2_d3(**overrides: object) -> R2D4:
    """The one-decoder ablation of 3.3.2."""
    return R2D4(replace(R2D4Config(two_stage=False), **overrides), name="r2-d3")  # type: ignore[arg-type]


TINY = R2D4Config(
    encoder_channels=(8, 8),
    aligned_channels=16,
    fusion_channels=16,
    fusion_growth=8,
    decoder_widths=(32, 16),
    decoder_growth=(8, 4),
    colour_transform=True,
    detail_return=True,
)


@register_model("r2-d4-tiny", checkpoint_filter=checkpoint_filter_fn)
def r2_d4_tiny(**overrides: object) -> R2D4:
    return R2D4(replace(TINY, **overrides), name="r2-d4-tiny")  # type: ignore[arg-type]
