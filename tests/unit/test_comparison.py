"""labkit.comparison on synthetic BenchResults with known answers: tables, feature matrix, choices, checks."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from labkit import bench, latency
from labkit.bench import BenchResult
from labkit.lessons import comparison, figures

SERVERS = {"redis": "Valkey 9.1.2", "kafka": "Tansu 0.6.0-510f3e2 (embedded, memory only)"}
BACKENDS = ["bullmq", "streams", "kafka"]


def fake(
    workload: str = "steady",
    figures: dict[str, list[dict[str, float]]] | None = None,
    rate: float = 1000.0,
    pause: tuple[float, float] = (0.0, 0.0),
) -> BenchResult:
    """A result of three backends; ``figures`` gives each backend's runs (default: two runs, Streams best)."""
    base = {"throughput_per_s": 1000.0, "produced_per_s": 1000.0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 5.0,
            "p999_ms": 80.0, "max_ms": 95.0, "sent": 100, "consumed": 100, "lost": 0, "duplicates": 0,
            "max_backlog": 10, "recovery_s": math.nan}  # fmt: skip
    figures = figures or {
        "bullmq": [{"p99_ms": 20.0}, {"p99_ms": 22.0}],
        "streams": [{"p99_ms": 3.0}, {"p99_ms": 4.0}],
        "kafka": [{"p99_ms": 50.0}, {"p99_ms": 60.0, "max_ms": 90.0, "p999_ms": 70.0}],
    }
    rows, spectra = [], []
    for backend, runs in figures.items():
        server = SERVERS["kafka" if backend == "kafka" else "redis"]
        for repetition, changes in enumerate(runs, start=1):
            rows.append(
                {"backend": backend, "repetition": repetition, **base, **changes,
                 "label": bench.backend_label(backend, SERVERS), "server": server,
                 "durability": bench.DURABILITY[backend], "cores": 2, "workload": workload,
                 "workload_rate": rate, "workload_pause_at_s": pause[0], "workload_pause_s": pause[1]}
            )  # fmt: skip
            hist = latency.histogram([1.0, 2.0, 3.0, 5.0, 8.0])
            spectra.append(latency.spectrum(hist).assign(backend=backend, repetition=repetition))
    timeline = pd.DataFrame(columns=["backend", "repetition", "second", "backlog"])
    return BenchResult(pd.DataFrame(rows), timeline, pd.concat(spectra, ignore_index=True), {})


def drain_result(consumed: dict[str, list[int]], recovery: float = 1.5) -> BenchResult:
    """A backlog-drain result, one run per backend, pause from second 4 to 7: 200 messages sent in each of
    seconds 0-9 (2,000 in all), ``consumed`` processed in each second."""
    result = fake("backlog-drain", {b: [{"recovery_s": recovery}] for b in consumed}, rate=200, pause=(4.0, 3.0))
    rows = [
        {"backend": b, "repetition": 1, "second": second, "produced": 200 if second < 10 else 0, "consumed": done,
         "backlog": 0}
        for b, per_second in consumed.items()
        for second, done in enumerate(per_second)
    ]  # fmt: skip
    result.timeline = pd.DataFrame(rows)
    return result


DRAINING = [200, 200, 200, 200, 0, 0, 0, 600, 400, 200, 0]  # waiting: 0 0 0 0 200 400 600 200 0 0 0
KAFKA_DRAINING = [190, 205, 195, 200, 10, 0, 0, 0, 1000, 200, 0]  # 10 5 10 10 200 400 600 800 0 0 0
STILL_WAITING = [200, 200, 200, 200, 0, 0, 0, 300, 300, 300, 200]  # ends with 100 never processed
NEVER_PAUSED = [200] * 10 + [0]


# -- the method ------------------------------------------------------------------------------------------


