"""The import contract: dependencies point one way, models -> export -> service -> benchmarks.

A lower layer never imports a higher one, not even inside a function or under ``TYPE_CHECKING``:
export runs graphs through the ``Backend`` interface of ``export/runtime.py`` rather than the
service's backends, and ``vident bench`` measures with ``service/benchmark.py`` rather than the
benchmarks package. ``tools/`` (research scripts, not installed) and ``tests/`` may import anything,
and no installed package may import them. Every module is parsed, so a deferred import counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("models", "export", "service", "benchmarks")  # each may import only itself and the ones before it
NOT_INSTALLED = ("tools", "tests")


def _module_name(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports_of(source: str, path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``source``: module level, in functions, relative ones
    resolved, and ``importlib.import_module("literal")`` calls."""
    package = _module_name(path, root)
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            elif node.module:
                found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def wrong_way_imports(root: Path = ROOT) -> list[str]:
    """``file:line: layer -> module`` for every import from a layer into a higher one (or into tools/tests)."""
    problems = []
    for layer_index, layer in enumerate(LAYERS):
        forbidden = (*LAYERS[layer_index + 1 :], *NOT_INSTALLED)
        for path in sorted((root / layer).rglob("*.py")):
            for line, module in imports_of(path.read_text(), path, root):
                top = module.split(".")[0]
                if top in forbidden:
                    problems.append(f"{path.relative_to(root)}:{line}: {layer} -> {module}")
    return problems


def test_imports_point_one_way() -> None:
    modules = [p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")]
    assert len(modules) > 50, f"found only {len(modules)} modules under {ROOT}: wrong root?"
    problems = wrong_way_imports()
    assert not problems, "imports against the layer order models -> export -> service -> benchmarks:\n" + "\n".join(
        problems
    )


def test_the_contract_sees_deferred_relative_and_dynamic_imports(tmp_path: Path) -> None:
    """The checker itself: each way a wrong-way import can hide is reported."""
    (tmp_path / "models" / "sub").mkdir(parents=True)
    (tmp_path / "export").mkdir()
    (tmp_path / "models" / "sub" / "deep.py").write_text(
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "from models.spec import ModelSpec\n"  # same layer: fine
        "if TYPE_CHECKING:\n"
        "    from export.verify import ParityReport\n"
        "def run():\n"
        "    from service.backends import factory\n"
        "    import benchmarks.fps\n"
        "    import tools.probe\n"
        "    return importlib.import_module('service.pipeline')\n"
    )
    (tmp_path / "export" / "__init__.py").write_text("from . import onnx\nfrom ..models import spec\n")
    (tmp_path / "export" / "onnx.py").write_text("from .runtime import Backend\n")
    problems = wrong_way_imports(tmp_path)
    assert problems == [
        "models/sub/deep.py:5: models -> export.verify",
        "models/sub/deep.py:7: models -> service.backends",
        "models/sub/deep.py:8: models -> benchmarks.fps",
        "models/sub/deep.py:9: models -> tools.probe",
        "models/sub/deep.py:10: models -> service.pipeline",
    ]
    resolved = imports_of((tmp_path / "export" / "onnx.py").read_text(), tmp_path / "export" / "onnx.py", tmp_path)
    assert resolved == [(1, "export.runtime")]
