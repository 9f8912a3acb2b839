"""Lesson 08: the three backends side by side, from the comparison harness's results (:mod:`labkit.bench`).

The harness measures; this module turns its :class:`~labkit.bench.BenchResult` into what the
lesson shows and checks:

- tables: the settings every backend ran with (:func:`durability_table`), the machine and the
  servers that answered (:func:`environment_table`), each run's figures per backend
  (:func:`results_table`, :func:`recovery_table`);
- the feature matrix (:func:`feature_matrix`): what lessons 02-07 measured about retries, delays,
  dead letters, ordering, replay, retention, consumer groups and priorities, next to the figures
  of this run;
- "when to choose which" (:func:`when_to_choose`), written from the numbers: from this run's
  results for throughput, latency and recovery, and from the figures of the earlier lessons for
  the rest. A backend is only named the better one when its runs do not overlap with the next
  one's and it is clearly ahead; otherwise the table says the run cannot tell them apart;
- the lesson's checks: every message accounted for, a steady rate kept up with, percentiles in order,
  monotonic spectra, a backlog that built up and drained, labels that name the server measured.

Charts are in :mod:`labkit.charts` (``throughput_bars``, ``latency_spectrum``,
``backlog_timeline``, ``latency_timeline``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from labkit.charts import PRODUCTS
from labkit.config import BACKENDS
from labkit.lessons.figures import BROKERS, figure

if TYPE_CHECKING:
    import pandas as pd
    from pandas.io.formats.style import Styler

    from labkit.bench import BenchResult, Workload
    from labkit.config import Config

#: Percentile columns of a summary, in the order their values must rise.
PERCENTILE_COLUMNS = ["p50_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms"]
#: Two medians closer than this (relative to the better one) do not make one backend the better choice.
CLOSE = 0.10

#: What lessons 02-07 showed, per feature and backend. ``{NN.name}`` is a figure the lesson measured and
#: ``benchmarks/lessons.py --record`` recorded (labkit.lessons.figures), filled in by :func:`lesson_rows` from the
#: recorded run on the broker this notebook measures; lesson 08 adds its own figures.
LESSON_FEATURES: dict[str, dict[str, str]] = {
    "retries": {
        "bullmq": "built in: attempts and exponential backoff are job options; 03: the median retry came "
        "{03.retry_extra_ms_bullmq} after its configured backoff",
        "streams": "no retry queue: an unacknowledged entry stays pending until XAUTOCLAIM takes it after "
        "min-idle, the same wait every time; 03: the median retry came {03.retry_extra_ms_streams} after min-idle",
        "kafka": "none in the client: the lab's worker writes a retry topic, so the work partition never "
        "waits; 03: the median retry came {03.retry_extra_ms_kafka} after its configured backoff",
    },
    "delays": {
        "bullmq": "built in: delayed jobs wait in a sorted set by due time (the backoff uses it); 03: no "
        "retry came earlier than configured",
        "streams": "none: a pending entry's idle time is the only clock (03)",
        "kafka": "none: the lab's retry records carry a not_before header and their partition pauses until then (03)",
    },
    "DLQ": {
        "bullmq": "failed jobs are kept in a failed set; the lab's DLQ is a second queue; 04: {04.reconciled_bullmq}",
        "streams": "none: the lab's worker writes a DLQ stream; 04: {04.reconciled_streams}",
        "kafka": "none in the client: the lab's worker writes a DLQ topic with reason and attempts headers; "
        "04: {04.reconciled_kafka}",
    },
    "ordering": {
        "bullmq": "in order only at concurrency 1; 05: {05.out_of_order_bullmq_8} of {05.unretried_bookings} "
        "unretried bookings out of order at concurrency 8",
        "streams": "in order only with one consumer; 05: {05.out_of_order_streams_3} of {05.unretried_bookings} "
        "unretried bookings out of order with 3 consumers",
        "kafka": "per key, through its partition; 05: {05.out_of_order_kafka_3} of {05.unretried_bookings} "
        "unretried bookings out of order with 3 consumers. A retry reordered the retried bookings on all three",
    },
    "replay": {
        "bullmq": "no log: a finished job is removed once 1000 newer ones finished; 04 replayed by adding the "
        "fixed dead letters again",
        "streams": "entries stay until trimmed or deleted: re-read with XRANGE or a new group from id 0 (03 "
        "re-read pending entries with XREADGROUP 0)",
        "kafka": "the log stays: seek to an offset or reset a group's offsets; 04: offsets_for_times for an hour "
        "ahead answered {04.offsets_for_future} (the right answer: -1)",
    },
    "retention": {
        "bullmq": "finished jobs by count (the lab keeps 1000 completed, 5000 failed); 01: jobId dedupe lasts "
        "only as long as the job is kept",
        "streams": "until XTRIM / MAXLEN (the lab trims nothing), in Redis memory, AOF on disk",
        "kafka": "by time or size per topic on Apache Kafka, its log on disk; the embedded broker ignores "
        "retention and keeps everything in memory only (docs/embedded-kafka.md)",
    },
    "consumer groups": {
        "bullmq": "implicit: workers compete for one queue; 02: the longest pause after a worker joined was "
        "{02.join_pause_bullmq_s}; 06: {06.speedup_bullmq} the throughput at the most workers (I/O-bound)",
        "streams": "named groups (XREADGROUP), any number of consumers; 02: longest pause after a join "
        "{02.join_pause_streams_s}; 06: {06.speedup_streams} at the most workers",
        "kafka": "groups with partition assignment; 02: a join paused the group for {02.join_pause_kafka_s} "
        "(its rebalance: {02.join_rebalance_s}) and a 4th consumer on 3 partitions processed nothing; 06: "
        "{06.speedup_kafka} at the most workers, capped by 3 partitions",
    },
    "priorities": {
        "bullmq": "built in: a job's priority option (the prioritized set); not measured in the lab",
        "streams": "none: one stream per priority, read in order of priority; not measured",
        "kafka": "none: one topic per priority; not measured",
    },
    "crash redelivery": {
        "bullmq": "07: a SIGKILLed worker's job came back after {07.handed_back_bullmq_s} (lock 5 s + stalled "
        "check 2 s)",
        "streams": "07: after {07.handed_back_streams_s} (XAUTOCLAIM, claim idle time 2 s)",
        "kafka": "07: after {07.handed_back_kafka_s} (session timeout 6 s + the survivor's heartbeat + a rebalance)",
    },
}

#: Lesson figures that "when to choose which" ranks: the figure of each backend (``values``: recorded keys).
LESSON_FIGURES: dict[str, dict[str, Any]] = {
    "crash": {
        "need": "the fastest hand-over of a crashed worker's message",
        "source": "lesson 07 (SIGKILL; the lab's lock, claim and session settings)",
        "unit": " s",
        "lower_is_better": True,
        "values": {b: f"07.handed_back_{b}_s" for b in BACKENDS},
    },
    "order": {
        "need": "per-booking order with several consumers in parallel",
        "source": "lesson 05 (3 consumers, or concurrency 8; unretried bookings out of order)",
        "unit": "",
        "lower_is_better": True,
        "values": {
            "bullmq": "05.out_of_order_bullmq_8",
            "streams": "05.out_of_order_streams_3",
            "kafka": "05.out_of_order_kafka_3",
        },  # fmt: skip
    },
    "scaling": {
        "need": "more throughput from more worker processes (I/O-bound work)",
        "source": "lesson 06 (speedup of the most workers over one; Kafka topic of 3 partitions)",
        "unit": "x",
        "lower_is_better": False,
        "values": {b: f"06.speedup_{b}" for b in BACKENDS},
    },
    "rebalance": {
        "need": "workers that join and leave without stopping the others",
        "source": "lesson 02 (longest pause of the group after a worker joined)",
        "unit": " s",
        "lower_is_better": True,
        "values": {b: f"02.join_pause_{b}_s" for b in BACKENDS},
    },
}
#: A figure of :data:`LESSON_FEATURES`: ``{02.join_pause_kafka_s}``.
_PLACEHOLDER = re.compile(r"\{(\d\d\.[A-Za-z0-9_]+)\}")
#: What a cell says for a figure no recorded run has.
NOT_RECORDED = "(not recorded yet: python benchmarks/lessons.py --record)"


def lesson_rows(lessons: Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    """:data:`LESSON_FEATURES` with each ``{figure}`` filled from ``lessons`` (a recorded run's figures)."""
    found = lessons or {}

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        return figure(key).format(found[key]) if found.get(key) is not None else NOT_RECORDED

    return {feature: {b: _PLACEHOLDER.sub(fill, text) for b, text in row.items()} for feature, row in
            LESSON_FEATURES.items()}  # fmt: skip


#: The documented long run of this lesson, shipped with the lab: ``labkit bench`` result folders, one per
#: broker (``embedded``, ``apache``) and workload, made by :data:`DOCUMENTED_COMMANDS` (docs/lessons.md).
DOCUMENTED_RUNS = Path(__file__).with_name("documented-runs")
#: What ``FULL = True`` runs, and what the documented run ran: the workloads' changes and repetitions.
FULL_PLAN: dict[str, tuple[dict[str, float], int]] = {
    "steady": ({"duration_s": 30, "warmup_s": 5}, 3),
    "max-rate": ({"duration_s": 10, "warmup_s": 3}, 3),
    "backlog-drain": ({}, 1),
}
#: The commands that made the documented run, one per workload (``-b kafka`` on Apache Kafka).
DOCUMENTED_COMMANDS = {
    "steady": "labkit bench -w steady -r 3 --duration 30 --warmup 5",
    "max-rate": "labkit bench -w max-rate -r 3 --duration 10 --warmup 3",
    "backlog-drain": "labkit bench -w backlog-drain -r 1",
}


class Step(NamedTuple):
    """One workload of the lesson and how often it runs on each backend."""

    workload: Workload
    repetitions: int


def plan(
    full: bool,
    repetitions: int,
    steady: str,
    steady_changes: Mapping[str, Any],
    max_rate_changes: Mapping[str, Any],
    drain_changes: Mapping[str, Any],
) -> dict[str, Step]:
    """The lesson's three workloads and how often each runs: ``steady``, ``max-rate``, ``backlog-drain``.

    With ``full`` the documented long run's (:data:`FULL_PLAN`, whatever the changes say), else the named
    workloads with the lesson's changes (a short live run), ``repetitions`` times each.
    """
    from labkit import bench

    if full:
        return {name: Step(bench.get_workload(name).replace(**changes), runs) for name, (changes, runs) in
                FULL_PLAN.items()}  # fmt: skip
    return {
        "steady": Step(bench.get_workload(steady).replace(**steady_changes), repetitions),
        "max-rate": Step(bench.WORKLOADS["max-rate"].replace(**max_rate_changes), repetitions),
        "backlog-drain": Step(bench.WORKLOADS["backlog-drain"].replace(**drain_changes), repetitions),
    }


def plan_table(steps: Mapping[str, Step]) -> pd.DataFrame:
    """:func:`workload_table` of a :func:`plan`, with a row for how often each workload runs per backend."""
    table = workload_table(*(step.workload for step in steps.values()))
    table.loc["runs per backend"] = [step.repetitions for step in steps.values()]
    return table


def kafka_figures(steady: BenchResult, max_rate: BenchResult, drain: BenchResult) -> dict[str, float]:
    """This run's Kafka figures that the lesson's "Embedded broker" box compares across the two brokers."""
    return {
        "08.steady_kafka_p99_ms": _figures(steady.summary, "p99_ms").get("kafka", (math.nan,))[0],
        "08.max_rate_kafka_per_s": _figures(max_rate.summary, "throughput_per_s").get("kafka", (math.nan,))[0],
        "08.drain_kafka_recovery_s": _figures(drain.summary, "recovery_s").get("kafka", (math.nan,))[0],
    }


def documented_results(folder: Path = DOCUMENTED_RUNS) -> dict[str, dict[str, BenchResult]]:
    """The documented long run: broker (``embedded``, ``apache``) -> workload -> :class:`~labkit.bench.BenchResult`."""
    from labkit.bench import BenchResult

    found: dict[str, dict[str, BenchResult]] = {}
    for run in sorted(folder.glob("*/*/metadata.json")):
        found.setdefault(run.parent.parent.name, {})[run.parent.name] = BenchResult.load(run.parent)
    return found


def documented_table(workload: str, folder: Path = DOCUMENTED_RUNS) -> pd.DataFrame:
    """The documented run's figures for ``workload``, every broker's rows in one table (indexed by label).

    The backlog drain gets :func:`recovery_table`'s columns, the others :func:`results_table`'s; ``recorded``
    is the date the run finished.
    """
    import pandas as pd

    tables = []
    found = documented_results(folder)
    for broker in sorted(found, key=lambda b: list(BROKERS).index(b) if b in BROKERS else len(BROKERS)):
        runs = found[broker]
        if workload in runs:
            result = runs[workload]
            table = recovery_table(result) if workload == "backlog-drain" else results_table(result)
            tables.append(table.assign(recorded=str(result.metadata.get("finished_at", ""))[:10]))
    return pd.concat(tables) if tables else pd.DataFrame()


# -- the method: settings, machine, servers ------------------------------------------------------


def workload_table(*workloads: Workload) -> pd.DataFrame:
    """The workloads side by side: one column per workload, one row per field (``bench.Workload``).

    The description is left out: it describes the named workload, not one changed with ``replace``.
    """
    import dataclasses

    import pandas as pd

    left_out = ("name", "description")
    columns = {w.name: {k: v for k, v in dataclasses.asdict(w).items() if k not in left_out} for w in workloads}
    table = pd.DataFrame(columns)
    table.index.name = "field"
    return table


def kafka_note(server: str) -> str:
    """What "Kafka" means in this run's results, in words, from the server that answered."""
    if "Apache Kafka" in server:
        return f"{server}: the results are Apache Kafka's"
    if "Tansu" in server or "embedded" in server:
        return (
            f"{server}: the lab's embedded Kafka-protocol broker, one broker keeping everything in memory only, "
            "not Apache Kafka; `labkit up --kafka apache` measures Apache Kafka instead (docs/embedded-kafka.md)"
        )
    return f"{server}: not the lab's embedded broker; its version and settings decide the results"


def durability_table(config: Config | None = None) -> pd.DataFrame:
    """The acknowledgement and durability settings each backend runs with (``bench.DURABILITY``).

    With ``config``, a column names the server that stores what was acknowledged.
    """
    import pandas as pd

    from labkit import bench

    table = pd.DataFrame(
        {"acknowledgement and durability": [bench.DURABILITY[b] for b in BACKENDS]},
        index=pd.Index([PRODUCTS[b] for b in BACKENDS], name="backend"),
    )
    if config is not None:
        found = bench.servers(config)
        table["stored by"] = [found["kafka" if b == "kafka" else "redis"] for b in BACKENDS]
    return table


def environment_rows(machine: Mapping[str, Any], servers: Mapping[str, str]) -> pd.DataFrame:
    """The machine and the servers as a two-column table (``what``, ``value``)."""
    import pandas as pd

    rows = [
        ("cores", str(machine.get("cores"))),
        ("CPU", str(machine.get("cpu"))),
        ("Python", str(machine.get("python"))),
        ("clients and brokers", str(machine.get("host"))),
        ("Redis server (BullMQ and Redis Streams)", servers.get("redis", "unknown")),
        ("Kafka-protocol server", servers.get("kafka", "unknown")),
        ('"Kafka" in these results is', kafka_note(servers.get("kafka", "unknown"))),
    ]
    return pd.DataFrame(rows, columns=["what", "value"]).set_index("what")


def environment_table(config: Config) -> pd.DataFrame:
    """The machine this notebook runs on and the servers answering at the lab's addresses (as every result records)."""
    from labkit import bench

    return environment_rows(bench.machine(), bench.servers(config))


def styled(table: pd.DataFrame) -> Styler:
    """A text table shown whole: left-aligned, wrapped, never cut off at pandas' column width."""
    cells = {"text-align": "left", "white-space": "pre-wrap", "vertical-align": "top"}
    return table.style.set_properties(**cells).set_table_styles([{"selector": "th", "props": "text-align: left"}])


# -- one run's figures -------------------------------------------------------------------------------


def labels(summary: pd.DataFrame) -> dict[str, str]:
    """Backend -> its chart label, which names the server measured (``Kafka on Tansu ...``)."""
    return {str(b): str(label) for b, label in summary.groupby("backend", sort=False)["label"].first().items()}


def _figures(summary: pd.DataFrame, column: str) -> dict[str, tuple[float, float, float]]:
    """Backend -> (median, min, max) of ``column`` over the repetitions."""
    grouped = summary.groupby("backend", sort=False)[column]
    median, low, high = grouped.median(), grouped.min(), grouped.max()
    return {str(b): (float(median[b]), float(low[b]), float(high[b])) for b in median.index}


def results_table(result: BenchResult) -> pd.DataFrame:
    """One row per backend (indexed by its label): medians over the repetitions, with throughput's min and max.

    ``lost`` and ``duplicates`` are totals over the repetitions; ``produced_per_s`` is what the
    producer sent per second in the measured window (max-rate: as fast as the broker acknowledged).
    """
    import pandas as pd

    summary = result.summary
    grouped = summary.groupby("backend", sort=False)
    table = pd.DataFrame(
        {
            "runs": grouped.size(),
            "throughput_per_s": grouped["throughput_per_s"].median(),
            "throughput_min": grouped["throughput_per_s"].min(),
            "throughput_max": grouped["throughput_per_s"].max(),
            "produced_per_s": grouped["produced_per_s"].median(),
            **{column: grouped[column].median() for column in PERCENTILE_COLUMNS},
            "max_backlog": grouped["max_backlog"].median(),
            "lost": grouped["lost"].sum(),
            "duplicates": grouped["duplicates"].sum(),
        }
    )
    table.index = pd.Index([labels(summary)[str(b)] for b in table.index], name="backend")
    return table.round(1)


def pause_window(summary: pd.DataFrame) -> tuple[float, float] | None:
    """When the consumers were stopped, in seconds since the producer started; None if they never were.

    Uses the measured ``paused_at_s`` and ``resumed_at_s`` columns when the results have them
    (their medians), else the workload's ``pause_at_s`` and ``pause_s`` (as configured: the restart
    itself, and on Kafka the group join, come on top).
    """
    if {"paused_at_s", "resumed_at_s"} <= set(summary.columns):
        return float(summary["paused_at_s"].median()), float(summary["resumed_at_s"].median())
    start = float(summary["workload_pause_at_s"].iloc[0]) if len(summary) else 0.0
    if not start:
        return None
    return start, start + float(summary["workload_pause_s"].iloc[0])


def recovery_table(result: BenchResult) -> pd.DataFrame:
    """Backlog drain, per backend: how long the consumers were away, the backlog that built up, the recovery.

    ``recovery_s`` is the harness's: seconds from the consumers' restart until the last message
    slower than normal (twice the p99 before the pause, at least 50 ms) finished.
    """
    import pandas as pd

    summary = result.summary
    grouped = summary.groupby("backend", sort=False)
    table = pd.DataFrame(
        {
            "runs": grouped.size(),
            "paused_s": grouped["workload_pause_s"].first(),
            "max_backlog": grouped["max_backlog"].median(),
            "recovery_s": grouped["recovery_s"].median(),
            "recovery_min": grouped["recovery_s"].min(),
            "recovery_max": grouped["recovery_s"].max(),
            "p99_ms": grouped["p99_ms"].median(),
            "max_ms": grouped["max_ms"].median(),
            "lost": grouped["lost"].sum(),
        }
    )
    table.index = pd.Index([labels(summary)[str(b)] for b in table.index], name="backend")
    return table.round(2)


# -- side by side --------------------------------------------------------------------------------------


def _number(value: float, unit: str = "") -> str:
    """A figure as people read it: ``1,602``, ``54.5``, ``0.42``, ``3``; ``unit`` is appended as given."""
    if math.isnan(value):
        return "n/a"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text}{unit}"


