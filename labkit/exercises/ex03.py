"""Exercise 03, retries: the Redis Streams pending list by hand (lesson 03-retries-and-backoff).

Confusion 8: ``XREADGROUP ... >`` asks for entries never delivered to anyone, ``0`` for this consumer's own
pending ones; and XAUTOCLAIM answers a cursor that must be walked to its ``0-0``. The checks run the commands on
a real stream of their own (labkit.lessons.retries.PendingExplorer); q3 runs the learner's reclaimer on it.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from labkit.booking import BookingGenerator
from labkit.config import Config
from labkit.exercises.questions import (
    Inconclusive,
    Judged,
    Kind,
    Question,
    Wrong,
    ____,
    as_number,
    call_learner,
    progress,
    ready,
    wait_with_bar,
)
from labkit.lab import produce
from labkit.lessons.retries import PendingExplorer
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings

__all__ = ["____", "claim_all_reference", "held_by_reference", "progress", "q1", "q2", "q3", "q4", "q5", "ready"]

ENTRIES = 5
STUCK = 7
MIN_IDLE_MS = 100


def _judge_zero(answer: Any, config: Config) -> Judged:
    with PendingExplorer(config, name="ex03-pel") as pel:
        pel.reset(ENTRIES)
        pel.read("alice", ">")
        again = len(pel.read("alice", "0"))
    ran = f"alice read {ENTRIES} new entries with `>` and acknowledged none, then read again with `0`"
    if as_number(answer) == again:
        return Judged(True, f"{ran}: {again} entries came back, her own pending ones, each delivery count now 2. "
                      "`0` is how a restarted consumer finds what it held.", {"read_with_0": again})  # fmt: skip
    return Judged(False, f"{ran}: the read did not return {answer} entries.", {"read_with_0": again})


def _judge_other(answer: Any, config: Config) -> Judged:
    with PendingExplorer(config, name="ex03-pel") as pel:
        pel.reset(ENTRIES)
        pel.read("alice", ">")
        bob = len(pel.read("bob", ">"))
        pending = int(pel.summary()["pending"].iloc[0])
    ran = f"alice read {ENTRIES} entries with `>` and acknowledged none; then bob read with `>`"
    measured = {"bob_got": bob, "still_pending": pending}
    if as_number(answer) == bob:
        return Judged(True, f"{ran}: bob got {bob}; `>` never hands out an entry that was delivered before, so "
                      f"{pending} stay in alice's pending list until someone claims them.", measured)  # fmt: skip
    return Judged(False, f"{ran}: bob did not get {answer} entries.", measured)


REREADS = 2


def _judge_deliveries(answer: Any, config: Config) -> Judged:
    with PendingExplorer(config, name="ex03-count") as pel:
        pel.reset(1)
        pel.read("alice", ">")
        for _ in range(REREADS):
            pel.read("alice", "0")
        count = int(pel.extended()["deliveries"].iloc[0])
    measured = {"times_delivered": count}
    ran = f"alice read one entry with `>`, then {REREADS} times with `0`, never acknowledging it"
    if as_number(answer) == count:
        return Judged(True, f"{ran}: XPENDING says it was delivered {count} times. Every read of a pending entry "
                      "counts as a delivery, which is how a worker tells a retry (and a poison entry) apart.",
                      measured)  # fmt: skip
    return Judged(False, f"{ran}: XPENDING's delivery count is not {answer}.", measured)


def claim_all_reference(client: Any, stream: str, group: str, consumer: str) -> list[str]:
    """The reference reclaimer: walk XAUTOCLAIM's cursor, two entries a call, until it answers 0-0."""
    claimed: list[str] = []
    cursor = "0-0"
    while True:
        cursor, entries, _deleted = client.xautoclaim(stream, group, consumer, 100, start_id=cursor, count=2)
        claimed += [entry_id for entry_id, _ in entries]
        if cursor == "0-0":
            return claimed


def claim_once(client: Any, stream: str, group: str, consumer: str) -> list[str]:
    """A typical wrong reclaimer: one XAUTOCLAIM call, its cursor thrown away."""
    _cursor, entries, _deleted = client.xautoclaim(stream, group, consumer, 100, start_id="0-0", count=2)
    return [entry_id for entry_id, _ in entries]


def _judge_claim(answer: Any, config: Config) -> Judged:
    with PendingExplorer(config, name="ex03-claim") as pel:
        pel.reset(STUCK)
        pel.read("dead-worker", ">")
        time.sleep(MIN_IDLE_MS / 1000 + 0.05)  # every entry idle long enough for the learner's claim
        client = redis.Redis.from_url(config.redis_url, decode_responses=True)
        try:
            returned = call_learner(answer, client, pel.stream, pel.group, "rescuer")
        finally:
            client.close()
        held = pel.extended()
    now_rescuer = int((held["consumer"] == "rescuer").sum())
    measured = {"stuck": STUCK, "claimed_by_rescuer": now_rescuer}
    ran = f"{STUCK} entries pending for a dead consumer, idle over {MIN_IDLE_MS} ms; your function ran as 'rescuer'"
    if now_rescuer == STUCK:
        n = len(returned) if isinstance(returned, (list, tuple)) else "?"
        return Judged(True, f"{ran}: it claimed all {STUCK} (returned {n} ids). Each call's cursor says where the "
                      "next one starts; 0-0 is the end of the pending list.", measured)  # fmt: skip
    return Judged(False, f"{ran}: only {now_rescuer} of {STUCK} are now held by 'rescuer'; "
                  f"{STUCK - now_rescuer} are still orphaned.", measured)  # fmt: skip


