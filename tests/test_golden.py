"""Golden outputs: fixed weights on a fixed input give the same numbers after every refactor (timm's
``test_model_inference``).

Each registered family's tiny variant (seeded initialisation, mask and homography heads exercised so
they carry real values) and each shipped checkpoint stream three frames of a fixed analytic texture
with the state carried, through the loop every runtime uses (``models.streaming``). Per frame, every
output's mean, standard deviation, minimum, maximum and a fixed sample of values, and every
next-state tensor's statistics, are compared with ``tests/golden/<name>.json`` at an absolute
tolerance of 1e-4 x max(1, largest |value| of that output): float32 noise between CPUs (AVX2,
AVX512, thread counts) is around 1e-6 here, while any change of the arithmetic moves far more.

Regenerate after a deliberate numeric change (a new layout, new shipped weights), never to make a
refactor pass:

    VIDENT_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

and commit the JSON with the change that explains it. A shipped golden records the SHA-256 of its
weights: new weights fail with a request to regenerate, drifting numerics fail on the values.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from export.verify import exercise_untrained
from models import create_model
from models.checkpoints import CHECKPOINT_DIR, load_model
from models.streaming import ModelRunner, stream_steps

GOLDEN_DIR = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("VIDENT_REGEN_GOLDEN") == "1"
TINY = ("most-nss-tiny", "most-net-tiny", "r2-d4-tiny")  # one per registered family and structure
# The MOST goldens were made with every layout option on (corner pooling, heads reading B^s, 5x5 input
# filters), before the tiny variants took their big siblings' shipped layouts; that layout covers every
# path, so they keep it. The homography refinement is covered by the shipped most-nss golden.
TINY_LAYOUT: dict[str, dict[str, object]] = {
    name: {"homography_pool": "corners", "restoration_input": True, "restoration_filter": 5, "homography_refine": ()}
    for name in ("most-nss-tiny", "most-net-tiny")
}
SHIPPED = tuple(sorted(p.stem for p in CHECKPOINT_DIR.glob("*.safetensors")))
HEIGHT, WIDTH, FRAMES = 32, 48, 3
SAMPLES = 32
RELATIVE_TOLERANCE = 1e-4


def golden_frames() -> list[np.ndarray]:
    """(1, 3, H, W) float32 frames in [0, 1]: a smooth texture moving 2-3 px per frame plus hash noise.

    Analytic rather than drawn from a random generator, so the input cannot change with a NumPy
    release."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    frames = []
    for t in range(FRAMES):
        u, v = x + 3 * t, y + 2 * t
        noise = np.modf(np.abs(np.sin(u * 12.9898 + v * 78.233)) * 43758.5453)[0]  # deterministic "random"
        channels = [
            0.5 + 0.3 * np.sin(u / 5.0 + c) * np.cos(v / 7.0 - c) + 0.15 * (noise - 0.5) for c in (0.0, 1.1, 2.3)
        ]
        frames.append(np.clip(np.stack(channels)[None], 0.0, 1.0).astype(np.float32))
    return frames


def sample_indices(size: int) -> np.ndarray:
    """Fixed positions spread over a flattened tensor (a prime stride, so no image row is favoured)."""
    return np.unique((np.arange(SAMPLES, dtype=np.int64) * 104_729 + 17) % size)


def _round(values: np.ndarray) -> list[float]:
    return [float(f"{v:.8g}") for v in np.asarray(values, np.float64).ravel()]


def summarise(model: torch.nn.Module) -> dict[str, object]:
    """What the golden files hold: per frame, statistics of every output and a sample of the model outputs."""
    runner = ModelRunner(model)
    model_outputs = {o.name for o in runner.spec.outputs}
    steps = []
    for _, outputs in stream_steps(runner, golden_frames()):
        step: dict[str, object] = {}
        for name in runner.spec.output_names:
            value = outputs[name].astype(np.float64)
            record: dict[str, object] = {"stats": _round([value.mean(), value.std(), value.min(), value.max()])}
            if name in model_outputs:
                record["samples"] = _round(value.ravel()[sample_indices(value.size)])
            step[name] = record
        steps.append(step)
    return {"size": [HEIGHT, WIDTH], "frames": FRAMES, "torch": torch.__version__, "steps": steps}


def check_against_golden(name: str, measured: dict[str, object], identity: dict[str, str] | None = None) -> None:
    path = GOLDEN_DIR / f"{name}.json"
    if REGENERATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps({**(identity or {}), **measured}, indent=1) + "\n")
        pytest.skip(f"wrote {path}")
    if not path.is_file():
        pytest.fail(f"{path} is missing: VIDENT_REGEN_GOLDEN=1 writes it")
    golden = json.loads(path.read_text())
    for key, value in (identity or {}).items():
        if golden.get(key) != value:
            pytest.fail(f"{name}: {key} is {value}, the golden file was made for {golden.get(key)}; "
                        f"new weights need new goldens (VIDENT_REGEN_GOLDEN=1, see the module docstring)")  # fmt: skip
    assert (golden["size"], golden["frames"]) == (measured["size"], measured["frames"])
    for t, (want_step, have_step) in enumerate(zip(golden["steps"], measured["steps"], strict=True)):  # type: ignore[arg-type]
        assert set(want_step) == set(have_step), f"{name} frame {t}: outputs differ"
        for tensor, want in want_step.items():
            have = have_step[tensor]
            assert set(want) == set(have), f"{name} frame {t} {tensor}: recorded fields differ"
            scale = max(1.0, abs(want["stats"][2]), abs(want["stats"][3]))  # largest |value| of the tensor
            for field in want:
                np.testing.assert_allclose(
                    have[field], want[field], rtol=0, atol=RELATIVE_TOLERANCE * scale,
                    err_msg=f"{name} frame {t} {tensor} {field} (golden torch {golden['torch']})",
                )  # fmt: skip


@pytest.mark.parametrize("name", TINY)
def test_tiny_network_matches_its_golden(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, **TINY_LAYOUT.get(name, {})).eval()
    model = exercise_untrained(model, seed=0)  # masks and homographies not constant
    check_against_golden(name, summarise(model))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_matches_its_golden(name: str) -> None:
    """The weights users run, loaded as ``vident`` loads them (layout conversions included)."""
    path = CHECKPOINT_DIR / f"{name}.safetensors"
    model, used = load_model(name)
    assert used == path
    weights = hashlib.sha256(path.read_bytes()).hexdigest()
    check_against_golden(f"shipped-{name}", summarise(model.float()), {"weights_sha256": weights})


def test_golden_input_is_what_the_goldens_were_made_from() -> None:
    """The analytic input itself, pinned: a change here would move every golden at once."""
    frames = golden_frames()
    assert [f.shape for f in frames] == [(1, 3, HEIGHT, WIDTH)] * FRAMES
    stacked = np.concatenate(frames).astype(np.float64)
    assert 0.0 <= stacked.min() and stacked.max() <= 1.0
    assert float(stacked.mean()) == pytest.approx(0.5, abs=0.05)
    np.testing.assert_allclose(frames[1][0, :, 5, 7], frames[0][0, :, 7, 10], atol=1e-6)  # moved by (2, 3) px
