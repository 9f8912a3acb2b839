"""Exercise 06, scaling: how throughput grows with workers and with partitions, and the backlog a group leaves.

q1 drains the same backlog with 1 and with 4 real Streams workers (labkit.lessons.scaling.measure) and judges the
learner's predicted speedup against the measured one; a measurement between two choices is Inconclusive, not a
verdict. q2 is the Kafka side of lesson 06's *backlog*: a group's lag per partition, read by the learner with
confluent-kafka and by the check with the backend's own lag reader (labkit.backends.kafka.lag). q3 runs real Kafka
workers with the learner's partitions and workers against a backlog and measures the bookings per second the group
completes while every partition still has work.
"""

from __future__ import annotations

import time
from typing import Any

from labkit.backends.kafka.admin import TopicAdmin
from labkit.backends.kafka.lag import group_lag
from labkit.backends.kafka.settings import client_config
from labkit.booking import BookingGenerator, encode
from labkit.config import Config
from labkit.exercises.questions import (
    BadAnswer,
    Inconclusive,
    Judged,
    Kind,
    Question,
    Wrong,
    ____,
    as_choice,
    call_learner,
    nearest,
    progress,
    ready,
    wait_with_bar,
)
from labkit.lab import produce, with_backend
from labkit.lessons import brokers, groups, scaling
from labkit.pool import WorkerPool
from labkit.progress import progress as progress_bar
from labkit.workflow import WorkerSettings

__all__ = ["____", "lag_reference", "progress", "q1", "q2", "q3", "ready"]

BOOKINGS = 40
STEP_MS = 20.0
CHOICES = {"1x": 1.0, "2x": 2.0, "4x": 4.0}


def _judge_speedup(answer: Any, config: Config) -> Judged:
    choice = as_choice(answer, list(CHOICES))
    settings = WorkerSettings(concurrency=1, step_ms=STEP_MS)
    throughput = {}
    with progress_bar([1, 4], desc="ex06.q1 runs (1, then 4 workers)", unit="run") as runs:
        for workers in runs:
            row, _, _ = scaling.measure("streams", config, workers, BOOKINGS, settings, f"ex06-{workers}", timeout=25)
            throughput[workers] = row["throughput"]
    speedup = throughput[4] / throughput[1]
    measured = {"throughput_1": round(throughput[1], 1), "throughput_4": round(throughput[4], 1),
                "speedup": round(speedup, 2)}  # fmt: skip
    ran = (f"drained {BOOKINGS} I/O-bound bookings (5 steps x {STEP_MS:g} ms of awaited I/O) with 1 and then 4 "
           "Streams workers")  # fmt: skip
    closest = nearest(speedup, CHOICES)
    if closest is None:
        raise Inconclusive(f"{ran}: the speedup fell between two choices; the machine is too busy to tell.")
    if choice == closest:
        return Judged(True, f"{ran}: {speedup:.1f}x. Each worker spends its booking waiting, so four workers "
                      "wait side by side: I/O-bound work scales with processes (or concurrency) until the broker "
                      "or the CPU is busy.", measured)  # fmt: skip
    return Judged(False, f"{ran}: the measured speedup is not nearest {choice}.", measured)


# -- q2: a group's lag per partition ----------------------------------------------------------------------

#: q2's topic: records per partition, and the offset the group committed on each (None: it never committed).
RECORDS = {0: 8, 1: 5, 2: 3}
COMMITTED = {0: 6, 1: 5, 2: None}
KAFKA_TIMEOUT_S = 10.0


def lag_reference(consumer: Any, topic: str) -> dict[int, int]:
    """The reference: per partition, where it ends minus the group's committed offset (the log start if none)."""
    from confluent_kafka import TopicPartition

    lags = {}
    for partition in sorted(consumer.list_topics(timeout=10).topics[topic].partitions):
        where = TopicPartition(topic, partition)
        low, high = consumer.get_watermark_offsets(where, timeout=10)
        [committed] = consumer.committed([where], timeout=10)
        lags[partition] = high - (committed.offset if committed.offset >= 0 else low)
    return lags


