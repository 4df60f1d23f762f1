"""Backend by name: the one place that maps configuration strings to runtime classes.

Runtimes that read ONNX (onnxruntime, openvino, tensorrt) get the graph from the export cache
(:func:`export.onnx.cached_onnx`), so ``create_backend("most-nss", backend="openvino")`` exports
on first use and only loads afterwards.

``auto`` picks the CPU default by :func:`choose_cpu_backend`: measured on the 2-core development
CPU (docs/performance.md), OpenVINO is the fastest CPU runtime for these graphs, then ONNX Runtime,
then torch; bf16 is chosen only where the CPU has native bf16 *and* a parity check of the actual
model against torch fp32 passes, so a model whose outputs bf16 would spoil stays in fp32. The check
streams rendered dental frames at the size the service warms up at and the cards are measured at
(320x416): the shipped most-nss passed a moving test pattern at 64x96 (MACE diff 0.005 px), while on
rendered frames at 320x416 its photometric refinement settles up to 0.56 px away from fp32's
(limit 0.05 px; docs/performance.md), so on such CPUs ``auto`` serves it in fp32.
Its verdict is kept on disk beside the exported graphs, so a server pays for it once per machine.
int8 (export/int8.py) is faster still but only on request (``precision="int8"``): on the test split
the shipped most-nss's restored frame came out at 38.3 dB of fp32, under the 40 dB bar
(docs/performance.md), so ``auto`` does not take it.

On CUDA ``auto`` takes TensorRT where it is installed, else the torch fast path (fp16, channels_last,
CUDA graphs: service/backends/torch.py) after a parity check against torch fp32 on the same rendered
streams (:func:`choose_cuda_precision`), fp32 if it fails.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from export.int8 import cached_int8, synthetic_streams
from export.onnx import cache_dir, cached_onnx, weights_hash, write_atomically
from export.openvino import import_openvino
from export.runtime import Backend, BackendUnavailable
from export.trt import cached_engine, import_tensorrt
from export.verify import ParityReport, compare_backends, compare_streams
from models.checkpoints import load_model
from models.hardware import cpu_has_bf16, cpu_model
from service.backends.onnxrt import OrtBackend, import_onnxruntime, require_cuda_provider
from service.backends.openvino import OpenVinoBackend
from service.backends.tensorrt import TrtBackend
from service.backends.torch import TorchBackend

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
# Fastest first, as measured for most-nss at 320x416 on the development CPU (docs/performance.md).
CPU_PREFERENCE = ("openvino", "onnxruntime", "torch")
# The streams ``auto``'s parity checks (CPU bf16, GPU fp16) run: rendered ``val`` sequences (never the
# test split) at the served size, long enough for the recurrent state to carry.
CHECK_SIZE = (320, 416)
CHECK_STREAMS = 3
CHECK_FRAMES = 4
CHECK_SEED = 0
BF16_CHECK_VERSION = "2"  # bump when the check changes beyond the constants above (they are in the key)
# The moving pattern of :func:`cuda_parity` when no streams are given (GPU tests, tools/gpu_run.py).
CUDA_PATTERN_SIZE = (64, 96)
CUDA_PATTERN_FRAMES = 3
# The GPU fast path's variants as the GPU tests and tools/gpu_run.py check them against torch fp32:
# name -> TorchBackend arguments.
CUDA_VARIANTS: dict[str, dict[str, object]] = {
    "fp16-eager": {"precision": "fp16", "cuda_graphs": False},
    "fp16-graphs": {"precision": "fp16", "cuda_graphs": True},
    "bf16-graphs": {"precision": "bf16", "cuda_graphs": True},
}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    precision: str
    reason: str


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def default_backend(device: str = "cpu") -> str:
    """The fastest installed runtime for ``device`` (no model needed; precision is chosen separately)."""
    if device.startswith("cuda"):
        # Without TensorRT the torch fast path (fp16 CUDA graphs) is the GPU runtime; ONNX Runtime's CUDA
        # provider runs these graphs in fp32 only (service/backends/onnxrt.py) and stays a request.
        return "tensorrt" if _installed("tensorrt") else "torch"
    return next(b for b in CPU_PREFERENCE if b == "torch" or _installed(b))


def check_streams() -> list[list[np.ndarray]]:
    """What ``auto``'s parity checks stream: what a microcamera sends, at the size the service warms up at."""
    return synthetic_streams(*CHECK_SIZE, CHECK_STREAMS, CHECK_FRAMES, CHECK_SEED)


