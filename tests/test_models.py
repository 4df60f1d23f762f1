"""Shapes, streaming equivalence, pinned sizes and the structure table of the three networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parity import assert_same_outputs

from models import create_model, list_models
from models.complexity import count_parameters
from models.layers import apply_colour_transform, colour_features, offsets_to_homography
from models.most import (
    MOST_NSS_STRUCTURE,
    CornerPool,
    MostNet,
    Structure,
    corner_pooled_state,
    filtered_restoration_state,
    input_fed_restoration_state,
)
from models.r2d4 import R2D4

FULL = ("most-net", "most-nss", "r2-d4", "r2-d3")
TINY = ("most-net-tiny", "most-nss-tiny", "r2-d4-tiny")

# Pinned so that an accidental architecture change shows; docs/models.md explains each figure. Each name
# counts the layout it ships (both: 5x5 input filters and the colour map; most-net: global pooling).
PARAMETERS = {
    "most-net": 9_188_566,
    "most-nss": 5_857_233,  # with the detail gate (3)
    "r2-d4": 4_532_327,  # with the detail gate (3)
    "r2-d3": 3_744_113,
    "most-net-tiny": 238_322,
    "most-nss-tiny": 175_913,
    "r2-d4-tiny": 94_639,
}


# The homography as the heads return it: the photometric refinement (tested in tests/test_refine.py) off.
HEAD_ONLY = {"homography_refine": ()}


def _state(model: torch.nn.Module, batch: int, height: int, width: int) -> list[torch.Tensor]:
    return [torch.from_numpy(v) for v in model.spec.initial_state(batch, height, width).values()]


def _step(model, frame, reset, state):
    out = model(frame, reset, *state)
    n = len(model.spec.outputs)
    return out[:n], list(out[n:])


def _stream(model: torch.nn.Module, clip: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Outputs of every step of a (time, batch, 3, h, w) clip streamed with the state carried."""
    t_len, batch, _, h, w = clip.shape
    state = _state(model, batch, h, w)
    streamed = []
    for t in range(t_len):
        outputs, state = _step(model, clip[t], torch.full((batch, 1, 1, 1), float(t == 0)), state)
        streamed.append(outputs)
    return streamed


def test_registry_lists_every_network_once() -> None:
    assert set(FULL + TINY) <= set(list_models())
    with pytest.raises(KeyError, match="registered"):
        create_model("most-nothing")


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameter_counts_are_pinned(name: str) -> None:
    assert count_parameters(create_model(name)) == PARAMETERS[name]


@pytest.mark.parametrize(("name", "size"), [(n, (64, 96)) for n in FULL + TINY] + [(n, (320, 416)) for n in FULL])
@torch.no_grad()
def test_output_shapes_and_dtypes(name: str, size: tuple[int, int]) -> None:
    model = create_model(name).eval()
    h, w = size
    batch = 2 if size == (64, 96) else 1
    frame = torch.rand(batch, 3, h, w)
    outputs, state = _step(model, frame, torch.ones(batch, 1, 1, 1), _state(model, batch, h, w))
    for spec, value in zip(model.spec.outputs, outputs, strict=True):
        assert value.dtype == torch.float32
        assert tuple(value.shape) == spec.shape(batch, h, w), spec.name
        assert torch.isfinite(value).all(), spec.name
    for spec, value in zip(model.spec.states, state, strict=True):
        assert tuple(value.shape) == spec.tensor.shape(batch, h, w), spec.name
    if isinstance(model, MostNet):
        mask = outputs[1]
        assert ((mask >= 0) & (mask <= 1)).all()
        assert torch.allclose(outputs[2][:, 2, 2], torch.ones(batch))


def test_spec_names_match_forward_arity() -> None:
    for name in TINY:
        model = create_model(name).eval()
        spec = model.spec
        out = model(torch.rand(1, 3, 32, 40), torch.ones(1, 1, 1, 1), *_state(model, 1, 32, 40))
        assert len(out) == len(spec.output_names)
        assert len(spec.input_names) == 2 + len(spec.states)
        with pytest.raises(ValueError, match="multiple of 8"):
            spec.initial_state(1, 30, 40)