def lag_as_end_offsets(consumer: Any, topic: str) -> dict[int, int]:
    """A typical wrong answer: where each partition ends, as if the group had read nothing."""
    from confluent_kafka import TopicPartition

    partitions = consumer.list_topics(timeout=10).topics[topic].partitions
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in sorted(partitions)}


def lag_ignoring_no_commit(consumer: Any, topic: str) -> dict[int, int]:
    """Another: end minus committed offset everywhere, though a partition never committed answers -1001."""
    from confluent_kafka import TopicPartition

    lags = {}
    for partition in sorted(consumer.list_topics(timeout=10).topics[topic].partitions):
        where = TopicPartition(topic, partition)
        [committed] = consumer.committed([where], timeout=10)
        lags[partition] = consumer.get_watermark_offsets(where, timeout=10)[1] - committed.offset
    return lags


def _fill(config: Config, topic: str) -> dict[int, int]:
    """Write ``RECORDS`` to ``topic``, one record per request (so every broker's end offset is exact); the ends."""
    from confluent_kafka import Producer

    producer = Producer({**client_config(config.kafka_bootstrap), "linger.ms": 0})
    ends: dict[int, int] = {}

    def delivered(error: Any, message: Any) -> None:
        if error is None:
            ends[message.partition()] = message.offset() + 1

    bookings = iter(BookingGenerator(seed=12, prefix="ex06l").bookings(sum(RECORDS.values())))
    for partition, count in RECORDS.items():
        for _ in range(count):
            producer.produce(topic, encode(next(bookings)).encode(), partition=partition, on_delivery=delivered)
            if producer.flush(KAFKA_TIMEOUT_S):
                raise Inconclusive("the broker did not acknowledge a record in time.")
    if len(ends) != len(RECORDS):
        raise Inconclusive(f"the broker acknowledged records on partitions {sorted(ends)} only.")
    return ends


def _as_lags(said: Any) -> dict[int, int]:
    if not isinstance(said, dict):
        raise BadAnswer(f"return a dict {{partition: lag}}, not {type(said).__name__} {said!r}.")
    try:
        return {int(p): int(lag) for p, lag in said.items()}
    except (TypeError, ValueError):
        raise BadAnswer(f"return whole numbers: {{partition: lag}}, not {said!r}.") from None


def _judge_lag(answer: Any, config: Config) -> Judged:
    from confluent_kafka import Consumer, TopicPartition

    with brokers.scratch_topic(config, "ex06-lag", partitions=len(RECORDS)) as topic:
        group = f"{topic}-group"
        ends = _fill(config, topic)
        admin = TopicAdmin(config.kafka_bootstrap)
        admin.commit(group, [TopicPartition(topic, p, o) for p, o in COMMITTED.items() if o is not None])
        try:
            # The broker's own answer, the way the lab's backlog reads it: Fetch high watermark - committed offset.
            lags = group_lag(client_config(config.kafka_bootstrap), group, [topic], config.kafka_bootstrap)
            truth = {int(name.rsplit("/", 1)[1]): lag for name, lag in lags.items()}
            consumer = Consumer({**client_config(config.kafka_bootstrap), "group.id": group,
                                 "enable.auto.commit": False})  # fmt: skip
            try:
                said = _as_lags(call_learner(answer, consumer, topic))
            finally:
                consumer.close()
        finally:
            admin.delete_group(group)
    measured = {"lag": truth, "records": ends}
    ran = (f"a group committed offsets on 2 of the 3 partitions of a topic holding {sum(ends.values())} records, "
           "and stopped; your function read its lag")  # fmt: skip
    if said == truth:
        return Judged(True, f"{ran}: {said}, as the broker says. Lag is where a partition ends minus where the "
                      "group will resume: the backlog lesson 06 charts. A partition the group never committed "
                      "resumes at its log start (auto.offset.reset=earliest), so all of it is lag.",
                      measured)  # fmt: skip
    never = [p for p, o in COMMITTED.items() if o is None]
    if set(said) != set(truth):
        problem = f"it returned partitions {sorted(said)}: every partition of the topic needs its lag"
    elif all(said[p] == ends[p] for p in ends):
        problem = "it returned where each partition ends (its high watermark), not how far the group is behind it"
    elif any(said[p] != truth[p] for p in never):
        problem = (f"partition {never[0]} has no committed offset (librdkafka answers OFFSET_INVALID, -1001): the "
                   "group read nothing there")  # fmt: skip
    else:
        problem = "its figures are not what the broker's committed offsets and end offsets give"
    return Judged(False, f"{ran}: {problem}.", measured)


