"""Order analysis on synthetic event logs whose answers are known (labkit/lessons/ordering.py)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from labkit.lessons import ordering

Span = tuple[int, float, float, str]  # seq, start, end, outcome of one attempt


def log(booking: str, attempts: list[Span], config: str = "cfg", partition: str = "bookings/0") -> list[dict[str, Any]]:
    """Event rows for one booking, as workers write them: ``started`` then ``completed`` or ``failed``.

    Only ``started`` and ``completed`` carry ``seq`` (as in labkit.workflow); the source names the message.
    """
    rows: list[dict[str, Any]] = []
    tries: dict[int, int] = {}
    for seq, start, end, outcome in attempts:
        attempt = tries[seq] = tries.get(seq, 0) + 1
        source = f"{partition}/{booking}-{seq}"
        common = {"config": config, "booking_id": booking, "attempt": attempt, "source": source, "worker": "w1"}
        rows.append({**common, "event": "started", "mono": start, "seq": seq})
        rows.append({**common, "event": outcome, "mono": end, "seq": seq if outcome == "completed" else None})
    return rows


def frame(*logs: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([row for rows in logs for row in rows]).sort_values("mono", ignore_index=True)


IN_ORDER = [(0, 0, 1, "completed"), (1, 1.5, 2, "completed"), (2, 2.5, 3, "completed")]
# modified starts before created is done, but finishes after it: a race that happened to be won
OVERLAP = [(0, 0, 3, "completed"), (1, 1, 4, "completed"), (2, 5, 6, "completed")]
# created is slow: modified and cancelled both start and finish before it
INVERTED = [(0, 0, 5, "completed"), (1, 1, 2, "completed"), (2, 3, 4, "completed")]
# created fails, modified runs meanwhile, created's retry completes, then cancelled
RETRIED = [(0, 0, 1, "failed"), (1, 2, 3, "completed"), (0, 4, 5, "completed"), (2, 6, 7, "completed")]


def verdicts(attempts: list[Span]) -> list[tuple[int, int, bool, bool]]:
    pairs = ordering.order_pairs(frame(log("b", attempts)))
    return list(pairs[["seq_a", "seq_b", "violation", "out_of_order"]].itertuples(index=False, name=None))


def test_events_processed_one_after_another_break_no_rule() -> None:
    assert verdicts(IN_ORDER) == [(0, 1, False, False), (0, 2, False, False), (1, 2, False, False)]


def test_an_event_started_before_the_previous_one_finished_is_a_violation_even_if_it_finished_later() -> None:
    assert verdicts(OVERLAP) == [(0, 1, True, False), (0, 2, False, False), (1, 2, False, False)]


def test_events_finished_before_an_earlier_one_are_applied_out_of_order() -> None:
    assert verdicts(INVERTED) == [(0, 1, True, True), (0, 2, True, True), (1, 2, False, False)]


def test_a_retried_event_is_judged_from_its_first_start_to_its_completion() -> None:
    spans = ordering.message_spans(frame(log("b", RETRIED)))
    created = spans[spans["seq"] == 0].iloc[0]
    assert (created["start"], created["done"], created["attempts"]) == (0, 5, 2)
    assert spans["retried"].all(), "one retried message marks its whole booking"
    assert verdicts(RETRIED) == [(0, 1, True, True), (0, 2, False, False), (1, 2, False, False)]


def test_a_message_that_never_completed_is_left_out_of_the_pairs() -> None:
    dead = [(0, 0, 1, "failed"), (1, 2, 3, "completed"), (2, 4, 5, "completed")]
    assert verdicts(dead) == [(1, 2, False, False)]


def test_the_final_state_is_that_of_the_event_applied_last() -> None:
    finals = ordering.final_events(frame(log("ok", IN_ORDER), log("bad", INVERTED), log("retry", RETRIED)))
    by_booking = finals.set_index("booking_id")
    assert by_booking.loc["ok", "applied_last"] == 2 and by_booking.loc["ok", "right_state"]
    assert by_booking.loc["bad", "applied_last"] == 0 and not by_booking.loc["bad", "right_state"]
    assert by_booking.loc["retry", "right_state"]


def test_the_report_counts_per_configuration_and_group() -> None:
    one = frame(log("a", IN_ORDER, "one"), log("b", INVERTED, "one"), log("c", RETRIED, "one"))
    two = frame(log("a", OVERLAP, "two"))
    report = ordering.order_report(one, two)

    assert list(report.index) == [("one", ordering.NO_RETRY), ("one", ordering.RETRIED), ("two", ordering.NO_RETRY)]
    assert report.loc[("one", ordering.NO_RETRY)].to_dict() == {
        "bookings": 2,
        "pairs": 6,
        "violations": 2,
        "bookings_violated": 1,
        "out_of_order": 2,
        "wrong_state": 1,
    }
    assert report.loc[("one", ordering.RETRIED), "violations"] == 1
    assert report.loc[("two", ordering.NO_RETRY), ["violations", "out_of_order", "wrong_state"]].tolist() == [1, 0, 0]
    assert ordering.violations(report, "one") == 2
    assert ordering.violations(report, "two", ordering.RETRIED) == 0, "a group without bookings has no violations"


def test_the_report_statement_counts_the_unretried_bookings_each_parallel_setup_broke() -> None:
    report = ordering.order_report(frame(log("a", IN_ORDER, "one"), log("b", INVERTED, "one")),
                                   frame(log("a", OVERLAP, "two"), log("b", OVERLAP, "two")))  # fmt: skip
    said = ordering.report_statement(report, {"streams_3": "one", "bullmq_8": "two"})
    assert said.text == "Bookings never retried whose order was broken, of 2: one: 1; two: 2."
    assert said.figures == {"05.unretried_bookings": 2, "05.out_of_order_streams_3": 1, "05.out_of_order_bullmq_8": 2}


def test_example_booking_prefers_one_applied_out_of_order() -> None:
    events = frame(log("a-overlap", OVERLAP), log("b-inverted", INVERTED), log("c-retried", RETRIED))
    assert ordering.example_booking(events, "cfg", retried=False) == "b-inverted"
    assert ordering.example_booking(events, "cfg", retried=True) == "c-retried"


def test_attempts_pair_each_start_with_its_own_end() -> None:
    attempts = ordering.attempts_of(frame(log("b", RETRIED)), "cfg", "b")
    assert attempts[["seq", "attempt", "start", "end", "outcome"]].values.tolist() == [
        [0, 1, 0, 1, "failed"],
        [1, 1, 2, 3, "completed"],
        [0, 2, 4, 5, "completed"],
        [2, 1, 6, 7, "completed"],
    ]


def test_overtaken_by_counts_other_records_of_the_partition_done_during_the_retry_wait() -> None:
    waiting = log("b", RETRIED, partition="bookings/1")  # created waits from t=1 to t=5
    same = log("x", [(0, 1.5, 2.5, "completed"), (1, 3, 3.5, "completed")], partition="bookings/1")
    other = log("y", [(0, 2, 3, "completed")], partition="bookings/2")
    late = log("z", [(0, 5.5, 6, "completed")], partition="bookings/1")
    assert ordering.overtaken_by(frame(waiting, same, other, late), "cfg", "b") == 2
    assert ordering.overtaken_by(frame(log("c", IN_ORDER)), "cfg", "c") == 0, "nothing waited"


def test_current_partitions_replays_assignments_and_revocations() -> None:
    def rebalance(worker: str, event: str, *partitions: str) -> dict[str, Any]:
        return {"event": event, "worker": worker, "partitions": list(partitions)}

    events = pd.DataFrame(
        [
            rebalance("w1", "assigned", "t/0", "t/1", "t/2", "t.retry/0"),
            {"event": "started", "worker": "w1", "partitions": None},
            rebalance("w1", "revoked", "t/0", "t/1", "t/2", "t.retry/0"),
            rebalance("w1", "assigned", "t/0", "t.retry/0"),
            rebalance("w2", "assigned", "t/1", "t/2"),
        ]
    )
    assert ordering.current_partitions(events, "t") == {"w1": {"t/0"}, "w2": {"t/1", "t/2"}}


def test_booking_events_tell_each_story_in_order_with_a_seeded_fault_on_created_only() -> None:
    messages = ordering.booking_events(20, seed=9, retried=4, jitter_ms=15)
    table = ordering.messages_table(messages)

    assert len(messages) == 60
    assert table.groupby("booking_id")["event"].apply(list).map(tuple).unique().tolist() == [
        ("created", "modified", "cancelled")
    ]
    failing = table[table["fail_times"] > 0]
    assert len(failing) == 4 and set(failing["seq"]) == {0}
    assert table["slow_ms"].between(0, 15).all() and table["slow_ms"].nunique() > 1
    assert ordering.booking_events(20, seed=9, retried=4, jitter_ms=15) == messages
    with pytest.raises(ValueError, match="retried"):
        ordering.booking_events(2, retried=3)
