"""labkit.groups on synthetic event logs with known answers: shares, Kafka assignments, rebalances."""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import pandas as pd
import pytest

from labkit.lessons import groups

matplotlib.use("Agg")

T = "ns-bookings"
R = "ns-bookings.retry"


def ev(event: str, mono: float, worker: str, **fields: Any) -> dict[str, Any]:
    """One event line as a worker writes it; the backend is the worker id's prefix."""
    return {"event": event, "mono": mono, "ts": 1e9 + mono, "worker": worker, "backend": worker.split("-")[0], **fields}


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    columns = ["event", "ts", "mono", "worker", "backend", "booking_id", "partitions"]
    return pd.DataFrame(rows).reindex(columns=columns).sort_values("mono", kind="stable").reset_index(drop=True)


def parts(*numbers: int) -> list[str]:
    """Work and retry partitions, as a Kafka worker's ``assigned`` event lists them."""
    return [f"{T}/{n}" for n in numbers] + [f"{R}/{n}" for n in numbers]


def done(worker: str, times: list[float], prefix: str = "b") -> list[dict[str, Any]]:
    return [ev("completed", t, worker, booking_id=f"{prefix}{t:.2f}") for t in times]


# -- who processed what ------------------------------------------------------------------------------


def shared_run() -> pd.DataFrame:
    """Two backends in one run folder: both have a w1 and a w2; streams-w3 did nothing."""
    rows = [ev("ready", 0, w) for w in ("streams-w1", "streams-w2", "streams-w3", "kafka-w1", "kafka-w2")]
    rows += [ev("completed", 1 + i, "streams-w1", booking_id=f"b{i}") for i in range(3)]
    rows += [ev("completed", 1.5, "streams-w2", booking_id="b3")]
    rows += [ev("completed", 2 + i, "kafka-w2", booking_id=f"b{i}") for i in range(4)]
    return frame(rows)


def test_per_worker_counts_each_workers_completions_and_keeps_idle_ones() -> None:
    table = groups.per_worker(shared_run())
    assert list(table.index) == ["streams", "kafka"]
    assert list(table.columns) == ["w1", "w2", "w3"]
    assert table.loc["streams"].tolist() == [3, 1, 0]
    assert table.loc["kafka"].tolist() == [0, 4, 0]


def test_delivery_counts_find_lost_and_duplicate_bookings() -> None:
    events = shared_run()
    ids = [f"b{i}" for i in range(4)]
    clean = groups.delivery_counts(events, ids)
    assert clean[["lost", "duplicates"]].to_dict("index") == {
        "streams": {"lost": 0, "duplicates": 0},
        "kafka": {"lost": 0, "duplicates": 0},
    }
    assert groups.delivery_counts(events, [*ids, "b9"])["lost"].to_dict() == {"streams": 1, "kafka": 1}
    duplicate = frame([*events.to_dict("records"), ev("completed", 9, "kafka-w1", booking_id="b0")])
    counts = groups.delivery_counts(duplicate, ids)
    assert counts.loc["kafka"].to_dict() == {"sent": 4, "completed": 5, "lost": 0, "duplicates": 1}
    assert counts.loc["streams", "duplicates"] == 0


def test_worker_labels_sort_by_number() -> None:
    assert groups.worker_label("kafka-w12") == "w12"
    labels = ["w10", "w2", "w1"]
    assert sorted(labels, key=groups._label_order) == ["w1", "w2", "w10"]
    assert groups.worker_color("w1") == groups.worker_color("w9")  # eight colours, then round again


# -- Kafka assignment --------------------------------------------------------------------------------


