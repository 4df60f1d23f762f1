"""Backend factory, runtime choice and missing runtimes: one clear message, never a traceback."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from export.runtime import BackendUnavailable
from export.verify import ParityReport
from models import create_model
from service.backends import factory
from service.backends import openvino as ov_backend
from service.cli import main


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Makes ``import module`` fail as if the package were not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("VIDENT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "vident-cache"))
    factory._CPU_CHOICES.clear()
    factory._CUDA_CHOICES.clear()


@pytest.mark.parametrize(("backend", "device", "package"), [
    ("openvino", "cpu", "openvino"),
    ("onnxruntime", "cpu", "onnxruntime"),
    ("tensorrt", "cuda", "tensorrt"),
])  # fmt: skip
def test_missing_runtime_names_the_package(monkeypatch, backend, device, package) -> None:
    _hide(monkeypatch, package)
    with pytest.raises(BackendUnavailable, match=f"'{package}'"):
        factory.create_backend("most-nss-tiny", backend, device)


def test_onnxruntime_cuda_without_gpu_provider_says_what_to_install(monkeypatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        factory.create_backend("most-nss-tiny", "onnxruntime", "cuda")


def test_cli_prints_one_line_and_exits_2_without_tensorrt(monkeypatch, capsys, tmp_path) -> None:
    _hide(monkeypatch, "tensorrt")
    code = main(["bench", "--model", "most-nss-tiny", "--backend", "tensorrt", "--device", "cuda",
                 "--size", "32x48", "--frames", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "'tensorrt' package is not installed" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code = main(["export", "tensorrt", "--onnx", str(tmp_path / "x.onnx"), "--model", "most-nss-tiny",
                 "--out", str(tmp_path / "x.plan")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "tensorrt" in err and "Traceback" not in err


def test_default_backend_follows_what_is_installed(monkeypatch) -> None:
    assert factory.default_backend("cpu") == "openvino"
    _hide(monkeypatch, "openvino")
    monkeypatch.setattr(factory, "_installed", lambda m: m != "openvino")
    assert factory.default_backend("cpu") == "onnxruntime"
    monkeypatch.setattr(factory, "_installed", lambda m: False)
    assert factory.default_backend("cpu") == "torch"
    assert factory.default_backend("cuda") == "torch"
    monkeypatch.setattr(factory, "_installed", lambda m: m != "tensorrt")  # onnxruntime(-gpu) is no reason
    assert factory.default_backend("cuda") == "torch"  # to leave the fp16 CUDA-graph path for fp32 ORT
    monkeypatch.setattr(factory, "_installed", lambda m: True)
    assert factory.default_backend("cuda") == "tensorrt"


def test_cuda_precision_is_fp16_only_where_parity_holds(monkeypatch) -> None:
    from export.verify import ParityReport

    def report(psnr: float) -> ParityReport:
        return ParityReport("torch/fp32", "torch/fp16", 1, 64, 96, 3, max_abs={"restored": 0.01}, psnr_db=psnr)

    network = create_model("most-nss-tiny").eval()
    asked: list[dict[str, object]] = []
    monkeypatch.setattr(factory, "cuda_parity", lambda n, device, **options: asked.append(options) or report(30.0))
    choice = factory.choose_cuda_precision(network, "cuda")
    assert (choice.backend, choice.precision) == ("torch", "fp32") and "parity fails" in choice.reason
    (options,) = asked
    streams = options.pop("streams")  # rendered frames at the served size, as the CPU's bf16 check
    shapes = [frame.shape for stream in streams for frame in stream]
    assert shapes == [(1, 3, *factory.CHECK_SIZE)] * (factory.CHECK_STREAMS * factory.CHECK_FRAMES)
    assert options == {"precision": "fp16", "cuda_graphs": True}  # the path that then serves
    factory._CUDA_CHOICES.clear()
    monkeypatch.setattr(factory, "cuda_parity", lambda n, device, **options: report(55.0))
    assert factory.choose_cuda_precision(network, "cuda").precision == "fp16"
    monkeypatch.setattr(factory, "cuda_parity", lambda *args, **options: pytest.fail("checked twice"))
    assert factory.choose_cuda_precision(network, "cuda").precision == "fp16"  # once per weights and GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
def test_auto_on_cuda_without_a_gpu_says_why(monkeypatch) -> None:
    monkeypatch.setattr(factory, "_installed", lambda m: False)
    with pytest.raises(BackendUnavailable, match="torch sees no CUDA GPU"):
        factory.create_backend("most-nss-tiny", "auto", "cuda", "auto")


def test_torch_backend_on_the_cpu_is_the_plain_reference() -> None:
    """CUDA-only options are refused or off on the CPU; ``infer_tensors`` and channels_last compute
    what ``infer`` does (the GPU fast path's plumbing, checked where it can be)."""
    from service.backends.torch import TorchBackend

    network = create_model("most-nss-tiny").eval()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        TorchBackend(network, "cpu", cuda_graphs=True)
    spec = network.spec
    rng = np.random.default_rng(0)
    feed = {"frame": rng.random((2, 3, 32, 48), np.float32), "reset": np.ones((2, 1, 1, 1), np.float32),
            **spec.initial_state(2, 32, 48)}  # fmt: skip
    with TorchBackend(network) as backend:
        assert (backend.cuda_graphs, backend.channels_last, backend.model) == (False, False, network)
        outputs = backend.infer(feed)
        tensors = backend.infer_tensors({k: torch.from_numpy(v) for k, v in feed.items()})
    assert list(tensors) == list(spec.output_names)
    for name in spec.output_names:
        np.testing.assert_array_equal(tensors[name].numpy(), outputs[name])
    with TorchBackend(create_model("most-nss-tiny").eval(), channels_last=True) as nhwc:
        nhwc.model.load_state_dict(network.state_dict())
        for name, value in nhwc.infer(feed).items():
            assert value.flags.c_contiguous, name
            np.testing.assert_allclose(value, outputs[name], atol=1e-5, err_msg=name)


def test_cpu_choice_uses_bf16_only_with_hardware_and_parity(monkeypatch) -> None:
    torch.manual_seed(0)
    network = create_model("most-nss-tiny").eval()
    monkeypatch.setattr(factory, "cpu_has_bf16", lambda: False)
    choice = factory.choose_cpu_backend(network)
    assert (choice.backend, choice.precision) == ("openvino", "fp32") and "no native bf16" in choice.reason

    factory._CPU_CHOICES.clear()
    monkeypatch.setattr(factory, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(factory, "bf16_parity_ok", lambda n: (False, "PSNR 12 dB"))
    choice = factory.choose_cpu_backend(network)
    assert choice.precision == "fp32" and "parity fails" in choice.reason

    factory._CPU_CHOICES.clear()
    monkeypatch.setattr(factory, "bf16_parity_ok", lambda n: (True, "ok"))
    assert factory.choose_cpu_backend(network).precision == "bf16"
    monkeypatch.setattr(factory, "bf16_parity_ok", lambda n: pytest.fail("checked twice"))
    assert factory.choose_cpu_backend(network).precision == "bf16"  # once per weights


def test_int8_is_refused_where_it_cannot_run(monkeypatch) -> None:
    from export.int8 import cached_int8, int8_available

    torch.manual_seed(0)
    r2d4 = create_model("r2-d4-tiny").eval()
    assert "lists no int8-tolerant layers" in int8_available(r2d4.spec)
    with pytest.raises(BackendUnavailable, match="lists no int8-tolerant layers"):
        cached_int8(r2d4, ov_backend.OpenVinoBackend)
    _hide(monkeypatch, "nncf")
    assert "needs the nncf package" in int8_available(create_model("most-nss-tiny").spec)
    with pytest.raises(BackendUnavailable, match="needs the nncf package"):
        factory.create_backend("most-nss-tiny", "openvino", "cpu", "int8")


def test_a_fixed_precision_skips_the_parity_checks(monkeypatch) -> None:
    monkeypatch.setattr(factory, "bf16_parity_ok", lambda n: pytest.fail("parity checked for a fixed precision"))
    with factory.create_backend("most-nss-tiny", "auto", "cpu", "fp32") as backend:
        assert (backend.info.name, backend.info.precision) == ("openvino", "fp32")


@pytest.mark.skipif(not factory.cpu_has_bf16(), reason="this CPU has no native bf16 (AMX / AVX512-BF16)")
def test_real_bf16_parity_check_passes_on_a_tiny_model() -> None:
    torch.manual_seed(0)
    ok, summary = factory.bf16_parity_ok(create_model("most-nss-tiny").eval(), cache=False)
    assert ok, summary
    assert "openvino/bf16 vs torch/fp32 (12 frames, b1, 320x416)" in summary and "rendered streams" in summary


def test_bf16_verdict_is_kept_per_weights(monkeypatch, tmp_path) -> None:
    """The check streams rendered frames at the served size, once per weights: a restart reads the verdict."""
    monkeypatch.setenv("VIDENT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(factory, "cached_onnx", lambda model: "no export needed")
    monkeypatch.setattr(factory, "OpenVinoBackend", lambda *a, **k: factory.TorchBackend(network))
    seen: list[tuple[int, ...]] = []

    def compare(reference, candidate, streams):
        seen.extend(frame.shape for stream in streams for frame in stream)
        return ParityReport("torch/fp32", "openvino/bf16", 1, 320, 416, len(seen), {"restored": 0.1}, psnr_db=30.0)

    monkeypatch.setattr(factory, "compare_streams", compare)
    torch.manual_seed(0)
    network = create_model("most-nss-tiny").eval()
    first = factory.bf16_parity_ok(network)
    assert not first[0] and "restored PSNR 30.0 dB" in first[1]
    assert factory.bf16_parity_ok(network) == first  # read back, not checked again
    assert seen == [(1, 3, *factory.CHECK_SIZE)] * (factory.CHECK_STREAMS * factory.CHECK_FRAMES)
    torch.manual_seed(1)
    assert not factory.bf16_parity_ok(create_model("most-nss-tiny").eval())[0]  # other weights: checked again
    assert len(seen) == 2 * factory.CHECK_STREAMS * factory.CHECK_FRAMES


def test_auto_backend_runs_and_matches_torch() -> None:
    backend = factory.create_backend("most-nss-tiny", "auto", "cpu", "auto")
    assert backend.info.name == factory.default_backend("cpu")
    spec = backend.spec
    feed = {"frame": np.random.rand(1, 3, 32, 48).astype(np.float32), "reset": np.ones((1, 1, 1, 1), np.float32)}
    outputs = backend.infer({**feed, **spec.initial_state(1, 32, 48)})
    assert set(outputs) == set(spec.output_names)
    assert outputs["restored"].shape == (1, 3, 32, 48) and np.isfinite(outputs["restored"]).all()
    backend.close()


def test_auto_precision_follows_the_cpu_choice(monkeypatch) -> None:
    # Both places that ask the CPU: the choice (factory) and the backend's own refusal (OpenVINO's plugin).
    monkeypatch.setattr(ov_backend, "runtime_has_bf16", lambda core: True)
    monkeypatch.setattr(factory, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(factory, "bf16_parity_ok", lambda n: (True, "ok"))
    assert factory.create_backend("most-nss-tiny", "openvino", "cpu", "auto").info.precision == "bf16"
    factory._CPU_CHOICES.clear()
    monkeypatch.setattr(factory, "cpu_has_bf16", lambda: False)
    assert factory.create_backend("most-nss-tiny", "openvino", "cpu", "auto").info.precision == "fp32"
    assert factory.create_backend("most-nss-tiny", "onnxruntime", "cpu", "auto").info.precision == "fp32"


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend 'tflite'"):
        factory.create_backend("most-nss-tiny", "tflite")


def _tensorrt_ready() -> str | None:
    try:
        from export.trt import import_tensorrt

        import_tensorrt()
    except BackendUnavailable as exc:
        return str(exc)
    return None


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(_tensorrt_ready() is not None, reason=f"TensorRT tests need it: {_tensorrt_ready()}")
def test_tensorrt_fp16_engine_matches_onnxruntime(tmp_path) -> None:
    from export.onnx import export_onnx
    from export.trt import ShapeRange, build_engine
    from export.verify import compare_backends
    from service.backends.onnxrt import OrtBackend
    from service.backends.tensorrt import TrtBackend

    network = create_model("most-nss-tiny").eval()
    path = export_onnx(network, tmp_path / "m.onnx")
    shapes = ShapeRange((1, 32, 48), (1, 64, 96), (2, 96, 128))
    build = build_engine(path, network.spec, tmp_path / "m.plan", fp16=True, shapes=shapes)
    assert build.path.is_file() and build.layer_count > 0
    with OrtBackend(network.spec, path) as reference, TrtBackend(network.spec, build.path) as engine:
        for batch, height, width in ((1, 64, 96), (2, 48, 80)):  # two shapes in one profile
            report = compare_backends(reference, engine, batch, height, width, frames=10)
            assert report.within_reduced(psnr=45.0, iou=0.99, mace=0.05), report.summary()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_onnxruntime_cuda_matches_torch() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from export.verify import compare_backends

    network = create_model("most-nss-tiny").eval()
    reference = factory.backend_for(network, "torch", "cuda")
    candidate = factory.backend_for(network, "onnxruntime", "cuda")
    with reference, candidate:
        report = compare_backends(reference, candidate, 1, 64, 96, frames=3)
    assert report.worst_abs < 1e-3, report.summary()
