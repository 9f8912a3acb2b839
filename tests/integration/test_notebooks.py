"""Every lesson runs top to bottom, once, headless, against the real test stack, with small parameters.

How a lesson is run, and why this way (one execution per notebook: the set must fit in 10 minutes):

1. papermill's ``parameterize_notebook`` writes a copy of the lesson to a temporary folder with
   the CI parameters (``metadata.labkit.ci_parameters``, plus a fresh ``NAMESPACE``) injected
   after the cell tagged ``parameters``, exactly as ``papermill -p`` would, but without running it.
2. nbval runs that copy: ``pytest --nbval-lax`` in a child process (its own pytest session, so
   nbval's collection and kernel do not mix with this session's plugins and fixtures). nbval
   executes every code cell in one kernel and fails on any error, as papermill would, and it
   compares the output of each cell tagged ``nbval-check-output`` (the lesson's ``check`` cells)
   with the expected output committed in the notebook: ``no booking lost: True`` must be printed
   exactly so. A check cell printing ``False``, or anything else, fails the run with nbval's diff.

   Executing with papermill and comparing afterwards would need nbval's comparison outside a
   pytest session (it is a method of nbval's pytest item); running nbval twice, or papermill and
   then nbval, would double the time. Here the one execution is nbval's own.
3. A small plugin (tests/nbval_plugin.py) keeps what that execution printed and writes the executed
   copy next to the parameterised one, outside ``notebooks/``, and fails the run if a worker
   process is still alive at the last cell. The child pytest loads only nbval and that plugin
   (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``): importing every installed plugin (hypothesis, schemathesis)
   cost each run seconds, on every lesson.
4. After the run, no process started by it (kernel, workers, a broker) may be left: each carries
   the run's marker variable in its environment. The stack itself belongs to the session fixture.

The kernel is this interpreter (``--nbval-current-env``: no stale ``python3`` kernelspec can pick
another Python) and runs in the temporary folder (nbval starts it in the notebook's folder), so a
lesson must not depend on its working directory; files a lesson writes go to its run folder.
How lesson authors store the expected check outputs: tests/notebook_checks.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nbformat
import pytest
from notebook_checks import (
    EXERCISE_CHECK_TAG,
    NBVAL_TAG,
    NOTEBOOKS,
    ci_copy,
    ci_parameters,
    conclusion_problems,
    exercise_notebooks,
    is_check,
    lesson_notebooks,
    processes_with,
    set_expected_output,
)

TESTS = Path(__file__).resolve().parents[1]
#: One cell may take this long before nbval interrupts the kernel.
CELL_TIMEOUT_S = 150
#: A run still going after this is stopped, with everything it started. A guard against a hang, not a time
#: budget: how long a lesson takes is measured by benchmarks/lessons.py (docs/lessons.md), since a timed test
#: fails on a loaded runner (07 took 145 s here with three busy loops beside it, against 85 s on a quiet one).
RUN_TIMEOUT_S = 300
#: Time for the kernel's children to exit after nbval stopped it (SIGKILL on parent death is asynchronous).
LEFTOVER_GRACE_S = 10
#: The environment variable, with a fresh value per run, that every process of the run inherits.
MARKER = "LABKIT_NOTEBOOK_RUN"


def run_nbval(
    notebooks: Sequence[Path], folder: Path, timeout: float = RUN_TIMEOUT_S
) -> tuple[subprocess.CompletedProcess[str], list[Path], float]:
    """Run ``notebooks`` once under ``pytest --nbval-lax``, one after the other in one child pytest, each in a
    kernel of its own; returns the result, the executed copies (in order) and the seconds taken.

    Raises:
        AssertionError: the run took far too long, or a process it started was still alive after it ended.
    """
    (folder / "pytest.ini").write_text("[pytest]\n")  # this project's pytest settings are not for nbval's run
    executed = [folder / "executed" / notebook.name for notebook in notebooks]
    names = ", ".join(notebook.name for notebook in notebooks)
    token = uuid.uuid4().hex
    marker = f"{MARKER}={token}"
    env = {**os.environ, MARKER: token, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    # This checkout's labkit, whatever is installed (a second clone, a worktree), and the plugin next to the tests.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent), str(TESTS), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "pytest", *map(str, notebooks),
        "-p", "nbval.plugin", "--nbval-lax", "--nbval-current-env", f"--nbval-cell-timeout={CELL_TIMEOUT_S}",
        "-p", "nbval_plugin", f"--executed-dir={folder / 'executed'}", f"--run-marker={marker}",
        "-p", "no:cacheprovider", f"--rootdir={folder}", "-q", "--color=no", "--durations=5",
    ]  # fmt: skip
    start = time.monotonic()
    try:
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        for pid in processes_with(marker):  # the kernel and its workers outlive a killed nbval process
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"{names} still running after {timeout:g} s:\n{e.stdout}") from None
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"{names} left processes behind: {left}"
    return result, executed, elapsed


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("source", lesson_notebooks(), ids=lambda p: p.stem)
def test_lesson_runs_once_and_its_checks_hold(source: Path, lab_stack: Any, tmp_path: Path) -> None:
    committed = source.read_bytes()
    parameters = {**ci_parameters(nbformat.read(source, as_version=4)), "NAMESPACE": f"nb{uuid.uuid4().hex[:6]}-"}
    result, [executed], elapsed = run_nbval([ci_copy(source, tmp_path / source.name, parameters)], tmp_path)

    assert result.returncode == 0, f"nbval failed on {source.name} (executed copy: {executed}):\n{result.stdout}"
    print(f"{source.stem}: {elapsed:.1f} s")
    checks = [c for c in nbformat.read(executed, as_version=4).cells if is_check(c)]
    assert checks, f"{source.name} has no cell tagged 'check' stating its conclusion"
    assert all(NBVAL_TAG in c.metadata["tags"] for c in checks), (
        f"nbval compared no expected output of {source.name}; store it: python tests/notebook_checks.py {source}"
    )
    assert not [p for c in checks for p in conclusion_problems(c)], [c.outputs for c in checks]
    assert source.read_bytes() == committed, "the run changed the committed notebook"
    assert [p.name for p in NOTEBOOKS.glob(f"{source.stem}*")] == [source.name], "a run must write nothing there"


# -- the exercise notebooks -------------------------------------------------------------------------


def exercise_outcomes(executed: Path) -> list[str]:
    """What each exercise check cell of an executed notebook showed (its markdown outcome)."""
    shown = []
    for cell in nbformat.read(executed, as_version=4).cells:
        if EXERCISE_CHECK_TAG in cell.get("metadata", {}).get("tags", []):
            shown.append("".join(o.get("data", {}).get("text/markdown", "") for o in cell.get("outputs", [])))
    return shown


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("source", exercise_notebooks(), ids=lambda p: p.stem)
def test_exercise_notebook_runs_as_shipped_and_every_check_is_not_attempted(
    source: Path, lab_stack: Any, tmp_path: Path
) -> None:
    result, [executed], elapsed = run_nbval([ci_copy(source, tmp_path / source.name, {})], tmp_path)

    assert result.returncode == 0, f"nbval failed on {source.name} (executed copy: {executed}):\n{result.stdout}"
    print(f"exercises/{source.stem}: {elapsed:.1f} s")
    outcomes = exercise_outcomes(executed)
    assert outcomes and all(": Not attempted.**" in o for o in outcomes), outcomes


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_an_exercise_notebook_with_the_reference_answers_is_all_correct(lab_stack: Any, tmp_path: Path) -> None:
    """Exercise 01 (its checks take well under a second): the REFERENCE_ANSWERS parameter as CI would set it."""
    source = exercise_notebooks()[0]
    copy = ci_copy(source, tmp_path / source.name, {"REFERENCE_ANSWERS": True})
    result, [executed], _ = run_nbval([copy], tmp_path)

    assert result.returncode == 0, result.stdout
    outcomes = exercise_outcomes(executed)
    assert outcomes and all(": Correct.**" in o for o in outcomes), outcomes


# -- the checks can fail ------------------------------------------------------------------------------


#: The canary's experiment: one BullMQ worker; each booking's payment fails FAIL_TIMES times first.
CANARY_RUN = """
cfg = lk.setup(namespace=NAMESPACE)
gen = lk.BookingGenerator(seed=3, fault_rate=1.0, fail_times=FAIL_TIMES)
with lk.WorkerPool("bullmq", cfg).start(1, max_attempts=MAX_ATTEMPTS, backoff_ms=50) as pool:
    lk.produce("bullmq", gen.bookings(N), cfg)
    stats = pool.wait_until_drained(timeout=30, expected=N)
