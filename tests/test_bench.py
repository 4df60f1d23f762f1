"""``vident bench`` on a tiny model: it runs, prints one table, and writes the documented JSON."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from models import create_model
from models.complexity import measure_complexity
from service.cli import main

RESULT_FIELDS = {
    "model", "backend", "device", "precision", "batch", "height", "width", "frames", "warmup_steps", "fps",
    "latency_ms", "peak_memory_mb", "memory_kind", "gmacs_per_frame", "gflops_per_frame", "achieved_gflops_s",
    "load_seconds", "random_weights", "cpu_seconds_per_frame", "load_average_1min", "error", "extra",
}  # fmt: skip


def test_bench_compare_writes_json_and_plot(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VIDENT_CACHE_DIR", str(tmp_path / "cache"))
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # unavailable everywhere, so its row is predictable
    code = main(["bench", "--model", "most-nss-tiny", "--size", "32x48", "--batch", "2", "--frames", "4",
                 "--warmup", "1", "--compare", "torch,onnxruntime,tensorrt",
                 "--json", str(out), "--plot", str(png)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "x first" in printed and "onnxruntime" in printed and "tensorrt unavailable" in printed
    report = json.loads(out.read_text())
    assert report["schema"] == "vident.bench/1"
    assert {"cpu", "cpu_cores", "cpu_cores_usable", "cpu_bf16"} <= set(report["hardware"])
    assert {"torch", "onnxruntime", "python"} <= set(report["versions"])
    torch_run, ort_run, trt_run = report["results"]
    gmacs = measure_complexity(create_model("most-nss-tiny"), 32, 48).gmacs
    for run in (torch_run, ort_run):
        assert set(run) == RESULT_FIELDS
        assert run["error"] is None and run["frames"] == 4 and run["batch"] == 2
        assert run["fps"] > 0 and run["memory_kind"] == "rss" and run["peak_memory_mb"] > 50
        lat = run["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert run["fps"] == pytest.approx(2000 / lat["mean"], rel=1e-6)  # 2 frames per step
        assert run["gmacs_per_frame"] == pytest.approx(gmacs)
        assert run["achieved_gflops_s"] == pytest.approx(2 * gmacs * run["fps"])
        assert run["cpu_seconds_per_frame"] > 0
    assert trt_run["error"] and "tensorrt" in trt_run["error"]
    with Image.open(png) as image:
        assert image.width == 760 and image.height > 100


def test_bench_refuses_a_bad_size(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--model", "most-nss-tiny", "--size", "30x48"])
    assert "multiples of 8" in capsys.readouterr().err
