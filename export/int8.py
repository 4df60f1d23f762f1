"""INT8 on the OpenVINO CPU path: post-training quantisation (NNCF) of the layers that tolerate it.

Why: the development CPU has AVX512-VNNI but no AMX, so int8 convolutions run about 1.4x faster than
bf16 ones (most-nss at 320x416: 3.1 against 2.25 FPS, docs/performance.md). Why not everything: with
NNCF's defaults (every convolution, MatMul and Gemm quantised, symmetric activations) the restored
frame fell to 18 dB against fp32 and the homography drifted by 5.3 px, and excluding only the heads
changed nothing. What comes closest to the reduced-precision bar (restored >= 40 dB, masks and
homographies matching) is quantising only the convolutions a network lists in ``ModelSpec.int8_modules`` (for
MOST: the encoder, the scale-1 and scale-2 alignment and decoder, the segmentation heads; the
scale-3 path that feeds the homography and every restoration head stay bf16/fp32) with the MIXED
preset (asymmetric activations). A network that lists no modules has no int8 variant.

It is not the CPU default: the recipe passes its own check on rendered streams only narrowly, and on
the test split the restored frame came out at 38.3 dB (``tools/int8_recipes.py``), so it runs
only where asked for (``precision="int8"``), with its parity report logged.

Calibration uses synthetic clips of the ``val`` split (never the test split that cards quote), with
the recurrent state carried by an fp32 run, so the statistics are those of a live stream. The
quantised IR and the parity report of a separate synthetic stream are cached together, keyed by the
weights, the OpenVINO and NNCF versions and :data:`RECIPE_VERSION`; a server start reuses both.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import multiprocessing
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from torch import nn

from export.onnx import cache_dir, cached_onnx, weights_hash, write_atomically
from export.openvino import import_openvino, openvino_graph
from export.runtime import Backend, BackendUnavailable
from export.verify import ParityReport, compare_streams
from models.data.synth import SynthConfig, render_sequence, sequence_seed
from models.spec import ModelSpec
from models.streaming import as_stream, stream_steps

# Bump when the calibration or the quantised layers change, so stale IRs are not reused.
RECIPE_VERSION = "1"
CALIBRATION_SEED = 11  # val-split sequences 0.. of this seed calibrate; PARITY_SEED's check
PARITY_SEED = 12
CALIBRATION_SIZE = (320, 416)  # the product's frame size (Vident-lab); ranges do not depend on it
CALIBRATION_SEQUENCES = 4
CALIBRATION_FRAMES = 8
PARITY_SEQUENCES = 4
PARITY_FRAMES = 10

# Builds the OpenVINO runner int8 is calibrated and checked with (the service's OpenVinoBackend):
# ``(spec, onnx_path, precision="fp32")`` for the reference, ``precision="int8", int8_model=xml`` for the
# candidate. Export takes it as an argument rather than importing the service (export/runtime.py).
OpenVinoRunner = Callable[..., Backend]

logger = logging.getLogger(__name__)


def import_nncf() -> ModuleType:
    try:
        import nncf
    except ImportError as exc:
        raise BackendUnavailable("openvino int8 needs the nncf package (pip install nncf)") from exc
    nncf.set_log_level(logging.WARNING)  # its INFO lists every skipped layer: hundreds of lines per build
    return nncf


def int8_available(spec: ModelSpec) -> str | None:
    """None when ``spec``'s network can run int8 here, else why not (one line)."""
    if not spec.int8_modules:
        return f"{spec.name} lists no int8-tolerant layers"
    try:
        import_nncf()
        ov = import_openvino()
    except BackendUnavailable as exc:
        return str(exc)
    if "INT8" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return "the OpenVINO CPU plugin reports no INT8 support on this CPU"
    return None


def ignored_pattern(modules: tuple[str, ...]) -> str:
    """A regex on node names matching every node *outside* ``modules`` (NNCF ignores those)."""
    alternatives = "|".join(re.escape(m) for m in modules)
    return rf"^(?!/?(?:{alternatives})/).*$"


def synthetic_streams(
    height: int, width: int, sequences: int, frames: int, seed: int
) -> list[list[np.ndarray]]:
    """Float (1, 3, H, W) frames in [0, 1] of rendered ``val`` sequences: what a microcamera sends."""
    cfg = SynthConfig(height=height, width=width, frames=frames, noise="mixed")
    streams = []
    for index in range(sequences):
        seq = render_sequence(cfg, sequence_seed(seed, "val", index))
        streams.append(as_stream(seq.input))
    return streams


