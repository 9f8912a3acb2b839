"""What the lessons measure, said from the measurement and kept: this run's figures beside a documented run's.

A sentence of a lesson that states a figure is printed by code from the number (:func:`say`), so it cannot
disagree with the run that shows it. Where the embedded broker (Tansu) and Apache Kafka differ, a lesson's
"Embedded broker" box states the figure on both (:func:`compare`): the one measured by this run, on whichever
broker answered, and the other broker's from a documented run.

Both kinds carry their figures as data in the cell's output (display metadata ``labkit.figures``), so that
``benchmarks/lessons.py --record`` can collect what executed lessons measured into :data:`RECORDED`
(``labkit/lessons/recorded.json``): per broker and lesson, the figures with the broker's name, the date, the
command and the lesson's wall time. That file is the documented run. The boxes read the other broker's figure
from it, lesson 08 reads the earlier lessons' figures from it, and docs/embedded-kafka.md ("Figures from the
lessons") and docs/lessons.md show it as tables that a test keeps equal to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit.config import Config

#: The documented runs: ``{broker: {lesson: {"kind", "date", "command", "seconds", "figures": {key: value}}}}``.
RECORDED = Path(__file__).with_name("recorded.json")
#: The two brokers the lab runs, by the name ``LABKIT_KAFKA`` gives them, and how a result names each.
BROKERS = {"embedded": "the embedded broker", "apache": "Apache Kafka"}

Value = float | int | str | bool


@dataclass(frozen=True)
class Figure:
    """One figure a lesson measures: what it is, and how it is written.

    Args:
        what: the figure in words, as a table row names it ("the rebalance after a worker joined").
        unit: appended to the number (" s", " ms", "" for a count or a word).
        digits: decimals of a float.
        broker: True for a figure that differs between the two brokers (it has a box that shows both).
    """

    what: str
    unit: str = ""
    digits: int = 1
    broker: bool = False

    def format(self, value: Value | None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        if isinstance(value, bool | str):
            return f"{value}"
        if isinstance(value, int):
            return f"{value:,}{self.unit}"
        return f"{value:,.{self.digits}f}{self.unit}"


#: Every figure a lesson states, by key (``<lesson>.<name>``). A key a lesson uses must be here.
FIGURES: dict[str, Figure] = {
    "00.kafka_first_assignment_s": Figure("a new Kafka worker: from ready to its first partitions", " s", broker=True),
    "01.log_append_time": Figure("timestamp type read back from a topic set to LogAppendTime", broker=True),
    "02.described_members": Figure("members describe_consumer_groups lists for 4 live consumers", broker=True),
    "02.join_rebalance_s": Figure(
        "Kafka rebalance after a worker joined (first revoked to last assigned)", " s", 2, broker=True
    ),  # fmt: skip
    "02.add_partition": Figure("adding a 4th partition to a topic of 3", broker=True),
    "02.join_pause_bullmq_s": Figure("BullMQ: longest pause of the group after a worker joined", " s", 2),
    "02.join_pause_streams_s": Figure("Streams: longest pause of the group after a worker joined", " s", 2),
    "02.join_pause_kafka_s": Figure("Kafka: longest pause of the group after a worker joined", " s", 2),
    "03.retry_extra_ms_bullmq": Figure("BullMQ: median retry gap beyond the configured backoff", " ms"),
    "03.retry_extra_ms_streams": Figure("Streams: median retry gap beyond the claim idle time", " ms"),
    "03.retry_extra_ms_kafka": Figure("Kafka: median retry gap beyond the configured backoff", " ms", broker=True),
    "03.streams_overshoot_max_ms": Figure("Streams: longest retry gap beyond the claim idle time", " ms"),
    "04.list_offsets_missed": Figure(
        "records of the work topic past the end that ListOffsets(latest) answered", broker=True
    ),  # fmt: skip
    "04.offsets_for_future": Figure("offsets_for_times for an hour ahead, every partition", broker=True),
    "04.reconciled_bullmq": Figure("BullMQ: messages sent = completed + dead-lettered, before and after the replay"),
    "04.reconciled_streams": Figure("Streams: messages sent = completed + dead-lettered, before and after the replay"),
    "04.reconciled_kafka": Figure("Kafka: messages sent = completed + dead-lettered, before and after the replay"),
    "05.unretried_bookings": Figure("bookings never retried"),
    "05.out_of_order_streams_3": Figure("Streams, 3 consumers: unretried bookings out of order"),
    "05.out_of_order_bullmq_8": Figure("BullMQ, concurrency 8: unretried bookings out of order"),
    "05.out_of_order_kafka_3": Figure("Kafka, 3 consumers: unretried bookings out of order"),
    "06.speedup_bullmq": Figure("BullMQ: I/O-bound throughput of the most workers over one", "x", 2),
    "06.speedup_streams": Figure("Streams: I/O-bound throughput of the most workers over one", "x", 2),
    "06.speedup_kafka": Figure("Kafka: I/O-bound throughput of the most workers over one", "x", 2),
    "06.add_partition": Figure("adding a 4th partition to a topic of 3", broker=True),
    "07.handed_back_bullmq_s": Figure("BullMQ: a killed worker's job back in wait after", " s"),
    "07.handed_back_streams_s": Figure("Streams: a killed consumer's entry claimed after", " s"),
    "07.handed_back_kafka_s": Figure("Kafka: a killed member's partition assigned again after", " s", broker=True),
    "07.join_rebalance_s": Figure(
        "Kafka rebalance when the second worker joined, before the kill", " s", 2, broker=True
    ),  # fmt: skip
    "07.aborted_delivered": Figure("aborted transactional records that a read_committed consumer read", broker=True),
    "07.max_poll_left_s": Figure(
        "a handler over max.poll.interval.ms: its worker left the group after", " s", broker=True
    ),  # fmt: skip
    "08.steady_kafka_p99_ms": Figure("Kafka p99 latency at the steady rate", " ms", 0, broker=True),
    "08.max_rate_kafka_per_s": Figure("Kafka messages per second, producer flat out", " msg/s", 0, broker=True),
    "08.drain_kafka_recovery_s": Figure("Kafka back to normal after its consumers were away", " s", broker=True),
}


def figure(key: str) -> Figure:
    """The registered figure ``key``; a lesson cannot state a figure that no table would show."""
    try:
        return FIGURES[key]
    except KeyError:
        raise KeyError(f"unknown figure {key!r}; register it in labkit.lessons.figures.FIGURES") from None


def _plain(value: Any) -> Value | None:
    """A figure as JSON keeps it: numpy and pandas scalars become Python ones, NaN becomes None."""
    if value is None:
        return None
    if hasattr(value, "item"):  # numpy / pandas scalar
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


class Statement:
    """A sentence printed from measurements, with the figures it states as data (see the module docstring)."""

    def __init__(self, text: str, figures: Mapping[str, Any]) -> None:
        for key in figures:
            figure(key)
        self.text = text
        self.figures = {key: _plain(value) for key, value in figures.items()}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, str], dict[str, Any]]:
        return {"text/markdown": self.text, "text/plain": self.text}, {"labkit": {"figures": self.figures}}

    def __repr__(self) -> str:
        return self.text


def say(text: str, figures: Mapping[str, Any] | None = None, **values: Any) -> Statement:
    """``text`` with its ``{placeholders}`` filled: each figure by the part of its key after the lesson number.

    ``say("a pause of {join_pause_kafka_s}", {"02.join_pause_kafka_s": 3.2})`` reads "a pause of 3.20 s" and
    carries the figure; ``values`` fill other placeholders (formatted by ``str.format``) and are not kept.
    """
    figures = dict(figures or {})
    shown = {key.split(".", 1)[1]: figure(key).format(_plain(value)) for key, value in figures.items()}
    return Statement(text.format(**shown, **values) if shown or values else text, figures)


# -- which broker answered, and what the other one measured ------------------------------------------


def _kafka_kind(bootstrap: str, redis_url: str) -> str:
    from labkit.stack import Stack

    config = Config.from_env(kafka_bootstrap=bootstrap, redis_url=redis_url)
    [status] = Stack(config, services=["kafka"]).status()
    return status.kind


def kafka_broker(config: Config) -> tuple[str, str]:
    """``(name, kind)`` of the Kafka-protocol broker answering for ``config``: name ``embedded`` or ``apache``.

    Decided by what answers, not by ``LABKIT_KAFKA``: a lab pointed at a running Apache Kafka (docker compose)
    measures Apache Kafka whatever the variable says. A broker that is neither is ``other``.
    """
    kind = _kafka_kind(config.kafka_bootstrap, config.redis_url)
    if kind.startswith("Tansu"):
        return "embedded", kind
    if kind.startswith("Apache Kafka"):
        return "apache", kind
    return "other", kind


def recorded(path: Path = RECORDED) -> dict[str, dict[str, dict[str, Any]]]:
    """The documented runs (:data:`RECORDED`); empty when none was recorded yet."""
    if not path.is_file():
        return {}
    data: dict[str, dict[str, dict[str, Any]]] = json.loads(path.read_text())
    return data


def documented(broker: str, key: str, path: Path = RECORDED) -> tuple[Value | None, dict[str, Any]]:
    """The figure ``key`` of the documented run on ``broker``, and that lesson's run record (kind, date, command)."""
    run = recorded(path).get(broker, {}).get(key.split(".", 1)[0], {})
    return run.get("figures", {}).get(key), run