def _spread(figures: tuple[float, float, float], unit: str = "", median: bool = True) -> str:
    """``median (min-max)``, or ``min-max`` when ``median`` is False; one number when they are equal."""
    middle, low, high = figures
    if low == high:
        return _number(middle, unit)
    if not median:
        return f"{_number(low)}-{_number(high, unit)}"
    return f"{_number(middle, unit)} ({_number(low)}-{_number(high)})"


def _workload_words(summary: pd.DataFrame) -> str:
    row = summary.iloc[0]
    rate = float(row["workload_rate"])
    pace = "as fast as acknowledged" if not rate else f"{rate:,.0f} msg/s"
    return f"{row['workload']}: {pace}, {len(summary) // summary['backend'].nunique()} run(s) per backend"


def measured_rows(
    steady: BenchResult | None = None, max_rate: BenchResult | None = None, drain: BenchResult | None = None
) -> dict[str, dict[str, str]]:
    """The feature matrix's rows measured by this notebook: figure -> backend -> text (median, min-max)."""
    rows: dict[str, dict[str, str]] = {}
    first = next((r for r in (steady, max_rate, drain) if r is not None), None)
    if first is not None:
        found = first.summary.groupby("backend", sort=False)["server"].first()
        rows["server measured (this run)"] = {str(b): str(s) for b, s in found.items()}
    if max_rate is not None:
        consumed = _figures(max_rate.summary, "throughput_per_s")
        produced = _figures(max_rate.summary, "produced_per_s")
        rows["max throughput (this run)"] = {
            b: f"{_spread(consumed[b])} msg/s processed; producer {_number(produced[b][0])} msg/s" for b in consumed
        }
    if steady is not None:
        p99, p50 = _figures(steady.summary, "p99_ms"), _figures(steady.summary, "p50_ms")
        rate = float(steady.summary["workload_rate"].iloc[0])
        rows[f"p99 latency at {rate:,.0f} msg/s (this run)"] = {
            b: f"{_spread(p99[b], ' ms')}; p50 {_number(p50[b][0], ' ms')}" for b in p99
        }
    if drain is not None:
        recovery, backlog = _figures(drain.summary, "recovery_s"), _figures(drain.summary, "max_backlog")
        paused = float(drain.summary["workload_pause_s"].iloc[0])
        rows[f"back to normal after a {paused:g} s stop (this run)"] = {
            b: f"{_spread(recovery[b], ' s')} after the restart; backlog peaked at {_number(backlog[b][0])}"
            for b in recovery
        }
    return rows


