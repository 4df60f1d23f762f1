"""Photometric homography refinement: recovers a planted homography, never makes the photometric error
worse, solves like LAPACK, and runs the same in the network's streaming form and in exported graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import create_model
from models.checkpoints import load_model, save_checkpoint
from models.data.scenes import dead_leaves
from models.layers import mean_corner_error, offsets_to_homography, warp_by_homography
from models.refine import _solve, _standardise, _standardise_all, luma, refine_homography

LEVELS = ((4, 5), (2, 3))


def _pair(seed: int, height: int = 160, width: int = 208, corner_px: float = 6.0) -> tuple[torch.Tensor, ...]:
    """Two views of a dead-leaves scene related by a random homography, with its label."""
    rng = np.random.default_rng(seed)
    scene = torch.from_numpy(dead_leaves(rng, height, width, 3.0, 40.0)).permute(2, 0, 1)[None].float()
    offsets = torch.from_numpy(rng.normal(0, corner_px, (1, 8))).float()
    h_true = offsets_to_homography(offsets, float(height), float(width))
    current = warp_by_homography(scene, h_true)  # the previous view seen through H_{t-1->t}
    return scene, current, h_true


def _half_luma(image: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(luma(image), 2)


@pytest.mark.parametrize("highpass", [5, (5, 11)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_a_planted_homography_from_a_rough_start(seed: int, highpass: int | tuple[int, ...]) -> None:
    previous, current, h_true = _pair(seed)
    height, width = previous.shape[-2:]
    rng = np.random.default_rng(100 + seed)
    start = offsets_to_homography(torch.from_numpy(rng.normal(0, 3, (1, 8))).float(), float(height), float(width))
    start = start @ h_true  # about 3 px off at the corners, what the head leaves on unseen content
    before = float(mean_corner_error(start, h_true, height, width))
    refined = refine_homography(_half_luma(previous), _half_luma(current), start, LEVELS, highpass=highpass)
    after = float(mean_corner_error(refined, h_true, height, width))
    assert before > 1.5
    # The border band that falls outside the second view after warping is the only error source left.
    assert after < 0.5, (before, after)


def test_several_local_mean_sides_are_channels_of_one_problem() -> None:
    """One side is the single-side refinement exactly; several stack each channel at each side, side-major."""
    previous, current, h_true = _pair(5)
    start = torch.eye(3)[None]
    two = torch.cat((_half_luma(previous), _half_luma(previous.flip(-1))), dim=1)
    stacked = _standardise_all(two, (5, 11))
    assert stacked.shape[1] == 4
    torch.testing.assert_close(stacked[:, 2:], _standardise(two, 11), rtol=0, atol=0)
    one = refine_homography(_half_luma(previous), _half_luma(current), start, LEVELS, highpass=5)
    torch.testing.assert_close(refine_homography(_half_luma(previous), _half_luma(current), start, LEVELS,
                                                 highpass=(5,)), one, rtol=0, atol=0)  # fmt: skip
    both = refine_homography(_half_luma(previous), _half_luma(current), start, LEVELS, highpass=(5, 11))
    assert not torch.equal(both, one)
    with pytest.raises(ValueError, match="highpass"):
        refine_homography(_half_luma(previous), _half_luma(current), start, LEVELS, highpass=(5, -1))


def test_keeps_the_start_where_refining_does_not_lower_the_error() -> None:
    """Unrelated frames: whatever Gauss-Newton finds is not trusted over the head unless it matches better."""
    previous, _, _ = _pair(3)
    other, _, _ = _pair(4)
    start = torch.eye(3)[None]
    refined = refine_homography(_half_luma(previous), _half_luma(other), start, LEVELS)
    assert torch.isfinite(refined).all()
    flat = torch.full_like(previous, 0.5)  # no texture: the solve must stay finite and keep the start
    refined = refine_homography(_half_luma(flat), _half_luma(flat), start, LEVELS)
    torch.testing.assert_close(refined, start)


def test_prior_holds_the_estimate_near_the_head() -> None:
    """A strong prior at the head's estimate leaves it in place; a mild one still lets the images move it."""
    previous, current, h_true = _pair(5)
    height, width = previous.shape[-2:]
    rng = np.random.default_rng(105)
    start = offsets_to_homography(torch.from_numpy(rng.normal(0, 3, (1, 8))).float(), float(height), float(width))
    start = start @ h_true
    moved = {}
    for prior in (1e4, 0.01):
        refined = refine_homography(_half_luma(previous), _half_luma(current), start, LEVELS, prior)
        moved[prior] = float(mean_corner_error(refined, start, height, width))
    assert moved[1e4] < 0.01 < 1.0 < moved[0.01], moved