def test_durability_table_shows_the_harness_settings_for_each_product() -> None:
    table = comparison.durability_table()
    assert list(table.index) == ["BullMQ", "Redis Streams", "Kafka"]
    assert table.loc["Kafka", "acknowledgement and durability"] == bench.DURABILITY["kafka"]
    assert "acks=all" in table.loc["Kafka"].iloc[0] and "XACK after processing" in table.loc["Redis Streams"].iloc[0]


@pytest.mark.parametrize(
    ("server", "says", "never"),
    [
        ("Tansu 0.6.0-510f3e2 (embedded, memory only)", "memory only, not Apache Kafka", "results are Apache"),
        ("Apache Kafka (apache/kafka:4.1.1 from docker-compose.yml, KRaft, 1 broker)", "results are Apache", "Tansu"),
        ("something else", "not the lab's embedded broker", "Apache Kafka's"),
    ],
)
def test_kafka_note_says_which_kafka_was_measured(server: str, says: str, never: str) -> None:
    note = comparison.kafka_note(server)
    assert server in note and says in note and never not in note


def test_environment_rows_name_machine_and_servers() -> None:
    table = comparison.environment_rows({"cores": 2, "cpu": "x86_64", "python": "3.11.7", "host": "one"}, SERVERS)
    assert table.loc["cores", "value"] == "2"
    assert table.loc["Kafka-protocol server", "value"] == SERVERS["kafka"]
    assert "not Apache Kafka" in table.loc['"Kafka" in these results is', "value"]


def test_workload_table_has_a_column_per_workload() -> None:
    drain = bench.WORKLOADS["backlog-drain"].replace(duration_s=12, warmup_s=2, pause_at_s=4, pause_s=3)
    table = comparison.workload_table(bench.WORKLOADS["smoke"], drain)
    assert list(table.columns) == ["smoke", "backlog-drain"]
    assert table.loc["rate", "smoke"] == 200 and table.loc["pause_s", "backlog-drain"] == 3
    assert "name" not in table.index and "description" not in table.index and "work" in table.index


def test_styled_shows_long_text_whole() -> None:
    long = "x" * 300
    html = comparison.styled(pd.DataFrame({"a": [long]})).to_html()
    assert long in html and "pre-wrap" in html


# -- one run's figures -----------------------------------------------------------------------------------


def test_results_table_gives_medians_min_max_and_totals_by_label() -> None:
    result = fake(figures={"bullmq": [{"throughput_per_s": 90.0, "lost": 1}, {"throughput_per_s": 110.0},
                                      {"throughput_per_s": 100.0, "duplicates": 2}]})  # fmt: skip
    table = comparison.results_table(result)
    row = table.loc["BullMQ on Valkey 9.1.2"]
    assert (row["runs"], row["throughput_per_s"], row["throughput_min"], row["throughput_max"]) == (3, 100, 90, 110)
    assert (row["lost"], row["duplicates"]) == (1, 2)
    assert list(table.columns[5:10]) == comparison.PERCENTILE_COLUMNS


def test_labels_name_the_server() -> None:
    assert comparison.labels(fake().summary)["kafka"] == "Kafka on Tansu 0.6.0-510f3e2 (embedded, memory only)"


def test_pause_window_is_the_configured_pause_unless_measured() -> None:
    assert comparison.pause_window(fake().summary) is None
    summary = drain_result({"bullmq": DRAINING}).summary
    assert comparison.pause_window(summary) == (4.0, 7.0)
    summary = summary.assign(paused_at_s=[4.1], resumed_at_s=[7.9])
    assert comparison.pause_window(summary) == (4.1, 7.9)


def test_recovery_table() -> None:
    table = comparison.recovery_table(drain_result({"bullmq": DRAINING, "kafka": KAFKA_DRAINING}, recovery=2.5))
    assert list(table.index) == ["BullMQ on Valkey 9.1.2", "Kafka on Tansu 0.6.0-510f3e2 (embedded, memory only)"]
    assert list(table["recovery_s"]) == [2.5, 2.5] and list(table["paused_s"]) == [3.0, 3.0]


# -- side by side ----------------------------------------------------------------------------------------