def feature_matrix(
    steady: BenchResult | None = None,
    max_rate: BenchResult | None = None,
    drain: BenchResult | None = None,
    backends: Sequence[str] = BACKENDS,
    lessons: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Features as rows, backends as columns: what lessons 02-07 measured, then this notebook's figures.

    Each cell says what the lab found (with the lesson number; its figures from ``lessons``, the recorded
    run's, see :func:`labkit.lessons.figures.lesson_figures`) or, for rows marked "this run", the median
    (min-max) of this notebook's runs. Results left out (None) leave their rows out.
    """
    import pandas as pd

    rows = {**lesson_rows(lessons), **measured_rows(steady, max_rate, drain)}
    table = pd.DataFrame({PRODUCTS[b]: [rows[f].get(b, "") for f in rows] for b in backends}, index=list(rows))
    table.index.name = "feature"
    return table


def _best(values: Mapping[str, tuple[float, float, float]], lower_is_better: bool) -> list[str]:
    """The backends that are best on a figure, as far as the numbers can tell.

    The best median wins alone only if the runner-up's range does not reach its range and its
    median is more than ``CLOSE`` better; otherwise every backend that close to it shares the place.
    """
    usable = {b: v for b, v in values.items() if not math.isnan(v[0])}
    if not usable:
        return []
    sign = 1.0 if lower_is_better else -1.0
    ranked = sorted(usable, key=lambda b: sign * usable[b][0])
    best = usable[ranked[0]]
    tied = [ranked[0]]
    for backend in ranked[1:]:
        median, low, high = usable[backend]
        overlaps = low <= best[2] if lower_is_better else high >= best[1]
        scale = max(abs(best[0]), abs(median), 1e-9)
        if overlaps or abs(median - best[0]) <= CLOSE * scale:
            tied.append(backend)
    return tied


def _choice(
    need: str,
    values: Mapping[str, tuple[float, float, float]],
    lower_is_better: bool,
    unit: str,
    source: str,
    names: Mapping[str, str],
    median: bool = True,
) -> dict[str, str]:
    winners = _best(values, lower_is_better)
    if len(winners) == len(values) and len(values) > 1:
        choose = "any of them: the figures cannot tell them apart"
    else:
        choose = " or ".join(names[b] for b in winners)
        if len({values[b][0] for b in winners}) > 1:
            choose += " (too close to tell apart)"
    figures = "; ".join(f"{PRODUCTS.get(b, b)} {_spread(v, unit, median)}" for b, v in values.items())
    return {"if you need": need, "choose": choose, "measured": figures, "source": source}


def when_to_choose(
    steady: BenchResult | None = None,
    max_rate: BenchResult | None = None,
    drain: BenchResult | None = None,
    backends: Sequence[str] = BACKENDS,
    lessons: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """ "When to choose which", one row per need, each decided by numbers: this run's first, then the lessons'.

    ``choose`` names the backend whose figure is best (with the server it ran on, for this run's
    figures), or several when their runs overlap or their medians are within ``CLOSE`` of each other;
    ``measured`` gives every backend's median (min-max) and ``source`` where the figure comes from.
    """
    import pandas as pd

    rows = []
    measured = [
        (max_rate, "the most messages per second through one queue", "throughput_per_s", False, " msg/s"),
        (steady, "the lowest tail latency (p99) at a steady rate", "p99_ms", True, " ms"),
        (drain, "the quickest return to normal after the consumers were away", "recovery_s", True, " s"),
    ]
    for result, need, column, lower, unit in measured:
        if result is None:
            continue
        values = {b: v for b, v in _figures(result.summary, column).items() if b in backends}
        source = f"this notebook, {_workload_words(result.summary)}"
        rows.append(_choice(need, values, lower, unit, source, labels(result.summary)))
    found = lessons or {}
    for spec in LESSON_FIGURES.values():  # one recorded figure per backend
        values = {
            b: (float(found[key]),) * 3
            for b, key in spec["values"].items()
            if b in backends and isinstance(found.get(key), int | float)
        }
        if values:
            lower, unit = spec["lower_is_better"], spec["unit"]
            rows.append(_choice(spec["need"], values, lower, unit, spec["source"], PRODUCTS, median=False))
    return pd.DataFrame(rows, columns=["if you need", "choose", "measured", "source"]).set_index("if you need")


# -- the lesson's checks --------------------------------------------------------------------------------


def _summaries(results: Sequence[BenchResult]) -> pd.DataFrame:
    import pandas as pd

    return pd.concat([r.summary for r in results], ignore_index=True) if results else pd.DataFrame()


def accounted_for(*results: BenchResult) -> bool:
    """Every message sent was consumed: nothing lost, in every run of every result."""
    summary = _summaries(results)
    return bool(len(summary)) and bool(((summary["lost"] == 0) & (summary["consumed"] >= summary["sent"])).all())


def kept_up(result: BenchResult, margin: float = 0.9, backlog_s: float = 1.0) -> bool:
    """At a fixed rate, in every run: the producer sent at least ``margin`` of the target rate, and at no
    second of the measured window were more than ``backlog_s`` seconds' worth of messages sent and not
    yet processed (:func:`with_outstanding`).

    A backend that keeps up has a backlog of a few messages in flight; one that does not has a
    backlog that grows all run long. Counting the backlog, not the messages finished per second,
    keeps a hiccup shorter than ``backlog_s`` from counting as falling behind.
    """
    summary = result.summary
    if summary.empty or not (summary["workload_rate"] > 0).all():
        return False
    if not (summary["produced_per_s"] >= margin * summary["workload_rate"]).all():
        return False
    timeline = with_outstanding(result.timeline)
    for backend, repetition, rate, warmup, duration in summary[
        ["backend", "repetition", "workload_rate", "workload_warmup_s", "workload_duration_s"]
    ].itertuples(index=False):
        run = timeline[(timeline["backend"] == backend) & (timeline["repetition"] == repetition)]
        measured = run[(run["second"] >= warmup) & (run["second"] < duration)]
        if measured.empty or measured["outstanding"].max() > rate * backlog_s:
            return False
    return True


def percentiles_ordered(*results: BenchResult) -> bool:
    """In every run: p50 <= p95 <= p99 <= p99.9 <= max, all measured (no NaN)."""
    values = _summaries(results).reindex(columns=PERCENTILE_COLUMNS)
    if values.empty or values.isna().any().any():
        return False
    return bool((values.diff(axis=1).iloc[:, 1:] >= 0).all().all())


def spectra_monotonic(*results: BenchResult) -> bool:
    """Every run's percentile spectrum exists and its latency never falls as the percentile rises."""
    for result in results:
        spectrum = result.spectrum
        runs = spectrum.groupby(["backend", "repetition"]) if len(spectrum) else []
        if len(result.summary) == 0 or len(runs) != len(result.summary):
            return False
        for _, curve in runs:
            latencies = curve.sort_values("percentile")["latency_ms"]
            if latencies.isna().any() or not latencies.is_monotonic_increasing:
                return False
    return True


def labels_name_servers(*results: BenchResult) -> bool:
    """Every result row's label names the server it measured, so no chart says just "Kafka"."""
    summary = _summaries(results)
    if summary.empty:
        return False
    return all(
        str(server) in str(label) and str(label) != PRODUCTS.get(str(backend))
        for backend, label, server in summary[["backend", "label", "server"]].itertuples(index=False)
    )


def with_outstanding(timeline: pd.DataFrame) -> pd.DataFrame:
    """The timeline with ``outstanding``: messages sent and not yet processed at the end of each second.

    It is the backlog as the clients count it, ``produced`` minus ``consumed`` added up second by
    second, exact and alike for every backend. The ``backlog`` column is what each broker reported
    when the harness asked, twice a second; for Kafka that is the group's lag behind its committed
    offsets (committed every 500 ms), so it trails, and a short run can end before it shows the drain.
    """
    frame = timeline.reset_index(drop=True)  # the harness concatenates runs: their index labels repeat
    runs = frame.sort_values(["backend", "repetition", "second"], kind="stable").groupby(["backend", "repetition"])
    outstanding = (runs["produced"].cumsum() - runs["consumed"].cumsum()).sort_index()
    return timeline.assign(outstanding=outstanding.to_numpy())


def _around_pause(result: BenchResult) -> list[tuple[pd.Series, pd.Series]]:
    """Per run of a backlog-drain result: its outstanding messages before the pause, and from the pause on."""
    summary, timeline = result.summary, with_outstanding(result.timeline)
    runs = []
    for backend, repetition, pause_at in summary[["backend", "repetition", "workload_pause_at_s"]].itertuples(
        index=False
    ):
        rows = timeline[(timeline["backend"] == backend) & (timeline["repetition"] == repetition)]
        outstanding = rows.set_index("second")["outstanding"].dropna().sort_index()
        runs.append((outstanding[outstanding.index < pause_at], outstanding[outstanding.index >= pause_at]))
    return runs


def backlog_built_up(drain: BenchResult) -> bool:
    """In every run more messages were waiting while the consumers were away than ever before the pause.

    Counted by the clients (:func:`with_outstanding`): sent and not yet processed.
    """
    runs = _around_pause(drain)
    return bool(runs) and all(len(before) and len(after) and after.max() > before.max() for before, after in runs)


def drained(drain: BenchResult) -> bool:
    """In every run the backlog came back down after the pause, and the harness measured a recovery time.

    Back down: after its peak, the count of messages sent and not yet processed (:func:`with_outstanding`)
    fell to at most its highest value before the pause. A message lost, or still waiting when the
    run ended, keeps it above.
    """
    runs = _around_pause(drain)
    if not runs or drain.summary["recovery_s"].isna().any():
        return False
    for before, after in runs:
        if not len(before) or not len(after):
            return False
        later = after[after.index > after.idxmax()]
        if not len(later) or later.min() > before.max():
            return False
    return True
