"""Triton Inference Server model repository for a streaming graph (sequence batcher, implicit state).

Triton keeps each sequence's state on the server (implicit state): the state tensors are listed in
``sequence_batching.state`` instead of ``input``/``output``, and the client sends only ``frame``
with a sequence id. The START control flag is delivered in the ``reset`` tensor, which is exactly
the network's own reset input, so a new sequence starts the way a new session does in vident.

Two adaptations of the ONNX graph, both because of Triton's rules rather than the network:
- A control tensor has shape (batch, 1), ours is (batch, 1, 1, 1): the repository's graph takes
  ``reset`` as (batch, 1) and unsqueezes it in front of the original graph.
- Initial state dims must be fixed, so a repository serves one frame size (``--size``, default
  320x416; clients pad to it, as :class:`service.pipeline.Geometry` does). Batch stays dynamic.

:func:`parse_pbtxt` and :func:`validate_repository` check a written config against its graph
(names, dtypes, dims); the export runs them, and so do the tests.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from export.onnx import graph_io
from models.spec import ModelSpec, TensorSpec

CONTROL_SHAPE_NAME = "reset_4d"  # the original (batch, 1, 1, 1) reset inside the repository's graph


def triton_graph(onnx_path: str | Path, out: str | Path, spec: ModelSpec) -> Path:
    """Copies the graph with ``reset`` as a (batch, 1) input (a Triton control tensor)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    reset = spec.reset.name
    for node in graph.node:
        node.input[:] = [CONTROL_SHAPE_NAME if name == reset else name for name in node.input]
    for value in graph.input:
        if value.name == reset:
            dims = value.type.tensor_type.shape.dim
            del dims[2:]  # (batch, 1, 1, 1) -> (batch, 1)
    graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), "reset_unsqueeze_axes"))
    graph.node.insert(0, helper.make_node("Unsqueeze", [reset, "reset_unsqueeze_axes"], [CONTROL_SHAPE_NAME]))
    onnx.checker.check_model(model)
    assert graph.input[[v.name for v in graph.input].index(reset)].type.tensor_type.elem_type == TensorProto.FLOAT
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def _dims(tensor: TensorSpec, height: int, width: int) -> list[int]:
    return list(tensor.shape(1, height, width)[1:])  # without the batch dim (max_batch_size > 0)


def _tensor_block(name: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, dims))} ] }}'


def config_pbtxt(
    spec: ModelSpec, name: str, height: int, width: int, max_batch: int = 8, platform: str = "onnxruntime_onnx"
) -> str:
    """The config.pbtxt text: inputs/outputs without state, sequence batcher with implicit state."""
    states = []
    for state in spec.states:
        dims = ", ".join(map(str, _dims(state.tensor, height, width)))
        states.append(
            f'    {{ input_name: "{state.name}" output_name: "{state.next_name}"\n'
            f"      data_type: TYPE_FP32 dims: [ {dims} ]\n"
            f'      initial_state: {{ name: "zeros" data_type: TYPE_FP32 dims: [ {dims} ] zero_data: true }} }}'
        )
    outputs = ",\n".join(_tensor_block(o.name, _dims(o, height, width)) for o in spec.outputs)
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO"
    return (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
        f"input [\n{_tensor_block(spec.frame.name, _dims(spec.frame, height, width))}\n]\n"
        f"output [\n{outputs}\n]\n"
        "sequence_batching {\n"
        "  max_sequence_idle_microseconds: 10000000\n"
        "  control_input [\n"
        f'    {{ name: "{spec.reset.name}"\n'
        "      control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] }\n"
        "  ]\n"
        "  state [\n" + ",\n".join(states) + "\n  ]\n"
        "}\n"
        f"instance_group [ {{ kind: {kind} count: 1 }} ]\n"
    )


def export_triton(
    onnx_path: str | Path,
    spec: ModelSpec,
    out_dir: str | Path,
    height: int = 320,
    width: int = 416,
    max_batch: int = 8,
    name: str | None = None,
    plan: str | Path | None = None,
) -> list[Path]:
    """Writes ``out_dir/<name>/{config.pbtxt,1/model.onnx}`` (and ``<name>-tensorrt`` with ``plan``).

    ``plan`` must be an engine built from this repository's graph (``reset`` of shape (batch, 1)).
    Returns the model directories written, each validated against its graph.
    """
    spec.check_size(height, width)
    name = name or spec.name
    root = Path(out_dir)
    model_dir = root / name
    triton_graph(onnx_path, model_dir / "1" / "model.onnx", spec)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(spec, name, height, width, max_batch))
    written = [model_dir]
    if plan is not None:
        plan_dir = root / f"{name}-tensorrt"
        (plan_dir / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plan, plan_dir / "1" / "model.plan")
        config = config_pbtxt(spec, f"{name}-tensorrt", height, width, max_batch, platform="tensorrt_plan")
        (plan_dir / "config.pbtxt").write_text(config)
        written.append(plan_dir)
    errors = validate_repository(model_dir)
    if errors:
        raise ValueError(f"{model_dir}: config does not match the graph: " + "; ".join(errors))
    return written


