"""Every exercise question judged by its real experiment: each typical wrong answer Incorrect with its own words, and
a server that does not answer Inconclusive, on every server the question uses.

Each check runs in a fresh namespace of the test stack (exported by the session fixture), with real worker
processes where the question has them. The reference answers are judged Correct where a learner meets them: in the
exercise notebooks, executed with ``REFERENCE_ANSWERS`` by tests/integration/test_notebooks.py, so they are not
judged a second time here.

Questions that use Kafka are marked ``kafka``, so ``pytest --kafka apache`` judges their wrong answers again on
Apache Kafka (and test_notebooks.py their reference answers). Every check's time is printed (``-s``) and kept
under its 30 s budget.
"""

from __future__ import annotations

from typing import Any

import pytest

from labkit.exercises import all_questions
from labkit.exercises.questions import Question, Verdict
from labkit.stack import free_port

#: A check's budget at its default size on 2 cores (the issue's), with a little room for a loaded runner.
CHECK_BUDGET_S = 35
#: A check whose server does not answer must say so at once, not after its clients' timeouts.
SILENT_SERVER_BUDGET_S = 2


def _marks(question: Question) -> list[pytest.MarkDecorator]:
    return [pytest.mark.kafka] if "kafka" in question.uses else []


def _wrong_answers() -> list[Any]:
    return [pytest.param(q, name, id=f"{q.id}-{name}", marks=_marks(q)) for q in all_questions() for name in q.wrong]


def _servers_used() -> list[Any]:
    return [pytest.param(q, server, id=f"{q.id}-{server}") for q in all_questions() for server in q.uses]


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("question", "name"), _wrong_answers())
def test_each_typical_wrong_answer_is_incorrect_with_its_message(question: Question, name: str, lab_stack: Any) -> None:
    wrong = question.wrong[name]
    outcome = question.check(wrong.answer, show=False)
    print(f"{question.id} ({name}): {outcome.seconds:.1f} s")

    assert outcome.verdict is Verdict.INCORRECT, str(outcome)
    assert wrong.says in outcome.message, f"{question.id} ({name}) should say {wrong.says!r}: {outcome}"
    assert f"{question.handle}.hint()" in outcome.message
    assert outcome.seconds < CHECK_BUDGET_S, outcome.seconds


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.parametrize(("question", "server"), _servers_used())
def test_a_server_that_does_not_answer_is_inconclusive(
    question: Question, server: str, lab_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other server is the real one; this one's address is a port nobody listens on, as a stopped server leaves
    it (connection refused), for the kernel and for the workers a check starts alike (both read the environment)."""
    port = free_port()
    if server == "redis":
        monkeypatch.setenv("LABKIT_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    else:
        monkeypatch.setenv("LABKIT_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    for answer in (question.reference_answer(lab_stack.config), *(w.answer for w in question.wrong.values())):
        outcome = question.check(answer, show=False)

        assert outcome.verdict is Verdict.INCONCLUSIVE, str(outcome)
        assert f"{server} at 127.0.0.1:{port}" in outcome.message and "nothing about your answer" in outcome.message
        assert outcome.seconds < SILENT_SERVER_BUDGET_S, outcome.seconds