def bf16_parity_ok(model: nn.Module, cache: bool = True) -> tuple[bool, str]:
    """OpenVINO bf16 against torch fp32 on rendered streams: PSNR, mask IoU and MACE within the limits.
    ``cache``: reuse (and keep) the verdict for these weights, this OpenVINO and this CPU."""
    check = f"{CHECK_SIZE}x{CHECK_STREAMS}x{CHECK_FRAMES}@{CHECK_SEED}v{BF16_CHECK_VERSION}"
    key = f"{weights_hash(model)}|{import_openvino().__version__}|{cpu_model()}|{check}"
    path = cache_dir() / "parity" / f"bf16-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache and path.is_file():
        try:
            verdict = json.loads(path.read_text())
            return bool(verdict["ok"]), str(verdict["summary"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: check again and overwrite
    with TorchBackend(model) as reference, OpenVinoBackend(model.spec, cached_onnx(model), precision="bf16") as bf16:  # type: ignore[arg-type]
        report = compare_streams(reference, bf16, check_streams())
    ok, summary = report.within_reduced(), f"{report.summary()}, rendered streams"
    if cache:
        record = json.dumps({"ok": ok, "summary": summary, "key": key})
        try:
            write_atomically(path, lambda tmp: Path(tmp).write_text(record))
        except OSError as exc:  # a read-only cache: the next start checks again
            logger.warning("bf16 parity verdict not kept in %s: %s", path.parent, exc)
    return ok, summary


def cuda_parity(
    network: nn.Module,
    device: str = "cuda",
    batch: int = 1,
    height: int = CUDA_PATTERN_SIZE[0],
    width: int = CUDA_PATTERN_SIZE[1],
    frames: int = CUDA_PATTERN_FRAMES,
    streams: list[list[np.ndarray]] | None = None,
    **torch_options: object,
) -> ParityReport:
    """The torch backend on ``device`` with ``torch_options`` (precision, cuda_graphs, ...; see
    :data:`CUDA_VARIANTS`) against torch fp32 on the CPU, the reference every runtime matches, over
    ``streams`` (else one moving pattern of the given shape) with the state carried. ``network``
    itself is the reference (it ends up on the CPU); a CUDA candidate runs its own copy."""
    reference = TorchBackend(network.cpu())
    with reference, TorchBackend(network, device, **torch_options) as candidate:  # type: ignore[arg-type]
        if streams is not None:
            return compare_streams(reference, candidate, streams)
        return compare_backends(reference, candidate, batch, height, width, frames)


_CPU_CHOICES: dict[str, BackendChoice] = {}  # weights hash -> choice, so each network is checked once
_CUDA_CHOICES: dict[tuple[str, str], BackendChoice] = {}  # (weights hash, device) -> choice


def choose_cpu_backend(network: nn.Module) -> BackendChoice:
    """Runtime and precision for this network on this CPU; the bf16 parity check runs once per weights."""
    key = weights_hash(network)
    if key not in _CPU_CHOICES:
        _CPU_CHOICES[key] = _choose_cpu(network)
        choice = _CPU_CHOICES[key]
        logger.info(
            "CPU backend for %s: %s %s (%s)", network.spec.name, choice.backend, choice.precision, choice.reason
        )  # type: ignore[attr-defined]
    return _CPU_CHOICES[key]


def _choose_cpu(network: nn.Module) -> BackendChoice:
    backend = default_backend("cpu")
    if backend != "openvino":
        return BackendChoice(backend, "fp32", f"{backend} is the fastest CPU runtime installed")
    if not cpu_has_bf16():
        return BackendChoice("openvino", "fp32", "CPU has no native bf16 (AMX / AVX512-BF16)")
    ok, summary = bf16_parity_ok(network)
    if ok:
        return BackendChoice("openvino", "bf16", f"native bf16 and parity holds: {summary}")
    return BackendChoice("openvino", "fp32", f"bf16 parity fails, staying fp32: {summary}")


def choose_cuda_precision(network: nn.Module, device: str = "cuda") -> BackendChoice:
    """The torch fast path's precision for this network on this GPU: fp16 (CUDA graphs) where a parity
    check against torch fp32 on :func:`check_streams` passes, else fp32. Checked once per weights and device."""
    key = (weights_hash(network), device)
    if key not in _CUDA_CHOICES:
        report = cuda_parity(network, device, streams=check_streams(), precision="fp16", cuda_graphs=True)
        if report.within_reduced():
            choice = BackendChoice("torch", "fp16", f"fp16 CUDA graphs, parity holds: {report.summary()}")
        else:
            choice = BackendChoice("torch", "fp32", f"fp16 parity fails, staying fp32: {report.summary()}")
        _CUDA_CHOICES[key] = choice
        logger.info("GPU backend for %s: torch %s (%s)", network.spec.name, choice.precision, choice.reason)  # type: ignore[attr-defined]
    return _CUDA_CHOICES[key]


def create_backend(
    model: str,
    backend: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    checkpoint: str | Path | None = None,
) -> Backend:
    """A loaded backend for a registered model name or checkpoint path.

    ``backend="auto"`` resolves with :func:`choose_cpu_backend` on the CPU and :func:`default_backend`
    on a GPU. ``precision="auto"``: bf16 or fp32 for OpenVINO by :func:`choose_cpu_backend`, fp16 for
    TensorRT, fp16 or fp32 for torch on a GPU by :func:`choose_cuda_precision`, fp32 otherwise.
    """
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}, auto")
    network, _ = load_model(model, checkpoint)
    if backend == "auto":
        if device == "cpu" and precision == "auto":
            choice = choose_cpu_backend(network)
            backend, precision = choice.backend, choice.precision
        elif device == "cpu":  # a fixed precision needs no parity checks, only the fastest runtime
            backend = default_backend("cpu")
        else:
            backend = default_backend(device)
    if precision == "auto":
        if backend == "openvino":  # bf16 where the hardware and the parity check allow it
            precision = choose_cpu_backend(network).precision
        elif backend == "torch" and device.startswith("cuda"):  # fp16 where the parity check allows it
            precision = choose_cuda_precision(network, device).precision
        else:
            precision = "fp16" if backend == "tensorrt" else "fp32"
    return backend_for(network, backend, device, precision).load()


def backend_for(network: nn.Module, backend: str, device: str = "cpu", precision: str = "fp32") -> Backend:
    """An unloaded backend of kind ``backend`` for an in-memory network (exports through the cache)."""
    spec = network.spec  # type: ignore[attr-defined]
    if backend == "torch":
        return TorchBackend(network, device=device, precision=precision)
    if backend == "tensorrt":
        import_tensorrt()  # fail with the clear message before spending time on an export
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"tensorrt backend: precision must be fp16 or fp32, not {precision!r}")
        build = cached_engine(cached_onnx(network), spec, fp16=precision == "fp16")
        return TrtBackend(spec, build.path, device=device if device.startswith("cuda") else "cuda", precision=precision)
    if backend == "onnxruntime":
        import_onnxruntime()  # fail with the clear message before spending time on an export
        if device.startswith("cuda"):
            require_cuda_provider()
        return OrtBackend(spec, cached_onnx(network), device=device, precision=precision)
    if backend == "openvino":
        import_openvino()  # fail with the clear message before spending time on an export
        if precision != "int8":
            return OpenVinoBackend(spec, cached_onnx(network), device=device, precision=precision)
        build = cached_int8(network, OpenVinoBackend)
        log = logger.info if build.within_limits else logger.warning
        log("%s int8: %s%s", spec.name, build.summary(), "" if build.within_limits else " (outside the parity limits)")
        return OpenVinoBackend(spec, cached_onnx(network), device=device, precision="int8", int8_model=build.path)
    raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "CUDA_VARIANTS", "BackendChoice", "BackendUnavailable", "backend_for", "create_backend",
           "cuda_parity", "default_backend", "choose_cpu_backend",
           "choose_cuda_precision"]  # fmt: skip