# -- q3: partitions and workers for a throughput target ----------------------------------------------------

#: q3: each booking is 5 steps of this much awaited I/O, one booking at a time per worker.
TARGET_STEP_MS = 20.0
#: q3's target, in bookings per second completed while every partition still has work.
TARGET = 40.0
#: q3 runs at most this many workers and partitions (2 cores; a check's 30 s).
MAX_WORKERS = 6
MAX_PARTITIONS = 8
#: q3's backlog: enough that no partition runs dry before the window ends, however they are split.
BACKLOG = 300
#: q3's measurement window, in seconds after the backlog was sent (the first second lets every partition start).
WINDOW = (1.0, 3.5)
#: Below the target although the answer's ceiling is this far above it: the machine, not the answer.
BUSY_MARGIN = 1.5


def _as_layout(answer: Any) -> tuple[int, int]:
    if not isinstance(answer, dict) or set(answer) != {"partitions", "workers"}:
        raise BadAnswer(f'answer a dict {{"partitions": ..., "workers": ...}}, not {answer!r}.')
    values = []
    for name, most in (("partitions", MAX_PARTITIONS), ("workers", MAX_WORKERS)):
        value = answer[name]
        if not isinstance(value, int) or not 1 <= value <= most:
            raise BadAnswer(f"{name} must be a whole number from 1 to {most} here (this check runs on 2 cores).")
        values.append(value)
    return values[0], values[1]


def _sustained(config: Config, partitions: int, workers: int) -> tuple[float, int, int]:
    """Bookings per second completed in ``WINDOW``, the members holding a partition, and those holding none."""
    settings = WorkerSettings(concurrency=1, step_ms=TARGET_STEP_MS, options={"partitions": str(partitions)})
    with_backend("kafka", lambda b: b.setup(), config, settings)  # the work topic with the learner's partitions
    with WorkerPool("kafka", config, settings) as pool:
        pool.start(workers, ready_timeout=30)
        table = groups.wait_for_assignment(pool, partitions, timeout=30)
        produce("kafka", BookingGenerator(seed=13, prefix="ex06t").bookings(BACKLOG), config)
        sent = time.monotonic()
        wait_with_bar("ex06.q3 measuring", WINDOW[1] + 0.3)
        events = pool.events()
    done = events[(events["event"] == "completed") & events["mono"].between(sent + WINDOW[0], sent + WINDOW[1])]
    if done.empty:
        raise Inconclusive("no booking completed in the measured window: the group did not start in time.")
    idle = int(table["idle"].sum())
    return len(done) / (WINDOW[1] - WINDOW[0]), workers - idle, idle