def four_on_three() -> pd.DataFrame:
    """Four Kafka consumers on three partitions; a Streams w1 stops in the same run folder meanwhile."""
    rows = [ev("ready", 0, f"kafka-w{k}") for k in range(1, 5)] + [ev("ready", 0, "streams-w1")]
    rows += [ev("assigned", 3, f"kafka-w{k}", partitions=parts(k - 1)) for k in range(1, 4)]
    rows += [ev("assigned", 3.1, "kafka-w4", partitions=[])]
    rows += [ev("stopped", 4, "streams-w1")]
    rows += done("kafka-w1", [5, 6]) + done("kafka-w2", [5.5]) + done("kafka-w3", [7])
    rows += [ev("revoked", 10, f"kafka-w{k}", partitions=parts(k - 1)) for k in range(1, 4)]
    rows += [ev("revoked", 10, "kafka-w4", partitions=[])]
    rows += [ev("stopped", 10.1, f"kafka-w{k}") for k in range(1, 5)]
    return frame(rows)


def test_assignment_log_keeps_an_empty_assignment_as_one_row() -> None:
    log = groups.assignment_log(four_on_three())
    idle = log[(log["worker"] == "w4") & (log["event"] == "assigned")]
    assert len(idle) == 1 and idle["partition"].isna().all()
    assert len(log[(log["worker"] == "w1") & (log["event"] == "assigned")]) == 2  # work and retry partition


def test_assignment_table_shows_the_idle_consumer_while_the_work_was_done() -> None:
    table = groups.assignment_table(four_on_three())  # default: at the last completed booking
    assert table["partitions"].tolist() == [[0], [1], [2], []]
    assert table["retry partitions"].tolist() == [[0], [1], [2], []]
    assert table["bookings"].tolist() == [2, 1, 1, 0]
    assert table["idle"].tolist() == [False, False, False, True]
    assert groups.each_partition_owned_once(table, 3)


def test_another_backends_worker_of_the_same_number_does_not_hide_a_kafka_member() -> None:
    """streams-w1 stopped at 4 s; kafka-w1 still holds partition 0 at 4.5 s."""
    assert groups.owned_at(four_on_three(), at=4.5)["w1"] == {(T, 0), (R, 0)}


def test_a_stopped_worker_holds_nothing() -> None:
    assert groups.owned_at(four_on_three()) == {}
    assert groups.assignment_table(four_on_three(), at=20).empty


@pytest.mark.parametrize(
    ("owned", "expected"),
    [([[0], [1], [2]], True), ([[0, 1], [2]], True), ([[0], [0], [2]], False), ([[0], [1]], False), ([[]], False)],
)
def test_each_partition_owned_once(owned: list[list[int]], expected: bool) -> None:
    table = pd.DataFrame({"partitions": owned})
    assert groups.each_partition_owned_once(table, 3) is expected


def test_settled_needs_every_live_member_assigned_and_every_partition_owned() -> None:
    rows = [ev("ready", 0, "kafka-w1"), ev("ready", 0, "kafka-w2")]
    rows += [ev("assigned", 3, "kafka-w1", partitions=parts(0, 1, 2))]
    live = ["kafka-w1", "kafka-w2"]
    assert not groups.settled(frame(rows), live, 3), "w2 has no assignment yet"
    rows += [ev("revoked", 5, "kafka-w1", partitions=parts(0, 1, 2))]
    assert not groups.settled(frame(rows), live, 3), "eager rebalance in progress"
    rows += [ev("assigned", 8, "kafka-w1", partitions=parts(0, 1)), ev("assigned", 8, "kafka-w2", partitions=parts(2))]
    assert groups.settled(frame(rows), live, 3)


# -- a worker joins and leaves ------------------------------------------------------------------------


def steps(start: float, stop: float, every: float = 0.5) -> list[float]:
    return [round(start + i * every, 2) for i in range(int(round((stop - start) / every)) + 1)]


