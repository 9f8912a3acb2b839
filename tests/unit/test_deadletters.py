"""Lesson 04's dead-letter analysis: the bad messages really are bad, the fixes are checked, the books add up."""

from __future__ import annotations

import json
from typing import Any

import matplotlib
import pandas as pd
import pytest

from labkit.booking import encode, parse_booking
from labkit.errors import BadMessage
from labkit.lessons import deadletters

matplotlib.use("Agg")


@pytest.mark.parametrize("name", list(deadletters.bad_messages()))
def test_every_bad_message_breaks_the_contract(name: str) -> None:
    message = deadletters.bad_messages()[name]
    with pytest.raises(BadMessage):
        parse_booking(message if isinstance(message, str) else encode(message))


def test_the_raw_message_breaks_the_contract_and_the_template_does_not() -> None:
    with pytest.raises(BadMessage, match="missing field 'hotel_id'"):
        parse_booking(json.dumps(deadletters.raw_message("kafka")))
    assert parse_booking(encode(deadletters.booking("fine"))).booking_id == "fine"


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("bad message: message is not valid JSON: Expecting value", "malformed"),
        ("poison: card declined (after 3 attempts)", "poison"),
        ("attempts exhausted: payment gateway timeout", "attempts exhausted"),
        ("delivered 4 times without a verdict (max_attempts 3)", "worker lost"),
    ],
)
def test_kind_of_a_reason(reason: str, kind: str) -> None:
    assert deadletters.kind_of(reason) == kind


def test_fix_removes_the_poison_fault() -> None:
    fixed, change = deadletters.fix_booking(encode(deadletters.booking("p", fault={"poison": True})))
    assert fixed is not None and "fault" not in fixed and change == "removed the fault"


def test_fix_corrects_guests_sent_as_text_and_backwards_dates_together() -> None:
    text = encode(deadletters.booking("g", guests="3", check_in="2027-05-10", check_out="2027-05-07"))
    fixed, change = deadletters.fix_booking(text)
    assert fixed is not None
    assert (fixed["guests"], fixed["check_in"], fixed["check_out"]) == (3, "2027-05-07", "2027-05-10")
    assert change == "guests '3' → 3; swapped check_in and check_out"
    parse_booking(encode(fixed))  # the fixed booking keeps the contract


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"booking_id": "torn", "guests": ', "not JSON"),
        ('["a", "list"]', "not a JSON object"),
        (encode(deadletters.booking("crowd", guests=12)), "needs its producer: field 'guests' must be 1-10, got 12"),
        (encode(deadletters.booking("words", guests="two")), "must be an integer"),
    ],
)
def test_what_cannot_be_fixed_says_why(text: str, why: str) -> None:
    fixed, change = deadletters.fix_booking(text)
    assert fixed is None and why in change


def test_a_valid_dead_letter_is_replayed_unchanged() -> None:
    fixed, change = deadletters.fix_booking(encode(deadletters.booking("ok")))
    assert fixed == deadletters.booking("ok") and change.startswith("unchanged")


def dlq(rows: list[tuple[str, str | None, str, str, int, str]]) -> pd.DataFrame:
    columns = ["backend", "booking_id", "kind", "reason", "attempts", "source", "booking"]
    return pd.DataFrame([(b, i, deadletters.kind_of(r), r, a, s, t) for b, i, r, s, a, t in rows], columns=columns)


def test_fixes_marks_each_dead_letter_fixable_or_not() -> None:
    letters = dlq(
        [
            ("streams", "p", "poison: declined", "1-0", 3, encode(deadletters.booking("p", fault={"poison": True}))),
            ("streams", None, "bad message: not JSON", "1-1", 1, "{torn"),
        ]
    )
    table = deadletters.fixes(letters)
    assert table["fixable"].tolist() == [True, False]
    assert table["fixed"].iloc[0] == deadletters.booking("p") and table["fixed"].iloc[1] is None


def test_with_deliveries_matches_sources_across_naming() -> None:
    # The Streams DLQ names a source "1-0"; the worker's events name it "entry 1-0".
    letters = dlq([("streams", "p", "poison: x", "1-0", 3, "{}"), ("kafka", "q", "poison: x", "t/0/5", 3, "{}")])
    events = pd.DataFrame(
        [{"event": "received", "backend": "streams", "source": "entry 1-0"}] * 3
        + [{"event": "received", "backend": "kafka", "source": "t/0/5"}] * 2
        + [{"event": "started", "backend": "kafka", "source": "t/0/5"}]
    )
    assert deadletters.with_deliveries(letters, events)["deliveries"].tolist() == [3, 2]


def test_replay_outcomes_finds_the_completion_of_each_replayed_booking() -> None:
    replayed = {
        "bullmq": pd.DataFrame({"booking_id": ["a", "b"], "replayed_from": ["job 1", "job 2"], "sent_to": ["9", "10"]})
    }
    events = pd.DataFrame(
        [
            {"event": "started", "backend": "bullmq", "booking_id": "a", "attempt": 1},
            {"event": "completed", "backend": "bullmq", "booking_id": "a", "attempt": 1},
            {"event": "completed", "backend": "streams", "booking_id": "b", "attempt": 1},  # other backend
        ]
    )
    table = deadletters.replay_outcomes(events, replayed)
    assert table["completed"].tolist() == [True, False]
    assert table.loc[0, "attempt"] == 1


def test_the_reconciliation_statement_and_the_offsets_answer_in_words() -> None:
    before = pd.DataFrame({"produced": [48], "completed": [40], "dead_lettered": [8], "replayed": [0], "lost": [0]},
                          index=pd.Index(["kafka"], name="backend"))  # fmt: skip
    after = before.assign(completed=45, dead_lettered=3, replayed=5)
    said = deadletters.reconciliation_statement(before, after)
    assert said.text == ("- Kafka: 48 sent = 40 completed + 8 dead-lettered, then 45 + 3 after replaying 5; "
                         "lost: 0.")  # fmt: skip
    answers = pd.DataFrame({"partition": ["d/0", "d/1"], "offset": [-1, -1]})
    assert deadletters.answered_offsets(answers) == "-1 on every partition"
    assert deadletters.answered_offsets(answers.assign(offset=[0, 3])) == "d/0: 0, d/1: 3"


def test_reconciliation_chart_returns_its_axes() -> None:
    import matplotlib.pyplot as plt

    index = pd.Index(["bullmq", "kafka"], name="backend")
    row: dict[str, Any] = {"produced": 10, "completed": 7, "dead_lettered": 3, "replayed": 0, "lost": 0}
    before = pd.DataFrame([row, row], index=index)
    after = before.assign(completed=9, dead_lettered=1, replayed=2)
    _, ax = plt.subplots()
    assert deadletters.plot_reconciliation({"before": before, "after": after}, ax=ax) is ax
    plt.close("all")
