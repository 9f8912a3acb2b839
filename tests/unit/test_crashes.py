"""Lesson 07's analysis on synthetic event logs with known answers: recovery times, duplicates, effects."""

from __future__ import annotations

from typing import Any

import matplotlib
import pandas as pd
import pytest

from labkit.lessons import crashes
from labkit.lessons.crashes import Kill

matplotlib.use("Agg")

KILL_AT = 100.0


def event(event: str, mono: float, worker: str, booking_id: str | None = None, **fields: Any) -> dict[str, Any]:
    backend = worker.split("-")[0]
    pid = {"w1": 11, "w2": 22}[worker.split("-")[1]]
    return {"event": event, "mono": mono, "worker": worker, "backend": backend, "pid": pid, "booking_id": booking_id,
            **fields}  # fmt: skip


def frame(*rows: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(list(rows)).sort_values("mono", kind="stable").reset_index(drop=True)


def kill(backend: str, source: str, window: tuple[float, float], worker: str = "w1") -> Kill:
    return Kill(backend, f"{backend}-{worker}", 11, KILL_AT, 1e9, source, "rule", window)


# A Streams crash: w1 dies running the victim (and one other booking); w2 claims both 2.4 s later.
# b4 was sent twice, so its second run is a duplicate.
STREAMS = frame(
    event("started", 99.0, "streams-w1", "victim", source="entry 1-0", attempt=1),
    event("started", 99.1, "streams-w1", "other", source="entry 1-1", attempt=1),
    event("started", 99.5, "streams-w2", "b3", source="entry 1-2", attempt=1),
    event("started", 99.6, "streams-w2", "b4", source="entry 1-3", attempt=1),
    event("completed", 101.0, "streams-w2", "b3", source="entry 1-2", attempt=1, duplicate=False),
    event("received", 102.4, "streams-w2", "victim", source="entry 1-0", attempt=2),
    event("started", 102.4, "streams-w2", "victim", source="entry 1-0", attempt=2),
    event("received", 102.4, "streams-w2", "other", source="entry 1-1", attempt=2),
    event("started", 102.4, "streams-w2", "other", source="entry 1-1", attempt=2),
    event("completed", 102.5, "streams-w2", "b4", source="entry 1-3", attempt=1, duplicate=False),
    event("started", 102.6, "streams-w2", "b4", source="entry 1-4", attempt=1),  # sent twice by the producer
    event("completed", 103.9, "streams-w2", "victim", source="entry 1-0", attempt=2, duplicate=False),
    event("completed", 104.0, "streams-w2", "other", source="entry 1-1", attempt=2, duplicate=False),
    event("completed", 104.1, "streams-w2", "b4", source="entry 1-4", attempt=1, duplicate=True),
)

# A Kafka crash: w2 is assigned w1's partition 9.9 s after the kill and starts again at offset 0.
KAFKA = frame(
    event("assigned", 90.0, "kafka-w1", partitions=["ns-bookings/0", "ns-bookings/1"]),
    event("assigned", 90.1, "kafka-w2", partitions=["ns-bookings/2"]),
    event("started", 99.4, "kafka-w1", "victim", source="ns-bookings/1/0", attempt=1),
    event("revoked", 108.0, "kafka-w2", partitions=["ns-bookings/2"], lost=False),
    event("assigned", 109.9, "kafka-w2", partitions=["ns-bookings/0", "ns-bookings/1", "ns-bookings/2"]),
    event("started", 110.1, "kafka-w2", "victim", source="ns-bookings/1/0", attempt=1),
    event("completed", 111.6, "kafka-w2", "victim", source="ns-bookings/1/0", attempt=1, duplicate=False),
)


def test_recovery_table_times_each_step_from_the_kill() -> None:
    kills = {"streams": kill("streams", "entry 1-0", (1.3, 3.3))}
    table = crashes.recovery_table(STREAMS, kills, "victim", {"streams": 102.4})
    row = table.loc["streams"]

    assert row["handed_back_s"] == pytest.approx(2.4)
    assert row["redelivered_s"] == pytest.approx(2.4) and row["redelivered_by"] == "streams-w2"
    assert row["completed_s"] == pytest.approx(3.9)
    assert row["same_source"] and row["not_early"]
    # At kill + 1.3 s, w2 had started b3 and b4 and finished only b3.
    assert row["survivor_busy"] == 1


def test_recovery_table_says_whether_the_hand_over_came_inside_its_window() -> None:
    inside = crashes.recovery_table(STREAMS, {"streams": kill("streams", "entry 1-0", (1.3, 3.3))}, "victim",
                                    {"streams": 102.4})  # fmt: skip
    late = crashes.recovery_table(STREAMS, {"streams": kill("streams", "entry 1-0", (1.0, 2.0))}, "victim",
                                  {"streams": 102.4})  # fmt: skip
    assert inside.loc["streams", "in_window"] and not late.loc["streams", "in_window"]
    said = crashes.recovery_statement(pd.concat([inside, late.rename(index={"streams": "kafka"})]))
    assert said.text.startswith("Handed back after the kill: Redis Streams 2.4 s (window 1.3–3.3 s)")
    assert said.text.endswith("In this run outside its box: kafka.")
    assert said.figures == {
        "07.handed_back_streams_s": pytest.approx(2.4),
        "07.handed_back_kafka_s": pytest.approx(2.4),
    }


def test_kafkas_window_is_the_session_timeout_give_or_take_a_heartbeat_plus_the_measured_rebalance() -> None:
    settings = crashes.crash_settings("kafka", True, 300, 5000, 2000, 1500)
    rule, window = crashes._rule_at_kill("kafka", settings, None, None, pd.Series(), [], 3.0)  # type: ignore[arg-type]
    session, heartbeat = crashes.KAFKA_SESSION_TIMEOUT_S, crashes.KAFKA_HEARTBEAT_INTERVAL_S
    assert window == (session - heartbeat + 3.0, session + heartbeat + 3.0) and "rebalance" in rule
    # KAFKA: the victim's partition came back 9.9 s after the kill; a 3 s rebalance puts it inside (7, 11)
    assert window[0] <= 9.9 <= window[1]


def test_join_rebalance_is_first_revoked_to_last_assigned() -> None:
    joined = frame(
        event("assigned", 1.0, "kafka-w1", partitions=["t/0", "t/1", "t/2"]),
        event("revoked", 3.0, "kafka-w1", partitions=["t/0", "t/1", "t/2"]),
        event("assigned", 6.0, "kafka-w2", partitions=["t/2"]),
        event("assigned", 6.1, "kafka-w1", partitions=["t/0", "t/1"]),
    )
    assert crashes.join_rebalance_s(joined) == pytest.approx(3.1)
    assert pd.isna(crashes.join_rebalance_s(joined[joined["event"] != "revoked"]))


def test_extra_charges_name_where_every_charge_beyond_one_came_from() -> None:
    bookings = ["victim", "other", "b3", "b4"]
    kills = {"streams": kill("streams", "entry 1-0", (1.3, 3.3))}
    # w1 (killed) charged victim and "other" before dying; b4 was sent twice.
    payments = {"victim": 2, "other": 2, "b3": 1, "b4": 2}
    table = crashes.extra_charges_table(STREAMS, {"streams": {"payments": payments}}, kills, "victim", "b4", bookings)
    row = table.loc["streams"]
    assert (row["charges"], row["extra"], row["victim"], row["resent"], row["others"]) == (7, 3, 1, 1, 1)
    assert row["killed_runs"] == 2 and row["charged_and_killed"] == 1 and row["explained"]
    words = crashes.explain_extra_charges(table).text
    assert "7 charges for 4 bookings, 3 extra" in words and "1 other booking the killed worker had charged" in words
    # a charge nothing explains: b3 charged twice, though it never ran on the killed worker
    double = {**payments, "b3": 2}
    assert not crashes.extra_charges_table(STREAMS, {"streams": {"payments": double}}, kills, "victim", "b4",
                                           bookings).loc["streams", "explained"]  # fmt: skip


def test_recovery_table_flags_an_early_hand_over_and_a_missing_redelivery() -> None:
    kills = {"streams": kill("streams", "entry 1-0", (3.0, 3.3))}
    early = crashes.recovery_table(STREAMS, kills, "victim", {"streams": 102.4}).loc["streams"]
    assert not early["not_early"]

    lost = crashes.recovery_table(STREAMS, kills, "nobody", {}).loc["streams"]
    assert not lost["same_source"] and pd.isna(lost["completed_s"]) and lost["redelivered_by"] is None


def test_redelivery_of_another_source_is_not_the_same_message() -> None:
    resent = STREAMS.copy()
    resent.loc[(resent["worker"] == "streams-w2") & (resent["booking_id"] == "victim"), "source"] = "entry 9-0"
    table = crashes.recovery_table(resent, {"streams": kill("streams", "entry 1-0", (1.3, 3.3))}, "victim", {})
    assert not table.loc["streams", "same_source"]


def test_handed_back_is_the_claim_on_streams_and_the_new_assignment_on_kafka() -> None:
    assert crashes.handed_back_at(STREAMS, kill("streams", "entry 1-0", (0, 0)), "victim") == 102.4
    # Kafka: w2's revoke at 108.0 does not count; its assignment of partition 1 at 109.9 does.
    assert crashes.handed_back_at(KAFKA, kill("kafka", "ns-bookings/1/0", (4, 6)), "victim") == 109.9
    assert pd.isna(crashes.handed_back_at(KAFKA, kill("kafka", "ns-bookings/7/0", (4, 6)), "victim"))
    assert pd.isna(crashes.handed_back_at(KAFKA, kill("bullmq", "job 1", (4, 8)), "victim"))


def test_running_at_counts_started_and_not_finished_runs() -> None:
    assert crashes.running_at(STREAMS, "streams-w2", 99.55) == 1
    assert crashes.running_at(STREAMS, "streams-w2", 102.45) == 3
    assert crashes.running_at(STREAMS, "streams-w2", 200) == 0


def test_duplicate_table_counts_the_log_and_compares_with_the_ledger() -> None:
    table = crashes.duplicate_table(STREAMS, {"streams": {"duplicates": 1}})
    row = table.loc["streams"]
    assert (row["runs_started"], row["completions"], row["distinct_completed"]) == (7, 5, 4)
    assert row["duplicates_in_log"] == 1 and row["agree"]
    assert not crashes.duplicate_table(STREAMS, {"streams": {"duplicates": 2}}).loc["streams", "agree"]


def test_effects_table_and_charges_per_booking_spot_double_effects() -> None:
    bookings = ["victim", "b2", "b3"]
    effects = {
        "bullmq": {"payments": {"victim": 2, "b2": 1, "b3": 2}, "inventory": {"hotel-1": 2, "hotel-2": 2}},
        "streams": {"payments": {"victim": 1, "b2": 1, "b3": 1}, "inventory": {"hotel-1": 1, "hotel-2": 2}},
    }
    once = {b: 1 for b in bookings}
    files = {
        "bullmq": {"confirmations": {**once, "b3": 2}, "outbox": {**once, "b3": 2}},
        "streams": {"confirmations": once, "outbox": once},
    }
    stats = {"bullmq": {"completed": 3}, "streams": {"completed": 3}}
    table = crashes.effects_table(effects, files, stats, bookings, "victim")

    assert table.loc["bullmq"].to_dict() == {
        "completed": 3, "charges": 5, "victim_charges": 2, "most_charges": 2, "inventory": 4,
        "confirmations": 4, "emails": 4, "exact": False,
    }  # fmt: skip
    assert table.loc["streams", "exact"]
    charged = crashes.charges_per_booking(effects, bookings)
    assert list(charged.index) == ["victim", "b3"]
    assert charged.loc["victim"].to_dict() == {"bullmq": 2, "streams": 1}


def test_a_booking_never_charged_is_not_exact() -> None:
    effects = {"kafka": {"payments": {"b1": 1}, "inventory": {"h": 1}}}
    files = {"kafka": {"confirmations": {"b1": 1}, "outbox": {"b1": 1}}}
    table = crashes.effects_table(effects, files, {"kafka": {"completed": 1}}, ["b1", "b2"], "b1")
    assert not table.loc["kafka", "exact"]
    assert list(crashes.charges_per_booking(effects, ["b1", "b2"]).index) == ["b2"]


def pending(after_consumer: str, after_deliveries: int, entries: tuple[str, ...] = ("1-0", "1-1")) -> pd.DataFrame:
    rows = [{"moment": "at the kill", "entry": e, "consumer": "w1", "idle_ms": 600, "deliveries": 1}
            for e in ("1-0", "1-1")]  # fmt: skip
    rows += [{"moment": "after the claim", "entry": e, "consumer": after_consumer, "idle_ms": 3,
              "deliveries": after_deliveries} for e in entries]  # fmt: skip
    return pd.DataFrame(rows)


def test_claimed_by_survivor_needs_every_entry_moved_with_one_more_delivery() -> None:
    assert crashes.claimed_by_survivor(pending("w2", 2), "w1")
    assert not crashes.claimed_by_survivor(pending("w1", 2), "w1"), "still with the dead consumer"
    assert not crashes.claimed_by_survivor(pending("w2", 1), "w1"), "a claim counts a delivery"
    assert not crashes.claimed_by_survivor(pending("w2", 2, ("1-0",)), "w1"), "an entry went missing"
    assert not crashes.claimed_by_survivor(pending("w2", 2).iloc[0:0], "w1")


def test_replayed_from_commit_compares_the_offsets_with_the_killed_record() -> None:
    offsets = pd.DataFrame(
        {"committed at the kill": {"t/0": 4, "t/1": -1}, "committed after recovery": {"t/0": 9, "t/1": 3}}
    )
    assert crashes.replayed_from_commit(offsets, kill("kafka", "t/0/4", (4, 6)))
    assert crashes.replayed_from_commit(offsets, kill("kafka", "t/1/0", (4, 6)))
    assert not crashes.replayed_from_commit(offsets, kill("kafka", "t/0/3", (4, 6))), "committed before the kill"
    assert not crashes.replayed_from_commit(offsets, kill("kafka", "t/0/9", (4, 6))), "never committed after"
    assert not crashes.replayed_from_commit(offsets, kill("kafka", "t/5/0", (4, 6)))


def test_membership_lists_the_group_events_in_order() -> None:
    table = crashes.membership(KAFKA)
    assert list(table["event"]) == ["assigned", "assigned", "revoked", "assigned"]
    assert table["at_s"].iloc[0] == 0 and table["at_s"].iloc[-1] == pytest.approx(19.9)
    assert table["partitions"].iloc[1] == "ns-bookings/2"


# max.poll.interval.ms: w1 runs "slow" for 12 s, leaves the group after 6 s; w2 runs it again at 10 s.
MAX_POLL = frame(
    event("assigned", 0.0, "kafka-w1", partitions=["t/0"]),
    event("assigned", 0.0, "kafka-w2", partitions=["t/1"]),
    event("started", 1.0, "kafka-w1", "fast", source="t/0/0", attempt=1),
    event("completed", 1.1, "kafka-w1", "fast", source="t/0/0", attempt=1, duplicate=False),
    event("started", 1.2, "kafka-w1", "slow", source="t/0/1", attempt=1),
    event("left_group", 7.25, "kafka-w1", partitions=["t/0"], reason="too slow"),
    event("started", 11.2, "kafka-w2", "slow", source="t/0/1", attempt=1),
    event("completed", 11.3, "kafka-w2", "slow", source="t/0/1", attempt=1, duplicate=False),
    event("completed", 13.2, "kafka-w1", "slow", source="t/0/1", attempt=1, duplicate=True),
    event("rejoining", 13.3, "kafka-w1"),
)


def test_max_poll_table_follows_the_booking_that_outran_the_limit() -> None:
    table = crashes.max_poll_table(MAX_POLL, "kafka-w1", 6000)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["booking_id"] == "slow" and row["over_limit"] and row["redelivered_to"] == "kafka-w2"
    assert row["left_after_s"] == pytest.approx(6.05)
    assert row["redelivered_s"] == pytest.approx(10.0)
    assert row["slow_finished_s"] == pytest.approx(12.0)
    # every column counts from the slow booking's start: it rejoined after its handler returned
    assert row["rejoined_s"] == pytest.approx(12.1) and row["rejoined_s"] > row["slow_finished_s"]


def test_max_poll_table_flags_a_group_exit_before_the_limit_and_is_empty_without_one() -> None:
    assert not crashes.max_poll_table(MAX_POLL, "kafka-w1", 8000).iloc[0]["over_limit"]
    assert crashes.max_poll_table(MAX_POLL[MAX_POLL["event"] != "left_group"], "kafka-w1", 6000).empty


def test_crash_settings_give_each_backend_only_its_own_knob() -> None:
    bullmq = crashes.crash_settings("bullmq", False, 300, 5000, 2000, 1500)
    streams = crashes.crash_settings("streams", True, 300, 5000, 2000, 1500)
    kafka = crashes.crash_settings("kafka", True, 300, 5000, 2000, 1500)
    assert bullmq.options == {"lock_duration_ms": "5000", "stalled_interval_ms": "2000"} and not bullmq.idempotent
    assert streams.backoff_ms == 1500 and streams.options == {}
    assert kafka.options == {} and kafka.step_ms == 300 and kafka.concurrency == crashes.CONCURRENCY


def test_charts_draw_on_the_given_axes() -> None:
    import matplotlib.pyplot as plt

    kills = {"streams": kill("streams", "entry 1-0", (1.3, 3.3)), "kafka": kill("kafka", "ns-bookings/1/0", (4, 6))}
    events = pd.concat([STREAMS, KAFKA]).sort_values("mono")
    table = crashes.recovery_table(events, kills, "victim", {"streams": 102.4, "kafka": 109.9})
    _, axes = plt.subplots(3)
    assert crashes.recovery_chart({"run": table}, ax=axes[0]) is axes[0]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["streams (run)", "kafka (run)"]
    effects = pd.DataFrame({"completed": [3], "charges": [5], "inventory": [4], "confirmations": [4]}, index=["bullmq"])
    assert crashes.effects_chart({"off": effects}, ax=axes[1]) is axes[1]
    assert crashes.max_poll_chart(MAX_POLL, "kafka-w1", 6000, ax=axes[2]) is axes[2]
    plt.close("all")


def test_the_second_join_counts_as_done_once_every_revoking_member_is_assigned_again() -> None:
    first = event("assigned", 1.0, "kafka-w1", partitions=["t/0", "t/1", "t/2"])
    revoked = event("revoked", 3.0, "kafka-w1", partitions=["t/0", "t/1", "t/2"])
    newcomer = event("assigned", 6.0, "kafka-w2", partitions=["t/2"])
    assert not crashes._rebalanced(frame(first, revoked, newcomer), 2), "w1 has not got its partitions back"
    assert crashes._rebalanced(frame(first, revoked, newcomer, event("assigned", 6.1, "kafka-w1")), 2)
    assert not crashes._rebalanced(frame(first), 2)
