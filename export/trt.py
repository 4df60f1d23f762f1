"""TensorRT FP16 engines from the exported ONNX graph (TensorRT Python API, no trtexec).

One optimisation profile covers a range of batch sizes and frame sizes; every state input gets the
matching shape at its stride, so the profile follows the spec rather than hand-written shapes.
Engines are built once and cached, keyed by the ONNX file's hash, the TensorRT version, the GPU
name and the precision (an engine is only valid for the exact TensorRT build and GPU it was built
on); a runtime then only deserializes.

The geometry (sampling grids of ``warp_by_homography`` and DCN, the 3x3 homography algebra) is
pinned to fp32 with precision constraints: in fp16 a coordinate of a few hundred pixels snaps to
whole pixels and the homography cascade loses its corner accuracy. Convolutions run in fp16.

Written against the TensorRT 10 Python API and not yet run on a GPU; the ``gpu`` extra also accepts
TensorRT 11, unverified. The calls most at risk there are the weakly typed precision controls the
fp16 build depends on (``BuilderFlag.FP16``, ``BuilderFlag.PREFER_PRECISION_CONSTRAINTS``,
``ILayer.precision``, ``ILayer.set_output_type``), which later TensorRT 10 releases deprecate in
favour of strongly typed networks; the rest (``create_network(0)``, ``set_memory_pool_limit``,
``build_serialized_network``, the engine inspector, ``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``) is the current API as far as known here (docs/performance.md, "GPU").
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from export.onnx import cache_dir, file_hash
from export.runtime import BackendUnavailable
from models.spec import ModelSpec


def import_tensorrt():  # noqa: ANN201 - module object
    """``tensorrt`` and a CUDA device, or :class:`BackendUnavailable` naming what is missing."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            "tensorrt: the 'tensorrt' package is not installed "
            "(pip install 'vident[gpu]' on a machine with an NVIDIA GPU)"
        ) from exc
    if not torch.cuda.is_available():
        raise BackendUnavailable("tensorrt: no CUDA GPU is visible to torch (TensorRT engines need an NVIDIA GPU)")
    return tensorrt


@dataclass(frozen=True)
class ShapeRange:
    """Batch and frame-size range of one optimisation profile: each entry is (batch, height, width)."""

    min: tuple[int, int, int] = (1, 240, 320)
    opt: tuple[int, int, int] = (1, 320, 416)
    max: tuple[int, int, int] = (8, 480, 640)

    def __post_init__(self) -> None:
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not lo <= mid <= hi:
                raise ValueError(f"shape range must satisfy min <= opt <= max per dim: {self}")
        for _, h, w in (self.min, self.opt, self.max):
            if h % 8 or w % 8:
                raise ValueError(f"frame sizes in a shape range must be multiples of 8: {self}")

    def signature(self) -> str:
        return "_".join("x".join(map(str, s)) for s in (self.min, self.opt, self.max))

    @staticmethod
    def parse(text: str) -> tuple[int, int, int]:
        """'BxHxW' -> (b, h, w)."""
        try:
            b, h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape must look like 1x320x416 (batch x height x width), got {text!r}") from None
        return b, h, w


@dataclass
class EngineBuild:
    path: Path
    precision: str
    build_seconds: float
    fp32_layers: list[str] = field(default_factory=list)  # layers that run in fp32 in an fp16 engine
    layer_count: int = 0
    cached: bool = False


def _pin_geometry_to_fp32(trt, network) -> int:  # noqa: ANN001 - tensorrt objects
    """Marks sampling grids and homography algebra fp32; returns how many layers were pinned.

    Recognised by shape, which is what distinguishes them from image maps: GridSample itself,
    tensors whose last dim is 2 (sampling grids, point lists), (..., 3, 3) matrices and low-rank
    tensors (corner lists, per-sample scalars).
    """
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE, trt.LayerType.CAST):
            continue
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not outputs or any(o.dtype != trt.float32 for o in outputs):
            continue  # shape arithmetic (int32/int64) and booleans have no precision to pin
        shapes = [tuple(o.shape) for o in outputs]
        geometric = layer.type == trt.LayerType.GRID_SAMPLE or any(
            len(s) <= 3 or s[-1] == 2 or s[-2:] == (3, 3) for s in shapes
        )
        if geometric:
            layer.precision = trt.float32
            for i in range(layer.num_outputs):
                layer.set_output_type(i, trt.float32)
            pinned += 1
    return pinned


def _fp32_layers(trt, engine) -> tuple[list[str], int]:  # noqa: ANN001 - tensorrt objects
    """Names of engine layers whose outputs are fp32 (the inspector needs DETAILED verbosity)."""
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    names = []
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        formats = " ".join(str(o.get("Format/Datatype", "")) for o in layer.get("Outputs", []))
        if "FP32" in formats or "Float" in formats:
            names.append(str(layer.get("Name", "?")))
    return names, len(info.get("Layers", []))


def profile_shapes(spec: ModelSpec, shapes: ShapeRange, reset_rank: int = 4) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every graph input, from the spec's strides: the optimisation profile."""
    result = {}
    for tensor in (spec.frame, spec.reset, *(s.tensor for s in spec.states)):
        triple = tuple(tensor.shape(*dims) for dims in (shapes.min, shapes.opt, shapes.max))
        if tensor.name == spec.reset.name:
            triple = tuple(shape[:reset_rank] for shape in triple)
        result[tensor.name] = triple
    return result


def build_engine(
    onnx_path: str | Path,
    spec: ModelSpec,
    out: str | Path,
    fp16: bool = True,
    shapes: ShapeRange | None = None,
    workspace_gib: float = 4.0,
    reset_rank: int = 4,
) -> EngineBuild:
    """Parses ``onnx_path``, builds a (FP16) engine with one profile over ``shapes`` and writes it to ``out``.

    ``reset_rank=2`` is for the Triton graph, whose ``reset`` control input is (batch, 1).
    """
    trt = import_tensorrt()
    shapes = shapes or ShapeRange()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        _pin_geometry_to_fp32(trt, network)
    profile = builder.create_optimization_profile()
    for name, (low, mid, high) in profile_shapes(spec, shapes, reset_rank).items():
        profile.set_shape(name, low, mid, high)
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    seconds = time.perf_counter() - start
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(serialized))
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    fp32, count = _fp32_layers(trt, engine)
    return EngineBuild(out, "fp16" if fp16 else "fp32", seconds, fp32 if fp16 else [], count)


def engine_cache_key(onnx_path: str | Path, precision: str, trt_version: str, gpu_name: str, shapes: ShapeRange) -> str:
    """Model hash, TensorRT version, GPU and precision (and the profile): what makes an engine reusable."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-")
    return f"{file_hash(onnx_path)}-trt{trt_version}-{gpu}-{precision}-{shapes.signature()}"


def cached_engine(
    onnx_path: str | Path, spec: ModelSpec, fp16: bool = True, shapes: ShapeRange | None = None
) -> EngineBuild:
    """The cached engine for this graph on this GPU and TensorRT, building it on first use."""
    trt = import_tensorrt()
    shapes = shapes or ShapeRange()
    precision = "fp16" if fp16 else "fp32"
    key = engine_cache_key(onnx_path, precision, trt.__version__, torch.cuda.get_device_name(), shapes)
    path = cache_dir() / "tensorrt" / f"{spec.name}-{key}.plan"
    if path.is_file():
        return EngineBuild(path, precision, 0.0, cached=True)
    tmp = path.with_suffix(".partial")
    build = build_engine(onnx_path, spec, tmp, fp16=fp16, shapes=shapes)
    tmp.replace(path)
    build.path = path
    return build