def _judge_throughput(answer: Any, config: Config) -> Judged:
    partitions, workers = _as_layout(answer)
    rate, busy, idle = _sustained(config, partitions, workers)
    per_worker = 1000 / (5 * TARGET_STEP_MS)
    measured = {"bookings_per_s": round(rate, 1), "members_with_partitions": busy, "idle_members": idle}
    ran = (f"{workers} Kafka worker(s), one booking of {5 * TARGET_STEP_MS:g} ms awaited I/O at a time each, on a "
           f"topic of {partitions} partition(s) holding a backlog of {BACKLOG}")  # fmt: skip
    at_once = min(busy, partitions)
    if rate >= TARGET:
        return Judged(True, f"{ran}: {rate:.0f} bookings/s, {at_once} bookings processed at once. A group "
                      "processes at most min(partitions, consumers) records at once (here one per consumer), so "
                      "both must grow, with headroom for what each booking costs on top of its I/O.",
                      measured)  # fmt: skip
    short = f"{ran}: {rate:.0f} bookings/s, under {TARGET:g}"
    if idle:
        return Judged(False, f"{short}. {idle} of the {workers} workers got no partition: in a group, a partition "
                      "has one consumer, and a consumer without one does nothing.", measured)  # fmt: skip
    if partitions > workers:
        return Judged(False, f"{short}. Each worker handles one booking at a time, so {workers} workers do "
                      f"{workers} at once, however many partitions they own.", measured)  # fmt: skip
    if at_once * per_worker >= BUSY_MARGIN * TARGET:
        raise Inconclusive(f"{short}, though {at_once} at once allow about {at_once * per_worker:.0f}/s: the "
                           "machine is too busy to judge.")  # fmt: skip
    return Judged(False, f"{short}. {at_once} bookings at once allow at most {at_once * per_worker:.0f}/s before "
                  "each booking's own overhead: no headroom.", measured)  # fmt: skip


q1 = Question(
    "ex06.q1", Kind.PREDICT, "speedup of I/O-bound work from 1 to 4 workers", _judge_speedup,
    hints=["Is the worker busy computing, or waiting, during a booking?",
           "A waiting process leaves the CPU to others: four of them can all wait at once, on two cores."],
    solution_text='"4x": the work is awaited I/O, so four workers do about four times as much.',
    reference="4x", wrong={"capped by two cores": Wrong("2x", "is not nearest 2x")}, backends=("streams",),
)  # fmt: skip
q2 = Question(
    "ex06.q2", Kind.INSPECT, "a Kafka group's lag per partition", _judge_lag,
    hints=["Lag is a difference: where the partition ends, and where the group will start reading again.",
           "`consumer.get_watermark_offsets(tp)` gives (low, high); `consumer.committed([tp])` the group's offset.",
           "A partition with no commit answers offset -1001 (OFFSET_INVALID): the group resumes at `low` there."],
    solution_text="for each partition, high watermark minus the committed offset, or minus the low watermark "
    "where the group never committed:",
    reference=lag_reference,
    wrong={"where each partition ends": Wrong(lag_as_end_offsets, "where each partition ends"),
           "no commit read as an offset": Wrong(lag_ignoring_no_commit, "has no committed offset")},
    servers=("kafka",),
)  # fmt: skip
q3 = Question(
    "ex06.q3", Kind.CONFIGURE, "partitions and consumers for a throughput target", _judge_throughput,
    hints=["How many bookings can the group process at the same moment? Count partitions and consumers.",
           "One booking takes 100 ms here, so one consumer does at most 10 per second.",
           "Both the partitions and the workers must reach the number of bookings you need at once, with room: "
           "e.g. 6 and 6."],
    solution_text=f'{{"partitions": 6, "workers": 6}}: 6 bookings at once, about 60/s before overheads, well '
    f"over {TARGET:g}. More workers than partitions leaves some idle; more partitions than workers leaves each "
    "worker doing one booking at a time anyway.",
    reference={"partitions": 6, "workers": 6},
    wrong={"more workers than partitions": Wrong({"partitions": 3, "workers": 4}, "got no partition"),
           "partitions alone": Wrong({"partitions": 8, "workers": 3}, "one booking at a time")},
    backends=("kafka",),
)  # fmt: skip
