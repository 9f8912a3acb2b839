"""Exercise 02, consumer groups: a fourth consumer on three partitions, and what auto-commit really commits.

q1 runs four real Kafka worker processes in one group (labkit.pool, labkit.lessons.groups) and counts who
processed what. q2 runs a plain confluent-kafka consumer with ``enable.auto.commit`` on a scratch topic of its own
(labkit.lessons.brokers) and reads the group's committed offset. Confusion 5: auto-commit commits what was
*polled*, not what was processed.
"""

from __future__ import annotations

import time
from typing import Any

from labkit.backends.kafka.settings import client_config
from labkit.booking import BookingGenerator, encode
from labkit.config import Config
from labkit.exercises.questions import Inconclusive, Judged, Kind, Question, Wrong, ____, as_number, progress, ready
from labkit.lab import new_run, produce
from labkit.lessons import brokers, figures, groups
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings

__all__ = ["____", "progress", "q1", "q2", "q3", "ready"]

BOOKINGS = 24
RECORDS = 10
PROCESSED = 4
COMMIT_INTERVAL_MS = 200
#: q3: bookings per second while a third Kafka worker joins, and how long each phase lasts at least.
JOIN_RATE = 10.0
JOIN_PHASE_S = 2.0
#: q3's tolerance: a prediction within this many seconds, or this share, of the measured pause is right.
PAUSE_TOLERANCE_S = 0.5
PAUSE_TOLERANCE = 0.5


def _judge_fourth(answer: Any, config: Config) -> Judged:
    with WorkerPool("kafka", config, WorkerSettings(concurrency=4)) as pool:
        pool.start(4, ready_timeout=30)
        table = groups.wait_for_assignment(pool, 3, timeout=30)
        produce("kafka", BookingGenerator(seed=2, prefix="ex02").bookings(BOOKINGS), config)
        pool.wait_until_drained(timeout=25, expected=BOOKINGS, progress=True)
        events = pool.events()
    done = events[events["event"] == "completed"].groupby("worker").size()
    per_worker = {w.worker_id: int(done.get(w.worker_id, 0)) for w in pool.workers}
    idle = min(per_worker.values())
    measured = {"per_worker": per_worker, "partitions_per_worker": len(table)}
    ran = f"sent {BOOKINGS} bookings to a group of 4 Kafka workers on a 3-partition topic"
    if as_number(answer) == idle:
        return Judged(True, f"{ran}: per worker {per_worker}. A partition has one owner in a group, so the "
                      "member without a partition gets nothing: more consumers than partitions adds no throughput.",
                      measured)  # fmt: skip
    return Judged(False, f"{ran}: the worker that processed the fewest did not process {answer}.", measured)


def _judge_autocommit(answer: Any, config: Config) -> Judged:
    from confluent_kafka import Consumer, Producer, TopicPartition

    with brokers.scratch_topic(config, "ex02-autocommit") as topic:
        producer = Producer(client_config(config.kafka_bootstrap))
        for booking in BookingGenerator(seed=3, prefix="ex02c").bookings(RECORDS):
            producer.produce(topic, encode(booking).encode())
        if producer.flush(10):
            raise Inconclusive("the broker did not acknowledge the records in time.")
        consumer = Consumer({
            **client_config(config.kafka_bootstrap), "group.id": f"{topic}-group", "enable.auto.commit": True,
            "auto.commit.interval.ms": COMMIT_INTERVAL_MS, "auto.offset.reset": "earliest",
        })  # fmt: skip
        try:
            consumer.assign([TopicPartition(topic, 0, 0)])
            polled: list[Any] = []
            deadline = time.monotonic() + 15
            while len(polled) < RECORDS and time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if message is not None and not message.error():
                    polled.append(message)
            if len(polled) < RECORDS:
                raise Inconclusive(f"only {len(polled)} of {RECORDS} records could be read in time.")
            time.sleep(4 * COMMIT_INTERVAL_MS / 1000)  # "processing" the first few; auto-commit runs meanwhile
            [committed] = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        finally:
            consumer.close()
    again = RECORDS - committed.offset if committed.offset >= 0 else RECORDS
    measured = {"committed_offset": committed.offset, "read_again_after_crash": again}
    ran = (f"a consumer with enable.auto.commit polled {RECORDS} records, processed {PROCESSED} and "
           f"crashed {4 * COMMIT_INTERVAL_MS} ms later")  # fmt: skip
    if as_number(answer) == again:
        return Judged(True, f"{ran}: the group's committed offset was {committed.offset}, so a restart reads "
                      f"{again} of them again, and the {RECORDS - PROCESSED} never processed are lost. Auto-commit "
                      "commits what poll() returned. labkit's workers store an offset only after the handler "
                      "finished (`enable.auto.offset.store=false`).", measured)  # fmt: skip
    return Judged(False, f"{ran}: a restarted consumer would not read {answer} of them again.", measured)


