"""Blocks with a known answer: DCNv2 against a direct loop, the 4-point DLT, warping, MECA/RDB."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.layers import (
    MECA,
    MSRDM,
    RDB,
    DeformableAlignment,
    apply_homography,
    dlt_4point,
    image_corners,
    mean_corner_error,
    modulated_deform_conv2d,
    offsets_to_homography,
    rescale_homography,
    warp_by_homography,
)


def _bilinear_zero_pad(img: np.ndarray, y: float, x: float) -> np.ndarray:
    """Value of (c, h, w) ``img`` at pixel-index coordinates (y, x), zeros outside."""
    c, h, w = img.shape
    y0, x0 = math.floor(y), math.floor(x)
    out = np.zeros(c)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def _deform_conv_reference(x, offset, mask, weight, bias, dilation=1):
    """DCNv2 by its definition: y(p) = sum_k w_k x(p + p_k + dp_k) m_k + b, one pixel at a time."""
    b, c, h, w = x.shape
    out_ch, _, k, _ = weight.shape
    out = np.zeros((b, out_ch, h, w))
    taps = [((i - (k - 1) / 2) * dilation, (j - (k - 1) / 2) * dilation) for i in range(k) for j in range(k)]
    for n in range(b):
        for py in range(h):
            for px in range(w):
                acc = bias.copy()
                for t, (ky, kx) in enumerate(taps):
                    sy = py + ky + offset[n, 2 * t, py, px]
                    sx = px + kx + offset[n, 2 * t + 1, py, px]
                    value = _bilinear_zero_pad(x[n], sy, sx) * mask[n, t, py, px]
                    acc += weight[:, :, t // k, t % k] @ value
                out[n, :, py, px] = acc
    return out


def test_deformable_conv_matches_direct_loop() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    offset = 1.7 * torch.randn(2, 18, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 9, 5, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    expected = _deform_conv_reference(x.numpy(), offset.numpy(), mask.numpy(), weight.numpy(), bias.numpy())
    got = modulated_deform_conv2d(x.float(), offset.float(), mask.float(), weight.float(), bias.float())
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-5)


def test_deformable_conv_with_zero_offsets_and_unit_mask_is_a_plain_conv() -> None:
    x = torch.randn(2, 5, 9, 11)
    weight = torch.randn(7, 5, 3, 3)
    bias = torch.randn(7)
    got = modulated_deform_conv2d(x, torch.zeros(2, 18, 9, 11), torch.ones(2, 9, 9, 11), weight, bias)
    torch.testing.assert_close(got, F.conv2d(x, weight, bias, padding=1), atol=1e-5, rtol=1e-5)


def test_deformable_alignment_shapes_and_start() -> None:
    module = DeformableAlignment(8, 16)
    out = module(torch.randn(1, 8, 12, 16), torch.randn(1, 8, 12, 16))
    assert out.shape == (1, 16, 12, 16)
    assert module.offset_mask.weight.abs().sum() == 0  # starts as a plain (half-modulated) conv


def _random_homographies(n: int, generator: torch.Generator, height: float, width: float) -> torch.Tensor:
    """Plausible camera motions: corners displaced by up to 15% of the size."""
    src = image_corners(height, width, torch.zeros(1, dtype=torch.float64)).expand(n, 4, 2)
    scale = torch.tensor([width, height], dtype=torch.float64)
    dst = src + (torch.rand(n, 4, 2, generator=generator, dtype=torch.float64) - 0.5) * 0.3 * scale
    return dlt_4point(src, dst)


def test_dlt_recovers_random_homographies_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    height, width = 320.0, 416.0
    truth = _random_homographies(256, g, height, width)
    corners = image_corners(height, width, truth).expand(256, 4, 2)
    dst = apply_homography(truth, corners)
    estimate = dlt_4point(corners.float(), dst.float())
    error = mean_corner_error(estimate.double(), truth, height, width)
    assert error.max().item() < 1e-4
    # and it maps arbitrary points, not only the corners
    points = torch.rand(256, 10, 2, generator=g, dtype=torch.float64) * torch.tensor([width, height])
    np.testing.assert_allclose(
        apply_homography(estimate.double(), points).numpy(), apply_homography(truth, points).numpy(), atol=1e-3
    )


def test_dlt_gradients_flow() -> None:
    height, width = 32.0, 40.0
    offsets = (torch.rand(3, 8, dtype=torch.float64) - 0.5) * 6
    offsets.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda o: offsets_to_homography(o, height, width), (offsets,))


def test_dlt_and_warp_export_to_onnx_and_match_in_onnxruntime(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")

    class HomographyWarp(torch.nn.Module):
        def forward(self, image: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = offsets_to_homography(offsets, image.shape[2], image.shape[3])
            return h, warp_by_homography(image, h)

    image = torch.rand(2, 3, 24, 32)
    offsets = (torch.rand(2, 8) - 0.5) * 4
    path = tmp_path / "dlt.onnx"
    torch.onnx.export(
        HomographyWarp(), (image, offsets), str(path), input_names=["image", "offsets"],
        output_names=["homography", "warped"], opset_version=17, dynamo=False,
        dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}, "offsets": {0: "b"}},
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in ((24, 32), (40, 56)):  # the graph is dynamic in size, not frozen at the traced one
        image = torch.rand(2, 3, *size)
        expected_h, expected_w = HomographyWarp()(image, offsets)
        got_h, got_w = session.run(None, {"image": image.numpy(), "offsets": offsets.numpy()})
        np.testing.assert_allclose(got_h, expected_h.numpy(), atol=1e-4)
        np.testing.assert_allclose(got_w, expected_w.numpy(), atol=1e-4)


def test_warp_by_translation_shifts_the_image() -> None:
    image = torch.rand(1, 2, 16, 20)
    shift = torch.tensor([[[1.0, 0.0, 3.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0]]])  # previous -> current: +3, +2 px
    warped = warp_by_homography(image, shift)
    torch.testing.assert_close(warped[..., 2:, 3:], image[..., :-2, :-3])
    assert warped[..., :2, :].abs().sum() == 0  # uncovered pixels are zeros
    torch.testing.assert_close(warp_by_homography(image, torch.eye(3)[None]), image)


def test_rescale_is_consistent() -> None:
    g = torch.Generator().manual_seed(1)
    h_low = _random_homographies(4, g, 80.0, 104.0)
    h_full = rescale_homography(h_low, 4.0)
    scale = torch.tensor([4.0, 4.0, 1.0], dtype=h_low.dtype)
    torch.testing.assert_close(h_full, h_low * scale.view(3, 1) / scale.view(1, 3), rtol=0, atol=0)  # S H S^-1
    corners_low = image_corners(80.0, 104.0, h_low).expand(4, 4, 2)
    np.testing.assert_allclose(
        apply_homography(h_full, corners_low * 4).numpy(), (apply_homography(h_low, corners_low) * 4).numpy(),
        atol=1e-9,
    )  # fmt: skip


def test_meca_uses_both_pools_and_rdb_is_residual() -> None:
    meca = MECA(7)
    x = torch.randn(2, 16, 5, 5)
    assert meca(x).shape == x.shape
    x2 = x.clone()
    x2[:, :, 0, 0] += 100.0  # changes the max pool far more than the mean
    assert not torch.allclose(meca(x2)[:, :, 1:, 1:], meca(x)[:, :, 1:, 1:])
    rdb = RDB(8, 4)
    torch.nn.init.zeros_(rdb.fuse.weight)
    torch.nn.init.zeros_(rdb.fuse.bias)
    y = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(rdb(y), y)
    assert MSRDM(8, 8)(y).shape == y.shape
    assert [layer.dilation for layer in MSRDM(8, 8).coarse.layers] == [(1, 1), (2, 2), (3, 3)]
