"""The torch GPU fast path (service/backends/torch.py) against torch fp32: fp16 eager, fp16 CUDA graphs
and bf16 CUDA graphs over a 10-frame stream with the state carried, and the graph mechanics.

Every test needs a CUDA GPU and skips without one. The file imports only torch, numpy and the
project's models / export / backend modules, so it also runs where the service's web stack is not
installed (tools/gpu_run.py runs it with `pytest -m gpu` on the device machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.verify import REDUCED_MACE_PX, REDUCED_MASK_IOU, REDUCED_PSNR_DB, exercise_untrained, moving_frames
from models import create_model
from models.checkpoints import load_model
from service.backends import factory
from service.backends.torch import TorchBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the torch fast path runs on CUDA)"),
]

# Batch 2 so batched streams are covered; small, because the fp32 reference runs on the CPU (on the
# 2 threads conftest.py allows). tools/gpu_run.py checks the same shape when pytest is missing.
PARITY_SHAPE = (2, 96, 128)
PARITY_FRAMES = 10


def _network(name: str) -> torch.nn.Module:
    network, checkpoint = load_model(name)
    return network if checkpoint is not None else exercise_untrained(network)


@pytest.mark.parametrize("variant", list(factory.CUDA_VARIANTS))
@pytest.mark.parametrize("name", ["most-nss", "r2-d4"])
def test_fast_path_matches_torch_fp32(name: str, variant: str) -> None:
    report = factory.cuda_parity(_network(name), "cuda", *PARITY_SHAPE, frames=PARITY_FRAMES,
                                 **factory.CUDA_VARIANTS[variant])  # fmt: skip
    summary = report.summary()
    assert report.psnr_db is not None and report.psnr_db >= REDUCED_PSNR_DB, summary
    if report.mask_iou is not None:  # MOST: mask and homography too
        assert report.mask_iou_confident is not None, f"masks undecided, nothing to compare: {summary}"
        assert report.mask_iou_confident >= REDUCED_MASK_IOU, summary
        assert report.mace_px is not None and report.mace_px <= REDUCED_MACE_PX, summary
    assert report.within_reduced(), summary


def _feed(spec, frame: np.ndarray, reset: float) -> dict[str, torch.Tensor]:  # noqa: ANN001
    batch, _, height, width = frame.shape
    state = {k: torch.from_numpy(v).cuda() for k, v in spec.initial_state(batch, height, width).items()}
    return {spec.frame.name: torch.from_numpy(frame).cuda(),
            spec.reset.name: torch.full((batch, 1, 1, 1), reset, device="cuda"), **state}  # fmt: skip


def test_graphs_replay_what_eager_computes_and_outputs_survive_the_next_replay() -> None:
    network = create_model("most-nss-tiny").eval()
    spec = network.spec
    frames = list(moving_frames(1, 64, 96, 3))
    with TorchBackend(network, "cuda", cuda_graphs=False) as eager, TorchBackend(network, "cuda") as graphs:
        assert graphs.cuda_graphs and graphs.channels_last and graphs.model is not network
        want, have = [], []
        for backend, results in ((eager, want), (graphs, have)):
            feed = _feed(spec, frames[0], 1.0)
            for t, frame in enumerate(frames):
                feed = {**feed, spec.frame.name: torch.from_numpy(frame).cuda(),
                        spec.reset.name: torch.full((1, 1, 1, 1), float(t == 0), device="cuda")}  # fmt: skip
                outputs = backend.infer_tensors(feed)
                results.append(outputs)  # kept: a later replay must not overwrite them
                feed.update({s.name: outputs[s.next_name] for s in spec.states})
        assert graphs.captured_shapes == [(1, 64, 96)]  # captured once, replayed for every frame
    assert next(network.parameters()).device.type == "cpu"  # the backends ran copies
    for t, (a, b) in enumerate(zip(want, have, strict=True)):
        for name in spec.output_names:
            torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-4, msg=f"frame {t}: {name}")


def test_one_graph_per_shape_least_recently_used_dropped_and_wrong_shapes_refused() -> None:
    network = create_model("r2-d4-tiny").eval()
    spec = network.spec
    with TorchBackend(network, "cuda", precision="fp16", max_graphs=2) as backend:
        for batch, height, width in ((1, 32, 48), (2, 32, 48), (1, 64, 96), (2, 32, 48)):
            frame = np.random.rand(batch, 3, height, width).astype(np.float32)
            feed = {spec.frame.name: frame, spec.reset.name: np.ones((batch, 1, 1, 1), np.float32),
                    **spec.initial_state(batch, height, width)}  # fmt: skip
            outputs = backend.infer(feed)
            assert outputs["restored"].shape == (batch, 3, height, width)
            assert outputs["restored"].dtype == np.float32 and np.isfinite(outputs["restored"]).all()
        assert backend.captured_shapes == [(1, 64, 96), (2, 32, 48)]
        state = spec.initial_state(2, 32, 48)
        first = spec.states[0].name
        state[first] = np.zeros((2, *state[first].shape[1:-1], state[first].shape[-1] + 8), np.float32)
        with pytest.raises(ValueError, match=f"{first} has shape"):
            backend.infer({spec.frame.name: np.zeros((2, 3, 32, 48), np.float32),
                           spec.reset.name: np.ones((2, 1, 1, 1), np.float32), **state})  # fmt: skip


def test_auto_on_cuda_serves_the_checked_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "_installed", lambda module: module != "tensorrt")
    factory._CUDA_CHOICES.clear()
    with factory.create_backend("most-nss", "auto", "cuda", "auto") as backend:
        assert (backend.info.name, backend.info.precision) == ("torch", "fp16")
        assert isinstance(backend, TorchBackend) and backend.cuda_graphs
