"""Every exercise question judged by its real experiment: the reference answer Correct, a typical wrong one Incorrect.

Each check runs in a fresh namespace of the test stack (exported by the session fixture), with real worker
processes where the question has them. Questions that use Kafka are marked ``kafka``, so ``pytest --kafka apache``
judges them again on Apache Kafka; a question whose right answer depends on the broker (a recorded timing) takes
the reference for the broker that answers. Every check's time is printed (``-s``) and kept under its 30 s budget.
"""

from __future__ import annotations

from typing import Any

import pytest

from labkit.exercises import all_questions
from labkit.exercises.questions import Question, Verdict

#: A check's budget at its default size on 2 cores (the issue's), with a little room for a loaded runner.
CHECK_BUDGET_S = 35


def _params() -> list[Any]:
    params = []
    for q in all_questions():
        marks = [pytest.mark.kafka] if "kafka" in q.backends else []
        params.append(pytest.param(q, id=q.id, marks=marks))
    return params


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.timeout(150)
@pytest.mark.parametrize("question", _params())
def test_reference_is_correct_and_a_typical_wrong_answer_incorrect(question: Question, lab_stack: Any) -> None:
    reference = question.check(question.reference_answer(lab_stack.config), show=False)
    name, wrong_answer = next(iter(question.wrong.items()))
    wrong = question.check(wrong_answer, show=False)
    print(f"{question.id}: reference {reference.seconds:.1f} s, wrong ({name}) {wrong.seconds:.1f} s")

    assert reference.verdict is Verdict.CORRECT, str(reference)
    assert wrong.verdict is Verdict.INCORRECT, str(wrong)
    assert f"{question.handle}.hint()" in wrong.message
    assert max(reference.seconds, wrong.seconds) < CHECK_BUDGET_S, (reference.seconds, wrong.seconds)