lost = N - stats["completed"]
"""
#: The same experiment without the ``with``: its worker is still running when the notebook ends.
CANARY_ORPHAN = """
cfg = lk.setup(namespace=NAMESPACE)
pool = lk.WorkerPool("bullmq", cfg).start(1)
lk.produce("bullmq", lk.BookingGenerator(seed=3).bookings(N), cfg)
stats = pool.wait_until_drained(timeout=30, expected=N)
lost = N - stats["completed"]
"""


def _canary(tmp_path: Path, run: str = CANARY_RUN, **parameters: Any) -> Path:
    """A lesson in miniature: setup, parameters, an experiment, a check with its expected output.

    With ``FAIL_TIMES`` below ``MAX_ATTEMPTS`` every booking completes on a retry; at or above it,
    every booking is dead-lettered, so the check's conclusion is wrong and must be caught.
    """
    new_code = nbformat.v4.new_code_cell
    parameters_cell = new_code('N = 3\nMAX_ATTEMPTS = 2\nFAIL_TIMES = 1\nNAMESPACE = "canary-"')
    parameters_cell.metadata["tags"] = ["parameters"]
    check = new_code('print("no booking lost:", lost == 0)\nprint("bookings completed:", stats["completed"])')
    set_expected_output(check, "no booking lost: True\nbookings completed: 3\n")
    notebook = nbformat.v4.new_notebook(
        cells=[new_code("import labkit as lk"), parameters_cell, new_code(run.strip()), check],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / "canary.ipynb"
    nbformat.write(notebook, source)
    return ci_copy(source, tmp_path / "canary-ci.ipynb", {"NAMESPACE": f"nb{uuid.uuid4().hex[:6]}-", **parameters})


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_a_check_cell_catches_a_broken_configuration(lab_stack: Any, tmp_path: Path) -> None:
    good, _, _ = run_nbval([_canary(tmp_path / "good", MAX_ATTEMPTS=2, FAIL_TIMES=1)], tmp_path / "good")
    broken, [executed], _ = run_nbval([_canary(tmp_path / "broken", MAX_ATTEMPTS=2, FAIL_TIMES=2)], tmp_path / "broken")

    assert good.returncode == 0, good.stdout
    assert broken.returncode == 1, broken.stdout
    assert "Cell outputs differ" in broken.stdout and "1 failed" in broken.stdout, broken.stdout
    assert "no booking lost: False" in broken.stdout, "nbval's diff shows the wrong conclusion"
    check = nbformat.read(executed, as_version=4).cells[-1]
    assert check.outputs[0]["text"] == "no booking lost: False\nbookings completed: 0\n"


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_an_error_in_any_cell_fails_the_run(lab_stack: Any, tmp_path: Path) -> None:
    broken, _, _ = run_nbval([_canary(tmp_path, N="three")], tmp_path)

    assert broken.returncode == 1, broken.stdout
    assert "Cell execution caused an exception" in broken.stdout, broken.stdout


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_a_worker_left_running_fails_the_run(lab_stack: Any, tmp_path: Path) -> None:
    broken, _, _ = run_nbval([_canary(tmp_path, run=CANARY_ORPHAN)], tmp_path)

    assert broken.returncode == 1, broken.stdout
    assert "Cell outputs differ" not in broken.stdout, "the check itself holds"
    assert "worker processes still running at the end of the notebook" in broken.stdout, broken.stdout
    assert "-m workers.bullmq" in broken.stdout
