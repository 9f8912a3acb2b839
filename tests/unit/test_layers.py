"""The package's layers, as its folders show them: a lower layer never imports an upper one.

The engine (``labkit/*.py`` and ``labkit/backends/``) is the bottom; ``labkit/lessons/`` drives the lessons with
it; ``labkit/exercises/`` and ``labkit/service/`` sit on top. An import the wrong way round would make the engine
depend on a notebook's driver, so a change to a lesson could break a worker.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LABKIT = Path(__file__).resolve().parents[2] / "labkit"
#: Each layer and the layers above it, which it must not import.
UPPER = {
    "engine": ("labkit.lessons", "labkit.exercises", "labkit.service"),
    "lessons": ("labkit.exercises", "labkit.service"),
}


def layer_of(path: Path) -> str | None:
    parts = path.relative_to(LABKIT).parts
    if len(parts) == 1 or parts[0] == "backends":
        return "engine"
    return parts[0] if parts[0] in UPPER else None


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


SOURCES = sorted(p for p in LABKIT.rglob("*.py") if layer_of(p) is not None)


def test_every_module_belongs_to_a_layer() -> None:
    assert len(SOURCES) > 20
    assert {layer_of(p) for p in SOURCES} >= {"engine", "lessons"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(LABKIT)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    layer = layer_of(path)
    assert layer is not None
    wrong = sorted(m for m in imported_modules(path) if m.startswith(UPPER[layer]))
    assert not wrong, f"{path.relative_to(LABKIT)} ({layer}) imports {wrong}"
