"""labkit.scaling's analysis on synthetic event logs and result tables with known answers."""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import pandas as pd
import pytest

from labkit.lessons import scaling
from labkit.workflow import WorkerSettings

matplotlib.use("Agg")


def ev(event: str, mono: float, worker: str, booking_id: str, attempt: int = 1) -> dict[str, Any]:
    return {"event": event, "mono": mono, "worker": worker, "booking_id": booking_id, "attempt": attempt}


def two_workers() -> pd.DataFrame:
    """w1 runs b1 (10.0-10.2) and b3 (10.2-10.5); w2 runs b2 (10.1-10.3); b4 fails its first attempt on w2."""
    rows = [
        ev("started", 10.0, "w1", "b1"), ev("completed", 10.2, "w1", "b1"),
        ev("started", 10.1, "w2", "b2"), ev("completed", 10.3, "w2", "b2"),
        ev("started", 10.2, "w1", "b3"), ev("completed", 10.5, "w1", "b3"),
        ev("started", 10.3, "w2", "b4"), ev("failed", 10.35, "w2", "b4"),
        ev("started", 10.4, "w2", "b4", attempt=2), ev("completed", 10.6, "w2", "b4", attempt=2),
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_throughput_runs_from_the_first_start_to_the_last_completion() -> None:
    count, seconds = scaling.throughput(two_workers())
    assert count == 4
    assert seconds == pytest.approx(0.6)


def test_throughput_of_an_empty_run_is_nan() -> None:
    count, seconds = scaling.throughput(two_workers().iloc[:0])
    assert count == 0 and math.isnan(seconds)


def test_booking_seconds_pairs_each_completion_with_its_own_attempt() -> None:
    durations = sorted(scaling.booking_seconds(two_workers()).round(3))
    assert durations == [0.2, 0.2, 0.2, 0.3]  # b4's attempt 2 took 0.2 s, not 0.3 from attempt 1


def test_busy_share_of_two_cpu_readings() -> None:
    assert scaling._busy_share((100.0, 400.0), (130.0, 440.0)) == pytest.approx(0.75)
    assert math.isnan(scaling._busy_share(None, (1.0, 2.0)))
    reading = scaling.cpu_busy()
    assert reading is None or reading[0] <= reading[1]


def results() -> pd.DataFrame:
    rows = [
        ("bullmq", 1, 50.0, 1, None, 0), ("bullmq", 2, 100.0, 2, None, 0), ("bullmq", 4, 180.0, 4, None, 0),
        ("kafka", 1, 50.0, 1, 3, 0), ("kafka", 2, 75.0, 2, 3, 0), ("kafka", 4, 140.0, 3, 3, 1),
        ("kafka", 8, 141.0, 3, 3, 5),
    ]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["backend", "workers", "throughput", "busy workers", "partitions", "idle"])
    frame = frame.rename(columns={"idle": "idle consumers"})
    frame["partitions"] = frame["partitions"].astype("Int64")
    frame["speedup"] = frame["throughput"] / frame.groupby("backend")["throughput"].transform("first")
    return frame


def test_ratio_and_speedup_table() -> None:
    frame = results()
    assert scaling.ratio(frame, "bullmq", 4, 1) == pytest.approx(3.6)
    assert scaling.ratio(frame, "kafka", 8, 4) == pytest.approx(141 / 140)
    table = scaling.speedup_table(frame)
    assert list(table.index) == ["bullmq", "kafka"]
    assert table.loc["kafka", 4] == pytest.approx(2.8)
    assert math.isnan(table.loc["bullmq", 8])


def test_kafka_capped_needs_every_run_beyond_the_partitions_to_keep_exactly_that_many_busy() -> None:
    frame = results()
    assert scaling.kafka_capped(frame)
    broken = frame.copy()
    broken.loc[(broken["backend"] == "kafka") & (broken["workers"] == 8), "busy workers"] = 4
    assert not scaling.kafka_capped(broken)
    assert not scaling.kafka_capped(frame[frame["workers"] <= 2]), "no run beyond the partitions: nothing shown"


def test_statements_print_the_speedups_cpu_and_booking_times_of_the_run() -> None:
    table = results().assign(**{"CPU busy %": 50.0, "booking ms": 12.5})
    said = scaling.scaling_statement(table, step_ms=2)
    assert "- BullMQ: 1 → 4 workers gave 3.60x the throughput (perfect: 4x)" in said.text
    assert "CPU was 50.0 % → 50.0 % busy, and a booking took 12.5 → 12.5 ms, of which 10 ms is waiting" in said.text
    assert said.figures == {"06.speedup_bullmq": pytest.approx(3.6), "06.speedup_kafka": pytest.approx(2.82)}
    assert "- Kafka: 1 → 2: 1.50x; 2 → 4: 1.87x; 4 → 8: 1.01x." in scaling.steps_statement(table).text


def test_the_kafka_pair_statement_reads_the_2_worker_run() -> None:
    assignments = pd.DataFrame(
        {"workers": [2, 2], "worker": ["w1", "w2"], "partitions": [[0, 1], [2]], "bookings": [70, 30]}
    ).set_index(["workers", "worker"])
    said = scaling.kafka_pair_statement(results(), assignments)
    assert said.text == ("With 2 Kafka workers, w1 owned 2 of the 3 partitions and completed 70 % of the bookings; "
                         "the pair was 1.50x as fast as 1 worker.")  # fmt: skip


def test_kafka_partitions_come_from_the_settings() -> None:
    assert scaling.kafka_partitions(WorkerSettings()) == 3
    assert scaling.kafka_partitions(WorkerSettings(options={"partitions": "6"})) == 6


@pytest.mark.parametrize(("cores", "counts"), [(1, [1, 2]), (2, [1, 2, 4]), (4, [1, 4, 8])])
def test_cpu_worker_counts(cores: int, counts: list[int]) -> None:
    assert scaling.cpu_worker_counts(cores) == counts


def test_charts_draw_the_caps() -> None:
    frame = results()
    axes = scaling.plot_throughputs(frame, "I/O-bound")
    labels = [ax.get_legend().get_texts()[0].get_text() for ax in axes]
    assert labels == ["perfect scaling", "perfect, capped at 3 partitions"]
    kafka_ideal = axes[1].get_lines()[0].get_ydata()
    assert list(kafka_ideal) == pytest.approx([50, 100, 150, 150])
    cpu = scaling.plot_throughput(frame, "bullmq", cores=2)
    assert list(cpu.get_lines()[0].get_ydata()) == pytest.approx([50, 100, 100])
    assert cpu.figure._suptitle is None  # one Axes only: the side-by-side figure carries the title
    samples = pd.DataFrame(
        {"backend": "kafka", "workers": [1, 1, 2, 2], "t": [0, 1, 0, 0.5], "backlog": [10, 0, 10, 0]}
    )
    drained = scaling.plot_drainings(samples, "draining")
    assert [line.get_label() for line in drained[0].get_lines()] == ["1 worker(s)", "2 worker(s)"]