@torch.no_grad()
def test_untrained_homography_heads_start_at_identity() -> None:
    model = create_model("most-net-tiny", **HEAD_ONLY).eval()
    frames = torch.rand(3, 1, 3, 64, 96)
    state = _state(model, 1, 64, 96)
    for t in range(3):
        outputs, state = _step(model, frames[t], torch.full((1, 1, 1, 1), float(t == 0)), state)
        assert torch.allclose(outputs[2][0], torch.eye(3), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Streaming equivalence: cached features == recomputing them from the clip at every step
# ----------------------------------------------------------------------------------------------


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Random non-zero weights everywhere (zero-initialised offsets/heads would hide mistakes)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def test_most_streaming_equals_reference_loop() -> None:
    model = _perturb(create_model("most-net-tiny", **HEAD_ONLY))
    clip = torch.rand(5, 2, 3, 64, 96)
    streamed = _stream(model, clip)
    # Reference: re-encode the previous frame from the clip at every step (no feature cache).
    motion: dict[str, torch.Tensor] = {}
    for t in range(clip.shape[0]):
        previous = clip[max(t - 1, 0)]
        prev_features = model.encoder(previous)
        ref_state = {f"prev_features_s{s}": prev_features[s - 1] for s in (1, 2, 3)}
        for s in model.structure.homography:
            ref_state[f"prev_motion_s{s}"] = motion.get(f"s{s}", torch.zeros_like(ref_state[f"prev_features_s{s}"]))
        reset = torch.full((2, 1, 1, 1), float(t == 0))
        step, new_state = model.step(clip[t], reset, ref_state)
        motion = {f"s{s}": new_state[f"prev_motion_s{s}"] for s in model.structure.homography}
        torch.testing.assert_close(step.final_restored, streamed[t][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.sigmoid(step.final_mask_logits), streamed[t][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.final_homography, streamed[t][2], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_r2d4_streaming_equals_reference_loop() -> None:
    model = _perturb(create_model("r2-d4-tiny"))
    clip = torch.rand(5, 2, 3, 64, 96)
    streamed = [outputs[0] for outputs in _stream(model, clip)]
    # Reference: E' applied afresh to (B_{t-2}, R^_{t-2}) from the history, the first frame
    # standing in for frames before the clip and as its own restoration.
    restored: list[torch.Tensor] = []
    for t in range(clip.shape[0]):
        if t == 0:
            prev_frame, prev_restored = clip[0], clip[0]
        else:
            prev_frame, prev_restored = clip[t - 1], restored[t - 1]
        if t <= 1:
            past2 = model.past_encoder(torch.cat((clip[0], clip[0]), dim=1))[1]
        else:
            past2 = model.past_encoder(torch.cat((clip[t - 2], restored[t - 2]), dim=1))[1]
        ref_state = {"prev_frame": prev_frame, "prev_restored": prev_restored, "prev_past_features": past2}
        outputs, _, found = model.forward_intermediates(clip[t], torch.zeros(2, 1, 1, 1), ref_state)
        restored.append(found["restored_before_colour"])  # the history holds the frame before the colour map
        torch.testing.assert_close(outputs["restored"], streamed[t], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_batched_streams_equal_separate_streams() -> None:
    """Sessions at different points of their streams can share one call (reset is per sample)."""
    model = _perturb(create_model("most-nss-tiny"))
    a, b = torch.rand(3, 1, 3, 64, 96), torch.rand(3, 1, 3, 64, 96)
    state_a, state_b = _state(model, 1, 64, 96), _state(model, 1, 64, 96)
    out_a, state_a = _step(model, a[0], torch.ones(1, 1, 1, 1), state_a)
    out_a, state_a = _step(model, a[1], torch.zeros(1, 1, 1, 1), state_a)
    expected_b, _ = _step(model, b[0], torch.ones(1, 1, 1, 1), state_b)
    expected_a, _ = _step(model, a[2], torch.zeros(1, 1, 1, 1), state_a)
    joint_state = [torch.cat(pair) for pair in zip(state_a, _state(model, 1, 64, 96), strict=True)]
    joint, _ = _step(model, torch.cat((a[2], b[0])), torch.tensor([0.0, 1.0]).view(2, 1, 1, 1), joint_state)
    # The refinement's steps carry rounding that differs with the batch size into the homography.
    names = ("restored", "teeth_mask", "homography")
    assert_same_outputs(names, [j[:1] for j in joint[:3]], expected_a[:3], 64, 96)
    assert_same_outputs(names, [j[1:] for j in joint[:3]], expected_b[:3], 64, 96)


# ----------------------------------------------------------------------------------------------
# The scales-to-tasks structure is data and really removes heads
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_streaming_step_makes_no_tensor_from_host_data(name: str) -> None:
    """A CUDA graph cannot capture a tensor made from Python data (a host-to-device copy; the replay
    would read freed host memory): every constant of a step must be made on the device
    (service/backends/torch.py captures the step). Seen here on the CPU as aten.lift_fresh."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostData(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if "lift_fresh" in str(func):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    model = create_model(name).eval()
    state = [torch.from_numpy(v) for v in model.spec.initial_state(1, 32, 48).values()]
    with torch.no_grad(), HostData() as mode:
        model(torch.rand(1, 3, 32, 48), torch.zeros(1, 1, 1, 1), *state)
    assert mode.seen == []


def test_nss_structure_removes_heads() -> None:
    net, nss = create_model("most-net"), create_model("most-nss")
    assert isinstance(nss, MostNet) and nss.structure == MOST_NSS_STRUCTURE
    assert set(nss.restoration_heads) == {"1", "3"}
    assert set(nss.segmentation_heads) == {"2", "3"}
    assert set(nss.homography_heads) == {"3"}
    assert set(net.homography_heads) == {"1", "2", "3"}
    assert not any(k.startswith(("homography_heads.1.", "homography_heads.2.")) for k in nss.state_dict())
    assert [s.name for s in nss.spec.states] == [
        "prev_features_s1", "prev_features_s2", "prev_features_s3", "prev_motion_s3", "prev_luma"
    ]  # fmt: skip
    assert count_parameters(net) - count_parameters(nss) > 3_000_000  # two homography regressors gone


@torch.no_grad()
def test_structure_without_full_resolution_heads_skips_decoding_there() -> None:
    coarse = Structure(restoration=(2, 3), segmentation=(3,), homography=(3,))
    model = MostNet(
        create_model("most-nss-tiny").cfg.__class__(
            structure=coarse, width=8, regressor_widths=(8, 16, 32, 32, 32), encoder_blocks=1, decoder_blocks=1
        )
    ).eval()
    assert "1" not in model.decoder and "1" not in model.alignment
    outputs, _ = _step(model, torch.rand(1, 3, 64, 96), torch.ones(1, 1, 1, 1), _state(model, 1, 64, 96))
    assert outputs[0].shape == (1, 3, 64, 96)  # upsampled from scale 2


def test_structure_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="including 3"):
        Structure(restoration=(1, 2))
    assert Structure.from_json(MOST_NSS_STRUCTURE.to_json()) == MOST_NSS_STRUCTURE
    assert MOST_NSS_STRUCTURE.table() == [[1, 0, 1], [0, 1, 1], [0, 0, 1]]


def test_r2d3_has_one_decoder() -> None:
    model = create_model("r2-d3")
    assert isinstance(model, R2D4) and model.deblur_decoder is None


@pytest.mark.parametrize("size", [(4, 4), (4, 5), (3, 7), (1, 1)])
def test_corner_pool_is_a_2x2_adaptive_average_in_corner_order(size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size)
    cells = F.adaptive_avg_pool2d(x, 2)  # (b, c, 2, 2), overlapping cells for odd sizes
    order = [cells[..., 0, 0], cells[..., 0, 1], cells[..., 1, 1], cells[..., 1, 0]]  # TL, TR, BR, BL
    torch.testing.assert_close(CornerPool()(x), torch.cat(order, dim=1))


@torch.no_grad()
def test_corner_pooled_state_computes_what_the_global_head_did() -> None:
    """A checkpoint with globally pooled homography heads, converted, predicts the same homographies
    (exactly where the regressor's last map has even sides: 64x64 gives 2x2 at scale 3 of the tiny
    net) and no longer does once the corners learn apart."""
    torch.manual_seed(0)
    old = create_model("most-net-tiny", homography_pool="global", **HEAD_ONLY).eval()
    for head in old.homography_heads.values():
        head.offsets.weight.normal_(0, 0.5)  # zero-initialised otherwise: every head would say identity
    new = create_model("most-net-tiny", homography_pool="corners", **HEAD_ONLY).eval()
    new.load_state_dict(corner_pooled_state(old.state_dict()))
    clip = torch.rand(2, 1, 3, 64, 64)
    (a, b) = (_stream(m, clip)[-1] for m in (old, new))
    assert not torch.allclose(a[2], torch.eye(3).expand_as(a[2]), atol=1e-3)  # a real motion estimate
    torch.testing.assert_close(b[2], a[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b[0], a[0], atol=1e-4, rtol=1e-4)
    new.homography_heads["3"].offsets.weight[:, :8].add_(1.0)  # only the top-left cell changes
    assert not torch.allclose(_stream(new, clip)[-1][2], a[2], atol=1e-3)


@torch.no_grad()
def test_input_fed_restoration_state_computes_what_the_old_heads_did() -> None:
    """Heads that did not read B^s, converted, restore the same frames (every restoration scale of
    most-net: s = 1, 2, 3); the new input channels then change the output, and only the restored
    frame's: the mask does not read them."""
    torch.manual_seed(0)
    old = create_model("most-net-tiny", restoration_input=False).eval()
    new = create_model("most-net-tiny", restoration_input=True).eval()
    new.load_state_dict(input_fed_restoration_state(old.state_dict()))
    for s, head in new.restoration_heads.items():
        assert head.body[0].in_channels == old.restoration_heads[s].body[0].in_channels + 3
    clip = torch.rand(3, 2, 3, 32, 48)
    for a, b in zip(_stream(old, clip), _stream(new, clip), strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    new.restoration_heads["1"].body[0].weight[:, -3:].normal_()
    changed = _stream(new, clip)[-1]
    reference = _stream(old, clip)[-1]
    assert not torch.allclose(changed[0], reference[0], atol=1e-3)  # the restored frame reads B^1
    torch.testing.assert_close(changed[1], reference[1], atol=1e-5, rtol=1e-5)  # the mask does not


@torch.no_grad()
def test_filtered_restoration_state_computes_the_same_and_filters_only_the_restored_frame() -> None:
    """A network made without restoration filters, converted, computes the same on every output;
    a non-zero scale-1 filter then adds exactly its convolution of B^1 to the restored frame and
    leaves the mask and the homography alone (scale 1 feeds nothing else)."""
    torch.manual_seed(0)
    old = create_model("most-net-tiny", restoration_filter=0, **HEAD_ONLY).eval()
    new = create_model("most-net-tiny", restoration_filter=5, **HEAD_ONLY).eval()
    assert not old.restoration_filters and set(new.restoration_filters) == {"1", "2", "3"}
    new.load_state_dict(filtered_restoration_state(old.state_dict(), new.cfg.restoration_filter))
    clip = torch.rand(3, 2, 3, 32, 48)
    reference = _stream(old, clip)
    for a, b in zip(reference, _stream(new, clip), strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    conv = new.restoration_filters["1"]
    conv.weight.normal_(std=0.1)
    conv.bias.fill_(0.05)
    changed = _stream(new, clip)
    torch.testing.assert_close(changed[-1][0], reference[-1][0] + conv(clip[-1]), atol=1e-5, rtol=1e-5)
    for x, y in zip(changed[-1][1:3], reference[-1][1:3], strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_homography_pool_is_checked() -> None:
    with pytest.raises(ValueError, match="homography_pool"):
        create_model("most-nss-tiny", homography_pool="max")
    with pytest.raises(ValueError, match="restoration_filter"):
        create_model("most-nss-tiny", restoration_filter=4)


@pytest.mark.parametrize("name", ["most-net-tiny", "most-nss-tiny"])
@torch.no_grad()
def test_forward_intermediates_returns_what_forward_does_and_the_features_it_read(name: str) -> None:
    """Streamed two steps, ``forward_intermediates`` gives ``forward``'s outputs and state; its features
    are the ones the outputs were computed from: the readout of the pooled features is the scale-3
    homography, B^1 + head output + input filter the restored frame."""
    model = _perturb(create_model(name, restoration_filter=5))
    frames = torch.rand(2, 2, 3, 64, 96)
    state = _state(model, 2, 64, 96)
    names = [s.name for s in model.spec.states]
    for t in range(2):
        reset = torch.full((2, 1, 1, 1), float(t == 0))
        expected = model(frames[t], reset, *state)
        step, new_state, found = model.forward_intermediates(frames[t], reset, dict(zip(names, state, strict=True)))
        have = (step.final_restored, torch.sigmoid(step.final_mask_logits), step.final_homography)
        for x, y in zip((*have, *(new_state[n] for n in names)), expected, strict=True):
            torch.testing.assert_close(x, y, atol=0, rtol=0)
        state = list(expected[3:])
    assert {f"homography_pooled_s{s}" for s in model.structure.homography} <= set(found)
    assert {f"restoration_residual_s{s}" for s in model.structure.restoration} <= set(found)
    pooled = found["homography_pooled_s3"]  # scale 3 decodes first: its homography is the readout's alone
    assert pooled.shape == (2, model.homography_heads["3"].offsets.in_features)
    estimate = offsets_to_homography(model.homography_heads["3"].offsets(pooled), 64 / 4, 96 / 4)
    torch.testing.assert_close(estimate, step.homography[3], atol=1e-6, rtol=1e-6)
    image = frames[1]
    restored = image + found["restoration_residual_s1"] + model.restoration_filters["1"](image)
    if model.colour_transform is None:
        torch.testing.assert_close(restored, step.restored[1], atol=0, rtol=0)
    else:  # the colour map of that frame, read from its statistics, is the output (and the scale-1 loss's)
        torch.testing.assert_close(restored, found["restored_before_colour"], atol=0, rtol=0)
        torch.testing.assert_close(colour_features(image, restored), found["colour_features"], atol=0, rtol=0)
        mapped = apply_colour_transform(restored, model.colour_transform(found["colour_features"]))
        torch.testing.assert_close(mapped, step.restored[1], atol=0, rtol=0)
        torch.testing.assert_close(mapped, step.final_restored, atol=0, rtol=0)
    reads = found["head_features_s1"].shape[1] + 3 * model.cfg.restoration_input
    assert reads == model.restoration_heads["1"].body[0].in_channels
