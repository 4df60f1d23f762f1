"""Which int8 recipe keeps most-nss within the parity bar: the measurement behind export/int8.py.

Each recipe quantises the model from rendered ``val`` calibration streams (as the product does), then
runs the first sequences of a data set (the test split) through torch fp32 and the int8 IR with the
state carried, and reports per recipe the worst restored PSNR, decided-pixel mask IoU and MACE
difference over all frames, plus OpenVINO bf16 for reference::

    python -m tools.int8_recipes --model most-nss --data data/test --sequences 4 --frames 10

Takes about 10 minutes for most-nss at 320x416 on two cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from export.int8 import CALIBRATION_FRAMES, CALIBRATION_SEED, calibration_feeds, quantize, synthetic_streams
from export.onnx import cached_onnx
from export.verify import compare_streams
from models.checkpoints import load_model
from models.data.format import find_sequences, read_sequence
from models.streaming import as_stream
from service.backends.openvino import OpenVinoBackend
from service.backends.torch import TorchBackend

# MOST's int8 modules plus the scale-3 path that feeds the homography.
WITH_SCALE_3 = ("encoder", "alignment.1", "alignment.2", "alignment.3", "decoder.1", "decoder.2", "decoder.3",
                "segmentation_heads")  # fmt: skip
# name -> (modules to quantise: None = the spec's list, () = NNCF's default everything; preset; calibration sequences)
RECIPES: dict[str, tuple[tuple[str, ...] | None, str, int]] = {
    "nncf default (everything, symmetric)": ((), "performance", 4),
    "listed modules + scale 3, symmetric, 2 calibration sequences": (WITH_SCALE_3, "performance", 2),
    "listed modules + scale 3, symmetric, 4 calibration sequences": (WITH_SCALE_3, "performance", 4),
    "shipped: listed modules (spec), mixed, 4 calibration sequences": (None, "mixed", 4),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="most-nss")
    p.add_argument("--data", type=Path, required=True, help="sequences to judge on (docs/data.md), e.g. the test split")
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--frames", type=int, default=10)
    args = p.parse_args()

    network, _ = load_model(args.model)
    network.eval()
    spec = network.spec
    onnx_path = cached_onnx(network)
    streams = []
    for folder in find_sequences(args.data)[: args.sequences]:
        seq = read_sequence(folder, count=args.frames)
        streams.append(as_stream(seq.input))
    height, width = streams[0][0].shape[2:]
    rows = []
    with torch.inference_mode(), TorchBackend(network) as reference:
        with OpenVinoBackend(spec, onnx_path, precision="bf16") as bf16:
            rows.append(("openvino bf16 (no int8)", compare_streams(reference, bf16, streams), 0.0))
        with OpenVinoBackend(spec, onnx_path, precision="fp32") as fp32:
            calibration = {n: calibration_feeds(fp32, synthetic_streams(height, width, n, CALIBRATION_FRAMES,
                                                                              CALIBRATION_SEED))
                           for n in sorted({r[2] for r in RECIPES.values()})}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            for index, (name, (modules, preset, sequences)) in enumerate(RECIPES.items()):
                start = time.perf_counter()
                xml = quantize(onnx_path, spec, calibration[sequences], Path(tmp) / f"r{index}.xml", modules, preset)
                seconds = time.perf_counter() - start
                with OpenVinoBackend(spec, onnx_path, precision="int8", int8_model=xml) as int8:
                    rows.append((name, compare_streams(reference, int8, streams), seconds))
                print(f"done: {name}", flush=True)
    print(f"\n{args.model} vs torch fp32 on {len(streams)} sequences x {args.frames} frames of {args.data} "
          f"({height}x{width}); calibration: rendered val streams, seed {CALIBRATION_SEED}")  # fmt: skip
    print("| recipe | restored PSNR min | mask IoU min (decided pixels) | MACE diff max | quantise s |")
    print("|---|---|---|---|---|")
    for name, report, seconds in rows:
        decided = report.mask_iou_confident if report.mask_iou_confident is not None else float("nan")
        print(f"| {name} | {report.psnr_db:.1f} dB | {report.mask_iou:.4f} ({decided:.4f}) | "
              f"{report.mace_px:.3f} px | {seconds:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