def test_residual_scaled_prior_lets_matching_frames_decide() -> None:
    """Scaled by the level's starting residual, the prior is weak where the frames match each other (the
    refinement reaches the truth from a 3 px start) and, relative to the Hessian-scaled prior, pulls
    harder as they match worse."""
    previous, current, h_true = _pair(5)
    height, width = previous.shape[-2:]
    rng = np.random.default_rng(105)
    start = offsets_to_homography(torch.from_numpy(rng.normal(0, 3, (1, 8))).float(), float(height), float(width))
    start = start @ h_true
    noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(0))
    moved, error = {}, {}
    for sigma in (0.0, 1.0):
        for scale in ("hessian", "residual"):
            refined = refine_homography(_half_luma(previous), _half_luma(current + sigma * noise), start, LEVELS, 0.2,
                                        prior_scale=scale)  # fmt: skip
            moved[sigma, scale] = float(mean_corner_error(refined, start, height, width))
            error[sigma, scale] = float(mean_corner_error(refined, h_true, height, width))
    assert error[0.0, "residual"] < 0.5 < 1.0 < error[0.0, "hessian"], error
    ratio = {sigma: moved[sigma, "residual"] / moved[sigma, "hessian"] for sigma in (0.0, 1.0)}
    assert ratio[0.0] > ratio[1.0], ratio
    with pytest.raises(ValueError, match="prior_scale"):
        refine_homography(_half_luma(previous), _half_luma(current), start, LEVELS, 0.2, prior_scale="flat")


def test_accept_blends_the_refined_estimate_in_by_its_cost_drop() -> None:
    """With ``accept`` the output moves from the head's estimate to the refined one as the relative cost
    drop grows against ``accept``: whole when the drop is far above it, almost nothing when far below, and
    in between along the line from one to the other (so a near tie no longer jumps a refinement step)."""
    previous, current, h_true = _pair(5)
    height, width = previous.shape[-2:]
    rng = np.random.default_rng(105)
    start = offsets_to_homography(torch.from_numpy(rng.normal(0, 3, (1, 8))).float(), float(height), float(width))
    start = start @ h_true
    frames = (_half_luma(previous), _half_luma(current))
    switched = refine_homography(*frames, start, LEVELS)
    step = float(mean_corner_error(switched, start, height, width))
    assert step > 1.0  # the refinement moves it: the blend has something to blend
    torch.testing.assert_close(refine_homography(*frames, start, LEVELS, accept=1e-3), switched)
    assert float(mean_corner_error(refine_homography(*frames, start, LEVELS, accept=1e6), start, height, width)) < 1e-3
    from_start, to_refined = [], []
    for accept in (0.5, 1.0, 2.0, 4.0):
        blended = refine_homography(*frames, start, LEVELS, accept=accept)
        from_start.append(float(mean_corner_error(blended, start, height, width)))
        to_refined.append(float(mean_corner_error(blended, switched, height, width)))
        assert from_start[-1] + to_refined[-1] == pytest.approx(step, rel=0.05)
    assert from_start == sorted(from_start, reverse=True) and to_refined == sorted(to_refined), (from_start, to_refined)
    assert from_start[-1] < 0.5 * from_start[0], from_start  # the drop is a fraction: accept 4 takes a quarter at most
    with pytest.raises(ValueError, match="accept"):
        refine_homography(*frames, start, LEVELS, accept=-0.1)


def test_unrolled_solve_matches_lapack() -> None:
    torch.manual_seed(0)
    a = torch.randn(5, 8, 8, dtype=torch.float64)
    spd = a @ a.transpose(1, 2) + 0.1 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(_solve(spd, b), torch.linalg.solve(spd, b))


@pytest.mark.parametrize("frames", ["restored", "restored+input"])
def test_network_with_refinement_streams_like_its_step_and_keeps_luma_state(frames: str) -> None:
    torch.manual_seed(0)
    model = create_model("most-nss-tiny", homography_refine=LEVELS, homography_refine_frames=frames).eval()
    names = [s.name for s in model.spec.states]
    assert names[-1] == "prev_luma"
    shapes = model.spec.initial_state(1, 64, 96)
    assert shapes["prev_luma"].shape == (1, 1 if frames == "restored" else 2, 32, 48)
    previous, current, _ = _pair(5, 64, 96, corner_px=2.0)
    state = {k: torch.from_numpy(v) for k, v in shapes.items()}
    with torch.no_grad():
        for t, frame in enumerate((previous, current)):
            reset = torch.full((1, 1, 1, 1), 1.0 if t == 0 else 0.0)
            step, new_state = model.step(frame, reset, state)
            out = model(frame, reset, *(state[n] for n in names))
            torch.testing.assert_close(out[2], step.final_homography)
            if t == 0:  # a frame that is its own predecessor: nothing to refine, the (untrained) head's identity
                torch.testing.assert_close(out[2], torch.eye(3)[None])
            state = {n: new_state[n] for n in names}
    expected = _half_luma(step.final_restored.clamp(0, 1))
    if frames == "restored+input":
        expected = torch.cat((expected, _half_luma(current)), dim=1)
    torch.testing.assert_close(state["prev_luma"], expected)
    with pytest.raises(ValueError, match="homography_refine_frames"):
        create_model("most-nss-tiny", homography_refine_frames="input")


