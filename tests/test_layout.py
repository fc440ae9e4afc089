"""The package's layering holds: the runtime never imports the algorithm, the core reaches the
reference fixture through one door, and the fixture stays split into readable pieces."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "sparrow"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every sparrow module `path` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "sparrow" or name.startswith("sparrow.")}


MODULES = {_module(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _importers(prefix: str) -> set[str]:
    return {module for module, path in MODULES.items()
            if any(name == prefix or name.startswith(prefix + ".") for name in _imports(path))}


def test_the_runtime_never_imports_the_algorithm_or_what_builds_on_it():
    above = ("sparrow.speculative", "sparrow.draft", "sparrow.targets", "sparrow.serve",
             "sparrow.api", "sparrow.cli", "sparrow.reference")
    for module, path in MODULES.items():
        if module.startswith("sparrow.runtime"):
            bad = {name for name in _imports(path) if name.startswith(above)}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_only_the_fixture_door_imports_the_reference_fixture():
    outside = {module for module in _importers("sparrow.reference")
               if not module.startswith("sparrow.reference")}
    assert outside == {"sparrow.fixture"}


def test_the_fixture_door_is_where_reference_targets_and_eval_target_come_from():
    from sparrow.cli import build_parser

    parser, commands = build_parser()
    assert commands["eval-target"].__module__ == "sparrow.reference.eval_target"
    assert {"sparrow.cli", "sparrow.targets"} <= _importers("sparrow.fixture")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("sparrow.reference")))
def test_the_fixture_has_no_file_over_600_lines_or_function_over_80(module):
    text = MODULES[module].read_text()
    assert len(text.splitlines()) <= 600, module
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno - node.lineno < 80, f"{module}.{node.name}"
