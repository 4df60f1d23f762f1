"""Steady-state streaming speed of one backend: FPS, latency percentiles, peak memory, GFLOP/s.

A benchmark feeds a moving synthetic stream with the state carried (reset on the first frame
only), so it times exactly what a live session does per frame. The first ``warmup`` steps are not
timed: they include OpenVINO's per-shape compile, TensorRT's context set-up, CUDA and oneDNN
kernel selection. Every step is timed around ``Backend.infer``, which returns host arrays, so the
timing is device-synchronised for every runtime (the GPU backends synchronise before returning).

FPS counts frames, so batch B at S steps/s is B x S FPS; latency is per step (per batch).
GFLOPs per frame are 2 x the multiply-accumulates counted by ``models.complexity`` on the torch
graph (convolutions and matrix products; grid sampling and element-wise ops are not counted).

``vident bench`` (``service/commands/bench.py``) prints and writes these measurements;
``python -m benchmarks.fps`` is the same command.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from export.openvino import profile_layers
from export.runtime import Backend
from export.verify import compare_backends, exercise_untrained, moving_frames
from models.checkpoints import load_model
from models.complexity import measure_complexity
from models.hardware import cpu_has_bf16, cpu_model
from service.backends.factory import backend_for
from service.backends.torch import TorchBackend

SCHEMA = "vident.bench/1"
VERSION_PACKAGES = ("vident", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "numpy")


@dataclass
class BenchResult:
    """One backend's measurement. Field meanings are documented in docs/performance.md."""

    model: str
    backend: str
    device: str
    precision: str
    batch: int
    height: int
    width: int
    frames: int  # timed frames (steps x batch)
    warmup_steps: int
    fps: float
    latency_ms: dict[str, float]  # p50, p95, p99, mean, per step
    peak_memory_mb: float
    memory_kind: str  # "rss" (whole process, sampled each step) or "cuda_max_allocated"
    gmacs_per_frame: float
    gflops_per_frame: float
    achieved_gflops_s: float
    load_seconds: float
    random_weights: bool
    # Process CPU time (all threads) per timed frame: on a shared CPU, wall-clock FPS drops with other
    # load while this barely moves, so it tells contention apart from a slow backend.
    cpu_seconds_per_frame: float = 0.0
    load_average_1min: float = 0.0  # at the end of the timed run
    error: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


def versions() -> dict[str, str]:
    found = {}
    for package in VERSION_PACKAGES:
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def hardware() -> dict[str, object]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "cpu_bf16": cpu_has_bf16(),
        "machine": platform.machine(),
        "os": platform.platform(),
    }
    try:
        load1, _, _ = os.getloadavg()
        info["load_average_1min_at_start"] = round(load1, 2)  # shows when other work shared the CPU
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return info


