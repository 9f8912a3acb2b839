"""Lesson 03's analysis of attempts and backoff, on synthetic event logs with known answers."""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import pandas as pd
import pytest

from labkit.lessons import retries
from labkit.workflow import WorkerSettings

matplotlib.use("Agg")

SETTINGS = WorkerSettings(max_attempts=3, backoff_ms=200)


def event(kind: str, mono: float, booking_id: str | None, attempt: int | None, backend: str = "bullmq",
          source: str = "job 1", **fields: Any) -> dict[str, Any]:  # fmt: skip
    return {"event": kind, "mono": mono, "backend": backend, "booking_id": booking_id, "attempt": attempt,
            "source": source, **fields}  # fmt: skip


def retried_twice(backend: str, booking_id: str, t0: float, gaps: tuple[float, float], **where: Any) -> list[dict]:
    """Fails attempts 1 and 2 (each takes 10 ms), completes attempt 3; ``gaps`` in seconds after each failure."""
    delays = [retries.configured_gap_ms(backend, SETTINGS, a) for a in (1, 2)]
    t1 = t0 + 0.01
    t2 = t1 + gaps[0]
    t3 = t2 + 0.01 + gaps[1]
    return [
        event("started", t0, booking_id, 1, backend, **where),
        event("failed", t1, booking_id, 1, backend, **where),
        event("retried", t1 + 0.002, booking_id, 1, backend, delay_ms=delays[0], **where),
        event("started", t2, booking_id, 2, backend, **where),
        event("failed", t2 + 0.01, booking_id, 2, backend, **where),
        event("retried", t2 + 0.012, booking_id, 2, backend, delay_ms=delays[1], **where),
        event("started", t3, booking_id, 3, backend, **where),
        event("completed", t3 + 0.01, booking_id, 3, backend, **where),
    ]


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows).sort_values("mono", kind="stable").reset_index(drop=True)


def test_configured_gap_doubles_except_on_streams() -> None:
    assert [retries.configured_gap_ms("bullmq", SETTINGS, a) for a in (1, 2, 3)] == [200, 400, 800]
    assert [retries.configured_gap_ms("kafka", SETTINGS, a) for a in (1, 2)] == [200, 400]
    assert [retries.configured_gap_ms("streams", SETTINGS, a) for a in (1, 2)] == [200, 200]
    # The Streams min-idle never drops below the worker's floor, whatever backoff_ms says.
    assert retries.configured_gap_ms("streams", WorkerSettings(backoff_ms=10), 1) == 100


def test_backoff_policy_has_one_column_per_retry() -> None:
    policy = retries.backoff_policy(SETTINGS, ["bullmq", "streams"])
    assert list(policy.columns) == ["1→2", "2→3"]
    assert policy.loc["bullmq"].tolist() == [200, 400] and policy.loc["streams"].tolist() == [200, 200]


def test_transient_ids_are_the_bookings_with_fail_times() -> None:
    bookings = [
        {"booking_id": "a", "fault": {"fail_times": 2}},
        {"booking_id": "b"},
        {"booking_id": "c", "fault": {"poison": True}},
        {"booking_id": "d", "fault": {"fail_times": 0}},
    ]
    assert retries.transient_ids(bookings) == {"a"}


