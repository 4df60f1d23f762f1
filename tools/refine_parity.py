"""ONNX Runtime (and optionally OpenVINO) against torch fp32 with a refinement setting, on sequences of
a training split at their full size: the tiny-model parity tests do not show what rounding does to
the refinement on realistic content.

    .venv/bin/python -m tools.refine_parity --model models/checkpoints/most-nss.safetensors \\
        --data data/hfit-mixed-256 --sequences 8 --frames 6 --levels "8:10,4:20" --prior 0.1 --highpass 5 11
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from export.onnx import export_onnx
from export.verify import compare_streams
from models.checkpoints import read_checkpoint, read_metadata, save_checkpoint
from models.data.format import find_sequences, read_sequence
from models.refine import HIGHPASS, PRIOR_SCALES, REFINE_FRAMES
from models.registry import create_model
from models.streaming import as_stream
from service.backends.onnxrt import OrtBackend
from service.backends.openvino import OpenVinoBackend
from service.backends.torch import TorchBackend
from tools.refine_tune import parse_levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MOST checkpoint; its refinement is replaced")
    parser.add_argument("--data", required=True, help="a training split in the on-disk format")
    parser.add_argument("--sequences", type=int, default=8, help="the last N sequences")
    parser.add_argument("--frames", type=int, default=6, help="first N frames of each")
    parser.add_argument("--levels", default="8:10,4:20", help="factor:steps,... coarse to fine")
    parser.add_argument("--prior", type=float, default=0.1, help="pull to the head's estimate")
    parser.add_argument("--prior-scale", choices=PRIOR_SCALES, default="hessian", help="what the prior is relative to")
    parser.add_argument("--highpass", type=int, nargs="+", default=[HIGHPASS], help="local-mean sides it matches at")
    parser.add_argument("--refine-frames", choices=REFINE_FRAMES, default="restored", help="the frames it matches")
    parser.add_argument("--openvino", action="store_true", help="also OpenVINO fp32")
    parser.add_argument("--save", type=Path, help="also write the weights with this refinement in their layout here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kwargs, state = read_checkpoint(args.model)
    kwargs |= {"homography_refine": parse_levels(args.levels), "homography_refine_prior": args.prior,
               "homography_refine_prior_scale": args.prior_scale,
               "homography_refine_frames": args.refine_frames,
               "homography_refine_highpass": tuple(args.highpass)}  # fmt: skip
    model = create_model(read_metadata(args.model)["model"], **kwargs)
    model.load_state_dict(state, strict=True)
    model.eval()
    if args.save is not None:
        print(f"wrote {save_checkpoint(model, args.save, read_metadata(args.model))}", flush=True)
    streams = [as_stream(read_sequence(f).input[: args.frames]) for f in find_sequences(args.data)[-args.sequences :]]
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(model, f"{tmp}/model.onnx")
        candidates = [OrtBackend(model.spec, onnx)] + ([OpenVinoBackend(model.spec, onnx)] if args.openvino else [])
        for candidate in candidates:
            print(compare_streams(TorchBackend(model), candidate, streams).summary(), flush=True)


if __name__ == "__main__":
    main()