# ----------------------------------------------------------------------------------------------
# Protobuf text format: just enough to read back a model config
# ----------------------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"pbtxt: cannot read {text[pos : pos + 20]!r}")
            break
        pos = match.end()
        if match.group(1) is None:
            tokens.append(next(g for g in match.groups()[1:] if g is not None))
    return tokens


def _scalar(token: str) -> object:
    if token.startswith('"'):
        return token[1:-1]
    for cast in (int, float):
        try:
            return cast(token)
        except ValueError:
            continue
    return {"true": True, "false": False}.get(token, token)  # enums stay strings


def parse_pbtxt(text: str) -> dict[str, list]:
    """Protobuf text format -> {field: [values]} (every field a list, as repeated and singular look alike)."""
    tokens = _tokens(text)
    position = 0

    def message(closing: str | None) -> dict[str, list]:
        nonlocal position
        fields: dict[str, list] = {}
        while position < len(tokens) and tokens[position] != closing:
            key = tokens[position]
            position += 1
            if tokens[position] == ":":
                position += 1
            fields.setdefault(key, []).extend(value())
            if position < len(tokens) and tokens[position] == ",":
                position += 1
        position += 1  # the closing brace (or past the end)
        return fields

    def value() -> list:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "{":
            return [message("}")]
        if token == "[":
            items = []
            while tokens[position] != "]":
                items.extend(value())
                if tokens[position] == ",":
                    position += 1
            position += 1
            return items
        return [_scalar(token)]

    return message(None)


def _compatible(config_dims: list[int], graph_dims: tuple[int | str, ...]) -> bool:
    """Config dims (no batch) against graph dims (batch first); symbolic graph dims accept any size."""
    if len(config_dims) + 1 != len(graph_dims):
        return False
    return all(isinstance(g, str) or g == c for c, g in zip(config_dims, graph_dims[1:], strict=True))


def validate_repository(model_dir: str | Path) -> list[str]:
    """Mismatches between ``config.pbtxt`` and ``1/model.onnx``: names, dtypes, dims, coverage."""
    model_dir = Path(model_dir)
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    graph = graph_io(model_dir / "1" / "model.onnx")
    errors: list[str] = []
    covered: set[str] = set()

    def check(name: str, dtype: str, dims: list[int], where: str) -> None:
        covered.add(name)
        if name not in graph:
            errors.append(f"{where} {name!r} is not in the graph")
            return
        graph_type, graph_dims = graph[name]
        if dtype != "TYPE_FP32" or graph_type != "FLOAT":
            errors.append(f"{where} {name!r}: config {dtype} vs graph {graph_type}")
        if not _compatible(dims, graph_dims):
            errors.append(f"{where} {name!r}: config dims {dims} (+ batch) vs graph {list(graph_dims)}")

    for entry in config.get("input", []):
        check(entry["name"][0], entry["data_type"][0], entry["dims"], "input")
    for entry in config.get("output", []):
        check(entry["name"][0], entry["data_type"][0], entry["dims"], "output")
    batcher = (config.get("sequence_batching") or [{}])[0]
    for state in batcher.get("state", []):
        dims = state["dims"]
        check(state["input_name"][0], state["data_type"][0], dims, "state input")
        check(state["output_name"][0], state["data_type"][0], dims, "state output")
        for initial in state.get("initial_state", []):
            if initial["dims"] != dims:
                errors.append(f"state {state['input_name'][0]!r}: initial_state dims {initial['dims']} != {dims}")
    for control in batcher.get("control_input", []):
        check(control["name"][0], "TYPE_FP32", [1], "control input")
    missing = sorted(set(graph) - covered)
    if missing:
        errors.append(f"graph tensors the config does not mention: {missing}")
    if int((config.get("max_batch_size") or [0])[0]) < 1:
        errors.append("max_batch_size must be >= 1 for the sequence batcher to batch sequences")
    return errors