#: Figures as a recorded run of lessons 02-07 holds them (labkit.lessons.figures.lesson_figures).
LESSONS = {
    "03.retry_extra_ms_bullmq": 38.0, "03.retry_extra_ms_streams": 231.0, "03.retry_extra_ms_kafka": 106.0,
    "04.reconciled_kafka": "48 sent = 40 completed + 8 dead-lettered, then 45 + 3 after replaying 5",
    "05.unretried_bookings": 27, "05.out_of_order_bullmq_8": 27, "05.out_of_order_streams_3": 27,
    "05.out_of_order_kafka_3": 0, "06.speedup_bullmq": 5.7, "06.speedup_streams": 6.1, "06.speedup_kafka": 2.7,
    "02.join_pause_bullmq_s": 0.1, "02.join_pause_streams_s": 0.1, "02.join_pause_kafka_s": 3.1,
    "07.handed_back_bullmq_s": 5.8, "07.handed_back_streams_s": 2.4, "07.handed_back_kafka_s": 9.9,
}  # fmt: skip


def test_feature_matrix_has_the_lessons_features_for_the_three_products() -> None:
    table = comparison.feature_matrix(lessons=LESSONS)
    assert list(table.columns) == ["BullMQ", "Redis Streams", "Kafka"]
    for feature in ("retries", "delays", "DLQ", "ordering", "replay", "retention", "consumer groups", "priorities"):
        assert table.loc[feature].str.len().gt(10).all(), feature
    assert "came 38.0 ms after" in table.loc["retries", "BullMQ"]
    assert "0 of 27" in table.loc["ordering", "Kafka"] and "27 of 27" in table.loc["ordering", "Redis Streams"]
    assert "after 2.4 s" in table.loc["crash redelivery", "Redis Streams"]
    assert "48 sent = 40 completed + 8 dead-lettered" in table.loc["DLQ", "Kafka"]
    assert not any("this run" in feature for feature in table.index)
    assert "{" not in "".join(table.to_numpy().ravel()), "every figure of the recorded run is filled in"


def test_feature_matrix_says_which_lesson_figures_are_not_recorded() -> None:
    table = comparison.feature_matrix(lessons={"05.out_of_order_kafka_3": 0})
    assert table.loc["DLQ", "BullMQ"].endswith(comparison.NOT_RECORDED)
    assert "05: 0 of " + comparison.NOT_RECORDED in table.loc["ordering", "Kafka"]


def test_every_figure_of_the_feature_matrix_is_one_a_lesson_records() -> None:
    keys = {k for row in comparison.LESSON_FEATURES.values() for text in row.values()
            for k in comparison._PLACEHOLDER.findall(text)}  # fmt: skip
    keys |= {k for spec in comparison.LESSON_FIGURES.values() for k in spec["values"].values()}
    assert keys and keys <= set(figures.FIGURES)


def test_feature_matrix_adds_this_runs_figures() -> None:
    max_rate = fake(
        "max-rate", {b: [{"throughput_per_s": t}] for b, t in zip(BACKENDS, [1602, 17374, 35741], strict=True)}
    )
    drain = drain_result({"bullmq": DRAINING, "streams": DRAINING, "kafka": KAFKA_DRAINING}, recovery=0.42)
    table = comparison.feature_matrix(fake(), max_rate, drain)

    assert table.loc["server measured (this run)", "Kafka"] == SERVERS["kafka"]
    assert table.loc["max throughput (this run)", "Redis Streams"].startswith("17,374 msg/s")
    assert table.loc["p99 latency at 1,000 msg/s (this run)", "BullMQ"].startswith("21 ms (20-22)")
    assert table.loc["back to normal after a 3 s stop (this run)", "Kafka"].startswith("0.42 s after the restart")


