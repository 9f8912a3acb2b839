"""Exercise 04, dead letters: where a poison booking goes, and building a dead-letter queue on Redis Streams.

Confusion 9: Redis Streams has no dead-letter queue; a consumer builds one (XADD the entry with its reason to a
stream of its own, then XACK the original, or it stays pending forever). q1 runs a real Streams worker on a
poison booking; q2 runs the learner's dead-lettering function on a real stream and checks the invariants.
"""

from __future__ import annotations

from typing import Any

import redis

from labkit import lab
from labkit.booking import BookingGenerator, encode
from labkit.config import Config
from labkit.exercises.questions import (
    BadAnswer,
    Judged,
    Kind,
    Question,
    Wrong,
    ____,
    as_number,
    call_learner,
    progress,
    ready,
)
from labkit.lab import produce
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings

__all__ = ["____", "dead_letter_reference", "progress", "q1", "q2", "q3", "q4", "ready", "reasons_reference"]

MAX_ATTEMPTS = 3


def _judge_attempts(answer: Any, config: Config) -> Judged:
    booking = {**BookingGenerator(seed=4, prefix="ex04").bookings(1)[0], "fault": {"poison": True}}
    settings = WorkerSettings(max_attempts=MAX_ATTEMPTS, backoff_ms=100)
    with WorkerPool("streams", config, settings) as pool:
        pool.start(1)
        produce("streams", [booking], config)
        stats = pool.wait_until_drained(timeout=20, expected=1, progress=True)
        events = pool.events()
    attempts = int(((events["event"] == "started") & (events["booking_id"] == booking["booking_id"])).sum())
    measured = {"attempts": attempts, "dead_lettered": stats["dead_lettered"]}
    ran = f"one poison booking on a Streams worker with max_attempts={MAX_ATTEMPTS}"
    if as_number(answer) == attempts:
        return Judged(True, f"{ran}: {attempts} attempts, then it went to `bookings:dlq` with its reason. "
                      "max_attempts counts deliveries, the first included.", measured)  # fmt: skip
    return Judged(False, f"{ran}: the workers' event log does not show {answer} attempts.", measured)


FAILS = 3


def _judge_attempts_setting(answer: Any, config: Config) -> Judged:
    attempts = as_number(answer)
    if attempts != int(attempts) or not 1 <= attempts <= 100:
        raise BadAnswer(f"answer a whole number of attempts from 1 to 100, not {answer!r}.")
    booking = {**BookingGenerator(seed=7, prefix="ex04a").bookings(1)[0], "fault": {"fail_times": FAILS}}
    settings = WorkerSettings(max_attempts=int(attempts), backoff_ms=50)
    with WorkerPool("bullmq", config, settings) as pool:
        pool.start(1)
        produce("bullmq", [booking], config)
        stats = pool.wait_until_drained(timeout=20, expected=1, progress=True)
    measured = {"completed": stats["completed"], "dead_lettered": stats["dead_lettered"]}
    ran = f"a booking whose payment fails {FAILS} times, on a BullMQ worker with max_attempts={int(attempts)}"
    if stats["completed"] == 1:
        return Judged(True, f"{ran}: it completed on attempt {FAILS + 1}, after {FAILS} retries with exponential "
                      "backoff (50, 100, 200 ms).", measured)  # fmt: skip
    return Judged(False, f"{ran}: it was dead-lettered, attempts exhausted, before its payment went through.", measured)


def reasons_reference(client: Any, dlq: str) -> dict[str, str]:
    """The reference: XRANGE the whole DLQ stream; each entry's booking id and reason."""
    import json

    return {json.loads(fields["booking"])["booking_id"]: fields["reason"] for _, fields in client.xrange(dlq)}


def reasons_first_only(client: Any, dlq: str) -> dict[str, str]:
    """A typical wrong answer: XREAD COUNT 1 reads only the oldest dead letter."""
    import json

    [(_, entries)] = client.xread({dlq: "0"}, count=1)
    return {json.loads(f["booking"])["booking_id"]: f["reason"] for _, f in entries}


def _judge_reasons(answer: Any, config: Config) -> Judged:
    gen = BookingGenerator(seed=6, prefix="ex04r")
    poison = {**gen.bookings(1)[0], "fault": {"poison": True}}
    malformed = {"booking_id": "ex04r-bad", "hotelId": 7}
    with WorkerPool("streams", config, WorkerSettings(max_attempts=2, backoff_ms=100)) as pool:
        pool.start(1)
        produce("streams", [poison, malformed], config)
        pool.wait_until_drained(timeout=20, expected=2, progress=True)
    expected = {row["booking_id"]: row["reason"] for _, row in lab.dead_letters("streams", config).iterrows()}
    client: Any = redis.Redis.from_url(config.redis_url, decode_responses=True)
    try:
        said = call_learner(answer, client, config.names.stream_dlq)
    finally:
        client.close()
    measured = {"dead_letters": len(expected)}
    ran = "a poison and a malformed booking went through a Streams worker; your function read its DLQ stream"
    if said == expected:
        return Judged(True, f"{ran}: {said}. Each dead letter carries the booking and why it failed, so it can be "
                      "fixed and replayed.", measured)  # fmt: skip
    return Judged(False, f"{ran}: it returned {said!r}, which is not what the DLQ stream holds.", measured)