def lesson_figures(broker: str, path: Path = RECORDED) -> dict[str, Value]:
    """Every figure of the documented runs on ``broker`` (``embedded`` or ``apache``), all lessons merged."""
    merged: dict[str, Value] = {}
    for run in recorded(path).get(broker, {}).values():
        merged.update({k: v for k, v in run.get("figures", {}).items() if v is not None})
    return merged


def compare(config: Config, measured: Mapping[str, Any], path: Path = RECORDED) -> Statement:
    """A box's measured lines: each figure as this run measured it, and as the documented run on the other broker did.

    Args:
        config: the lab, to tell which broker answered this run.
        measured: this run's figures by :data:`FIGURES` key.
    """
    here, kind = kafka_broker(config)
    lines = []
    for key, value in measured.items():
        spec = figure(key)
        parts = [f"**{spec.format(_plain(value))}** in this run, on {kind}"]
        for broker in (b for b in BROKERS if b != here):
            other, run = documented(broker, key, path)
            if other is None:
                parts.append(f"not recorded yet on {BROKERS[broker]} (`python benchmarks/lessons.py --record`)")
            else:
                parts.append(f"**{spec.format(other)}** on {run['kind']} (recorded {run['date']})")
        lines.append(f"- {spec.what}: " + "; ".join(parts) + ".")
    lines.append('\nThe recorded runs, with their commands: docs/embedded-kafka.md, "Figures from the lessons".')
    return Statement("\n".join(lines), measured)


