"""Where OpenVINO spends a frame: per-layer timings of the compiled graph, grouped by network part.

OpenVINO's performance counters report each executed (fused) node with the ONNX node name of its
main operation, and the TorchScript exporter names nodes after the module path
(``/encoder/blocks.0/blocks.0.3/body/body.0/Conv``). Grouping by the first path components turns
hundreds of kernels into a short table of network parts, which is what a decision about the
architecture needs ("the full-resolution encoder costs X%"), not a kernel list.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.spec import ModelSpec
from service.backends.onnxrt import cpu_threads
from service.backends.openvino import _PRECISION_HINT, _import_openvino


@dataclass(frozen=True)
class LayerGroup:
    name: str  # module path prefix, e.g. "encoder/blocks.0"; "(graph)" for nodes outside any module
    ms_per_frame: float
    share: float  # of the summed layer time
    kernels: int  # executed nodes in the group
    precisions: str  # execution types seen, e.g. "brgconv_avx512_bf16" -> shows whether bf16 really ran


def _group(node_name: str, depth: int) -> str:
    parts = [p for p in node_name.split("/") if p]
    return "/".join(parts[:depth]) if len(parts) > 1 else "(graph)"


def profile_layers(
    onnx_path: str | Path,
    spec: ModelSpec,
    height: int = 320,
    width: int = 416,
    precision: str = "fp32",
    steps: int = 3,
    depth: int = 2,
) -> list[LayerGroup]:
    """Runs ``steps`` streaming steps (after one warm-up) with performance counters; groups sorted by cost."""
    ov = _import_openvino()
    core = ov.Core()
    model = core.read_model(str(onnx_path))
    feed = {spec.frame.name: np.random.default_rng(0).random((1, 3, height, width), dtype=np.float32)}
    feed[spec.reset.name] = np.zeros((1, 1, 1, 1), np.float32)
    feed.update(spec.initial_state(1, height, width))
    model.reshape({n: list(v.shape) for n, v in feed.items()})
    config = {
        "INFERENCE_PRECISION_HINT": _PRECISION_HINT[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": cpu_threads(),
        "PERF_COUNT": True,
    }
    request = core.compile_model(model, "CPU", config).create_infer_request()
    request.infer(feed)
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, int] = defaultdict(int)
    exec_types: dict[str, set[str]] = defaultdict(set)
    for _ in range(steps):
        request.infer(feed)
        for info in request.profiling_info:
            if info.status != info.Status.EXECUTED:
                continue
            group = _group(info.node_name, depth)
            totals[group] += info.real_time.total_seconds() * 1e3 / steps
            kernels[group] += 1
            exec_types[group].add(info.exec_type)
    whole = sum(totals.values()) or 1.0
    return sorted(
        (
            LayerGroup(g, ms, ms / whole, kernels[g] // steps, ",".join(sorted(exec_types[g]))[:80])
            for g, ms in totals.items()
        ),
        key=lambda row: -row.ms_per_frame,
    )