def dead_letter_reference(client: Any, stream: str, group: str, entry_id: str, reason: str, dlq: str) -> None:
    """The reference: copy the entry with its reason to the DLQ stream, then acknowledge the original."""
    [(_, fields)] = client.xrange(stream, entry_id, entry_id)
    client.xadd(dlq, {**fields, "reason": reason, "source": entry_id})
    client.xack(stream, group, entry_id)


def dead_letter_without_ack(client: Any, stream: str, group: str, entry_id: str, reason: str, dlq: str) -> None:
    """A typical wrong answer: the copy is made, the original is never acknowledged."""
    [(_, fields)] = client.xrange(stream, entry_id, entry_id)
    client.xadd(dlq, {**fields, "reason": reason})


def dead_letter_without_reason(client: Any, stream: str, group: str, entry_id: str, reason: str, dlq: str) -> None:
    """Another: acknowledged and copied, but nobody will know why it failed."""
    [(_, fields)] = client.xrange(stream, entry_id, entry_id)
    client.xadd(dlq, dict(fields))
    client.xack(stream, group, entry_id)


def _judge_dlq(answer: Any, config: Config) -> Judged:
    stream, dlq, group = f"{config.namespace}ex04-work", f"{config.namespace}ex04-dlq", "ex04-group"
    client: Any = redis.Redis.from_url(config.redis_url, decode_responses=True)  # plain replies, decoded
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
        bookings = BookingGenerator(seed=5, prefix="ex04").bookings(3)
        ids = [client.xadd(stream, {"booking": encode(b)}) for b in bookings]
        client.xreadgroup(group, "worker-1", {stream: ">"})
        client.xack(stream, group, ids[0], ids[2])  # the good ones are done; the middle one is poison
        reason = "poison: card declined (after 3 attempts)"
        call_learner(answer, client, stream, group, ids[1], reason, dlq)
        pending = int(client.xpending(stream, group)["pending"])
        letters = client.xrange(dlq)
    finally:
        client.delete(stream, dlq)
        client.close()
    measured = {"pending_after": pending, "dead_letters": len(letters)}
    ran = "three bookings read by a group, two acknowledged, your function called on the poison one"
    problems = []
    if len(letters) != 1:
        problems.append(f"the DLQ stream holds {len(letters)} entries, not 1")
    elif letters[0][1].get("booking") != encode(bookings[1]):
        problems.append("the dead letter does not carry the original booking (its `booking` field)")
    elif reason not in letters[0][1].values():
        problems.append("the dead letter does not say why (no field holds the reason)")
    if pending:
        problems.append(f"{pending} entry is still pending in the group: nobody acknowledged it, so a reclaimer "
                        "would hand the poison booking out again, for ever")  # fmt: skip
    if problems:
        return Judged(False, f"{ran}: " + "; ".join(problems) + ".", measured)
    return Judged(True, f"{ran}: one dead letter with the booking and its reason, nothing left pending. "
                  "This is what labkit's Streams backend does in one Lua script, so a crash between the two "
                  "writes cannot leave a copy without its acknowledgement.", measured)  # fmt: skip


q1 = Question(
    "ex04.q1", Kind.PREDICT, "attempts before a poison booking is dead-lettered", _judge_attempts,
    hints=["A poison booking fails every attempt; the worker dead-letters it when attempts run out.",
           f"Does max_attempts={MAX_ATTEMPTS} count the first delivery?"],
    solution_text=f"{MAX_ATTEMPTS}: max_attempts counts every delivery, the first one included.",
    reference=MAX_ATTEMPTS,
    wrong={"retries after the first": Wrong(MAX_ATTEMPTS + 1, f"does not show {MAX_ATTEMPTS + 1} attempts")},
    backends=("streams",), confusion=9,
)  # fmt: skip
q2 = Question(
    "ex04.q2", Kind.WRITE_CODE, "a dead-letter queue on Redis Streams", _judge_dlq,
    hints=["Two things must happen: a copy somewhere a human will look, and the original out of the way.",
           "XADD the entry's fields plus the reason to the DLQ stream; XACK the original in its group.",
           "`[(_, fields)] = client.xrange(stream, entry_id, entry_id)` reads the entry."],
    solution_text="XRANGE the entry, XADD its fields with a `reason` to the DLQ stream, XACK the original: "
    "",
    reference=dead_letter_reference,
    wrong={"no ack": Wrong(dead_letter_without_ack, "still pending in the group"),
           "no reason": Wrong(dead_letter_without_reason, "does not say why")}, confusion=9,
)  # fmt: skip
q3 = Question(
    "ex04.q3", Kind.INSPECT, "read every dead letter's reason", _judge_reasons,
    hints=["The Streams DLQ is a stream: read all of it, from the first id to the last.",
           "`client.xrange(dlq)`; each entry's `booking` field is the original message, `reason` why it failed."],
    solution_text="XRANGE the DLQ stream and map each entry's booking id to its reason:",
    reference=reasons_reference,
    wrong={"first one only": Wrong(reasons_first_only, "not what the DLQ stream holds")},
    backends=("streams",), confusion=9,
)  # fmt: skip
q4 = Question(
    "ex04.q4", Kind.CONFIGURE, "max_attempts for a booking that fails three times", _judge_attempts_setting,
    hints=["The booking succeeds on the attempt after its last failure.",
           "max_attempts counts every delivery, the first one included."],
    solution_text=f"{FAILS + 1} (or more): {FAILS} failed attempts, then the one that succeeds.",
    reference=FAILS + 1,
    wrong={"one per failure": Wrong(FAILS, "attempts exhausted")},
    backends=("bullmq",), confusion=9,
)  # fmt: skip