def test_best_needs_a_clear_gap_between_ranges() -> None:
    assert comparison._best({"a": (1.0, 0.9, 1.1), "b": (2.0, 1.8, 2.2)}, lower_is_better=True) == ["a"]
    assert comparison._best({"a": (1.0, 0.9, 1.9), "b": (2.0, 1.8, 2.2)}, lower_is_better=True) == ["a", "b"]
    assert comparison._best({"a": (100.0, 100, 100), "b": (95.0, 95, 95)}, lower_is_better=False) == ["a", "b"]
    assert comparison._best({"a": (100.0, 100, 100), "b": (80.0, 80, 80)}, lower_is_better=False) == ["a"]
    assert comparison._best({"a": (math.nan,) * 3, "b": (3.0, 3, 3)}, lower_is_better=True) == ["b"]


def test_when_to_choose_follows_this_runs_numbers() -> None:
    throughputs = {"bullmq": 1602.0, "streams": 17374.0, "kafka": 35741.0}
    max_rate = fake("max-rate", {b: [{"throughput_per_s": t}] for b, t in throughputs.items()}, rate=0)
    table = comparison.when_to_choose(fake(), max_rate)

    most = table.loc["the most messages per second through one queue"]
    assert most["choose"] == "Kafka on Tansu 0.6.0-510f3e2 (embedded, memory only)"
    assert most["measured"] == "BullMQ 1,602 msg/s; Redis Streams 17,374 msg/s; Kafka 35,741 msg/s"
    assert "max-rate: as fast as acknowledged, 1 run(s)" in most["source"]
    assert table.loc["the lowest tail latency (p99) at a steady rate", "choose"] == "Redis Streams on Valkey 9.1.2"
    assert "the quickest return to normal after the consumers were away" not in table.index  # no drain run given

    swapped = fake("max-rate", {"bullmq": [{"throughput_per_s": 40000.0}], "kafka": [{"throughput_per_s": 900.0}]})
    choice = comparison.when_to_choose(max_rate=swapped).loc["the most messages per second through one queue"]
    assert choice["choose"] == "BullMQ on Valkey 9.1.2"


def test_when_to_choose_says_when_runs_cannot_tell_backends_apart() -> None:
    same = fake(figures={b: [{"p99_ms": 5.0}, {"p99_ms": 6.0}] for b in BACKENDS})
    row = comparison.when_to_choose(steady=same).loc["the lowest tail latency (p99) at a steady rate"]
    assert row["choose"] == "any of them: the figures cannot tell them apart"
    assert row["measured"] == "BullMQ 5.5 ms (5-6); Redis Streams 5.5 ms (5-6); Kafka 5.5 ms (5-6)"


def test_when_to_choose_ranks_the_lessons_figures() -> None:
    table = comparison.when_to_choose(lessons=LESSONS)
    assert table.loc["the fastest hand-over of a crashed worker's message", "choose"] == "Redis Streams"
    assert table.loc["per-booking order with several consumers in parallel", "choose"] == "Kafka"
    assert table.loc["workers that join and leave without stopping the others", "choose"] == "BullMQ or Redis Streams"
    scaling = table.loc["more throughput from more worker processes (I/O-bound work)", "choose"]
    assert scaling == "Redis Streams or BullMQ (too close to tell apart)"
    assert "Redis Streams 2.4 s" in table.loc["the fastest hand-over of a crashed worker's message", "measured"]
    assert comparison.when_to_choose(lessons={}).empty, "no recorded figures, no rows from them"


# -- checks ------------------------------------------------------------------------------------------------


def test_accounted_for() -> None:
    assert comparison.accounted_for(fake(), fake("max-rate"))
    assert not comparison.accounted_for(fake(), fake(figures={"kafka": [{"lost": 1}]}))
    assert not comparison.accounted_for(fake(figures={"kafka": [{"consumed": 99}]}))
    assert not comparison.accounted_for()


def steady_result(consumed: list[int], produced_per_s: float = 1000.0) -> BenchResult:
    """One Kafka run at 200 msg/s for 6 s (warm-up 1 s): 200 sent each second, ``consumed`` processed."""
    result = fake(figures={"kafka": [{"produced_per_s": produced_per_s}]}, rate=200.0)
    result.summary = result.summary.assign(workload_warmup_s=1.0, workload_duration_s=6.0)
    rows = [{"backend": "kafka", "repetition": 1, "second": second, "produced": 200 if second < 6 else 0,
             "consumed": done} for second, done in enumerate(consumed)]  # fmt: skip
    result.timeline = pd.DataFrame(rows)
    return result


