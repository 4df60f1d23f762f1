"""ONNX export of a streaming network: every state tensor an explicit graph input and output.

The graph's tensor names are the model spec's (``frame``, ``reset``, the state names; the outputs
then the next-state names), so ONNX Runtime, OpenVINO, TensorRT and Triton all read feeds built by
one pipeline. Batch, height and width are dynamic: a state at stride ``s`` gets the dims
``height_div{s}`` / ``width_div{s}``, which keeps the relation to the frame visible in the graph.

The TorchScript exporter (``dynamo=False``) is used: it handles ``grid_sample``, pixel shuffle and
adaptive pooling of these networks without graph breaks, and the geometry in ``models.layers``
builds its grids from traced shapes, so one file runs at every size (the tests check two sizes).

Exports are cached on disk, keyed by model name and a hash of the weights, so a backend that reads
ONNX (``create_backend("most-nss", backend="openvino")``) exports once and then only loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.spec import ModelSpec, TensorSpec

OPSET = 17
# Bump when the export recipe changes, so stale cached graphs are not reused.
EXPORT_VERSION = "1"
# Traced at a small size: the graph is dynamic, and a small trace keeps export fast.
TRACE_SIZE = (64, 96)
# Cached graphs kept per model name (see _prune).
CACHE_KEEP = 4


def cache_dir() -> Path:
    """``$VIDENT_CACHE_DIR`` or ``~/.cache/vident``: exported graphs and engines live here."""
    root = os.environ.get("VIDENT_CACHE_DIR") or Path.home() / ".cache" / "vident"
    return Path(root)


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, values) and the layout, 16 hex digits.

    Equal weights build different graphs under another layout (a MOST structure, the homography
    refinement, which adds no weights), so the layout a checkpoint records is part of the key.
    """
    digest = hashlib.sha256()
    digest.update(model.spec.name.encode())  # type: ignore[attr-defined]
    layout = getattr(model, "layout_metadata", None)
    if layout is not None:
        digest.update(json.dumps(layout(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _dim_names(tensor: TensorSpec) -> dict[int, str]:
    if tensor.kind != "map":
        return {0: "batch"}
    if tensor.stride == 1:
        return {0: "batch", 2: "height", 3: "width"}
    return {0: "batch", 2: f"height_div{tensor.stride}", 3: f"width_div{tensor.stride}"}


def dynamic_axes(spec: ModelSpec) -> dict[str, dict[int, str]]:
    """Symbolic dims for every input and output of the streaming graph."""
    axes = {spec.frame.name: _dim_names(spec.frame), spec.reset.name: _dim_names(spec.reset)}
    for output in spec.outputs:
        axes[output.name] = _dim_names(output)
    for state in spec.states:
        axes[state.name] = _dim_names(state.tensor)
        axes[state.next_name] = _dim_names(state.tensor)
    return axes


def example_inputs(
    spec: ModelSpec, batch: int, height: int, width: int, reset: float = 0.0
) -> tuple[torch.Tensor, ...]:
    frame = torch.rand(batch, 3, height, width)
    state = [torch.from_numpy(v) for v in spec.initial_state(batch, height, width).values()]
    return (frame, torch.full((batch, 1, 1, 1), reset), *state)


def export_onnx(
    model: nn.Module, path: str | Path, opset: int = OPSET, trace_size: tuple[int, int] = TRACE_SIZE
) -> Path:
    """Writes the streaming graph of ``model`` to ``path`` with embedded weights and checks it with onnx."""
    import onnx

    if opset < 17:
        raise ValueError(f"opset {opset}: the streaming graphs need opset >= 17 (the tested floor)")
    spec: ModelSpec = model.spec  # type: ignore[attr-defined]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    # reset = 0 in the trace: both branches of `reset * f_t + keep * state` are data, not control
    # flow, so the traced graph is valid for either value; 0 keeps the state inputs live.
    args = example_inputs(spec, 2, *trace_size)
    with warnings.catch_warnings():
        # The tracer warns about every Python-int size it sees; models.layers routes the sizes that
        # matter through tensors, and the two-size parity test is what proves the graph dynamic.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_axes=dynamic_axes(spec),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    graph.doc_string = f"vident streaming graph of {spec.name}; weights {weights_hash(model)}"
    onnx.save(graph, str(path))
    return path


def cached_onnx(model: nn.Module) -> Path:
    """The exported graph for ``model`` from the cache, exporting it first if needed.

    Writes to a temporary file then renames, so two processes exporting at once never leave a
    half-written graph for a third to load.
    """
    spec: ModelSpec = model.spec  # type: ignore[attr-defined]
    key = f"{spec.name}-{weights_hash(model)}-opset{OPSET}-v{EXPORT_VERSION}"
    target = cache_dir() / "onnx" / f"{key}.onnx"
    if target.is_file():
        return target
    write_atomically(target, lambda tmp: export_onnx(model, tmp))
    _prune(target.parent, spec.name)
    return target


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes, 16 hex digits: the cache key of everything derived from an exported graph."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def write_atomically(target: Path, write: Callable[[str], object]) -> Path:
    """Calls ``write(tmp)`` for a temporary file beside ``target``, then renames it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache (a container volume) must stay readable
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _prune(folder: Path, model_name: str) -> None:
    """Keeps the newest :data:`CACHE_KEEP` graphs per model name.

    Models without a checkpoint get fresh random weights in every process, hence a new hash and a
    new export each time; without pruning the cache would grow by one graph per start.
    """
    pattern = re.compile(rf"{re.escape(model_name)}-[0-9a-f]{{16}}-opset\d+-v.+\.onnx")
    graphs = sorted((p for p in folder.glob("*.onnx") if pattern.fullmatch(p.name)), key=lambda p: p.stat().st_mtime)
    for stale in graphs[:-CACHE_KEEP]:
        stale.unlink(missing_ok=True)


def graph_io(path: str | Path) -> dict[str, tuple[str, tuple[int | str, ...]]]:
    """name -> (element type, dims) for every input and output of an ONNX file; dims are ints or symbols."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    result: dict[str, tuple[str, tuple[int | str, ...]]] = {}
    for value in (*graph.input, *graph.output):
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim)
        result[value.name] = (onnx.TensorProto.DataType.Name(tensor_type.elem_type), dims)
    return result
