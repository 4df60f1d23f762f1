"""``vident export onnx|tensorrt|triton``: deployable graphs with a parity check after each export.

Thin: the work is in :mod:`export`. A missing runtime (no tensorrt, no GPU) prints one line naming
it and exits 2; a failed parity check exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.commands.common import frame_size

EXIT_PARITY = 1
EXIT_UNAVAILABLE = 2
# Second size and batch of the ONNX self-check: a different shape from the first proves the graph is
# dynamic in batch, height and width (a graph frozen at the traced size fails here).
DYNAMIC_CHECK = (2, 48, 80)


def _model_name_from_graph(path: Path) -> str | None:
    import onnx

    doc = onnx.load(str(path), load_external_data=False).doc_string
    prefix = "vident streaming graph of "
    return doc[len(prefix) :].split(";")[0] if doc.startswith(prefix) else None


def _export_onnx(args: argparse.Namespace) -> int:
    from export.onnx import export_onnx
    from export.verify import FP32_MAX_ABS, compare_backends
    from models.checkpoints import load_model
    from service.backends.onnxrt import OrtBackend
    from service.backends.torch import TorchBackend

    network, checkpoint = load_model(args.model, args.checkpoint)
    out = export_onnx(network, args.out, opset=args.opset)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, opset {args.opset}, weights embedded"
          f"{'' if checkpoint else ', RANDOM weights: no checkpoint'})")  # fmt: skip
    height, width = args.check_size
    ok = True
    with TorchBackend(network) as reference, OrtBackend(network.spec, out) as candidate:  # type: ignore[arg-type]
        for batch, h, w, frames in ((1, height, width, args.frames), (*DYNAMIC_CHECK, 3)):
            report = compare_backends(reference, candidate, batch, h, w, frames)
            passed = report.within_fp32()
            ok &= passed
            print(f"{'PASS' if passed else 'FAIL'} {report.summary()} (limit {FP32_MAX_ABS:.0e})")
    return 0 if ok else EXIT_PARITY


def _export_tensorrt(args: argparse.Namespace) -> int:
    from export.trt import ShapeRange, build_engine
    from export.verify import compare_backends
    from models.checkpoints import load_model
    from service.backends.onnxrt import OrtBackend
    from service.backends.tensorrt import TrtBackend

    onnx_path = Path(args.onnx)
    name = args.model or _model_name_from_graph(onnx_path)
    if name is None:
        print("vident export tensorrt: --model is needed (the graph does not say which model it is)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    spec = load_model(name, None)[0].spec  # names and strides only; the weights are in the graph
    shapes = ShapeRange(ShapeRange.parse(args.min), ShapeRange.parse(args.opt), ShapeRange.parse(args.max))
    build = build_engine(onnx_path, spec, args.out, fp16=args.fp16, shapes=shapes)
    print(f"wrote {build.path} ({build.precision}, {build.layer_count} layers, built in {build.build_seconds:.0f} s)")
    if args.fp16:
        print(f"{len(build.fp32_layers)} layers run in fp32: " + ", ".join(build.fp32_layers[:40]))
    batch, height, width = shapes.opt
    reference_device = "cuda" if _ort_has_cuda() else "cpu"
    reference = OrtBackend(spec, onnx_path, reference_device)
    engine = TrtBackend(spec, build.path, "cuda", build.precision)
    with reference, engine:
        report = compare_backends(reference, engine, batch, height, width, frames=10)
    passed = report.within_reduced(psnr=45.0, iou=0.99, mace=0.05)
    print(f"{'PASS' if passed else 'FAIL'} {report.summary()} (limits: PSNR >= 45 dB, IoU >= 0.99, MACE <= 0.05 px)")
    return 0 if passed else EXIT_PARITY


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _export_triton(args: argparse.Namespace) -> int:
    from export.onnx import export_onnx
    from export.triton import export_triton, triton_graph
    from models.checkpoints import load_model

    network, _ = load_model(args.model, args.checkpoint)
    spec = network.spec  # type: ignore[attr-defined]
    out = Path(args.out)
    staging = out / ".staging"
    onnx_path = export_onnx(network, staging / "streaming.onnx")
    plan = None
    if args.tensorrt:
        from export.trt import ShapeRange, build_engine

        height, width = args.size
        shapes = ShapeRange((1, height, width), (1, height, width), (args.max_batch, height, width))
        triton_onnx = triton_graph(onnx_path, staging / "triton.onnx", spec)
        plan = build_engine(triton_onnx, spec, staging / "model.plan", shapes=shapes, reset_rank=2).path
    written = export_triton(onnx_path, spec, out, *args.size, max_batch=args.max_batch, plan=plan)
    for directory in written:
        print(f"wrote {directory} (config.pbtxt validated against the graph)")
    for leftover in sorted(staging.iterdir(), reverse=True):
        leftover.unlink()
    staging.rmdir()
    return 0


def run(args: argparse.Namespace) -> int:
    from export.runtime import BackendUnavailable

    handlers = {"onnx": _export_onnx, "tensorrt": _export_tensorrt, "triton": _export_triton}
    try:
        return handlers[args.format](args)
    except BackendUnavailable as exc:
        print(f"vident export: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="ONNX, TensorRT engine or Triton repository, parity-checked")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")

    onnx = formats.add_parser("onnx", help="streaming graph with explicit state; checked against torch")
    onnx.add_argument("--model", required=True, help="registered model name or .safetensors")
    onnx.add_argument("--checkpoint", default=None)
    onnx.add_argument("--out", required=True, help="output .onnx file")
    onnx.add_argument("--opset", type=int, default=17)
    onnx.add_argument(
        "--check-size", type=frame_size, default=(160, 208), help="HxW of the parity stream (default 160x208)"
    )
    onnx.add_argument("--frames", type=int, default=10, help="frames of the parity stream (default 10)")

    trt = formats.add_parser("tensorrt", help="FP16 engine from an exported ONNX file (needs a GPU)")
    trt.add_argument("--onnx", required=True)
    trt.add_argument("--out", required=True, help="output engine (.plan)")
    trt.add_argument("--model", default=None, help="model name (default: read from the graph)")
    trt.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True)
    trt.add_argument("--min", default="1x240x320", help="smallest BxHxW of the profile")
    trt.add_argument("--opt", default="1x320x416", help="BxHxW the engine is tuned for")
    trt.add_argument("--max", default="8x480x640", help="largest BxHxW of the profile")

    triton = formats.add_parser("triton", help="Triton model repository (sequence batcher, implicit state)")
    triton.add_argument("--model", default="most-nss")
    triton.add_argument("--checkpoint", default=None)
    triton.add_argument("--out", required=True, help="model repository directory")
    triton.add_argument("--size", type=frame_size, default=(320, 416), help="frame size served (default 320x416)")
    triton.add_argument("--max-batch", type=int, default=8)
    triton.add_argument("--tensorrt", action="store_true", help="also build an FP16 plan (needs a GPU)")
    p.set_defaults(func=run)