IN_FLIGHT = 3
WAITING = 2
ORPHAN_WAIT_S = 3.0


def held_by_reference(client: Any, stream: str, group: str, consumer: str) -> int:
    """The reference: XPENDING's extended form, filtered to one consumer, counted."""
    return len(client.xpending_range(stream, group, "-", "+", 1000, consumername=consumer))


def held_by_stream_length(client: Any, stream: str, group: str, consumer: str) -> int:
    """A typical wrong answer: XLEN counts every entry of the stream, pending or not, read or not."""
    return int(client.xlen(stream))


def _judge_orphans(answer: Any, config: Config) -> Judged:
    settings = WorkerSettings(concurrency=IN_FLIGHT, step_ms=1000)
    with WorkerPool("streams", config, settings) as pool:
        pool.start(1)
        produce("streams", BookingGenerator(seed=9, prefix="ex03o").bookings(IN_FLIGHT), config)
        deadline = time.monotonic() + 10
        while (pool.events()["event"] == "started").sum() < IN_FLIGHT:
            if time.monotonic() > deadline:
                raise Inconclusive("the worker did not start its bookings in time.")
            time.sleep(0.05)
        dead = pool.workers[0].worker_id
        pool.kill(0)
    produce("streams", BookingGenerator(seed=10, prefix="ex03w").bookings(WAITING), config)
    wait_with_bar("ex03.q4 waiting for a rescuer that never comes", ORPHAN_WAIT_S)
    client = redis.Redis.from_url(config.redis_url, decode_responses=True)
    try:
        held = held_by_reference(client, config.names.stream, config.names.stream_group, dead)
        said = call_learner(answer, client, config.names.stream, config.names.stream_group, dead)
    finally:
        client.close()
    measured = {"pending_for_dead_consumer": held, "your_function": said}
    ran = (f"SIGKILLed the only Streams worker while it ran {IN_FLIGHT} bookings, sent {WAITING} more, waited "
           f"{ORPHAN_WAIT_S:g} s, then called your function for the dead consumer {dead!r}")  # fmt: skip
    if said == held:
        return Judged(True, f"{ran}: {held}, as XPENDING says. They are orphaned: nothing expires a pending entry; "
                      "only another consumer's XAUTOCLAIM (labkit's workers run one) or XCLAIM moves them, so with "
                      "no survivor they wait for ever.", measured)  # fmt: skip
    return Judged(False, f"{ran}: it returned {said!r}, but XPENDING lists another count for that consumer.", measured)


q1 = Question(
    "ex03.q1", Kind.PREDICT, "XREADGROUP with 0 after reading with >", _judge_zero,
    hints=["`>` and `0` ask different questions: new entries, or my own pending ones?",
           "Nothing was acknowledged, so everything alice read is still in her pending list."],
    solution_text=f"{ENTRIES}: with `0` a consumer re-reads its own pending entries, all {ENTRIES} of them.",
    reference=ENTRIES, wrong={"nothing new": Wrong(0, "did not return 0 entries")}, backends=(), confusion=8,
)  # fmt: skip
q2 = Question(
    "ex03.q2", Kind.PREDICT, "another consumer reads with > while entries are pending", _judge_other,
    hints=["Does `>` look at other consumers' pending entries?",
           "An entry delivered once stays with its consumer until XACK or a claim (XCLAIM/XAUTOCLAIM)."],
    solution_text="0: `>` only hands out entries never delivered; pending ones need XAUTOCLAIM.",
    reference=0,
    wrong={"redelivered to bob": Wrong(ENTRIES, f"bob did not get {ENTRIES} entries")},
    backends=(), confusion=8,
)  # fmt: skip
q3 = Question(
    "ex03.q3", Kind.WRITE_CODE, "a reclaimer that walks the XAUTOCLAIM cursor", _judge_claim,
    hints=["XAUTOCLAIM returns three things: the next cursor, the claimed entries, and deleted ids.",
           "Loop: call again from the returned cursor until it is '0-0'.",
           "`cursor, entries, _ = client.xautoclaim(stream, group, consumer, 100, start_id=cursor, count=2)`"],
    solution_text="a loop over XAUTOCLAIM from cursor 0-0, each call starting at the cursor the last answered, "
    "until it answers 0-0:",
    reference=claim_all_reference,
    wrong={"one call": Wrong(claim_once, "are still orphaned")},
    backends=(), confusion=8,
)  # fmt: skip
q4 = Question(
    "ex03.q4", Kind.INSPECT, "count what a killed consumer still holds", _judge_orphans,
    hints=["Which command lists pending entries, and can it filter by consumer?",
           "XPENDING's extended form: `client.xpending_range(stream, group, '-', '+', 1000, consumername=consumer)`."],
    solution_text="count XPENDING's entries for that consumer:",
    reference=held_by_reference,
    wrong={"stream length": Wrong(held_by_stream_length, "XPENDING lists another count")},
    backends=("streams",), confusion=7,
)  # fmt: skip
q5 = Question(
    "ex03.q5", Kind.PREDICT, "the delivery count after re-reading with 0", _judge_deliveries,
    hints=["XPENDING shows `times_delivered` for each pending entry.",
           "Does reading your own pending entries with `0` count as delivering them again?"],
    solution_text=f"{REREADS + 1}: the first read and each re-read with `0` are deliveries.",
    reference=REREADS + 1, wrong={"only the first read counts": Wrong(1, "delivery count is not 1")}, confusion=8,
)  # fmt: skip
