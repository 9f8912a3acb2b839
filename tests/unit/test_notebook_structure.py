"""Every lesson keeps the lab's notebook rules; checked on the committed files, no kernel needed.

The rules (README and the lesson brief): an H1 that links the previous lesson; a setup-only first
code cell; then the cell tagged ``parameters`` with the lesson's ``NAMESPACE``, whose names
``metadata.labkit.ci_parameters`` overrides in CI; ``lk.setup(namespace=NAMESPACE)`` after it;
short code cells; ``WorkerPool`` only in ``with`` statements; check cells before ``## Summary``,
then ``## Try this``; and no stored output except the check cells' expected output, which nbval
compares in CI (see tests/notebook_checks.py for how it is stored).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
from nbformat import NotebookNode
from notebook_checks import (
    CHECK_TAG,
    EXERCISE_CHECK_TAG,
    NBVAL_TAG,
    PARAMETERS_TAG,
    ci_parameters,
    conclusion_problems,
    exercise_notebooks,
    is_check,
    lesson_notebooks,
)

MAX_CODE_LINES = 15

LESSONS = lesson_notebooks()
lesson = pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])


def read(path: Path) -> NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(notebook: NotebookNode) -> list[NotebookNode]:
    return [c for c in notebook.cells if c.cell_type == "code"]


def tags(cell: NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def headings(notebook: NotebookNode) -> dict[str, tuple[int, int]]:
    """Every markdown heading line and where it is: ``(cell index, line index)``, comparable for order."""
    return {
        line.strip(): (i, k)
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "markdown"
        for k, line in enumerate(cell.source.splitlines())
        if line.startswith("#")
    }


def parse(source: str) -> ast.Module:
    """A cell's code as Python (IPython allows a top-level ``await``)."""
    tree: ast.Module = compile(source, "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    return tree


def test_there_are_lessons() -> None:
    assert LESSONS and LESSONS[0].name == "00-welcome.ipynb"


@lesson
def test_opens_with_a_title_that_links_the_previous_lesson(path: Path) -> None:
    first = read(path).cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "the first cell is the H1"
    number = int(path.name[:2])
    if number:
        assert f"{number - 1:02d}-" in first.source, f"the opening paragraph links lesson {number - 1:02d}"


@lesson
def test_runs_on_the_python3_kernel(path: Path) -> None:
    assert read(path).metadata["kernelspec"]["name"] == "python3"


@lesson
def test_first_code_cell_only_imports(path: Path) -> None:
    first = code_cells(read(path))[0]
    statements = parse(first.source).body
    assert all(isinstance(s, ast.Import | ast.ImportFrom) for s in statements), first.source
    assert "import labkit as lk" in first.source.splitlines()


@lesson
def test_second_code_cell_holds_the_parameters_ci_overrides(path: Path) -> None:
    notebook = read(path)
    cells = code_cells(notebook)
    assert PARAMETERS_TAG in tags(cells[1]), "the second code cell is tagged 'parameters'"
    assert not any(PARAMETERS_TAG in tags(c) for c in cells[2:]), "one parameters cell"
    assigned = {t.id for s in parse(cells[1].source).body if isinstance(s, ast.Assign) for t in s.targets
                if isinstance(t, ast.Name)}  # fmt: skip
    assert "NAMESPACE" in assigned
    assert set(ci_parameters(notebook)) <= assigned, "metadata.labkit.ci_parameters names parameters that exist"
    later = "\n".join(c.source for c in cells[2:])
    assert re.search(r"\blk\.setup\(namespace=NAMESPACE\)", later), "cfg = lk.setup(namespace=NAMESPACE) follows"


@lesson
def test_code_cells_are_short(path: Path) -> None:
    long = [c.source for c in code_cells(read(path)) if len(c.source.strip().splitlines()) > MAX_CODE_LINES]
    assert not long, f"code cells over {MAX_CODE_LINES} lines belong in labkit: {long}"


@lesson
def test_worker_pools_live_in_with_statements(path: Path) -> None:
    """A pool outside ``with`` outlives an exception in its cell, and its workers with it."""
    for cell in code_cells(read(path)):
        tree = parse(cell.source)
        managed = {id(node) for w in ast.walk(tree) if isinstance(w, ast.With | ast.AsyncWith) for item in w.items
                   for node in ast.walk(item.context_expr)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and "WorkerPool" in ast.unparse(node.func):
                assert id(node) in managed, f"WorkerPool outside a with statement: {ast.unparse(node)}"


@lesson
def test_no_stored_outputs_but_the_expected_checks(path: Path) -> None:
    for cell in code_cells(read(path)):
        if is_check(cell):
            continue
        assert NBVAL_TAG not in tags(cell), f"only check cells are compared by nbval: {cell.source!r}"
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"stored output: {cell.source!r}"


@lesson
def test_check_cells_carry_their_expected_conclusions(path: Path) -> None:
    """Each check cell stores what nbval must see it print: conclusions only, never a timing."""
    checks = [c for c in code_cells(read(path)) if is_check(c)]
    assert checks, f"no cell tagged {CHECK_TAG!r}: the lesson states no conclusion"
    for cell in checks:
        assert NBVAL_TAG in tags(cell), f"tag it {NBVAL_TAG!r} so nbval --nbval-lax compares it: {cell.source!r}"
        assert cell.get("execution_count") is not None, f"nbval skips a check with no execution count: {cell.source!r}"
        assert not conclusion_problems(cell), (cell.source, conclusion_problems(cell))


@lesson
def test_ends_with_checks_then_summary_then_try_this(path: Path) -> None:
    notebook = read(path)
    found = headings(notebook)
    assert "## Summary" in found, "a '## Summary' section"
    assert "## Try this" in found and found["## Try this"] > found["## Summary"], "'## Try this' after the Summary"
    last_check = max(i for i, cell in enumerate(notebook.cells) if is_check(cell))
    assert last_check < found["## Summary"][0], "the check cells come before the Summary"


# -- the exercise notebooks: the same rules, with questions for check cells --------------------------

EXERCISES = exercise_notebooks()
exercise = pytest.mark.parametrize("path", EXERCISES, ids=[p.stem for p in EXERCISES])


def test_there_is_an_exercise_notebook_per_lesson_01_to_08() -> None:
    assert [p.name[:2] for p in EXERCISES] == [f"{n:02d}" for n in range(1, 9)]


@exercise
def test_exercise_opens_with_a_title_that_links_its_lesson(path: Path) -> None:
    first = read(path).cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "the first cell is the H1"
    [lesson] = [p for p in LESSONS if p.name[:2] == path.name[:2]]
    assert f"](../{lesson.name})" in first.source, f"the opening paragraph links {lesson.name}"
    assert read(path).metadata["kernelspec"]["name"] == "python3"


@exercise
def test_exercise_setup_parameters_and_ready(path: Path) -> None:
    cells = code_cells(read(path))
    assert all(isinstance(s, ast.Import | ast.ImportFrom) for s in parse(cells[0].source).body), cells[0].source
    assert f"from labkit.exercises import ex{path.name[:2]} as ex" in cells[0].source
    assert PARAMETERS_TAG in tags(cells[1]) and not any(PARAMETERS_TAG in tags(c) for c in cells[2:])
    assert "REFERENCE_ANSWERS" in cells[1].source
    assert "ex.ready(reference_answers=REFERENCE_ANSWERS)" in cells[2].source


@exercise
def test_exercise_cells_are_short_with_no_stored_output_and_pools_in_with(path: Path) -> None:
    for cell in code_cells(read(path)):
        assert len(cell.source.strip().splitlines()) <= MAX_CODE_LINES, cell.source
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"stored output: {cell.source!r}"
        assert "WorkerPool" not in cell.source, "an exercise's experiments run inside its checks"


@exercise
def test_every_question_has_a_placeholder_and_a_check_before_the_summary(path: Path) -> None:
    import importlib

    module = importlib.import_module(f"labkit.exercises.ex{path.name[:2]}")
    questions = sorted(n for n in dir(module) if re.fullmatch(r"q\d+", n))
    notebook = read(path)
    found = headings(notebook)
    checks = [(i, c) for i, c in enumerate(notebook.cells) if EXERCISE_CHECK_TAG in tags(c)]
    assert [re.match(r"ex\.(q\d+)\.check\(", c.source).group(1) for _, c in checks] == questions  # type: ignore[union-attr]
    for i, _ in checks:
        assert "____" in notebook.cells[i - 2].source, f"the answer cell before check {i} has the placeholder"
    assert "## Summary" in found and "## Try this" in found and found["## Try this"] > found["## Summary"]
    assert max(i for i, _ in checks) < found["## Summary"][0]


@exercise
def test_the_welcome_and_the_lesson_state_the_exercise_notebooks_question_count(path: Path) -> None:
    """00-welcome's table and the lesson's Try this say how many questions the notebook has: its checks."""
    count = sum(EXERCISE_CHECK_TAG in tags(c) for c in read(path).cells)
    link = f"exercises/{path.name}"
    welcome = "\n".join(c.source for c in read(LESSONS[0]).cells if c.cell_type == "markdown")
    assert f"]({link}) | {count} |" in welcome, f"00-welcome's exercise table: {path.stem} has {count} questions"
    [lesson] = [p for p in LESSONS if p.name[:2] == path.name[:2]]
    text = "\n".join(c.source for c in read(lesson).cells if c.cell_type == "markdown")
    assert f"]({link}): {count} questions" in text, f"{lesson.name}'s Try this: {path.stem} has {count} questions"
