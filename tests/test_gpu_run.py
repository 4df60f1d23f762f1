"""tools/gpu_run.py, the prepared device run: its dry run on the CPU, with the packages the GPU machine
lacks made unimportable, writes the JSON and the tables it promises."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from models.data.scenes import PHOTOS_DIR_ENV, TRAINING_PHOTOS, stage_photos

ROOT = Path(__file__).resolve().parents[1]
# Installed here, absent or not relied on on the GPU machine (it has torch, numpy, safetensors, onnx, onnxruntime,
# OpenCV, Triton, tqdm and prometheus-client): the script must not import any of them, not even through the
# project's modules; the training falls back where scikit-learn or PyAV is missing.
ABSENT = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "av", "websockets", "multipart",
          "openvino", "nncf", "onnxscript", "tensorrt", "PIL", "rich", "httpx", "sklearn", "matplotlib",
          "mahotas", "skimage", "scipy", "selenium", "pytest", "skvideo", "pywt")  # fmt: skip

# The path finder, blind to those packages: `import x` fails and find_spec("x") is None, as on a machine
# without them (torch itself probes optional packages with find_spec).
RUNNER = """
import importlib.machinery, runpy, sys

class PathFinderWithout(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in ABSENT else super().find_spec(name, path, target)

sys.meta_path = [PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
assert PathFinderWithout in sys.meta_path and not set(sys.modules) & ABSENT
sys.argv = ["tools/gpu_run.py", *ARGV]
runpy.run_path("tools/gpu_run.py", run_name="__main__")
"""


@pytest.mark.slow
def test_dry_run_writes_json_and_tables_without_the_web_stack(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = RUNNER.replace("ABSENT", repr(set(ABSENT))).replace("ARGV", repr(["--dry-run", "--out", str(out)]))
    # The photographs staged as `--stage-photos` stages them for the device machine (their packages are hidden)
    photos = tmp_path / "photos"
    stage_photos(TRAINING_PHOTOS, photos)
    env = {**os.environ, PHOTOS_DIR_ENV: str(photos)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "gpu_run.json").read_text())
    assert report["schema"] == "vident.gpu_run/1" and report["dry_run"] is True
    assert {"environment", "tests", "bench", "train", "notes", "budget"} <= set(report)
    assert "error" not in report["tests"] and "error" not in report["bench"] and "error" not in report["train"]

    parity = report["tests"]["parity"]
    assert report["tests"]["runner"] == "parity" and parity
    checked = {(r["model"], r["variant"]) for r in parity}
    assert {("most-nss-tiny", "fp16-eager"), ("r2-d4-tiny", "fp16-eager")} <= checked
    for record in parity:
        assert {"passed", "psnr_db", "summary"} <= set(record) and record["device"] == "cpu"

    rows = report["bench"]["results"]
    measured = [r for r in rows if "fps" in r]
    assert {r["variant"] for r in measured} == {"fp32-eager", "fp16-eager"}  # graphs and compile need CUDA
    for row in measured:
        assert {"model", "batch", "height", "width", "fps", "latency_ms", "gflops_per_frame"} <= set(row)
        assert row["fps"] > 0 and row["latency_ms"]["p99"] >= row["latency_ms"]["p50"] > 0
    assert any("CUDA graphs need CUDA" in note for note in report["notes"])

    train = report["train"]
    assert train["model"] == "most-nss-tiny" and train["steps"] >= 1
    # The staged photographs keep the whole mix; PyAV is hidden, so the degradations fall back, saying so
    assert train["mix"] == "dental=0.55,dead-leaves=0.25,photos=0.2" and train["degradation"] == "recipe"
    assert not any("photographs" in n for n in report["notes"]) and any("PyAV" in n for n in report["notes"])
    assert {"wall_seconds", "steps_per_second", "validation_before", "validation_after", "checkpoint"} <= set(train)
    weights = out / train["checkpoint"]
    assert weights.is_file() and weights.stat().st_size < 16 * 2**20
    from models.checkpoints import load_model, read_metadata

    meta = read_metadata(weights)
    assert meta["dtype"] == "float16" and int(meta["steps"]) == train["steps"]
    assert json.loads(meta["train_config"])["extra"]["content_mix"] == train["mix"]  # the card reads it
    load_model(str(weights))  # a returned checkpoint loads (and --train-from takes it)

    tables = (out / "gpu_run.md").read_text()
    for heading in ("## Tests", "## Benchmark", "## Training", "## Notes"):
        assert heading in tables
    assert "| most-nss-tiny | 32x48 | 1 | fp32-eager |" in tables
    assert (out / "gpu_run.log").read_text().count("\n") > 5


def test_without_the_photographs_the_mix_leaves_out_what_needs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dead leaves draw half their palettes from the training photographs, so both go (rendering them would
    fail mid-run), and the note says how to stage the files."""
    import models.data.scenes as scenes

    training_mix = runpy.run_path(str(ROOT / "tools" / "gpu_run.py"))["training_mix"]
    mix, note = training_mix("dental=0.55,dead-leaves=0.25,photos=0.2")
    assert str(mix) == "dental=0.55,dead-leaves=0.25,photos=0.2" and note is None  # installed here
    monkeypatch.setattr(scenes, "photos_available", lambda names: False)
    mix, note = training_mix("dental=0.55,dead-leaves=0.25,photos=0.2")
    assert str(mix) == "dental=0.55" and "--stage-photos" in note and "dead-leaves and photos" in note
    assert training_mix("dental=1")[1] is None
    assert str(training_mix("photos=1")[0]) == "dental=1"