def test_kept_up_at_a_fixed_rate() -> None:
    assert comparison.kept_up(steady_result([190, 205, 200, 200, 200, 205, 0], produced_per_s=200))
    # a hiccup: 150 messages wait for half a second, then go through
    assert comparison.kept_up(steady_result([200, 200, 50, 350, 200, 200, 0], produced_per_s=200))
    # falling behind: the backlog grows by 100 a second, 400 waiting by second 5 (more than 1 s of messages)
    assert not comparison.kept_up(steady_result([200, 100, 100, 100, 100, 100, 500], produced_per_s=200))
    assert not comparison.kept_up(steady_result([200] * 6 + [0], produced_per_s=170))  # the producer fell behind
    assert not comparison.kept_up(fake("max-rate", rate=0))  # no rate to keep up with


def test_percentiles_ordered() -> None:
    assert comparison.percentiles_ordered(fake())
    assert not comparison.percentiles_ordered(fake(figures={"kafka": [{"p95_ms": 6.0}]}))  # above p99 = 5
    assert not comparison.percentiles_ordered(fake(figures={"kafka": [{"max_ms": math.nan}]}))


def test_spectra_monotonic() -> None:
    good = fake()
    assert comparison.spectra_monotonic(good)
    falling = fake()
    falling.spectrum.loc[3, "latency_ms"] = 0.5
    assert not comparison.spectra_monotonic(falling)
    missing = fake()
    missing.spectrum = missing.spectrum[missing.spectrum["backend"] != "kafka"]
    assert not comparison.spectra_monotonic(good, missing)


def test_labels_name_servers() -> None:
    assert comparison.labels_name_servers(fake())
    bare = fake()
    bare.summary.loc[bare.summary["backend"] == "kafka", "label"] = "Kafka"
    assert not comparison.labels_name_servers(bare)


@pytest.mark.parametrize(
    ("consumed", "recovery", "built", "drained"),
    [
        ({"bullmq": DRAINING, "kafka": KAFKA_DRAINING}, 1.5, True, True),
        ({"bullmq": DRAINING}, math.nan, True, False),  # no recovery time measured
        ({"bullmq": DRAINING, "streams": STILL_WAITING}, 1.5, True, False),  # one still waiting at the end
        ({"kafka": [190, 205, 195, 200, 10, 0, 0, 0, 900, 200, 0]}, 1.5, True, False),  # 100 above the level before
        ({"streams": NEVER_PAUSED}, 1.5, False, True),  # nothing built up while "away"
    ],
)
def test_backlog_built_up_and_drained(
    consumed: dict[str, list[int]], recovery: float, built: bool, drained: bool
) -> None:
    result = drain_result(consumed, recovery)
    assert comparison.backlog_built_up(result) is built
    assert comparison.drained(result) is drained


def test_with_outstanding_counts_sent_minus_processed_per_run() -> None:
    runs = drain_result({"bullmq": DRAINING, "kafka": KAFKA_DRAINING}).timeline.groupby("backend")
    # as the harness builds it: each run's frame indexed from 0, concatenated; here also shuffled
    timeline = pd.concat([run.reset_index(drop=True) for _, run in runs]).sample(frac=1.0, random_state=3)
    found = comparison.with_outstanding(timeline)
    assert found.index.equals(timeline.index) and found["second"].equals(timeline["second"])
    by_run = found.sort_values("second").groupby("backend")["outstanding"].apply(list)
    assert by_run["bullmq"] == [0, 0, 0, 0, 200, 400, 600, 200, 0, 0, 0]
    assert by_run["kafka"] == [10, 5, 10, 10, 200, 400, 600, 800, 0, 0, 0]