def join_leave_run() -> groups.JoinLeave:
    """Kafka and Streams, 2 workers, w3 joins at 10 s and leaves at 20 s; Kafka rebalances eagerly."""
    rows = [ev("ready", 0, f"{b}-w{k}") for b in ("kafka", "streams") for k in (1, 2)]
    # Streams: nobody stops; the newcomer is ready at 10.5 and completes from 10.7.
    rows += done("streams-w1", steps(1, 30)) + done("streams-w2", steps(1.25, 30.25))
    rows += (
        [ev("ready", 10.5, "streams-w3")] + done("streams-w3", steps(10.7, 19.7)) + [ev("stopped", 20.1, "streams-w3")]
    )
    # Kafka: w1 {0,1}, w2 {2}; join: revoke at 11/11.5, reassigned at 14/14.5; leave: w3 out at 20.2, back at 24.
    rows += [
        ev("assigned", 0.5, "kafka-w1", partitions=parts(0, 1)),
        ev("assigned", 0.5, "kafka-w2", partitions=parts(2)),
    ]
    rows += done("kafka-w1", steps(1, 11)) + done("kafka-w2", steps(1.25, 11.25))
    rows += [ev("ready", 10.5, "kafka-w3")]
    rows += [
        ev("revoked", 11.0, "kafka-w1", partitions=parts(0, 1)),
        ev("revoked", 11.5, "kafka-w2", partitions=parts(2)),
    ]
    rows += [
        ev("assigned", 14.0, "kafka-w1", partitions=parts(0)),
        ev("assigned", 14.2, "kafka-w3", partitions=parts(2)),
    ]
    rows += [ev("assigned", 14.5, "kafka-w2", partitions=parts(1))]
    rows += (
        done("kafka-w1", steps(14.1, 21)) + done("kafka-w2", steps(14.6, 21.1)) + done("kafka-w3", steps(14.3, 20.1))
    )
    rows += [ev("revoked", 20.2, "kafka-w3", partitions=parts(2)), ev("stopped", 20.3, "kafka-w3")]
    rows += [ev("revoked", 21.2, "kafka-w1", partitions=parts(0)), ev("revoked", 21.3, "kafka-w2", partitions=parts(1))]
    rows += [
        ev("assigned", 24.0, "kafka-w1", partitions=parts(0, 1)),
        ev("assigned", 24.0, "kafka-w2", partitions=parts(2)),
    ]
    rows += done("kafka-w1", steps(24.2, 30)) + done("kafka-w2", steps(24.3, 30.3))
    moments = pd.DataFrame(
        [
            {"backend": b, "action": a, "mono": m, "workers": n}
            for b in ("streams", "kafka")
            for a, m, n in (("start", 0.0, 2), ("join", 10.0, 3), ("leave", 20.0, 2))
        ]
    )
    return groups.JoinLeave(run_dir=None, events=frame(rows), moments=moments, sent=[])  # type: ignore[arg-type]


def test_longest_gap_counts_the_window_edges() -> None:
    assert groups.longest_gap([1, 2, 6, 7], since=0, until=10) == 4
    assert groups.longest_gap([], since=3, until=5) == 2
    assert groups.longest_gap([1, 9], since=2, until=8) == 6  # events outside the window do not count


def test_pauses_put_numbers_on_the_join_and_the_leave() -> None:
    table = groups.pauses(join_leave_run())
    streams, kafka = table.loc["streams"], table.loc["kafka"]
    assert streams["newcomer's first booking"] == pytest.approx(0.7)
    assert streams["longest pause after join"] <= 0.5
    assert math.isnan(streams.get("Kafka rebalance after join", math.nan))
    assert kafka["newcomer's first booking"] == pytest.approx(4.3)
    assert kafka["longest pause after join"] == pytest.approx(14.1 - 11.25)  # last before revoke → first after
    assert kafka["Kafka rebalance after join"] == pytest.approx(14.5 - 11.0)
    assert kafka["Kafka rebalance after leave"] == pytest.approx(24.0 - 20.2)
    assert kafka["longest pause after leave"] == pytest.approx(24.2 - 21.1)


