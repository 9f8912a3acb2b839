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
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import kafka_broker
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

from labkit.exercises import all_questions
from labkit.exercises.questions import Question, load_progress

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
#
# Two runs, each of several notebooks in one nbval child (one pytest start, a kernel per notebook): every
# notebook as shipped, and every notebook with REFERENCE_ANSWERS, whose outcomes are the reference answers'
# test, question by question. How long each check took is in the progress the checks save in the session's
# state folder (the kernels inherit it), as of this run.

#: An exercise notebook's share of a run's time limit (its checks take under 30 s each).
EXERCISE_NOTEBOOK_LIMIT_S = 150
#: Each check's budget at its default size on 2 cores (the issue's 30 s), with room for a loaded runner.
CHECK_BUDGET_S = 35
#: What a check cell shows first: ``✅ **ex07.q2: Correct.** ...``.
OUTCOME = re.compile(r"\*\*(?P<question>ex\d\d\.q\d+): (?P<verdict>[^*]+?)\.\*\*")


@dataclass(frozen=True)
class ExerciseRun:
    """One nbval run of exercise notebooks: what each check cell showed, and the progress it saved."""

    result: subprocess.CompletedProcess[str]
    shown: dict[str, tuple[str, str]]  # question -> (verdict, the whole outcome as shown)
    progress: dict[str, dict[str, Any]]  # question -> its saved record, for the questions this run checked
    seconds: float

    def failure(self, question: str) -> str:
        """Why ``question`` has no usable outcome: nbval's report, for a run that failed."""
        return f"{question} showed no outcome; nbval said:\n{self.result.stdout[-4000:]}"


def run_exercises(sources: Sequence[Path], folder: Path, reference_answers: bool | str = False) -> ExerciseRun:
    """Execute ``sources`` in one nbval run with ``REFERENCE_ANSWERS`` set; what each check showed."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = [ci_copy(s, folder / s.name, {"REFERENCE_ANSWERS": reference_answers}) for s in sources]
    started = datetime.now(UTC).replace(microsecond=0).isoformat()
    result, executed, seconds = run_nbval(copies, folder, timeout=EXERCISE_NOTEBOOK_LIMIT_S * len(sources))
    shown = {}
    for path in (p for p in executed if p.is_file()):
        for text in exercise_outcomes(path):
            if match := OUTCOME.search(text):
                shown[match["question"]] = (match["verdict"], text)
    saved = {q: entry for q, entry in load_progress().items() if q in shown and entry.get("when", "") >= started}
    return ExerciseRun(result, shown, saved, seconds)


def exercise_outcomes(executed: Path) -> list[str]:
    """What each exercise check cell of an executed notebook showed (its markdown outcome)."""
    shown = []
    for cell in nbformat.read(executed, as_version=4).cells:
        if EXERCISE_CHECK_TAG in cell.get("metadata", {}).get("tags", []):
            shown.append("".join(o.get("data", {}).get("text/markdown", "") for o in cell.get("outputs", [])))
    return shown


def _questions_of(source: Path) -> list[Question]:
    return [q for q in all_questions() if q.id.startswith(f"ex{source.name[:2]}.")]


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.timeout(EXERCISE_NOTEBOOK_LIMIT_S * 8 + 60)
def test_every_exercise_notebook_runs_as_shipped_and_every_check_is_not_attempted(
    lab_stack: Any, tmp_path: Path
) -> None:
    sources = exercise_notebooks()
    run = run_exercises(sources, tmp_path)
    print(f"{len(sources)} exercise notebooks as shipped: {run.seconds:.1f} s")

    assert run.result.returncode == 0, f"nbval failed on the exercise notebooks:\n{run.result.stdout}"
    expected = {q.id for source in sources for q in _questions_of(source)}
    not_attempted = {q for q, (verdict, _) in run.shown.items() if verdict == "Not attempted"}
    assert not_attempted == expected, {q: run.shown.get(q, ("", "no outcome"))[1] for q in expected - not_attempted}


def _reference_params() -> list[Any]:
    return [pytest.param(q, id=q.id, marks=[pytest.mark.kafka] if "kafka" in q.uses else []) for q in all_questions()]


@pytest.fixture(scope="module")
def reference_run(request: pytest.FixtureRequest, lab_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The exercise notebooks of the selected reference tests, executed once with ``REFERENCE_ANSWERS``.

    On Apache Kafka (``--kafka apache``: only the Kafka questions are selected) the notebooks judge the reference
    answer only in their Kafka questions (``REFERENCE_ANSWERS = "kafka"``); the others stay Not attempted.
    """
    mine = test_the_reference_answer_is_correct_in_its_notebook
    selected = {item.callspec.params["question"].id for item in request.session.items
                if getattr(item, "function", None) is mine}  # fmt: skip
    sources = [s for s in exercise_notebooks() if any(q.id in selected for q in _questions_of(s))]
    answers: bool | str = "kafka" if kafka_broker(request.config) == "apache" else True
    run = run_exercises(sources, tmp_path_factory.mktemp("reference-answers"), answers)
    print(f"\n{len(sources)} exercise notebooks with REFERENCE_ANSWERS={answers!r}: {run.seconds:.1f} s")
    return run


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.timeout(EXERCISE_NOTEBOOK_LIMIT_S * 8 + 60)
@pytest.mark.parametrize("question", _reference_params())
def test_the_reference_answer_is_correct_in_its_notebook(question: Question, reference_run: ExerciseRun) -> None:
    """The reference answer, judged by the check cell of the notebook executed with ``REFERENCE_ANSWERS``."""
    assert question.id in reference_run.shown, reference_run.failure(question.id)
    verdict, shown = reference_run.shown[question.id]
    seconds = float(reference_run.progress.get(question.id, {}).get("seconds", "nan"))
    print(f"{question.id}: {verdict}, {seconds:.1f} s")

    assert verdict == "Correct", shown
    assert seconds < CHECK_BUDGET_S, f"{question.id} took {seconds:.1f} s: {shown}"


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