def _rss_mb() -> float:
    """Current resident set size of this process, from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(statistics.fmean(ms)),
    }


def run_benchmark(
    model: str,
    backend: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    size: tuple[int, int] = (320, 416),
    batch: int = 1,
    frames: int = 30,
    warmup: int = 3,
    checkpoint: str | None = None,
    profile: bool = False,
    parity_frames: int = 0,
) -> BenchResult:
    """Loads ``model`` on ``backend`` and measures ``frames`` streaming frames after ``warmup`` steps.

    ``profile`` (OpenVINO only) adds per-part layer timings to ``extra["profile"]``, measured in a
    separate run with performance counters so the counters do not slow the timed frames.
    ``parity_frames`` > 0 adds ``extra["parity"]``: this backend against torch fp32 on the same
    weights over a stream of that many frames at the benchmark's size and batch (random weights are
    first made non-degenerate by :func:`export.verify.exercise_untrained`).
    """
    height, width = size
    network, used_checkpoint = load_model(model, checkpoint)
    if parity_frames > 0 and used_checkpoint is None:
        exercise_untrained(network)  # else masks sit at 0.5 and homographies at identity: nothing to compare
    spec = network.spec  # type: ignore[attr-defined]
    spec.check_size(height, width)
    gmacs = measure_complexity(network, height, width).gmacs
    runner = backend_for(network, backend, device, precision)
    runner.load()
    cuda = device.startswith("cuda")
    steps = max(1, -(-frames // batch))
    stream = list(moving_frames(batch, height, width, min(steps + warmup, 16)))
    state = spec.initial_state(batch, height, width)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    peak_rss = _rss_mb()
    timings: list[float] = []
    cpu_time = 0.0
    try:
        for step in range(warmup + steps):
            reset = np.full((batch, 1, 1, 1), 1.0 if step == 0 else 0.0, np.float32)
            feed = {spec.frame.name: stream[step % len(stream)], spec.reset.name: reset, **state}
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs = runner.infer(feed)
            elapsed = time.perf_counter() - start
            state = {s.name: outputs[s.next_name] for s in spec.states}
            if step >= warmup:
                timings.append(elapsed)
                cpu_time += time.process_time() - start_cpu
            peak_rss = max(peak_rss, _rss_mb())
        parity = _parity(runner, network, batch, height, width, parity_frames) if parity_frames > 0 else None
    finally:
        runner.close()
    total = sum(timings)
    fps = batch * len(timings) / total
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss
    extra: dict[str, object] = {} if parity is None else {"parity": parity}
    if profile and backend == "openvino":
        groups = profile_layers(runner.onnx_path, spec, height, width, precision,  # type: ignore[attr-defined]
                                model_path=runner.int8_model)  # type: ignore[attr-defined]  # fmt: skip
        extra["profile"] = [asdict(g) for g in groups]
    return BenchResult(
        model=model,
        backend=backend,
        device=device,
        precision=precision,
        batch=batch,
        height=height,
        width=width,
        frames=batch * len(timings),
        warmup_steps=warmup,
        fps=fps,
        latency_ms=percentiles(timings),
        peak_memory_mb=peak,
        memory_kind="cuda_max_allocated" if cuda else "rss",
        gmacs_per_frame=gmacs,
        gflops_per_frame=2 * gmacs,
        achieved_gflops_s=2 * gmacs * fps,
        load_seconds=runner.load_seconds,
        random_weights=used_checkpoint is None,
        cpu_seconds_per_frame=cpu_time / (batch * len(timings)),
        load_average_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
        extra=extra,
    )


def _parity(
    runner: Backend, network: torch.nn.Module, batch: int, height: int, width: int, frames: int
) -> dict[str, object]:
    with TorchBackend(network) as reference:
        result = compare_backends(reference, runner, batch, height, width, frames)
    return {**result.to_dict(), "summary": result.summary()}


def report(results: list[BenchResult]) -> dict[str, object]:
    """The JSON document ``vident bench --json`` writes (schema documented in docs/performance.md)."""
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware": hardware(),
        "versions": versions(),
        "results": [asdict(r) for r in results],
    }


def plot(results: list[BenchResult], path: str | Path) -> Path:
    """A bar chart of FPS per backend with p50/p95 latency labels, drawn with Pillow (no matplotlib)."""
    ok = [r for r in results if r.error is None]
    width, bar_h, pad = 760, 36, 12
    image = Image.new("RGB", (width, pad * 3 + 20 + (bar_h + pad) * max(1, len(ok))), "white")
    draw = ImageDraw.Draw(image)
    if ok:
        title = f"{ok[0].model} {ok[0].height}x{ok[0].width} batch {ok[0].batch}: frames per second"
        draw.text((pad, pad), title, fill="black")
    best = max((r.fps for r in ok), default=1.0)
    label_w, bar_w = 190, width - 190 - 2 * pad - 150
    for i, r in enumerate(ok):
        y = pad * 2 + 20 + i * (bar_h + pad)
        draw.text((pad, y + bar_h // 3), f"{r.backend} {r.device} {r.precision}", fill="black")
        length = max(2, int(bar_w * r.fps / best))
        draw.rectangle((label_w, y, label_w + length, y + bar_h), fill=(70, 120, 200))
        text = f"{r.fps:.2f} FPS  p50 {r.latency_ms['p50']:.0f} ms  p95 {r.latency_ms['p95']:.0f} ms"
        draw.text((label_w + length + 6, y + bar_h // 3), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
