"""The exercise framework without a stack: outcomes, placeholders, saved progress, the CLI, learner code.

Every question's experiments run against the real stack in tests/integration/test_exercises.py; here, a lab whose
servers do not answer shows that a check never raises and says Inconclusive, never Incorrect.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from labkit.config import Config
from labkit.exercises import all_questions, exercises_command, questions
from labkit.exercises.questions import (
    BadAnswer,
    Inconclusive,
    Judged,
    Kind,
    LearnerCodeRaised,
    Question,
    Verdict,
    Wrong,
    ____,
    call_learner,
    is_placeholder,
    load_progress,
    nearest,
    write_step,
)
from labkit.worker import worker_command
from labkit.workflow import load_payment_step

QUESTIONS = all_questions()


@pytest.fixture(autouse=True)
def lab_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state folder of the test's own, and servers that do not answer (nothing listens on port 1)."""
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    monkeypatch.setenv("LABKIT_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("LABKIT_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    return tmp_path


def _question(judge: object, qid: str = "ex99.q1") -> Question:
    """A question whose experiment needs no server, so that the outcomes below come from its judge alone."""
    return Question(qid, Kind.PREDICT, "a test question", judge, ["one", "two"], "42", reference=42, servers=())  # type: ignore[arg-type]


def test_every_notebook_has_questions_with_references_wrong_answers_and_hints() -> None:
    per_notebook = Counter(q.id.split(".")[0] for q in QUESTIONS)
    assert set(per_notebook) == {f"ex{n:02d}" for n in range(1, 9)}
    assert all(3 <= n <= 5 for n in per_notebook.values()), per_notebook
    assert len(QUESTIONS) >= 30
    for q in QUESTIONS:
        assert q.wrong, f"{q.id} has no typical wrong answer"
        assert all(isinstance(w, Wrong) and w.says for w in q.wrong.values()), f"{q.id}: say what each gets wrong"
        assert len(q.hints) >= 2, f"{q.id} has one hint level"
        assert q.reference is not None or q.reference_for is not None, q.id
        assert set(q.uses) <= {"redis", "kafka"} and q.uses, q.id
    kinds = Counter(q.kind for q in QUESTIONS)
    assert set(kinds) == set(Kind) and min(kinds.values()) >= 3, kinds


def test_the_docs_list_every_question_with_its_kind() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "exercises.md").read_text(encoding="utf-8")
    kinds = "|".join(k.value for k in Kind)
    rows = {m["id"]: m["kind"] for m in re.finditer(rf"^\| (?P<id>ex\d\d\.q\d+) \| (?P<kind>{kinds}) \|", doc, re.M)}
    assert rows == {q.id: q.kind.value for q in QUESTIONS}
    assert f"{len(QUESTIONS)} questions in" in doc


def test_the_ten_confusions_are_each_covered() -> None:
    assert {q.confusion for q in QUESTIONS if q.confusion} == set(range(1, 11))


def test_placeholders_are_found_in_values_containers_and_function_bodies() -> None:
    def unfinished(ctx: object) -> None:
        ____  # noqa: B018

    def finished(ctx: object) -> int:
        return 1

    assert is_placeholder(____) and is_placeholder({"a": ____}) and is_placeholder(unfinished)
    assert not is_placeholder(0) and not is_placeholder({"a": 1}) and not is_placeholder(finished)


def test_each_outcome_kind_and_none_raises(capsys: pytest.CaptureFixture[str]) -> None:
    def raises(exc: Exception):  # type: ignore[no-untyped-def]
        def judge(answer: object, config: Config) -> Judged:
            raise exc

        return judge

    assert _question(lambda a, c: Judged(a == 42, "ran it")).check(42).verdict is Verdict.CORRECT
    wrong = _question(lambda a, c: Judged(a == 42, "ran it")).check(7)
    assert wrong.verdict is Verdict.INCORRECT and "ex.q1.hint()" in wrong.message and "42" not in wrong.message
    assert _question(lambda a, c: Judged(True, "")).check(____).verdict is Verdict.NOT_ATTEMPTED
    assert _question(raises(BadAnswer("answer a number"))).check("x").verdict is Verdict.INCORRECT
    assert _question(raises(LearnerCodeRaised("f() raised KeyError"))).check(1).verdict is Verdict.RAISED
    for infrastructure in (Inconclusive("busy"), ConnectionError("refused"), TimeoutError("slow")):
        assert _question(raises(infrastructure)).check(1).verdict is Verdict.INCONCLUSIVE
    assert "ex99.q1: Correct." in capsys.readouterr().out


def test_learner_code_that_raises_is_quoted_with_its_input() -> None:
    def divide(x: int) -> float:
        return 1 / x

    with pytest.raises(LearnerCodeRaised, match=r"divide\(0\)` raised `ZeroDivisionError"):
        call_learner(divide, 0)


def test_progress_survives_a_restart_and_the_cli_prints_it(lab_home: Path) -> None:
    q = _question(lambda a, c: Judged(a == 42, "ran it"), "ex99.q2")
    q.check(7, show=False)
    q.check(42, show=False)
    q.check(____, show=False)
    saved = load_progress()["ex99.q2"]
    assert saved["attempts"] == 2 and saved["correct"] is True and saved["outcome"] == "Not attempted"
    assert (lab_home / "exercises" / "progress.json").is_file()
    result = CliRunner().invoke(exercises_command, [])
    assert result.exit_code == 0, result.output
    assert "ex07" in result.output and "questions correct" in result.output


@pytest.mark.parametrize("qid", ["ex01.q1", "ex03.q1", "ex04.q2"])
def test_a_lab_that_does_not_answer_is_inconclusive_never_incorrect(qid: str) -> None:
    q = next(q for q in QUESTIONS if q.id == qid)
    for answer in (q.reference, *(w.answer for w in q.wrong.values())):
        assert q.check(answer, show=False).verdict is Verdict.INCONCLUSIVE


def test_reference_answers_for_one_server_fill_only_its_questions(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI's run on Apache Kafka: ``REFERENCE_ANSWERS = "kafka"`` judges the Kafka questions, leaves the rest."""
    monkeypatch.setattr(questions, "_reference_answers", "kafka")
    kafka, redis_only = (next(q for q in QUESTIONS if ("kafka" in q.uses) is uses) for uses in (True, False))
    assert kafka.check(____, show=False).verdict is Verdict.INCONCLUSIVE  # judged: its broker (port 1) is silent
    assert redis_only.check(____, show=False).verdict is Verdict.NOT_ATTEMPTED


def test_nearest_refuses_to_call_a_figure_between_two_choices() -> None:
    choices = {"1x": 1.0, "2x": 2.0, "4x": 4.0}
    assert nearest(3.8, choices) == "4x" and nearest(1.1, choices) == "1x"
    assert nearest(2.83, choices) is None


async def _step(ctx: object) -> None:
    await asyncio.sleep(0)


def test_a_written_step_loads_as_the_workers_load_it(tmp_path: Path) -> None:
    spec = write_step(_step, tmp_path)
    assert spec.endswith(":_step") and callable(load_payment_step(spec))


@pytest.mark.parametrize(
    ("spec", "reason"),
    [("nothing", "is not module:function"), ("missing.py:f", "not found"), ("json:no_such", "has no function")],
)
def test_a_bad_handler_is_one_line_and_exit_2(spec: str, reason: str) -> None:
    result = CliRunner().invoke(worker_command, ["--backend", "streams", "--handler", spec])
    assert result.exit_code == 2 and reason in result.output and "Traceback" not in result.output