def test_timeline_has_one_row_per_attempt_with_outcome_and_backoff() -> None:
    events = frame(
        [
            *retried_twice("bullmq", "flaky", 10.0, (0.25, 0.45)),
            event("started", 10.0, "steady", 1),
            event("completed", 10.02, "steady", 1),
            # A bad message never starts the workflow: no attempt row.
            event("failed", 10.03, None, 1, bad_message=True),
            event("dead_lettered", 10.04, None, 1),
            event("started", 11.0, "poison", 3),
            event("failed", 11.01, "poison", 3),
            event("dead_lettered", 11.02, "poison", 3),
        ]
    )
    timeline = retries.attempt_timeline(events, SETTINGS)
    flaky = timeline[timeline["booking_id"] == "flaky"]
    assert flaky["attempt"].tolist() == [1, 2, 3]
    assert flaky["outcome"].tolist() == ["failed", "failed", "completed"]
    assert flaky["t_start"].round(3).tolist() == [0.0, 0.26, 0.72]
    assert flaky["backoff_ms"].tolist()[:2] == [200, 400] and math.isnan(flaky["backoff_ms"].iloc[2])
    poison = timeline[timeline["booking_id"] == "poison"].iloc[0]
    assert poison["outcome"] == "dead-lettered" and math.isnan(poison["backoff_ms"])
    assert set(timeline["booking_id"]) == {"flaky", "steady", "poison"}


def test_timeline_keeps_the_order_the_backends_ran_in() -> None:
    events = frame([*retried_twice("streams", "s", 1.0, (0.2, 0.2)), *retried_twice("kafka", "k", 5.0, (0.2, 0.4))])
    assert list(dict.fromkeys(retries.attempt_timeline(events, SETTINGS)["backend"])) == ["streams", "kafka"]


def test_measured_gaps_against_configured_and_announced() -> None:
    events = frame([*retried_twice("bullmq", "b", 1.0, (0.25, 0.45)), *retried_twice("streams", "s", 3.0, (0.3, 0.3))])
    gaps = retries.measured_gaps(retries.attempt_timeline(events, SETTINGS), events)
    b = gaps[gaps["backend"] == "bullmq"]
    assert b["retry"].tolist() == ["1→2", "2→3"]
    assert b["gap_ms"].round(1).tolist() == [250.0, 450.0]
    assert b["configured_ms"].tolist() == [200, 400] and b["announced_ms"].tolist() == [200, 400]
    assert b["recorded_ms"].round(1).tolist() == [2.0, 2.0]
    s = gaps[gaps["backend"] == "streams"]
    assert s["configured_ms"].tolist() == [200, 200] and s["gap_ms"].round(1).tolist() == [300.0, 300.0]


def test_gaps_statement_prints_how_late_each_backend_retried_and_the_streams_overshoot() -> None:
    events = frame([*retried_twice("bullmq", "b", 1.0, (0.25, 0.45)), *retried_twice("streams", "s", 3.0, (0.3, 0.37))])
    gaps = retries.measured_gaps(retries.attempt_timeline(events, SETTINGS), events)
    assert retries.median_extra_ms(gaps, "bullmq") == pytest.approx(50.0)
    said = retries.gaps_statement(gaps, SETTINGS)
    assert said.text.startswith("The median retry came this much later than configured: BullMQ 50.0 ms, Redis "
                                "Streams 135.0 ms.")  # fmt: skip
    # min-idle 200 ms: the reclaimer looks every 100 ms; the longest overshoot, 170 ms, is 70 ms past one period
    assert "looks every 100 ms" in said.text and "longest overshoot here was 170.0 ms, 70.0 ms more" in said.text
    assert said.figures["03.streams_overshoot_max_ms"] == pytest.approx(170.0)
    assert "1→2 300 ms, 2→3 370 ms" in said.text


def test_kafka_announces_its_delay_in_seconds() -> None:
    rows = retried_twice("kafka", "k", 1.0, (0.2, 0.4))
    for row in rows:
        if row["event"] == "retried":
            row["delay_s"] = row.pop("delay_ms") / 1000
    events = frame(rows)
    gaps = retries.measured_gaps(retries.attempt_timeline(events, SETTINGS), events)
    assert gaps["announced_ms"].tolist() == [200, 400]