def calibration_feeds(reference: Backend, streams: list[list[np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Every input of every step, with the state an fp32 run carried: NNCF sees live-stream statistics."""
    return [feed for stream in streams for feed, _ in stream_steps(reference, stream)]


def quantize(
    onnx_path: str | Path,
    spec: ModelSpec,
    feeds: list[dict[str, np.ndarray]],
    out: str | Path,
    modules: tuple[str, ...] | None = None,
    preset: str = "mixed",
) -> Path:
    """NNCF post-training quantisation of the OpenVINO graph; writes ``out`` (.xml, with its .bin).

    ``modules``: whose convolutions to quantise (default ``spec.int8_modules``; ``()`` = whatever NNCF
    quantises by default). ``preset``: "mixed" (asymmetric activations) or "performance" (symmetric).
    The alternatives exist to measure what the recipe avoids (``tools/int8_recipes.py``)."""
    nncf = import_nncf()
    ov = import_openvino()
    model = ov.Core().read_model(str(openvino_graph(onnx_path)))
    modules = spec.int8_modules if modules is None else modules
    ignored = None
    if modules:
        ignored = nncf.IgnoredScope(patterns=[ignored_pattern(modules)], types=["MatMul", "GridSample"], validate=False)
    quantized = nncf.quantize(
        model,
        nncf.Dataset([{n: f[n] for n in spec.input_names} for f in feeds]),
        preset=nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(feeds),
        fast_bias_correction=True,
        ignored_scope=ignored if ignored is not None else nncf.IgnoredScope(),
    )
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return Path(out)


@dataclass(frozen=True)
class Int8Build:
    path: Path  # the quantised IR (.xml; the weights are the .bin beside it)
    parity: dict[str, object]  # ParityReport fields of the int8 vs fp32 check
    within_limits: bool  # the reduced-precision bar of export.verify (restored >= 40 dB, masks, MACE)
    seconds: float  # what building it took (0 when it came from the cache)

    def summary(self) -> str:
        p = self.parity
        return (
            f"int8 vs openvino fp32 ({p['frames']} frames of rendered streams, "
            f"{p['height']}x{p['width']}): restored {p['psnr_db']:.1f} dB, mask IoU {p['mask_iou']:.4f} "
            f"(decided pixels {p['mask_iou_confident'] if p['mask_iou_confident'] is not None else float('nan'):.4f}), "
            f"MACE diff {p['mace_px']:.4f} px"
        )


def _versions() -> str:
    return "-".join(f"{p}{importlib.metadata.version(p)}" for p in ("openvino", "nncf"))


def _build(
    runner: OpenVinoRunner,
    spec: ModelSpec,
    onnx_path: Path,
    xml: Path,
    report_path: Path,
    size: tuple[int, int],
    sequences: int,
) -> dict[str, object]:
    """Calibrate, quantise, check parity, write the IR and the report. Runs in a child process."""
    height, width = size
    folder = xml.parent
    # The IR is two files: write both under a temporary stem, then rename the .bin before the .xml.
    tmp_xml = folder / f".{xml.stem}.{time.time_ns()}.xml"
    with runner(spec, onnx_path, precision="fp32") as fp32:
        streams = synthetic_streams(height, width, sequences, CALIBRATION_FRAMES, CALIBRATION_SEED)
        feeds = calibration_feeds(fp32, streams)
        try:
            quantize(onnx_path, spec, feeds, tmp_xml)
            tmp_xml.with_suffix(".bin").replace(xml.with_suffix(".bin"))
            tmp_xml.replace(xml)
        finally:
            tmp_xml.unlink(missing_ok=True)
            tmp_xml.with_suffix(".bin").unlink(missing_ok=True)
        del feeds
        # The fp32 graph is the reference: the export already holds it to torch within 1e-4.
        streams = synthetic_streams(height, width, PARITY_SEQUENCES, PARITY_FRAMES, PARITY_SEED)
        with runner(spec, onnx_path, precision="int8", int8_model=xml) as candidate:
            parity: ParityReport = compare_streams(fp32, candidate, streams)
    record = {"parity": asdict(parity), "within_limits": parity.within_reduced(), "recipe": RECIPE_VERSION}
    write_atomically(report_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def cached_int8(
    network: nn.Module,
    runner: OpenVinoRunner,
    size: tuple[int, int] = CALIBRATION_SIZE,
    sequences: int = CALIBRATION_SEQUENCES,
) -> Int8Build:
    """The quantised IR of ``network`` and its parity report, from the cache or built now; ``runner``
    builds the OpenVINO backends it is calibrated and checked with (:data:`OpenVinoRunner`).

    Building takes a few minutes for most-nss at 320x416 on two cores (calibration, quantisation,
    then the parity streams through fp32 and int8); it is logged, and done once per weights. It runs
    in a child process: the calibration data (about 1 GB) goes back to the OS when it ends, and the
    OpenVINO objects NNCF creates never live in a serving process (in the same process they crashed
    a later, unrelated test run with SIGSEGV when they were collected).
    """
    spec: ModelSpec = network.spec  # type: ignore[attr-defined]
    if reason := int8_available(spec):
        raise BackendUnavailable(f"openvino int8: {reason}")
    height, width = size
    folder = cache_dir() / "openvino-int8"
    stem = f"{spec.name}-{weights_hash(network)}-{height}x{width}-{_versions()}-r{RECIPE_VERSION}"
    xml, report_path = folder / f"{stem}.xml", folder / f"{stem}.json"
    if xml.is_file() and xml.with_suffix(".bin").is_file() and report_path.is_file():
        report = json.loads(report_path.read_text())
        return Int8Build(xml, report["parity"], report["within_limits"], 0.0)
    logger.info("building the int8 variant of %s (calibration at %dx%d, then a parity check)", spec.name, height, width)
    start = time.perf_counter()
    onnx_path = cached_onnx(network)
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        record = pool.submit(_build, runner, spec, onnx_path, xml, report_path, size, sequences).result()
    seconds = time.perf_counter() - start
    build = Int8Build(xml, record["parity"], record["within_limits"], seconds)  # type: ignore[arg-type]
    logger.info("int8 variant of %s built in %.0f s: %s", spec.name, seconds, build.summary())
    return build


__all__ = ["Int8Build", "cached_int8", "calibration_feeds", "int8_available", "quantize", "synthetic_streams"]
