"""The package's layout: dependencies point one way, and importing it (or its console script) loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import anomalib_transformer_student

PACKAGE = anomalib_transformer_student.__name__
ROOT = Path(anomalib_transformer_student.__file__).parent
# Which subpackages each may import (besides itself); the top level imports the model lazily.
ALLOWED = {
    "apps": {"model", "training", "metrics", "feature_cache"},
    "model": {"training", "deploy", "feature_cache"},
    "feature_cache": {"training"},
    "training": set(),
    "deploy": set(),
    "metrics": set(),
}
HEAVY = ("torch", "timm", "anomalib", "lightning", "openvino")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of this package that ``path`` imports, at any depth of the file (TYPE_CHECKING included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(name for name in [target, *names] if name.startswith(PACKAGE))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE))
    return found


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in ROOT.rglob("*.py")}


def test_dependencies_point_one_way() -> None:
    wrong = []
    for module, imported in _graph().items():
        source = _subpackage(module)
        if source is None:
            continue
        for target in imported:
            destination = _subpackage(target)
            if destination not in (None, source) and destination not in ALLOWED[source]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_import_cycle_between_modules() -> None:
    graph = _graph()
    modules = set(graph)
    # An import of a name inside a module counts as an import of that module.
    edges = {
        module: {target if target in modules else target.rpartition(".")[0] for target in targets} & modules
        for module, targets in graph.items()
    }
    # Importing a submodule runs its package's __init__ first; that edge is not a cycle of the code.
    for module in edges:
        edges[module].discard(module)
        edges[module] -= {other for other in modules if module.startswith(f"{other}.")}
    visiting, done, cycles = set(), set(), []

    def visit(module: str, path: list[str]) -> None:
        visiting.add(module)
        for target in sorted(edges[module]):
            if target in visiting:
                cycles.append([*path[path.index(target) :], target] if target in path else [module, target])
            elif target not in done:
                visit(target, [*path, target])
        visiting.discard(module)
        done.add(module)

    for module in sorted(edges):
        if module not in done:
            visit(module, [module])
    assert not cycles, cycles


def _run_and_list_heavy_imports(code: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``code`` in a fresh interpreter; return the process and the heavy modules it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=120
    )
    modules = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    return result, sorted({module for module in modules if module.split(".")[0] in HEAVY})


def test_importing_the_package_loads_no_torch() -> None:
    result, heavy = _run_and_list_heavy_imports(f"import {PACKAGE}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert heavy == []


def test_console_script_help_loads_no_torch() -> None:
    code = f"import sys; sys.argv = ['transformer-student', '--help']; from {PACKAGE}.apps.cli import main; main()"
    result, heavy = _run_and_list_heavy_imports(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: transformer-student" in result.stdout
    assert "demo" in result.stdout and "evaluate" in result.stdout
    assert heavy == []


def test_listing_the_cache_loads_no_torch(tmp_path: Path) -> None:
    argv = ["transformer-student", "cache", "list", "--cache-dir", str(tmp_path)]
    code = f"import sys; sys.argv = {argv!r}; from {PACKAGE}.apps.cli import main; main()"
    result, heavy = _run_and_list_heavy_imports(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert heavy == []


def test_public_names_load_on_first_use() -> None:
    code = f"from {PACKAGE} import TransformerStudent; print(TransformerStudent.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == f"{PACKAGE}.model.lightning_model"
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        anomalib_transformer_student.Nothing  # noqa: B018
