"""OpenVINO specifics: the graph rewrite that keeps geometry accurate in bf16, layer profiling, and the
runtime settings (precision hint, bf16 support) that the profiler, int8 calibration and the service's
backend (``service/backends/openvino.py``) share.

**Geometry in bf16.** OpenVINO's CPU plugin runs every MatMul in the inference precision. In these
graphs every MatMul is geometry (3x3 homography products, pixel coordinates times a homography in
the warp; the regressor's Linear is a Gemm), and coordinates of hundreds of pixels in bf16 are off
by a pixel, so the homography drifted by 0.26 px MACE on a tiny model where torch bf16 autocast
(fp32 geometry) stays at 0.02 px. :func:`elementwise_matmuls` rewrites each MatMul as
Unsqueeze-Mul-ReduceSum, which the plugin leaves in fp32 (element-wise ops off the convolution
path are not lowered); the products are tiny (3x3), so the cost is negligible. Marking nodes with
the ``precise`` runtime attribute had no effect on the CPU plugin's bf16 lowering (tried).

**Profiling.**
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
from types import ModuleType

import numpy as np

from export.onnx import cache_dir, file_hash, write_atomically
from export.runtime import cpu_threads, import_runtime
from models.spec import ModelSpec

# Bump when the rewrite changes, so stale rewritten graphs are not reused.
REWRITE_VERSION = "1"
_PRECISION_HINT = {"fp32": "f32", "bf16": "bf16"}


def import_openvino() -> ModuleType:
    """The ``openvino`` module, or :class:`~export.runtime.BackendUnavailable` naming the package."""
    return import_runtime("openvino", "openvino", "openvino")


def runtime_has_bf16(core) -> bool:  # noqa: ANN001 - openvino Core
    """True when the OpenVINO CPU plugin reports native bf16 (AVX512-BF16 or AMX): the one place that asks."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def inference_hint(core, precision: str) -> str:  # noqa: ANN001 - openvino Core
    """``INFERENCE_PRECISION_HINT`` for a precision. int8: the precision of the layers left unquantised,
    bf16 where the CPU has it (what export.int8's parity report measured), else f32."""
    if precision == "int8":
        return "bf16" if runtime_has_bf16(core) else "f32"
    return _PRECISION_HINT[precision]


def elementwise_matmuls(src: str | Path, dst: str | Path) -> int:
    """Writes ``src`` with every MatMul(A, B) as ReduceSum(Unsqueeze(A, -1) * Unsqueeze(B, -3), -2).

    Exact for operands of rank >= 2 (all MatMuls of these graphs); returns how many were rewritten.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    axes = {"mm_axis_last": -1, "mm_axis_row": -3, "mm_axis_reduce": -2}
    graph.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), k) for k, v in axes.items())
    nodes, rewritten = [], 0
    for node in graph.node:
        if node.op_type != "MatMul":
            nodes.append(node)
            continue
        a, b = node.input
        (y,) = node.output
        stem = f"{node.name or y}_elementwise"
        nodes += [
            helper.make_node("Unsqueeze", [a, "mm_axis_last"], [f"{stem}_a"]),  # (..., n, k, 1)
            helper.make_node("Unsqueeze", [b, "mm_axis_row"], [f"{stem}_b"]),  # (..., 1, k, m)
            helper.make_node("Mul", [f"{stem}_a", f"{stem}_b"], [f"{stem}_products"]),  # (..., n, k, m)
            helper.make_node("ReduceSum", [f"{stem}_products", "mm_axis_reduce"], [y], keepdims=0),
        ]
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return rewritten


def openvino_graph(onnx_path: str | Path) -> Path:
    """The rewritten graph for ``onnx_path`` from the cache (keyed by the source file's hash)."""
    target = cache_dir() / "openvino" / f"{file_hash(onnx_path)}-v{REWRITE_VERSION}.onnx"
    if target.is_file():
        return target
    return write_atomically(target, lambda tmp: elementwise_matmuls(onnx_path, tmp))


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
    model_path: str | Path | None = None,
) -> list[LayerGroup]:
    """Runs ``steps`` streaming steps (after one warm-up) with performance counters; groups sorted by cost.

    ``model_path``: an IR to profile instead of the rewritten ONNX (the quantised one for int8, whose
    unquantised layers run bf16 where the CPU has it, as in the backend)."""
    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(model_path or openvino_graph(onnx_path)))
    feed = {spec.frame.name: np.random.default_rng(0).random((1, 3, height, width), dtype=np.float32)}
    feed[spec.reset.name] = np.zeros((1, 1, 1, 1), np.float32)
    feed.update(spec.initial_state(1, height, width))
    model.reshape({n: list(v.shape) for n, v in feed.items()})
    config = {
        "INFERENCE_PRECISION_HINT": inference_hint(core, precision),
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