# -- the docs' tables, written from the recorded runs --------------------------------------------------

#: Where ``benchmarks/lessons.py --record`` writes each table, between these two lines of its doc.
SECTIONS = {
    "figures": ("<!-- figures from the lessons: written by `python benchmarks/lessons.py --record` -->",
                "<!-- end of the figures from the lessons -->"),
    "times": ("<!-- lesson times: written by `python benchmarks/lessons.py --record` -->",
              "<!-- end of the lesson times -->"),
}  # fmt: skip
#: How long a learner may wait for a lesson at its defaults: the comparison five minutes, the others three.
BUDGET_S = {"08": 300.0}
DEFAULT_BUDGET_S = 180.0


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (no dependency: pandas needs tabulate for it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _runs_line(data: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    parts = []
    for broker, lessons in sorted(data.items(), key=lambda item: list(BROKERS).index(item[0])):
        dates = sorted({str(run["date"]) for run in lessons.values()})
        commands = sorted({str(run["command"]) for run in lessons.values()})
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        parts.append(f"on {BROKERS.get(broker, broker)} on {when} with `{'` and `'.join(commands)}`")
    return "Recorded " + "; ".join(parts) + "." if parts else "Nothing recorded yet."


def figures_table(path: Path = RECORDED) -> str:
    """Every figure that differs between the brokers (:data:`FIGURES` with ``broker``), as each recorded run had it."""
    data = recorded(path)
    kinds = {b: next((str(r["kind"]) for r in data.get(b, {}).values()), BROKERS[b]) for b in BROKERS}
    rows = []
    for key, spec in FIGURES.items():
        if not spec.broker:
            continue
        lesson = key.split(".", 1)[0]
        values = [spec.format(data.get(b, {}).get(lesson, {}).get("figures", {}).get(key)) for b in BROKERS]
        rows.append([lesson, spec.what, *values])
    table = markdown_table(["lesson", "figure", *(kinds[b] for b in BROKERS)], rows)
    return f"{_runs_line(data)}\n\n{table}"


def times_table(path: Path = RECORDED) -> str:
    """Each lesson's wall time at its defaults on each broker, against its budget (the recorded runs')."""
    data = recorded(path)
    lessons = sorted({(lesson, str(run.get("lesson", lesson))) for runs in data.values() for lesson, run in
                      runs.items()})  # fmt: skip
    rows = []
    for lesson, name in lessons:
        seconds = []
        for broker in BROKERS:
            run = data.get(broker, {}).get(lesson)
            seconds.append(f"{run['seconds']:.0f} s" if run else "not recorded")
        rows.append([f"`{name}`", *seconds, f"{BUDGET_S.get(lesson, DEFAULT_BUDGET_S):.0f} s"])
    baselines = [
        f"{min(r['baseline_s'] for r in data[b].values()):.0f} s" if data.get(b) else "not recorded" for b in BROKERS
    ]
    rows.append(["baseline: a kernel, `import labkit`, `lk.setup`", *baselines, ""])
    table = markdown_table(["lesson, at its defaults", *(f"on {BROKERS[b]}" for b in BROKERS), "budget"], rows)
    return f"{_runs_line(data)}\n\n{table}"


def with_section(text: str, name: str, body: str) -> str:
    """``text`` with the section ``name`` (see :data:`SECTIONS`) holding ``body``.

    Raises:
        ValueError: the doc has no such section.
    """
    begin, end = SECTIONS[name]
    if begin not in text or end not in text:
        raise ValueError(f"no section {name!r}: the doc needs the lines {begin!r} and {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def section(text: str, name: str) -> str:
    """The body of the section ``name`` of a doc (see :func:`with_section`)."""
    begin, end = SECTIONS[name]
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def collect(notebook: Any) -> dict[str, Value | None]:
    """Every figure an executed lesson stated (its outputs' ``labkit.figures`` metadata), by key."""
    found: dict[str, Value | None] = {}
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            found.update(output.get("metadata", {}).get("labkit", {}).get("figures", {}))
    return found


__all__ = [
    "BROKERS",
    "FIGURES",
    "RECORDED",
    "Figure",
    "Statement",
    "collect",
    "compare",
    "documented",
    "figure",
    "kafka_broker",
    "lesson_figures",
    "recorded",
    "say",
    "figures_table",
    "times_table",
    "with_section",
    "section",
    "markdown_table",
]
