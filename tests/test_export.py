"""Export round trip: ONNX graphs with explicit state match torch over a stream, at two sizes, in every CPU runtime."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from parity import assert_same_outputs

from export.onnx import cached_onnx, export_onnx, graph_io, weights_hash
from export.runtime import Backend, BackendInfo
from export.triton import export_triton, parse_pbtxt, triton_graph, validate_repository
from export.verify import (
    FP32_MAX_ABS,
    compare_backends,
    compare_streams,
    confident_mask_iou,
    exercise_untrained,
    mask_iou,
)
from models import create_model
from models.spec import ModelSpec
from service.backends.factory import backend_for, cpu_has_bf16
from service.backends.onnxrt import OrtBackend
from service.backends.openvino import OpenVinoBackend
from service.backends.torch import TorchBackend

# (batch, height, width): two sizes and two batch sizes from one exported file.
SHAPES = ((1, 64, 96), (2, 48, 80))
TINY = ("most-nss-tiny", "r2-d4-tiny")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch) -> None:
    """Exports and rewritten graphs go to a temporary cache, never the user's ~/.cache/vident."""
    monkeypatch.setenv("VIDENT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "vident-cache"))


@pytest.fixture(scope="module", params=TINY)
def exported(request, tmp_path_factory) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = exercise_untrained(create_model(request.param).eval())  # real masks and homographies to compare
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    return model, path


def test_graph_has_spec_names_and_dynamic_axes(exported) -> None:
    model, path = exported
    spec = model.spec
    io = graph_io(path)
    assert list(io) == [*spec.input_names, *spec.output_names]
    assert all(dtype == "FLOAT" for dtype, _ in io.values())
    frame_dims = io[spec.frame.name][1]
    assert frame_dims == ("batch", 3, "height", "width")
    for state in spec.states:
        dims = io[state.name][1]
        assert dims[0] == "batch" and dims[1] == state.tensor.channels
        assert all(isinstance(d, str) for d in dims[2:]), f"{state.name} is frozen at {dims}"
        assert io[state.next_name][1] == dims
    import onnx

    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.graph.initializer)  # embedded


@pytest.mark.parametrize("runtime", [OrtBackend, OpenVinoBackend])
def test_fp32_runtimes_match_torch_over_a_stream(exported, runtime) -> None:
    model, path = exported
    with TorchBackend(model) as reference, runtime(model.spec, path) as candidate:
        for batch, height, width in SHAPES:
            report = compare_backends(reference, candidate, batch, height, width, frames=3)
            assert report.within_fp32(), report.summary()
            assert report.worst_abs <= FP32_MAX_ABS
            assert set(report.max_abs) == set(model.spec.output_names)  # state compared too
            if report.mace_px is not None:  # MOST: geometry and thresholds really exercised
                assert report.mace_px <= 1e-3 and report.mask_iou_confident >= 0.999, report.summary()


def test_parity_loop_detects_a_wrong_state(exported) -> None:
    """A runtime that drops the state must fail the loop: the check can fail for a real reason."""
    model, path = exported

    class Forgetful(OrtBackend):
        def _infer(self, feed):  # noqa: ANN001, ANN202
            zeros = {n: np.zeros_like(v) for n, v in feed.items() if n not in ("frame", "reset")}
            return super()._infer({**feed, **zeros})

    with TorchBackend(model) as reference, Forgetful(model.spec, path) as candidate:
        report = compare_backends(reference, candidate, 1, 64, 96, frames=3)
    assert not report.within_fp32()


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16 (AMX / AVX512-BF16)")
def test_openvino_bf16_stays_close_to_fp32(exported) -> None:
    model, path = exported
    with TorchBackend(model) as reference, OpenVinoBackend(model.spec, path, precision="bf16") as candidate:
        report = compare_backends(reference, candidate, 1, 64, 96, frames=3)
    # PSNR >= 40 dB, decided-mask IoU >= 0.99, MACE <= 0.05 px (geometry kept fp32 by the MatMul rewrite)
    assert report.within_reduced(), report.summary()
    assert 0 < report.worst_abs < 0.1  # bf16 really ran (not fp32) and stayed close


def test_openvino_graph_has_no_matmul_and_computes_the_same(exported, tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    from export.openvino import elementwise_matmuls

    _, path = exported
    rewritten = tmp_path / "rewritten.onnx"
    count = elementwise_matmuls(path, rewritten)
    ops = [n.op_type for n in onnx.load(str(rewritten)).graph.node]
    assert "MatMul" not in ops and ops.count("ReduceSum") >= count
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (path, rewritten)]
    model = exported[0]
    feed = {"frame": np.random.rand(2, 3, 48, 80).astype(np.float32), "reset": np.zeros((2, 1, 1, 1), np.float32)}
    feed |= {k: np.random.rand(*v.shape).astype(np.float32) for k, v in model.spec.initial_state(2, 48, 80).items()}
    names = [o.name for o in sessions[0].get_outputs()]
    expected, got = (s.run(None, feed) for s in sessions)
    assert_same_outputs(names, got, expected, 48, 80, rtol=1e-7)  # numpy's assert_allclose default