def test_rebalance_seconds_is_nan_without_a_revoke() -> None:
    events = join_leave_run().events
    assert math.isnan(groups.rebalance_seconds(events, since=2, until=9))


def test_owners_by_phase_shows_range_moving_an_old_members_partition() -> None:
    table = groups.owners_by_phase(join_leave_run())
    assert table.loc["before the join"].tolist() == ["w1", "w1", "w2"]
    assert table.loc["after the join"].tolist() == ["w1", "w2", "w3"]
    assert table.loc["after the leave"].tolist() == ["w1", "w1", "w2"]


def test_eager_rebalance_needs_every_old_partition_revoked() -> None:
    run = join_leave_run()
    assert groups.eager_rebalance(run)
    # Cooperative: w1 keeps partition 0 (it only gives up 1), so the rebalance was not eager.
    events = run.events.copy()
    w1_revoke = (events["event"] == "revoked") & (events["worker"] == "kafka-w1") & (events["mono"] == 11.0)
    events.loc[w1_revoke, "partitions"] = pd.Series([parts(1)], index=events.index[w1_revoke])
    assert not groups.eager_rebalance(groups.JoinLeave(run.run_dir, events, run.moments, run.sent))


def test_unowned_spans_cover_each_rebalance_but_not_the_final_stop() -> None:
    spans = groups.unowned_spans(join_leave_run().events[lambda e: e["backend"] == "kafka"])
    assert spans == [(11.0, 14.5), (20.2, 24.0)]


def test_charts_return_their_axes() -> None:
    run = join_leave_run()
    ax = groups.plot_per_worker(groups.per_worker(run.events))
    assert ax.get_ylabel() == "bookings completed"
    axes = groups.plot_timelines(run)
    assert [a.get_ylabel() for a in axes] == ["streams", "kafka"]
    assert axes[1].get_legend() is not None  # the unowned partitions are marked


def test_partition_sizes_and_shares_follow_partitions() -> None:
    locations = [f"{T}/0/0", f"{T}/0/1", f"{T}/2/0", f"{T}/1/0", f"{T}/2/1", f"{T}/2/2"]
    assert groups.partition_sizes(locations) == {0: 2, 1: 1, 2: 3}
    table = pd.DataFrame({"partitions": [[0, 1], [2], []], "bookings": [3, 3, 0]})
    assert groups.shares_follow_partitions(table, locations)
    table.loc[0, "bookings"] = 2
    assert not groups.shares_follow_partitions(table, locations)


def test_the_pauses_statement_prints_each_backends_pause_and_kafkas_rebalance() -> None:
    table = pd.DataFrame(
        {"longest pause after join": [0.06, 0.05, 3.4], "Kafka rebalance after join": [None, None, 3.02]},
        index=pd.Index(["bullmq", "streams", "kafka"], name="backend"),
    )
    said = groups.pauses_statement(table)
    assert said.text == ("Longest stretch without a completed booking after the join: BullMQ 0.06 s, Redis Streams "
                         "0.05 s, Kafka 3.40 s. Kafka's rebalance itself took 3.02 s.")  # fmt: skip
    assert set(said.figures) == {"02.join_pause_bullmq_s", "02.join_pause_streams_s", "02.join_pause_kafka_s",
                                 "02.join_rebalance_s"}  # fmt: skip


def test_first_assignment_is_from_a_kafka_workers_ready_to_its_partitions() -> None:
    from labkit.lessons import brokers

    events = pd.DataFrame(
        [{"event": "ready", "mono": 1.0, "worker": "bullmq-w1", "backend": "bullmq"},
         {"event": "ready", "mono": 2.0, "worker": "kafka-w1", "backend": "kafka"},
         {"event": "assigned", "mono": 5.1, "worker": "kafka-w1", "backend": "kafka"}]
    )  # fmt: skip
    assert brokers.first_assignment_s(events) == pytest.approx(3.1)
    assert pd.isna(brokers.first_assignment_s(events[events["backend"] == "bullmq"]))
