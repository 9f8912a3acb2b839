"""Exercise 01, producers: what BullMQ's ``jobId`` dedupe really promises (lesson 01-producers).

Each check adds real jobs to a BullMQ queue of its own (``Queue.add`` with a chosen ``jobId``, through
labkit.lessons.anatomy) and reads back what Redis kept. Confusion 3: the dedupe lasts only while the old
job's hash is kept; once it is removed (``removeOnComplete`` does that) the same ``jobId`` is a new job.
"""

from __future__ import annotations

from typing import Any

from labkit.booking import BookingGenerator
from labkit.config import Config
from labkit.exercises.questions import (
    Inconclusive,
    Judged,
    Kind,
    Question,
    Wrong,
    ____,
    as_choice,
    as_number,
    progress,
    ready,
)
from labkit.lessons import anatomy, brokers

__all__ = ["____", "progress", "q1", "q2", "q3", "q4", "ready"]

JOB_ID = "ex-booking-1"
CHOICES_KEPT = ("first", "second")
CHOICES_AGAIN = ("accepted", "ignored")


def _two_adds(config: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same jobId added twice, with different amounts: what Redis kept after each add."""
    first, second = BookingGenerator(seed=1, prefix="ex01").bookings(2)
    second = {**first, "amount_cents": first["amount_cents"] + 1000}
    return anatomy.bullmq_add(config, first, JOB_ID), anatomy.bullmq_add(config, second, JOB_ID)


def _judge_waiting(answer: Any, config: Config) -> Judged:
    _, after = _two_adds(config)
    waiting = after["jobs_waiting"]
    ran = f"added two jobs with jobId {JOB_ID!r} to an empty queue"
    if as_number(answer) == waiting:
        return Judged(True, f"{ran}: {waiting} job waits. The second add found the hash "
                      f"`bull:<queue>:{JOB_ID}` and stored nothing.", {"jobs_waiting": waiting})  # fmt: skip
    return Judged(False, f"{ran}: the queue's wait list does not hold {answer} jobs.", {"jobs_waiting": waiting})


def _judge_kept(answer: Any, config: Config) -> Judged:
    first, after = _two_adds(config)
    kept = "first" if after["stored_amount"] == first["sent_amount"] else "second"
    measured = {"stored_amount": after["stored_amount"], "first_sent": first["sent_amount"],
                "second_sent": after["sent_amount"]}  # fmt: skip
    if as_choice(answer, CHOICES_KEPT) == kept:
        return Judged(
            True,
            f"Redis holds amount {after['stored_amount']} in the job hash: the {kept} add's data. "
            "A duplicate add is silently dropped: the producer is not told its data was lost.",
            measured,
        )
    return Judged(False, "the job hash does not hold the data of the add you chose. "
                  "Look at `anatomy.bullmq_job_hash` in lesson 01.", measured)  # fmt: skip


def _judge_again(answer: Any, config: Config) -> Judged:
    booking = BookingGenerator(seed=2, prefix="ex01").bookings(1)[0]
    anatomy.bullmq_add(config, booking, JOB_ID)
    removed = anatomy.bullmq_remove(config, JOB_ID)
    again = anatomy.bullmq_add(config, {**booking, "amount_cents": booking["amount_cents"] + 1}, JOB_ID)
    outcome = "accepted" if again["jobs_waiting"] == 1 and again["stored_amount"] != booking["amount_cents"] else ""
    outcome = outcome or "ignored"
    measured = {"removed": removed, "jobs_waiting_after_re_add": again["jobs_waiting"], "result": outcome}
    if as_choice(answer, CHOICES_AGAIN) == outcome:
        return Judged(True, f"added jobId {JOB_ID!r}, removed the job (as removeOnComplete does), added it again: "
                      f"{outcome}, {again['jobs_waiting']} job waits with the new data. The dedupe lasts only "
                      "while the old job's hash exists.", measured)  # fmt: skip
    return Judged(
        False, f"added, removed and re-added jobId {JOB_ID!r}: BullMQ did not do what you predicted.", measured
    )


SAME_KEY = 5


def _judge_partitions(answer: Any, config: Config) -> Judged:
    base = BookingGenerator(seed=3, prefix="ex01k").bookings(1)[0]
    sends = [{**base, "seq": i} for i in range(SAME_KEY)]
    with brokers.scratch_topic(config, "ex01-keys", partitions=3) as topic:
        reports = anatomy.kafka_send(config, sends, topic=topic)
    if reports["error"].notna().any():
        raise Inconclusive(f"the broker refused a record: {reports['error'].dropna().iloc[0]}")
    used = int(reports["partition"].nunique())
    measured = {"partitions_used": used, "offsets": list(reports["offset"])}
    ran = f"sent {SAME_KEY} records with the same key ({base['booking_id']!r}) to a 3-partition topic"
    if as_number(answer) == used:
        return Judged(True, f"{ran}: they landed on {used} partition, at offsets {list(reports['offset'])}. The "
                      "partitioner hashes the key (murmur2), so one booking's records share a partition and keep "
                      "their order there.", measured)  # fmt: skip
    return Judged(False, f"{ran}: the delivery reports do not show {answer} partitions.", measured)


q1 = Question(
    "ex01.q1", Kind.PREDICT, "jobs waiting after the same jobId is added twice", _judge_waiting,
    hints=["BullMQ's add script first looks whether `bull:<queue>:<jobId>` exists.",
           "If the hash exists, the script logs a `duplicated` event and returns the old id."],
    solution_text="1: the second add with the same jobId stores nothing while the first job exists.",
    reference=1, wrong={"two jobs": Wrong(2, "does not hold 2 jobs")}, backends=("bullmq",), confusion=3,
)  # fmt: skip
q2 = Question(
    "ex01.q2", Kind.PREDICT, "whose data the job keeps after a duplicate add", _judge_kept,
    hints=["Does a duplicate add update the existing job, or leave it alone?",
           "Read the job hash's `data` field after both adds (lesson 01, `anatomy.bullmq_job_hash`)."],
    solution_text='"first": the duplicate add is dropped, its data with it.',
    reference="first",
    wrong={"last write wins": Wrong("second", "not hold the data of the add you chose")},
    backends=("bullmq",), confusion=3,
)  # fmt: skip
q3 = Question(
    "ex01.q3", Kind.PREDICT, "the same jobId after the first job was removed", _judge_again,
    hints=["Dedupe is a lookup of the job's hash, not a record of every id ever used.",
           "`removeOnComplete` deletes the job hash once the job completes."],
    solution_text='"accepted": once the old job is removed, the same jobId is a brand new job '
    "(a booking retried by its producer after completion runs again).",
    reference="accepted",
    wrong={"dedupe forever": Wrong("ignored", "did not do what you predicted")},
    backends=("bullmq",), confusion=3,
)  # fmt: skip
q4 = Question(
    "ex01.q4", Kind.PREDICT, "partitions used by records of one key", _judge_partitions,
    hints=["How does a Kafka producer choose a record's partition when the record has a key?",
           "hash(key) mod partitions: the same key gives the same number every time."],
    solution_text="1: the same key always hashes to the same partition.",
    reference=1, wrong={"spread round-robin": Wrong(3, "do not show 3 partitions")},
    backends=("kafka",), servers=("kafka",),
)  # fmt: skip