def _judge_pause(answer: Any, config: Config) -> Judged:
    predicted = as_number(answer)
    run = groups.join_and_leave(["kafka"], config, new_run("ex02-join", config), workers=2, rate=JOIN_RATE,
                                phase_s=JOIN_PHASE_S, settle_timeout=25, drain_timeout=20)  # fmt: skip
    pause = float(groups.pauses(run).loc["kafka", "longest pause after join"])
    measured = {"longest_pause_after_join_s": pause}
    ran = f"a third Kafka worker joined a group of 2 consuming {JOIN_RATE:g} bookings/s"
    if abs(predicted - pause) <= max(PAUSE_TOLERANCE_S, PAUSE_TOLERANCE * pause):
        return Judged(True, f"{ran}: the group completed nothing for {pause:.2f} s after the join (you said "
                      f"{predicted:g} s). An eager rebalance stops every member until the group has its new "
                      "assignment; how long that takes is the broker's (the embedded one holds each JoinGroup for "
                      "half the session timeout).", measured)  # fmt: skip
    return Judged(False, f"{ran}: the longest stretch without a completed booking was not within "
                  f"{PAUSE_TOLERANCE_S:g} s or {PAUSE_TOLERANCE:.0%} of {predicted:g} s.", measured)  # fmt: skip


def recorded_pause(config: Config) -> float:
    """Lesson 02's recorded pause after the join on this lab's broker (labkit/lessons/recorded.json)."""
    value, _ = figures.documented(figures.kafka_broker(config)[0], "02.join_pause_kafka_s")
    return float(value) if value is not None else float("nan")


q1 = Question(
    "ex02.q1", Kind.PREDICT, "bookings the fourth consumer on three partitions processes", _judge_fourth,
    hints=["In a consumer group, how many members can read one partition at a time?",
           "Three partitions, four members: one member is assigned nothing."],
    solution_text="0: each partition is read by one member of the group; the fourth member has none.",
    reference=0, wrong={"an even share": Wrong(BOOKINGS // 4, f"did not process {BOOKINGS // 4}")}, backends=("kafka",),
)  # fmt: skip
q2 = Question(
    "ex02.q2", Kind.PREDICT, "records read again after a crash with auto-commit", _judge_autocommit,
    hints=["What does enable.auto.commit commit: what you processed, or what poll() gave you?",
           "librdkafka stores each record's offset when poll() returns it, and commits every auto.commit.interval.ms."],
    solution_text=f"0: the committed offset is {RECORDS}, past every record polled, so the "
    f"{RECORDS - PROCESSED} unprocessed ones are skipped after a restart: lost, not redelivered.",
    reference=0,
    wrong={"the unprocessed ones": Wrong(RECORDS - PROCESSED, f"would not read {RECORDS - PROCESSED} of them again")},
    backends=("kafka",), servers=("kafka",), confusion=5,
)  # fmt: skip
q3 = Question(
    "ex02.q3", Kind.PREDICT, "how long a Kafka group pauses when a worker joins", _judge_pause,
    hints=["With eager assignment every member gives up its partitions until the group agrees on new ones.",
           "Lesson 02's Embedded broker box gives the pause on both brokers; which one runs here (`labkit status`)?",
           "About 3 s on the embedded broker (it holds each JoinGroup for half the 6 s session timeout); well under "
           "a second on Apache Kafka."],
    solution_text="the embedded broker: about 3 s; Apache Kafka: about 0.1 s. Streams and BullMQ do not pause.",
    reference=None, reference_for=recorded_pause,
    wrong={"no pause on the embedded broker, 10 s on Apache": Wrong(10, "was not within")},
    backends=("kafka",), confusion=6,
)  # fmt: skip
