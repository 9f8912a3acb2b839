"""The queue contract every backend keeps, checked the same way for all three with real worker processes.

One class of tests, subclassed per backend (faststream's ``BackendContract`` pattern). Each
test gets a fresh namespace, starts its own :class:`~labkit.pool.WorkerPool` of two worker
processes, sends bookings, and then reconciles three independent records of what happened:
the broker's own stats, the workers' event logs, and the effects in Redis and on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest
import redis

from labkit import lab
from labkit.backends.base import Message
from labkit.booking import BookingGenerator
from labkit.config import Config
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings, count_effects

#: Short, so a retry test takes a second: 200 ms, then 400 ms under exponential backoff.
BACKOFF_MS = 200
MAX_ATTEMPTS = 3
#: Timestamps come from two processes' monotonic clocks (one system clock) and BullMQ schedules
#: delays in whole milliseconds: allow this much rounding when comparing a gap with a backoff.
CLOCK_SLACK_S = 0.005


def produce(config: Config, backend: str, messages: Iterable[Message]) -> list[str]:
    return lab.produce(backend, list(messages), config)


def effects(config: Config, backend: str) -> dict[str, dict[str, int]]:
    return lab.with_backend(backend, lambda b: b.ledger.effects(), config)


def rows(events: pd.DataFrame, event: str, booking_id: str | None = None) -> pd.DataFrame:
    """The ``event`` rows (of one booking), oldest first."""
    selected = events[events["event"] == event]
    if booking_id is not None:
        selected = selected[selected["booking_id"] == booking_id]
    return selected.sort_values("mono")


def wait_for_started(pool: WorkerPool, booking_id: str, timeout: float = 30) -> pd.Series:
    """The first "started" event of ``booking_id``, as soon as a worker logs it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = rows(pool.events(), "started", booking_id)
        if len(started):
            return started.iloc[0]
        time.sleep(0.05)
    raise AssertionError(f"no worker started {booking_id} within {timeout} s; stats: {pool.stats()}")