def test_openvino_compiles_once_per_shape(exported) -> None:
    model, path = exported
    with OpenVinoBackend(model.spec, path) as backend:
        for batch, height, width in (*SHAPES, SHAPES[0]):
            feed = {"frame": np.random.rand(batch, 3, height, width).astype(np.float32)}
            feed |= {"reset": np.ones((batch, 1, 1, 1), np.float32), **model.spec.initial_state(batch, height, width)}
            outputs = backend.infer(feed)
            assert outputs[model.spec.outputs[0].name].shape == (batch, 3, height, width)
        assert len(backend.compiled_shapes) == 2


def test_openvino_shapes_beyond_the_static_budget_share_one_dynamic_compilation(exported) -> None:
    """Memory stays bounded for clients of many frame sizes, and the dynamic path computes the same."""
    model, path = exported
    with TorchBackend(model) as reference, OpenVinoBackend(model.spec, path, max_static_shapes=1) as candidate:
        for batch, height, width in SHAPES:
            report = compare_backends(reference, candidate, batch, height, width, frames=3)
            assert report.within_fp32(), report.summary()
        assert candidate.compiled_shapes == [(SHAPES[0][0], 3, *SHAPES[0][1:])]
        assert candidate.uses_dynamic


def test_cache_exports_once_per_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VIDENT_CACHE_DIR", str(tmp_path))
    model = create_model("most-nss-tiny").eval()
    first = cached_onnx(model)
    mtime = first.stat().st_mtime_ns
    assert cached_onnx(model) == first and first.stat().st_mtime_ns == mtime  # loaded, not exported again
    other = create_model("most-nss-tiny").eval()  # new random weights
    assert weights_hash(other) != weights_hash(model)
    assert cached_onnx(other) != first
    refined = create_model("most-nss-tiny", homography_refine=((2, 1),)).eval()
    refined.load_state_dict(model.state_dict())  # same weights, another graph: a stale export would be wrong
    assert weights_hash(refined) != weights_hash(model)
    assert first.parent == tmp_path / "onnx"
    assert backend_for(model, "onnxruntime").onnx_path == first


class _Fixed(Backend):
    """Returns the same outputs whatever the feed: a runner whose differences are known."""

    def __init__(self, spec: ModelSpec, outputs: dict[str, np.ndarray]) -> None:
        super().__init__(spec, BackendInfo("fixed", "cpu", "fp32"))
        self.outputs = outputs

    def _load(self) -> None:
        return None

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.outputs


def test_parity_measures() -> None:
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., :4] = 1
    shifted = np.roll(mask, 2, axis=-1)
    assert mask_iou(mask, shifted) == pytest.approx(16 / 48)
    assert mask_iou(mask * 0, mask * 0) == 1.0
    undecided = np.full((1, 1, 8, 8), 0.5, np.float32)
    undecided[..., 0, 0] = 0.9
    flipped = undecided + np.float32(0.001)  # every undecided pixel flips, the decided one stays
    assert mask_iou(undecided, flipped) == pytest.approx(1 / 64)
    assert confident_mask_iou(undecided, flipped) == 1.0
    assert confident_mask_iou(np.full_like(undecided, 0.5), flipped) is None


def test_parity_report_of_known_differences() -> None:
    """PSNR (clipped), mask IoU and MACE of a candidate that is off by known amounts."""
    spec = create_model("most-nss-tiny").spec
    restored = np.random.default_rng(0).random((1, 3, 32, 48), dtype=np.float32)
    mask = np.zeros((1, 1, 32, 48), np.float32)
    mask[..., :24] = 1
    shift = np.eye(3, dtype=np.float32)[None].copy()
    shift[0, 0, 2] = 0.5  # every corner moves half a pixel
    state = {s.next_name: np.zeros(s.tensor.shape(1, 32, 48), np.float32) for s in spec.states}
    reference = _Fixed(spec, {"restored": restored, "teeth_mask": mask, "homography": np.eye(3, dtype=np.float32)[None],
                              **state})  # fmt: skip
    candidate = _Fixed(spec, {"restored": np.clip(restored + 0.01, 0, 1), "teeth_mask": np.roll(mask, 12, axis=-1),
                              "homography": shift, **state})  # fmt: skip
    report = compare_streams(reference, candidate, [[restored] * 3])
    assert report.frames == 3 and report.psnr_db == pytest.approx(40.0, abs=0.5)
    assert report.mask_iou == pytest.approx(12 / 36) and report.mask_iou_confident == pytest.approx(12 / 36)
    assert report.mace_px == pytest.approx(0.5)
    same = compare_streams(reference, reference, [[restored]])
    assert same.psnr_db == float("inf") and same.mace_px == 0.0 and same.within_fp32()


# ------------------------------------------------------------------------------------------------
# Triton repository
# ------------------------------------------------------------------------------------------------


