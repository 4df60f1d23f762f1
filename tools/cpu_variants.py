"""Two CPU experiments behind docs/performance.md, interleaved so shared-CPU load hits all variants alike.

    python -m tools.cpu_variants torch      # torch fp32/bf16 autocast x contiguous/channels_last
    python -m tools.cpu_variants openvino   # OpenVINO bf16: original graph vs MatMul rewrite
    python -m tools.cpu_variants openvino-shapes  # OpenVinoBackend bf16: static vs dynamic compilation

Each variant reports wall FPS and process CPU seconds per frame (all threads); on a CPU shared with
other work the second is the one to compare.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch


def _interleave(variants: dict[str, Callable[[int], object]], steps: int, warmup: int = 2) -> None:
    wall = dict.fromkeys(variants, 0.0)
    cpu = dict.fromkeys(variants, 0.0)
    for step in range(warmup + steps):
        for name, run in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run(step)
            if step >= warmup:
                wall[name] += time.perf_counter() - start
                cpu[name] += time.process_time() - start_cpu
    for name in variants:
        print(f"{name}: {steps / wall[name]:.2f} FPS, {cpu[name] / steps:.3f} CPU s/frame")
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")


def torch_variants(model_name: str, height: int, width: int, steps: int) -> None:
    from export.verify import moving_frames
    from models import create_model

    torch.manual_seed(0)
    frames = [torch.from_numpy(f) for f in moving_frames(1, height, width, 8)]
    variants = {}
    for layout in ("contiguous", "channels_last"):
        for precision in ("fp32", "bf16"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            model = create_model(model_name).eval().to(memory_format=fmt)
            state = {"s": [torch.from_numpy(v) for v in model.spec.initial_state(1, height, width).values()]}

            def run(step: int, model=model, state=state, fmt=fmt, precision=precision) -> None:  # noqa: ANN001
                frame = frames[step % len(frames)].contiguous(memory_format=fmt)
                reset = torch.full((1, 1, 1, 1), float(step == 0))
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                    state["s"] = list(model(frame, reset, *state["s"])[len(model.spec.outputs) :])

            variants[f"torch {layout} {precision}"] = run
    _interleave(variants, steps)


def openvino_variants(model_name: str, height: int, width: int, steps: int) -> None:
    import openvino as ov

    from export.onnx import cached_onnx
    from export.openvino import openvino_graph
    from export.runtime import cpu_threads
    from models import create_model

    torch.manual_seed(0)
    model = create_model(model_name).eval()
    spec = model.spec
    source = cached_onnx(model)
    feed = {"frame": np.random.default_rng(0).random((1, 3, height, width), dtype=np.float32)}
    feed |= {"reset": np.zeros((1, 1, 1, 1), np.float32), **spec.initial_state(1, height, width)}
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": cpu_threads()}
    variants = {}
    for name, path in (("original", source), ("MatMul rewrite", openvino_graph(source))):
        graph = core.read_model(str(path))
        graph.reshape({n: list(v.shape) for n, v in feed.items()})
        request = core.compile_model(graph, "CPU", config).create_infer_request()
        variants[f"openvino bf16 {name}"] = lambda step, request=request: request.infer(feed)  # noqa: ARG005
    _interleave(variants, steps)


def openvino_shape_variants(model_name: str, height: int, width: int, steps: int) -> None:
    """What a frame size beyond the backend's static-shape budget costs: the shared dynamic compilation."""
    from export.onnx import cached_onnx
    from models import create_model
    from service.backends.openvino import OpenVinoBackend

    torch.manual_seed(0)
    model = create_model(model_name).eval()
    spec = model.spec
    feed = {"frame": np.random.default_rng(0).random((1, 3, height, width), dtype=np.float32)}
    feed |= {"reset": np.zeros((1, 1, 1, 1), np.float32), **spec.initial_state(1, height, width)}
    variants = {}
    for name, budget in (("static", 1), ("dynamic", 0)):
        backend = OpenVinoBackend(spec, cached_onnx(model), precision="bf16", max_static_shapes=budget).load()
        variants[f"openvino bf16 {name}"] = lambda step, backend=backend: backend.infer(feed)  # noqa: ARG005
    _interleave(variants, steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiment", choices=("torch", "openvino", "openvino-shapes"))
    parser.add_argument("--model", default="most-nss")
    parser.add_argument("--size", default="320x416", help="HxW")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.split("x"))
    run = {"torch": torch_variants, "openvino": openvino_variants, "openvino-shapes": openvino_shape_variants}[
        args.experiment
    ]
    run(args.model, height, width, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