def test_gap_table_counts_gaps_shorter_than_configured() -> None:
    # A 150 ms gap where 200 ms were configured is too short; 198 ms is within the clock slack.
    events = frame(
        [*retried_twice("bullmq", "short", 1.0, (0.15, 0.4)), *retried_twice("bullmq", "ok", 3.0, (0.198, 0.5))]
    )
    table = retries.gap_table(retries.measured_gaps(retries.attempt_timeline(events, SETTINGS), events))
    assert table.loc[("bullmq", "1→2"), "shorter"] == 1
    assert table.loc[("bullmq", "2→3"), "shorter"] == 0
    assert table.loc[("bullmq", "1→2"), "measured_min_ms"] == 150.0
    assert table.loc[("bullmq", "2→3"), "retries"] == 2


def test_attempt_summary() -> None:
    events = frame(
        [
            *retried_twice("bullmq", "flaky", 1.0, (0.2, 0.4)),
            event("started", 1.0, "steady", 1),
            event("completed", 1.01, "steady", 1),
            event("started", 1.0, "late", 1),
            event("failed", 1.01, "late", 1),
            event("started", 1.5, "late", 2),
            event("completed", 1.51, "late", 2),
        ]
    )
    summary = retries.attempt_summary(retries.attempt_timeline(events, SETTINGS), {"flaky", "late"})
    row = summary.loc["bullmq"]
    assert (row["bookings"], row["transient"], row["transient_completed"]) == (3, 2, 2)
    assert row["final_attempts"] == [2, 3]
    assert (row["steady_first_try"], row["retries"]) == (1, 3)


def test_retry_waits_flags_partitions_outside_the_retry_topic() -> None:
    events = frame(
        [
            event("retry_wait", 1.0, None, None, "kafka", partition="ns-bookings.retry/2", offset=4, wait_s=0.2),
            event("retry_wait", 2.0, None, None, "kafka", partition="ns-bookings/0", offset=9, wait_s=0.1),
        ]
    )
    waits = retries.retry_waits(events, "ns-bookings.retry")
    assert waits["retry_topic"].tolist() == [True, False]
    assert waits["offset"].tolist() == [4, 9]
    assert retries.retry_waits(frame([event("started", 1.0, "x", 1)]), "ns-bookings.retry").empty


def test_overtakes_counts_records_that_went_ahead_of_a_retried_one() -> None:
    def steady(booking_id: str, offset: int, done: float) -> list[dict[str, Any]]:
        where = {"source": f"t-bookings/0/{offset}"}
        return [event("started", done - 0.01, booking_id, 1, "kafka", **where),
                event("completed", done, booking_id, 1, "kafka", **where)]  # fmt: skip

    events = frame(
        [
            *retried_twice("kafka", "flaky", 1.0, (0.2, 0.4), source="t-bookings/0/5"),
            *retried_twice("kafka", "flaky-too", 1.1, (0.2, 0.4), source="t-bookings/0/7"),
            *steady("before", 4, 0.9),
            *steady("fast", 6, 1.05),
            *steady("slow", 8, 9.0),  # completes after flaky's last attempt: it did not go ahead
        ]
    )
    table = retries.overtakes(events, retries.attempt_timeline(events, SETTINGS)).set_index("booking_id")
    assert table.loc["flaky", ["offset", "behind", "retried_behind", "overtook"]].tolist() == [5, 3, 1, 1]
    assert table.loc["flaky", "in_place_wait_ms"] == 600
    assert table.loc["flaky-too", ["behind", "retried_behind", "overtook"]].tolist() == [1, 0, 0]


@pytest.mark.parametrize("plot", [retries.plot_attempts, retries.plot_gaps])
def test_charts_return_their_axes(plot: Any) -> None:
    import matplotlib.pyplot as plt

    events = frame([*retried_twice("bullmq", "b", 1.0, (0.2, 0.4)), *retried_twice("streams", "s", 3.0, (0.3, 0.3))])
    timeline = retries.attempt_timeline(events, SETTINGS)
    data = timeline if plot is retries.plot_attempts else retries.measured_gaps(timeline, events)
    _, ax = plt.subplots()
    assert plot(data, ax=ax) is ax
    plt.close("all")