def test_balanced_channels_follow_the_one_that_matches() -> None:
    """Two channels, one of the true pair and one whose content moves otherwise and is noisy (what a
    channel that does not follow the camera looks like): weighed by their starting residuals the second
    pulls little and the refinement lands on the truth; with equal weights it lands more than twice as far."""
    previous, current, h_true = _pair(6)
    height, width = previous.shape[-2:]
    rng = np.random.default_rng(106)
    start = offsets_to_homography(torch.from_numpy(rng.normal(0, 3, (1, 8))).float(), float(height), float(width))
    start = start @ h_true
    other_prev, other_cur, _ = _pair(7, corner_px=8.0)
    noise = torch.randn(other_cur.shape, generator=torch.Generator().manual_seed(1)) * 0.3
    pairs = ((previous, other_prev), (current, other_cur + noise))
    two = [torch.cat((_half_luma(a), _half_luma(b)), dim=1) for a, b in pairs]
    error = {}
    for balance in (True, False):
        refined = refine_homography(*two, start, LEVELS, balance=balance)
        error[balance] = float(mean_corner_error(refined, h_true, height, width))
    one = refine_homography(_half_luma(previous), _half_luma(current), start, LEVELS)
    assert error[True] < 0.5 and error[False] > 2 * error[True], error
    assert float(mean_corner_error(one, h_true, height, width)) < 0.5


def test_refinement_travels_with_the_checkpoint(tmp_path) -> None:
    model = create_model("most-nss-tiny", homography_refine=LEVELS, homography_refine_prior=0.25,
                         homography_refine_prior_scale="hessian", homography_refine_frames="restored+input",
                         homography_refine_highpass=(5, 9))  # fmt: skip
    path = save_checkpoint(model, tmp_path / "w.safetensors")
    loaded, _ = load_model(str(path))
    assert loaded.cfg.homography_refine == LEVELS
    assert loaded.cfg.homography_refine_prior == 0.25
    assert loaded.cfg.homography_refine_prior_scale == "hessian"
    assert loaded.cfg.homography_refine_frames == "restored+input"
    assert loaded.cfg.homography_refine_highpass == (5, 9)
    with pytest.raises(ValueError, match="prior_scale"):
        create_model("most-nss-tiny", homography_refine_prior_scale="flat")
    for sides in ((), (5, -1)):
        with pytest.raises(ValueError, match="highpass"):
            create_model("most-nss-tiny", homography_refine_highpass=sides)
    assert [s.name for s in loaded.spec.states] == [s.name for s in model.spec.states]


def test_config_rejects_levels_that_are_not_coarse_to_fine() -> None:
    with pytest.raises(ValueError, match="coarse to fine"):
        create_model("most-nss-tiny", homography_refine=((2, 3), (4, 5)))
    with pytest.raises(ValueError, match="coarse to fine"):
        create_model("most-nss-tiny", homography_refine=((3, 1),))


def test_a_real_pair_converges_to_one_answer_whatever_the_rounding() -> None:
    """Runtimes round differently, so the refined homography must not depend on where rounding steers
    the iteration. The fixture: the shipped most-nss's restored luma (1/4 size, float16) of frames 10
    and 11 of sequence 248 of a training split (``vident synth --split train --seed 13 --sequences 256
    --content dental --degradation mixed``), with the head's estimate and the label; with border pixels
    switching in and out of the cost between steps, the iteration cycled here and 1e-6 of noise moved the
    result by 0.004 px."""
    data = np.load(Path(__file__).parent / "fixtures" / "refine-pair.npz")
    previous, current = (torch.from_numpy(data[k].astype(np.float32))[None, None] for k in ("previous", "current"))
    head, true = (torch.from_numpy(data[k]).float()[None] for k in ("head", "true"))
    height, width = (float(v) for v in data["size"])
    levels = ((8, 10), (4, 20))
    refined = refine_homography(previous, current, head, levels, 0.1)
    assert mean_corner_error(refined, true, height, width) < mean_corner_error(head, true, height, width) - 0.5
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        noisy = (x + 1e-6 * torch.randn(x.shape, generator=generator) for x in (previous, current))
        assert float(mean_corner_error(refine_homography(*noisy, head, levels, 0.1), refined, height, width)) < 1e-3