def kill_with_bookings_in_flight(pool: WorkerPool, timeout: float = 60) -> int:
    """SIGKILL the first worker seen with a run started and not ended: its event log's last line is "started".

    A batch writes its "started" lines, then runs the effects, then writes its "completed" lines,
    so a last line "started" means the worker is in the middle of a batch (or, one booking at a
    time, of a booking). Returns the killed pid.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in pool.workers:
            path = pool.run_dir / "events" / f"{worker.worker_id}.jsonl"
            if worker.exit_code is None and path.exists() and _last_event(path) == "started":
                return pool.kill(worker.worker_id)
        time.sleep(0.005)
    raise AssertionError(f"no worker was seen in the middle of a booking within {timeout} s")


def _last_event(path: Path) -> str | None:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        lines = f.read().splitlines()
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            event: str = json.loads(line)["event"]
            return event
    return None


def booking(booking_id: str, **fields: Any) -> dict[str, Any]:
    """A valid booking with a chosen id; ``fields`` override or add (e.g. ``fault``)."""
    base = {
        "booking_id": booking_id,
        "user_id": "user-00001",
        "hotel_id": "hotel-001",
        "check_in": "2027-03-01",
        "check_out": "2027-03-04",
        "guests": 2,
        "amount_cents": 42_000,
    }
    return {**base, **fields}


class BackendContract:
    """What every backend must do, however it does it (docs/contract.md and the Backend ABC)."""

    backend: ClassVar[str]
    #: Whether the workers take what the client fetched as one batch (BookingHandler.run_batch); BullMQ's
    #: Python worker hands over one job at a time.
    batches: ClassVar[bool] = True
    #: Backend tuning so that crash recovery takes seconds, not the production defaults' minutes.
    options: ClassVar[dict[str, str]] = {}
    #: BullMQ and Kafka double the delay per retry; Streams' delay is the fixed claim idle time.
    exponential_backoff: ClassVar[bool] = True

    def start_pool(self, config: Config, n: int = 2, **changes: Any) -> WorkerPool:
        settings = WorkerSettings(
            concurrency=4, max_attempts=MAX_ATTEMPTS, backoff_ms=BACKOFF_MS, options=dict(self.options)
        )
        return WorkerPool(self.backend, config, dataclasses.replace(settings, **changes)).start(n, ready_timeout=30)

    @pytest.mark.timeout(90)
    def test_all_completed_and_reconciled(self, lab_config: Config) -> None:
        n = 200
        sent = BookingGenerator(seed=7, prefix="all").bookings(n)
        # 10 ms per step, 50 ms a booking: one worker alone would need seconds for all 200 (Kafka runs one
        # booking per partition at a time), so the other has joined long before the work runs out.
        with self.start_pool(lab_config, step_ms=10) as pool:
            produce(lab_config, self.backend, sent)
            stats = pool.wait_until_drained(timeout=60, expected=n)
            events = pool.events()

        assert (stats["completed"], stats["dead_lettered"], stats["backlog"], stats["in_flight"]) == (n, 0, 0, 0)
        completed = rows(events, "completed")
        assert set(completed["booking_id"]) == {b["booking_id"] for b in sent}
        assert completed["booking_id"].nunique() == stats["completed"]
        # Every extra "completed" event of a booking is one duplicate in the stats, and the other way round.
        assert len(completed) == stats["completed"] + stats["duplicates"] == stats["runs"]
        assert int(completed["duplicate"].sum()) == stats["duplicates"]
        assert set(completed["worker"]) == {f"{self.backend}-w1", f"{self.backend}-w2"}, "both workers did work"

    @pytest.mark.timeout(90)
    def test_transient_failure_completes_on_attempt_3(self, lab_config: Config) -> None:
        flaky = [booking(f"flaky-{i}", fault={"fail_times": 2}) for i in range(4)]
        steady = [booking(f"steady-{i}") for i in range(4)]
        with self.start_pool(lab_config) as pool:
            produce(lab_config, self.backend, flaky + steady)
            stats = pool.wait_until_drained(timeout=60, expected=len(flaky) + len(steady))
            events = pool.events()

        assert (stats["completed"], stats["dead_lettered"]) == (8, 0)
        assert stats["retried"] == 2 * len(flaky)
        second_gap = 2 * BACKOFF_MS if self.exponential_backoff else BACKOFF_MS
        for b in flaky:
            bid = b["booking_id"]
            started, failed = rows(events, "started", bid), rows(events, "failed", bid)
            assert list(started["attempt"]) == [1, 2, 3], bid
            assert list(failed["attempt"]) == [1, 2], bid
            assert len(rows(events, "retried", bid)) == 2, bid
            assert list(rows(events, "completed", bid)["attempt"]) == [3], bid
            gaps = [
                started[started["attempt"] == k + 1]["mono"].iloc[0] - failed[failed["attempt"] == k]["mono"].iloc[0]
                for k in (1, 2)
            ]
            assert gaps[0] >= BACKOFF_MS / 1000 - CLOCK_SLACK_S, (bid, gaps)
            assert gaps[1] >= second_gap / 1000 - CLOCK_SLACK_S, (bid, gaps)
        for b in steady:
            assert list(rows(events, "started", b["booking_id"])["attempt"]) == [1]

    @pytest.mark.timeout(90)
    def test_poison_dead_lettered_after_max_attempts(self, lab_config: Config) -> None:
        poison = [booking(f"poison-{i}", fault={"poison": True}) for i in range(2)]
        good = [booking(f"good-{i}") for i in range(3)]
        with self.start_pool(lab_config) as pool:
            produce(lab_config, self.backend, poison + good)
            stats = pool.wait_until_drained(timeout=60, expected=len(poison) + len(good))
            events = pool.events()
        dead = lab.dead_letters(self.backend, lab_config)

        assert (stats["completed"], stats["dead_lettered"]) == (3, 2)
        assert sorted(dead["booking_id"]) == ["poison-0", "poison-1"]
        assert list(dead["attempts"]) == [MAX_ATTEMPTS, MAX_ATTEMPTS]
        assert all("poison" in reason for reason in dead["reason"]), list(dead["reason"])
        for b in poison:
            assert list(rows(events, "started", b["booking_id"])["attempt"]) == [1, 2, 3]
            assert rows(events, "completed", b["booking_id"]).empty
            assert len(rows(events, "dead_lettered", b["booking_id"])) == 1
        assert set(rows(events, "completed")["booking_id"]) == {b["booking_id"] for b in good}

    @pytest.mark.timeout(90)
    def test_malformed_dead_lettered_once(self, lab_config: Config) -> None:
        not_json = '{"booking_id": "torn", "guests": '
        array = '[{"booking_id": "in-a-list"}]'
        no_guests = booking("no-guests", guests=0)
        backwards = booking("backwards", check_in="2027-05-10", check_out="2027-05-01")
        after = [booking(f"after-{i}") for i in range(10)]
        with self.start_pool(lab_config) as pool:
            produce(lab_config, self.backend, [not_json, array, no_guests, backwards])
            produce(lab_config, self.backend, after)
            stats = pool.wait_until_drained(timeout=60, expected=4 + len(after))
            events = pool.events()
            live = len(pool.pids)
        dead = lab.dead_letters(self.backend, lab_config)

        assert live == 2, "a bad message must not stop a worker"
        assert (stats["completed"], stats["dead_lettered"], stats["retried"]) == (len(after), 4, 0)
        assert set(rows(events, "completed")["booking_id"]) == {b["booking_id"] for b in after}
        assert len(dead) == 4, dead.to_dict("records")
        assert list(dead["attempts"]) == [1, 1, 1, 1]
        by_text = dict(zip(dead["booking"], dead["reason"], strict=True))
        by_id = dict(zip(dead["booking_id"], dead["reason"], strict=True))
        assert "not valid JSON" in by_text[not_json]
        assert "must be a JSON object" in by_text[array]
        assert "'guests' must be 1-10" in by_id["no-guests"]
        assert "check_out" in by_id["backwards"] and "later than check_in" in by_id["backwards"]
        # Once each, never retried: one "failed" delivery per bad message.
        bad = rows(events, "failed")
        assert len(bad) == 4 and set(bad["attempt"]) == {1} and bool(bad["bad_message"].all())
        assert len(rows(events, "dead_lettered")) == 4

    @pytest.mark.timeout(120)
    def test_sigkill_redelivers_the_same_message(self, lab_config: Config) -> None:
        slow = booking("slow-0", fault={"slow_ms": 3000})
        others = [booking(f"other-{i}") for i in range(10)]
        with self.start_pool(lab_config) as pool:
            produce(lab_config, self.backend, [slow, *others])
            first = wait_for_started(pool, "slow-0")
            killed_pid = pool.kill(first["worker"])  # mid-job: it sleeps 3 s before its first step
            stats = pool.wait_until_drained(timeout=90, expected=1 + len(others))
            events = pool.events()
            victim = next(w for w in pool.workers if w.worker_id == first["worker"])

        assert killed_pid == first["pid"] and victim.exit_code == -9
        started = rows(events, "started", "slow-0")
        assert started["pid"].iloc[0] == killed_pid
        assert killed_pid not in set(started["pid"].iloc[1:]) and len(started) >= 2, started[["worker", "attempt"]]
        assert set(started["source"]) == {first["source"]}, "redelivered, not sent again"
        done = rows(events, "completed", "slow-0")
        assert len(done) >= 1 and killed_pid not in set(done["pid"])
        # Nothing lost: everything produced is completed or dead-lettered.
        assert (stats["completed"], stats["dead_lettered"]) == (1 + len(others), 0)
        assert set(rows(events, "completed")["booking_id"]) == {"slow-0", *(b["booking_id"] for b in others)}

    @pytest.mark.timeout(120)
    def test_backlog_in_batches_reconciles(self, lab_config: Config) -> None:
        """A backlog drained in batches: every booking settled once, and one event line per event and delivery."""
        valid = BookingGenerator(seed=11, prefix="batch").bookings(1500)
        flaky = [booking(f"flaky-{i}", fault={"fail_times": 1}) for i in range(5)]
        poison = [booking(f"poison-{i}", fault={"poison": True}) for i in range(2)]
        malformed = ['{"booking_id": "torn", "guests": ', booking("bad-guests", guests=0)]
        backlog: list[Message] = list(valid)
        for k, odd in enumerate([*flaky, *poison, *malformed]):
            backlog.insert(100 + 130 * k, odd)  # inside batches, not at their edges only
        produce(lab_config, self.backend, backlog)  # before any worker: the first fetches are full batches
        with self.start_pool(lab_config) as pool:
            stats = pool.wait_until_drained(timeout=90, expected=len(backlog))
            events = pool.events()
        applied = effects(lab_config, self.backend)

        settled_ok = {b["booking_id"] for b in [*valid, *flaky]}
        assert (stats["completed"], stats["dead_lettered"], stats["backlog"], stats["in_flight"]) == (
            len(settled_ok),
            len(poison) + len(malformed),
            0,
            0,
        )
        completed = rows(events, "completed")
        assert set(completed["booking_id"]) == settled_ok
        assert len(completed) == stats["completed"] + stats["duplicates"] == stats["runs"]
        assert int(completed["duplicate"].sum()) == stats["duplicates"]
        assert sorted(lab.dead_letters(self.backend, lab_config)["booking_id"].fillna("?")) == sorted(
            ["?", "bad-guests", "poison-0", "poison-1"]
        )
        # The ledger's retries are the deliveries that started at attempt 2 or later, as the event log shows them.
        started = rows(events, "started")
        again = started[started["attempt"] > 1]
        assert stats["retried"] == len(again)
        # Every injected failure was retried: each flaky booking once, each poison booking until its last attempt.
        faulty = {b["booking_id"] for b in [*flaky, *poison]}
        retried = rows(events, "retried")["booking_id"].value_counts()
        assert set(retried.index) <= faulty, "a valid booking failed"
        assert all(retried.get(b["booking_id"], 0) >= 1 for b in flaky)
        assert all(retried.get(b["booking_id"], 0) >= MAX_ATTEMPTS - 1 for b in poison)
        # Any other redelivery is at-least-once at work (a consumer held past min-idle on a loaded machine, its
        # entries claimed by the other): the booking ran again, and the ledger counted the second run a duplicate.
        redelivered = set(again["booking_id"]) - faulty
        assert redelivered <= set(completed[completed["duplicate"].astype(bool)]["booking_id"])
        # Every run that started ends in exactly one "completed" or "failed" line; bad messages fail unstarted.
        failed = rows(events, "failed")
        bad = failed[failed["bad_message"].fillna(False).astype(bool)]
        ended = pd.concat([completed, failed.drop(bad.index)])["booking_id"].value_counts()
        assert started["booking_id"].value_counts().sort_index().equals(ended.sort_index())
        assert len(bad) == len(malformed) and len(rows(events, "dead_lettered")) == len(poison) + len(malformed)
        received = rows(events, "received")
        assert len(received) >= len(started) + len(bad), "every delivery is received first"
        assert settled_ok <= set(received["booking_id"])
        # Effects exactly once per completed booking (idempotency on).
        assert set(applied["payments"]) == settled_ok and set(applied["payments"].values()) == {1}
        assert sum(applied["inventory"].values()) == len(settled_ok)
        if self.batches:
            per_write = completed.groupby(["worker", "mono"]).size()
            assert per_write.max() > 1, "the workers processed one booking at a time"

    @pytest.mark.timeout(150)
    def test_sigkill_mid_batch_loses_nothing(self, lab_config: Config) -> None:
        """A worker SIGKILLed with bookings in flight: all of them delivered again, every booking completed."""
        sent = BookingGenerator(seed=12, prefix="kill").bookings(3000)
        produce(lab_config, self.backend, sent)
        with self.start_pool(lab_config) as pool:
            victim = kill_with_bookings_in_flight(pool)
            stats = pool.wait_until_drained(timeout=120, expected=len(sent))
            events = pool.events()
        applied = effects(lab_config, self.backend)

        assert (stats["completed"], stats["dead_lettered"]) == (len(sent), 0)
        completed = rows(events, "completed")
        assert set(completed["booking_id"]) == {b["booking_id"] for b in sent}
        # At-least-once: the repeats are counted, not hidden. A worker killed after recording a completion
        # and before logging it leaves a run in the ledger without its line (its redelivery is the duplicate).
        assert stats["runs"] == stats["completed"] + stats["duplicates"]
        assert stats["completed"] <= len(completed) <= stats["runs"]
        assert int(completed["duplicate"].sum()) <= stats["duplicates"]
        started = rows(events, "started")
        by_victim = started[started["pid"] == victim]
        finished_by_victim = set(completed.loc[completed["pid"] == victim, "booking_id"])
        cut = set(by_victim["booking_id"]) - finished_by_victim
        assert cut, "the kill did not land inside a batch"
        again = started[started["booking_id"].isin(cut) & (started["pid"] != victim)]
        assert set(again["booking_id"]) == cut, "a booking in flight in the killed worker was not delivered again"
        assert set(completed.loc[completed["booking_id"].isin(cut), "pid"]) - {victim}, "finished elsewhere"
        sources = started[started["booking_id"].isin(cut)].groupby("booking_id")["source"].nunique()
        assert set(sources) == {1}, "redelivered, not sent again"
        assert set(applied["payments"].values()) == {1} and len(applied["payments"]) == len(sent)

    def _run_with_duplicates(self, config: Config, idempotent: bool) -> tuple[dict[str, Any], WorkerPool, int]:
        """Force two kinds of duplicate run and return the stats, the (stopped) pool and the killed pid.

        - ``twice`` is sent twice, as a producer retry would: two complete runs, one of them a duplicate.
        - ``cut`` is SIGKILLed right after its payment was charged, before the ack: the redelivery
          runs every step again, and only the idempotency markers keep the charge single.

        Steps take 300 ms, so the payment lands 0.6 s after the start with 0.3 s to spare.
        """
        bookings = [booking("cut", hotel_id="hotel-007"), booking("twice"), booking("plain")]
        payments_key = config.names.key(self.backend, "payments")
        with (
            redis.Redis.from_url(config.redis_url) as client,
            self.start_pool(config, step_ms=300, idempotent=idempotent) as pool,
        ):
            produce(config, self.backend, [*bookings, booking("twice")])
            victim = wait_for_started(pool, "cut")
            deadline = time.monotonic() + 10
            while not client.hget(payments_key, "cut") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert client.hget(payments_key, "cut") == b"1", "the payment step did not run"
            killed_pid = pool.kill(victim["worker"])
            stats = pool.wait_until_drained(timeout=90, expected=len(bookings))
        started = rows(pool.events(), "started", "cut")
        assert started["pid"].iloc[0] == killed_pid and started["pid"].nunique() >= 2, "cut was not redelivered"
        assert (stats["completed"], stats["dead_lettered"]) == (3, 0)
        assert stats["duplicates"] >= 1
        return stats, pool, killed_pid

    @pytest.mark.timeout(120)
    def test_idempotency_on_keeps_effects_exact(self, lab_config: Config) -> None:
        stats, pool, _ = self._run_with_duplicates(lab_config, idempotent=True)
        applied = effects(lab_config, self.backend)
        on_disk = count_effects(pool.run_dir, self.backend)

        assert applied["payments"] == {"cut": 1, "twice": 1, "plain": 1}
        assert sum(applied["inventory"].values()) == stats["completed"] == 3
        assert on_disk == {
            "confirmations": {"cut": 1, "twice": 1, "plain": 1},
            "outbox": {"cut": 1, "twice": 1, "plain": 1},
        }

    @pytest.mark.timeout(120)
    def test_idempotency_off_doubles_them(self, lab_config: Config) -> None:
        stats, pool, _ = self._run_with_duplicates(lab_config, idempotent=False)
        applied = effects(lab_config, self.backend)
        on_disk = count_effects(pool.run_dir, self.backend)

        assert applied["payments"]["cut"] == 2, "charged in the killed run and again in the redelivery"
        assert applied["payments"]["twice"] >= 2
        assert sum(applied["inventory"].values()) > stats["completed"]
        assert on_disk["confirmations"]["twice"] >= 2 and on_disk["outbox"]["twice"] >= 2


@pytest.mark.integration
@pytest.mark.redis
class TestStreams(BackendContract):
    backend = "streams"
    # The retry delay is the XAUTOCLAIM min-idle time (backoff_ms), which is also how soon a
    # SIGKILLed worker's entries are claimed: no option needed for fast recovery.
    exponential_backoff = False


@pytest.mark.integration
@pytest.mark.redis
class TestBullMQ(BackendContract):
    backend = "bullmq"
    batches = False
    # A SIGKILLed worker's job is back about lockDuration + 2 x stalledInterval later: 3 s here
    # instead of the lab's 9 s. Nothing in these tests blocks the event loop, so locks are renewed.
    options = {"lock_duration_ms": "2000", "stalled_interval_ms": "500"}


@pytest.mark.integration
@pytest.mark.redis
@pytest.mark.kafka
class TestKafka(BackendContract):
    backend = "kafka"
    # Nothing to shorten: the backend's session.timeout.ms is 6 s (the embedded broker holds each
    # JoinGroup for half of it), so a SIGKILLed worker's partitions move about 8-9 s after the kill.
