"""Lesson notebooks and their expected check outputs: the one kind of output a committed notebook keeps.

Each lesson ends with cells tagged ``check`` that print one conclusion per line
(``no booking lost: True``). CI runs every lesson once, under nbval (``--nbval-lax``), which
compares what those cells print with the output stored in the committed notebook. So a check
cell is committed *with* its expected output, an ``execution_count`` (nbval ignores the stored
output of a cell that has none) and the tag ``nbval-check-output`` (what makes ``--nbval-lax``
compare it). Every other cell is committed without outputs.

A lesson author stores the expected outputs once the lesson is written, from a run of the
notebook with its CI parameters::

    # against a running stack (LABKIT_* variables as for the lab itself):
    python tests/notebook_checks.py notebooks/07-crashes-and-redelivery.ipynb
    # or from a copy already executed with papermill:
    python tests/notebook_checks.py notebooks/07-crashes-and-redelivery.ipynb /tmp/07-out.ipynb

It prints the stored lines (read them: they are the lesson's promises) and refuses outputs
that are not conclusions: an error, anything on stderr, an empty check, or a line that does
not end in ``True`` or a number. Run it again whenever a check cell changes. The same
functions are the library for the notebook tests (tests/integration/test_notebooks.py) and
the structure tests (tests/unit/test_notebook_structure.py).
"""

from __future__ import annotations

import re
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import nbformat
from nbformat import NotebookNode

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

#: The lesson's conclusion cells (the lesson rules' name for them).
CHECK_TAG = "check"
#: nbval's tag for "compare this cell's output even under --nbval-lax".
NBVAL_TAG = "nbval-check-output"
#: papermill's tag for the cell whose values CI replaces.
PARAMETERS_TAG = "parameters"
#: The execution count stored with each expected output; nbval skips cells that have none.
EXPECTED_EXECUTION_COUNT = 1
#: A conclusion line: ``<what>: <True | an exact count>``; False would mean the lesson's point failed.
CONCLUSION = re.compile(r"^\S.*: (True|-?\d+)$")


def lesson_notebooks() -> list[Path]:
    """Every lesson, in order: ``notebooks/NN-name.ipynb``."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))


def exercise_notebooks() -> list[Path]:
    """notebooks/exercises/NN-*.ipynb, in order: one per lesson 01-08."""
    return sorted((NOTEBOOKS / "exercises").glob("[0-9][0-9]-*.ipynb"))


#: The tag of an exercise notebook's check cells (``ex.q1.check(answer_q1)``): their outcome is judged live.
EXERCISE_CHECK_TAG = "exercise-check"


def is_check(cell: NotebookNode) -> bool:
    return cell.cell_type == "code" and CHECK_TAG in cell.get("metadata", {}).get("tags", [])


def ci_parameters(notebook: NotebookNode) -> dict[str, Any]:
    """The small parameters CI runs a lesson with (``metadata.labkit.ci_parameters``)."""
    return dict(notebook.metadata["labkit"]["ci_parameters"])


def printed_text(cell: NotebookNode) -> str:
    """What a cell printed on stdout, its stream outputs joined (as nbval joins them)."""
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def conclusion_problems(cell: NotebookNode) -> list[str]:
    """Why a check cell's outputs are not a valid expected output; empty when they are.

    Only stdout may appear, at least one line, every line a conclusion (``CONCLUSION``).
    """
    problems = []
    for output in cell.get("outputs", []):
        if output.get("output_type") != "stream" or output.get("name") != "stdout":
            kind = output.get("name") or output.get("output_type")
            detail = output.get("evalue") or output.get("text") or output.get("data", {}).get("text/plain", "")
            problems.append(f"prints {kind}, not only stdout: {str(detail)[:200]!r}")
    lines = printed_text(cell).splitlines()
    if not lines:
        problems.append("prints nothing")
    problems += [f"line {line!r} is not '<conclusion>: True' or an exact count" for line in lines
                 if not CONCLUSION.match(line)]  # fmt: skip
    return problems


def set_expected_output(cell: NotebookNode, text: str) -> None:
    """Store ``text`` as the check cell's expected stdout, in the form nbval compares."""
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
    cell.execution_count = EXPECTED_EXECUTION_COUNT
    tags = cell.metadata.setdefault("tags", [])
    for tag in (CHECK_TAG, NBVAL_TAG):
        if tag not in tags:
            tags.append(tag)


def clear_outputs(notebook: NotebookNode) -> None:
    """Drop every output and execution count, except the check cells' expected outputs."""
    for cell in notebook.cells:
        if cell.cell_type == "code" and not is_check(cell):
            cell.outputs = []
            cell.execution_count = None


def store_expected(source: Path, executed: Path) -> list[str]:
    """Copy the check outputs of ``executed`` (a run of ``source``) into ``source`` and clear the rest.

    Returns:
        the stored lines.

    Raises:
        ValueError: the runs' check cells differ in number, or an output is not a conclusion.
    """
    notebook = nbformat.read(source, as_version=4)
    ran = [c for c in nbformat.read(executed, as_version=4).cells if is_check(c)]
    checks = [c for c in notebook.cells if is_check(c)]
    if not checks or len(checks) != len(ran):
        raise ValueError(f"{source.name} has {len(checks)} check cell(s), the executed copy {len(ran)}")
    problems = [f"check cell {i + 1}: {p}" for i, cell in enumerate(ran) for p in conclusion_problems(cell)]
    if problems:
        raise ValueError(f"{executed} cannot be stored as expected output:\n" + "\n".join(problems))
    for cell, result in zip(checks, ran, strict=True):
        set_expected_output(cell, printed_text(result))
    clear_outputs(notebook)
    nbformat.write(notebook, source)
    return [line for cell in checks for line in printed_text(cell).splitlines()]


def ci_copy(source: Path, destination: Path, parameters: dict[str, Any]) -> Path:
    """Write ``source`` with ``parameters`` injected after its parameters cell, unexecuted (papermill's way).

    The copy keeps the expected check outputs, so nbval can run it once and compare them.
    """
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    notebook = parameterize_notebook(
        load_notebook_node(str(source)), parameters, kernel_name="python3", language="python"
    )
    nbformat.write(notebook, destination)
    return destination


def _run_with_papermill(source: Path, folder: Path) -> Path:
    import papermill

    notebook = nbformat.read(source, as_version=4)
    executed = folder / source.name
    parameters = {**ci_parameters(notebook), "NAMESPACE": f"store{uuid.uuid4().hex[:6]}-"}
    papermill.execute_notebook(
        str(source),
        str(executed),
        parameters=parameters,
        cwd=str(source.parent),
        kernel_name="python3",
        progress_bar=False,
    )
    return executed


USAGE = "usage: python tests/notebook_checks.py NOTEBOOK [EXECUTED_COPY]"


def processes_with(marker: str) -> dict[int, str]:
    """The command line of every live process, by pid, whose environment holds ``marker`` (Linux ``/proc``).

    Every process a notebook starts (its kernel, worker processes, a broker) inherits the
    environment of the run, so a marker variable set for one run finds exactly that run's leftovers.
    """
    found = {}
    needle = marker.encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if command:  # a zombie has an empty command line: exited, only not reaped yet
            found[int(entry.name)] = command
    return found


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(USAGE, file=sys.stderr)
        return 2
    source = Path(argv[0])
    with tempfile.TemporaryDirectory() as folder:
        executed = Path(argv[1]) if len(argv) == 2 else _run_with_papermill(source, Path(folder))
        try:
            lines = store_expected(source, executed)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 1
    print(f"stored {len(lines)} expected check line(s) in {source}:")
    print("\n".join(f"  {line}" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