def test_triton_repository_matches_the_graph(exported, tmp_path) -> None:
    model, path = exported
    spec = model.spec
    (model_dir,) = export_triton(path, spec, tmp_path, 64, 96, max_batch=4)
    assert validate_repository(model_dir) == []
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config["platform"] == ["onnxruntime_onnx"] and config["max_batch_size"] == [4]
    assert [i["name"][0] for i in config["input"]] == [spec.frame.name]
    assert [o["name"][0] for o in config["output"]] == [o.name for o in spec.outputs]
    batcher = config["sequence_batching"][0]
    states = {s["input_name"][0]: s for s in batcher["state"]}
    assert list(states) == [s.name for s in spec.states]
    for state in spec.states:
        entry = states[state.name]
        assert entry["output_name"] == [state.next_name]
        assert entry["dims"] == list(state.tensor.shape(1, 64, 96)[1:])
        assert entry["initial_state"][0]["zero_data"] == [True]
    (control,) = batcher["control_input"]
    assert control["name"] == [spec.reset.name]
    assert control["control"][0]["kind"] == ["CONTROL_SEQUENCE_START"]
    io = graph_io(model_dir / "1" / "model.onnx")
    assert io[spec.reset.name][1] == ("batch", 1)  # Triton's control tensor shape


def test_triton_validation_catches_mismatches(exported, tmp_path) -> None:
    model, path = exported
    (model_dir,) = export_triton(path, model.spec, tmp_path, 64, 96)
    config = model_dir / "config.pbtxt"
    text = config.read_text()
    state = model.spec.states[0]
    config.write_text(text.replace(f'output_name: "{state.next_name}"', 'output_name: "nope"'))
    errors = validate_repository(model_dir)
    assert any("'nope' is not in the graph" in e for e in errors)
    assert any(state.next_name in e for e in errors)  # the real output is now unmentioned
    config.write_text(text.replace("dims: [ 3, 64, 96 ]", "dims: [ 4, 64, 96 ]", 1))
    assert any("config dims [4, 64, 96]" in e for e in validate_repository(model_dir))


def test_triton_graph_runs_with_a_2d_reset(exported, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, path = exported
    spec = model.spec
    adapted = triton_graph(path, tmp_path / "triton.onnx", spec)
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    triton = ort.InferenceSession(str(adapted), providers=["CPUExecutionProvider"])
    feed = {"frame": np.random.rand(2, 3, 48, 80).astype(np.float32), **spec.initial_state(2, 48, 80)}
    reset = np.array([1.0, 0.0], np.float32)
    expected = original.run(None, {**feed, "reset": reset.reshape(2, 1, 1, 1)})
    got = triton.run(None, {**feed, "reset": reset.reshape(2, 1)})
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)


def test_pbtxt_parser_reads_nested_and_repeated_fields() -> None:
    parsed = parse_pbtxt('a: 1 # comment\nb { c: "x" d: [ 1, 2 ] } b { c: "y" } e: [ { f: ENUM } ] g: true')
    assert parsed == {"a": [1], "b": [{"c": ["x"], "d": [1, 2]}, {"c": ["y"]}], "e": [{"f": ["ENUM"]}], "g": [True]}


def test_int8_quantises_only_the_listed_modules_and_is_cached(monkeypatch) -> None:
    import openvino as ov

    import export.int8
    from export.int8 import cached_int8

    torch.manual_seed(0)
    model = exercise_untrained(create_model("most-nss-tiny").eval())
    build = cached_int8(model, OpenVinoBackend, size=(64, 96), sequences=2)
    assert build.seconds > 0 and build.path.is_file() and build.path.with_suffix(".bin").is_file()
    consumers = [
        target.get_node()
        for op in ov.Core().read_model(str(build.path)).get_ops()
        if op.get_type_name() == "FakeQuantize"
        for output in op.outputs()
        for target in output.get_target_inputs()
    ]
    assert any(n.get_type_name() == "Convolution" for n in consumers)  # something really is int8
    allowed = tuple(f"/{m}/" for m in model.spec.int8_modules)
    outside = sorted({n.get_friendly_name() for n in consumers if not n.get_friendly_name().startswith(allowed)})
    assert not outside, f"quantised outside {model.spec.int8_modules}: {outside[:5]}"
    # The parity report is of a real int8 run: features differ from fp32, the outputs stay within limits.
    assert build.parity["max_abs"]["next_features_s1"] > 1e-4
    assert build.within_limits and build.parity["psnr_db"] >= 40, build.summary()

    monkeypatch.setattr(export.int8, "quantize", lambda *a, **k: pytest.fail("rebuilt although cached"))
    again = cached_int8(model, OpenVinoBackend, size=(64, 96), sequences=2)
    assert (again.path, again.parity, again.seconds) == (build.path, build.parity, 0.0)


def test_openvino_int8_needs_its_quantised_model(exported) -> None:
    model, path = exported
    with pytest.raises(ValueError, match="int8 runs the quantised IR"):
        OpenVinoBackend(model.spec, path, precision="int8")
    with pytest.raises(ValueError, match="int8 runs the quantised IR"):
        OpenVinoBackend(model.spec, path, precision="bf16", int8_model=path)
