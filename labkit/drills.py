"""Reliability drills: the lab shown to keep the promises it teaches, under the faults it teaches.

Each drill runs real worker processes against real brokers, injects one kind of fault, then
audits labkit's own ledger in Redis against the list of bookings the producer got an
acknowledgement for:

- ``worker_kills``: SIGKILL a random worker at random intervals and start a replacement;
- ``redis_restart``: stop and restart a private Redis (AOF on) mid-run;
- ``kafka_restart``: restart a private embedded Kafka-protocol broker mid-run (memory only: it loses data);
- ``bad_input``: a fuzz corpus of 200+ bad messages between valid bookings, also through independent clients;
- ``slow_consumer``: handlers slower than the lock / claim idle time / max.poll.interval.ms, with and
  without the lab's protection;
- ``process_hygiene``: SIGKILL the pool's parent (a notebook kernel) and time how long its workers survive.

Every drill returns a :class:`DrillResult` whose :meth:`~DrillResult.summary` is one line
(produced, completed, dead-lettered, lost, duplicates, double effects, recovery time), and
:func:`results_frame` turns several into one DataFrame. A booking is *lost* when the producer
was told it was stored and it is neither completed nor dead-lettered when the drill gives up
waiting; a *double effect* is a payment, inventory count, confirmation or email applied more
than once for one booking.

The restart drills never touch a learner's or a test session's servers: they start a stack of
their own on free ports with a temporary state folder, and stop it at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit import lab
from labkit.backends import get_backend
from labkit.backends.kafka import quirks
from labkit.booking import MAX_MESSAGE_BYTES, MAX_NESTING, BookingGenerator, encode
from labkit.config import Config
from labkit.errors import LabkitError
from labkit.pool import REPO_ROOT, WorkerPool
from labkit.stack import PrivateStack
from labkit.workflow import WorkerSettings, count_effects

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

DRILLS = ("worker-kills", "redis-restart", "kafka-restart", "bad-input", "slow-consumer", "process-hygiene")

#: The audit stops waiting for acknowledged bookings to settle after this many seconds without progress.
SETTLE_TIMEOUT_S = 60.0
#: Seconds between two looks at the ledger while waiting.
_POLL_S = 0.5
#: Simulated I/O per workflow step in the chaos drills: 5 steps x 30 ms, so at 40 bookings/s about 6 are in
#: flight and most kills land mid-booking.
CHAOS_STEP_MS = 30.0
#: Random pause between two kills, per backend (seconds). A Kafka kill costs a rebalance (about
#: session.timeout.ms = 6 s on the embedded broker), so killing faster than that only measures rebalances.
#: Kafka partitions per worker in the kill drill: as many as a worker has handler slots (concurrency 4).
KILL_PARTITIONS_PER_WORKER = 4
KILL_EVERY_S = {"bullmq": (2.0, 5.0), "streams": (2.0, 5.0), "kafka": (6.0, 10.0)}


@dataclass
class DrillResult:
    """What one drill measured.

    Attributes:
        drill: the drill's name (``worker-kills``, ...).
        backend: ``bullmq``, ``streams`` or ``kafka``.
        seconds: how long faults were injected (the producer's run time).
        produced: bookings the producer was told were stored (valid ones, plus bad ones in ``bad-input``).
        completed: of those, bookings whose workflow finished.
        dead_lettered: of those, bookings in the dead-letter destination.
        lost: acknowledged bookings neither completed nor dead-lettered when the drill stopped waiting.
        duplicates: workflow runs of an already completed booking (the ledger's counter).
        double_effects: payments, inventory counts, confirmations and emails applied more than once.
        recovery_s: worst time from the fault to the first work done after it (None: nothing to recover).
        worker_crashes: worker exits the drill did not cause.
        ok: the lab kept its promise under this drill (see each drill for what that means).
        detail: drill-specific numbers (kills, down time, per-category counts, ...).
    """

    drill: str
    backend: str
    seconds: float
    produced: int = 0
    completed: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicates: int = 0
    double_effects: int = 0
    recovery_s: float | None = None
    worker_crashes: int = 0
    ok: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: the figures docs/drills.md tabulates."""
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        return (
            f"drill={self.drill} backend={self.backend} seconds={self.seconds:g} produced={self.produced} "
            f"completed={self.completed} dead_lettered={self.dead_lettered} lost={self.lost} "
            f"duplicates={self.duplicates} double_effects={self.double_effects} recovery={recovery} "
            f"crashes={self.worker_crashes} {'OK' if self.ok else 'FAILED'}"
        )

    def row(self) -> dict[str, Any]:
        """The result as one flat row (``detail`` as JSON text)."""
        row = asdict(self)
        row["detail"] = json.dumps(self.detail, default=str, sort_keys=True)
        return row


def results_frame(results: list[DrillResult]) -> pd.DataFrame:
    """Drill results side by side, one row per drill run."""
    import pandas as pd

    return pd.DataFrame([r.row() for r in results])


# -- shared machinery -------------------------------------------------------------------------------------------


def _drill_config(config: Config | None) -> Config:
    """The lab's config with a fresh namespace, so a drill never mixes with a lesson's data."""
    base = config or Config.from_env()
    return base.with_(namespace=f"{base.namespace}drill{uuid.uuid4().hex[:6]}-")


class _Producer(threading.Thread):
    """Sends bookings at a steady rate from a thread of its own, through labkit's backend (its own loop).

    A batch the broker refused or did not acknowledge (broker down) is sent again until it is
    acknowledged, as a careful producer would: only acknowledged bookings count as produced,
    and a batch written in part before the error may arrive twice (a duplicate, not a loss).
    """

    def __init__(
        self,
        backend: str,
        config: Config,
        bookings: list[dict[str, Any]],
        rate: float,
        interleave: Callable[[int], list[Any]] | None = None,
    ) -> None:
        super().__init__(name=f"drill-producer-{backend}", daemon=True)
        self.backend = backend
        self.config = config
        self.bookings = bookings
        self.rate = rate
        self.interleave = interleave
        self.acked: list[str] = []
        self.extra_acked = 0
        self.failures: list[tuple[float, str]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # reported by the drill, which decides whether it is fatal
            self.error = e

    async def _run(self) -> None:
        batch = max(1, int(self.rate / 10))  # 10 batches a second
        started = time.monotonic()
        backend = get_backend(self.backend)(self.config)
        connected = False
        try:
            for index in range(0, len(self.bookings), batch):
                await asyncio.sleep(max(0.0, started + index / self.rate - time.monotonic()))
                chunk = self.bookings[index : index + batch]
                messages: list[Any] = list(chunk)
                extra = self.interleave(index) if self.interleave else []
                messages += extra
                while True:
                    try:
                        if not connected:
                            await backend.connect()
                            connected = True
                        await backend.produce(messages)
                        break
                    except LabkitError as e:
                        self.failures.append((time.monotonic(), str(e)))
                        # A client may be wedged for good (an idempotent Kafka producer after a broker
                        # restart): start over with a fresh one.
                        with contextlib.suppress(Exception):
                            await backend.close()
                        await asyncio.sleep(0.3)
                        backend, connected = get_backend(self.backend)(self.config), False
                self.acked.extend(b["booking_id"] for b in chunk)
                self.extra_acked += len(extra)
        finally:
            with contextlib.suppress(Exception):
                await backend.close()


@dataclass
class _Ledger:
    """labkit's bookkeeping for one backend, read once with a plain redis client."""

    completed: set[str]
    dead: set[str]
    counters: dict[str, int]
    payments: dict[str, int]
    inventory: dict[str, int]


def _read_ledger(config: Config, backend: str) -> _Ledger:
    import redis

    key = config.names.key
    client = redis.Redis.from_url(config.redis_url, decode_responses=True, socket_timeout=10)
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.smembers(key(backend, "completed"))
            pipe.smembers(key(backend, "dead"))
            pipe.hgetall(key(backend, "counters"))
            pipe.hgetall(key(backend, "payments"))
            pipe.hgetall(key(backend, "inventory"))
            completed, dead, counters, payments, inventory = pipe.execute()
    finally:
        client.close()
    return _Ledger(set(completed), set(dead), _ints(counters), _ints(payments), _ints(inventory))


def _ints(values: dict[str, str]) -> dict[str, int]:
    return {k: int(v) for k, v in values.items()}


def _settle(config: Config, backend: str, ids: list[str], timeout: float) -> tuple[_Ledger, float]:
    """Wait until every id is completed or dead-lettered; returns the ledger and the wait.

    Gives up after ``timeout`` seconds without progress, not after ``timeout`` in all: a backlog
    that is still being worked off (one Kafka partition left without a consumer for a while
    holds hundreds of bookings, processed one at a time) is late, not lost.
    """
    wanted = set(ids)
    started = last_progress = time.monotonic()
    settled = -1
    while True:
        try:
            ledger = _read_ledger(config, backend)
        except Exception as e:  # Redis briefly gone (a restart drill): look again
            log.debug("ledger not readable yet: %s", e)
        else:
            now_settled = len(wanted & (ledger.completed | ledger.dead))
            if now_settled > settled:
                settled, last_progress = now_settled, time.monotonic()
            if settled == len(wanted) or time.monotonic() - last_progress > timeout:
                return ledger, time.monotonic() - started
        if time.monotonic() - last_progress > timeout + 30:
            raise LabkitError(f"Redis at {config.redis_url} did not answer for {timeout + 30:g} s")
        time.sleep(_POLL_S)


def _audit(
    result: DrillResult, config: Config, run_dir: Path, acked: list[str], hotels: dict[str, str], timeout: float
) -> _Ledger:
    """Fill the counts of ``result`` from the ledger and the run folder's effect files."""
    ledger, waited = _settle(config, result.backend, acked, timeout)
    ids = set(acked)
    result.produced = len(ids)
    result.completed = len(ids & ledger.completed)
    result.dead_lettered = len(ids & ledger.dead - ledger.completed)
    result.lost = len(ids - ledger.completed - ledger.dead)
    result.duplicates = ledger.counters.get("duplicates", 0)
    double_payments = sum(max(0, n - 1) for n in ledger.payments.values())
    # Inventory is a per-hotel counter: compare it with the completed bookings of each hotel.
    expected_rooms: dict[str, int] = {}
    for booking_id in ids & ledger.completed:
        expected_rooms[hotels[booking_id]] = expected_rooms.get(hotels[booking_id], 0) + 1
    double_rooms = sum(max(0, n - expected_rooms.get(h, 0)) for h, n in ledger.inventory.items())
    files = count_effects(run_dir, result.backend)
    double_files = {kind: sum(max(0, n - 1) for n in per.values()) for kind, per in files.items()}
    result.double_effects = double_payments + double_rooms + sum(double_files.values())
    result.detail.update(
        settle_s=round(waited, 1),
        runs=ledger.counters.get("runs", 0),
        retried=ledger.counters.get("retried", 0),
        double_payments=double_payments,
        double_inventory=double_rooms,
        double_confirmations=double_files["confirmations"],
        double_emails=double_files["outbox"],
    )
    if result.lost:
        result.detail["lost_ids"] = sorted(ids - ledger.completed - ledger.dead)[:20]
    if result.backend == "kafka":  # what the embedded broker's repairs had to do in this run (quirks.py)
        result.detail["broker_repairs"] = quirks.Repairs(config).counts()
    return ledger


def _finish_run(
    result: DrillResult,
    config: Config,
    pool: WorkerPool,
    producer: _Producer,
    hotels: dict[str, str],
    timeout: float,
) -> tuple[_Ledger, pd.DataFrame]:
    """End of every drill run: wait for the producer, audit what it got acknowledged, count crashes."""
    producer.join()
    if producer.error is not None:
        raise producer.error
    ledger = _audit(result, config, pool.run_dir, producer.acked, hotels, timeout)
    result.worker_crashes = _crashes(pool)
    return ledger, pool.events()


def _crashes(pool: WorkerPool) -> int:
    """Worker exits the pool did not cause (a worker that died on its own)."""
    return sum(1 for w in pool.workers if not w.alive and not w.stopped_by_pool)


def _bookings(count: int, prefix: str, **fault: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``count`` valid bookings with unique ids, and each one's hotel (for the inventory audit)."""
    bookings = BookingGenerator(seed=random.randrange(1 << 30), prefix=prefix).bookings(count)
    if fault:
        bookings = [{**b, "fault": dict(fault)} for b in bookings]
    return bookings, {b["booking_id"]: b["hotel_id"] for b in bookings}


def _cleanup(backend: str, config: Config) -> None:
    """Empty the drill's namespace (Kafka topics hold memory on the embedded broker)."""
    try:
        lab.reset(backend, config)
        lab.with_backend(backend, lambda b: b.purge(), config)
    except Exception as e:  # the figures are already measured: a failed clean-up must not hide them
        log.warning("could not clean up drill namespace %r: %s", config.namespace, e)


def _first_completion_after(events: pd.DataFrame, mono: float) -> float | None:
    """Seconds from ``mono`` to the first booking completed after it."""
    done = events[(events["event"] == "completed") & (events["mono"] > mono)]
    return None if done.empty else float(done["mono"].min() - mono)


@contextlib.contextmanager
def _pool(backend: str, config: Config, settings: WorkerSettings, workers: int, label: str) -> Iterator[WorkerPool]:
    pool = WorkerPool(backend, config, settings, run_dir=lab.new_run(f"drill-{label}-{backend}", config))
    try:
        pool.start(workers, ready_timeout=30)
        yield pool
    finally:
        pool.stop()


# -- 1. worker kills --------------------------------------------------------------------------------------------


def worker_kills(
    backend: str,
    seconds: float = 20,
    workers: int = 3,
    rate: float = 40,
    idempotent: bool = True,
    config: Config | None = None,
    seed: int | None = None,
    settle_timeout: float = SETTLE_TIMEOUT_S,
    broker_repairs: bool = True,
) -> DrillResult:
    """SIGKILL a random worker at random intervals (and start a replacement) while a producer runs.

    Passes (``ok``) when no acknowledged booking is lost, no worker died unasked, and, with
    idempotency on, no effect was applied twice. With ``idempotent=False`` the double effects
    the duplicates caused are reported, and are not a failure: they are the lesson.
    ``broker_repairs=False`` runs Kafka workers without the embedded broker's group repairs
    (``labkit.backends.kafka.quirks``): on Apache Kafka the group must recover by itself.

    ``recovery_s``: the worst time, over all kills, from the kill to the first completion
    after it of a booking the killed worker had received and not finished.
    """
    rng = random.Random(seed)
    config = _drill_config(config)
    result = DrillResult("worker-kills", backend, seconds, detail={"idempotent": idempotent, "workers": workers})
    bookings, hotels = _bookings(int(seconds * rate), f"wk{uuid.uuid4().hex[:6]}")
    # Kafka runs one booking at a time per partition (per-key order): 3 partitions of 150 ms bookings do
    # 20 a second, less than the 40 produced, and the backlog would swamp what a kill costs.
    options = {"partitions": str(KILL_PARTITIONS_PER_WORKER * workers)} if backend == "kafka" else {}
    if backend == "kafka":
        options["broker_repairs"] = "on" if broker_repairs else "off"
        result.detail["broker_repairs_on"] = broker_repairs
    settings = WorkerSettings(concurrency=4, idempotent=idempotent, step_ms=CHAOS_STEP_MS, options=options)
    lab.with_backend(backend, lambda b: b.setup(), config, settings)
    kills: list[tuple[float, str]] = []
    try:
        with _pool(backend, config, settings, workers, "kills") as pool:
            producer = _Producer(backend, config, bookings, rate)
            producer.start()
            low, high = KILL_EVERY_S[backend]
            deadline = time.monotonic() + seconds
            while time.monotonic() + low < deadline:
                time.sleep(rng.uniform(low, high))
                live = [w for w in pool.workers if w.alive]
                victim = rng.choice(live).worker_id
                kills.append((time.monotonic(), victim))
                pool.kill(victim)
                pool.scale(workers)
            _, events = _finish_run(result, config, pool, producer, hotels, settle_timeout)
        result.recovery_s = _kill_recovery(events, kills)
        result.detail.update(kills=len(kills), producer_retries=len(producer.failures))
        result.ok = result.lost == 0 and result.worker_crashes == 0 and (result.double_effects == 0 or not idempotent)
    finally:
        _cleanup(backend, config)
    return result


def _kill_recovery(events: pd.DataFrame, kills: list[tuple[float, str]]) -> float | None:
    """Worst delay from a kill to the next completion of a booking the victim held."""
    worst: float | None = None
    for mono, victim in kills:
        mine = events[(events["worker"] == victim) & (events["mono"] <= mono)]
        held = set(mine.loc[mine["event"] == "received", "booking_id"].dropna())
        held -= set(mine.loc[mine["event"].isin(["completed", "dead_lettered"]), "booking_id"].dropna())
        if not held:
            continue
        later = events[(events["mono"] > mono) & events["booking_id"].isin(held) & (events["event"] == "completed")]
        if later.empty:
            continue
        delay = float(later["mono"].max() - mono)  # the last of them to be picked up again
        worst = delay if worst is None else max(worst, delay)
    return None if worst is None else round(worst, 2)


# -- 2. Redis restart -------------------------------------------------------------------------------------------


def redis_restart(
    backend: str,
    seconds: float = 16,
    workers: int = 3,
    rate: float = 40,
    hard: bool = False,
    down_s: float = 1.0,
    settle_timeout: float = SETTLE_TIMEOUT_S,
) -> DrillResult:
    """Stop a private Redis half-way through a run (SIGTERM, or SIGKILL with ``hard``), start it again.

    Redis runs as ``labkit up`` runs it: ``appendonly yes``, ``appendfsync everysec``. Passes when the
    workers carry on by themselves (no crash, completions after the restart) and no acknowledged
    booking is lost. ``recovery_s``: from Redis answering again to the first completion after it.
    """
    if backend not in ("bullmq", "streams"):
        raise LabkitError(f"redis-restart drills BullMQ and Streams; {backend!r} keeps its work in Kafka")
    stack = PrivateStack(with_kafka=False, namespace="drill-")
    result = DrillResult("redis-restart", backend, seconds, detail={"hard": hard})
    try:
        stack.up()
        config = stack.config
        lab.with_backend(backend, lambda b: b.setup(), config)
        bookings, hotels = _bookings(int(seconds * rate), f"rr{uuid.uuid4().hex[:6]}")
        settings = WorkerSettings(concurrency=4, step_ms=CHAOS_STEP_MS)
        with _pool(backend, config, settings, workers, "redis") as pool:
            producer = _Producer(backend, config, bookings, rate)
            producer.start()
            time.sleep(seconds / 2)
            aof = lab.with_backend(backend, lambda b: b.redis.config_get("append*"), config)
            stopped_at = time.monotonic()
            stack.stop_service("redis", hard=hard)
            time.sleep(down_s)
            stack.up()
            back_at = time.monotonic()
            _, events = _finish_run(result, config, pool, producer, hotels, settle_timeout)
        result.recovery_s = _first_completion_after(events, back_at)
        result.detail.update(
            down_s=round(back_at - stopped_at, 2),
            aof={k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                 for k, v in aof.items()},
            producer_retries=len(producer.failures),
        )  # fmt: skip
        result.ok = result.lost == 0 and result.worker_crashes == 0 and result.recovery_s is not None
    finally:
        stack.close()
    return result


# -- 3. Kafka-protocol broker restart ---------------------------------------------------------------------------


def kafka_restart(
    seconds: float = 30,
    workers: int = 3,
    rate: float = 20,
    down_s: float = 1.0,
    settle_timeout: float = 60,
) -> DrillResult:
    """Crash (SIGKILL) a private broker half-way through a Kafka run and start it again.

    The broker is the lab's kind (``Config.kafka``): the embedded one comes back empty, Apache Kafka
    with its log. Nothing else is restarted or set up again: the producer builds a fresh client when
    its own fails and recreates the topics it needs; the workers' group watch recreates missing
    topics and rebalances the group onto them (``labkit.backends.kafka``).

    The embedded broker keeps everything in memory, so there this drill expects loss and reports it:
    ``detail["lost_in_broker"]`` are bookings acknowledged by the old broker and not processed
    when it died (gone with it); ``detail["lost_after_restart"]`` are bookings acknowledged by the
    new broker that the running workers never processed. ``ok``: no worker crashed, every booking is
    accounted for, none acknowledged after the restart was lost, and on a durable broker (Apache
    Kafka) none acknowledged before it either; the embedded broker's loss is reported, not a failure.
    """
    lab_config = Config.from_env()
    stack = PrivateStack(with_kafka=True, namespace="drill-", lab_config=lab_config)
    durable = lab_config.kafka == "apache"
    result = DrillResult("kafka-restart", "kafka", seconds)
    try:
        stack.up()
        config = stack.config
        lab.with_backend("kafka", lambda b: b.setup(), config)
        bookings, hotels = _bookings(int(seconds * rate), f"kr{uuid.uuid4().hex[:6]}")
        with _pool("kafka", config, WorkerSettings(concurrency=4, step_ms=CHAOS_STEP_MS), workers, "kafka") as pool:
            producer = _Producer("kafka", config, bookings, rate)
            producer.start()
            time.sleep(seconds / 2)
            stopped_at = time.monotonic()
            # SIGKILL: a crash, and a clean cut. On SIGTERM the embedded broker keeps serving for about 5 s
            # while it shuts down, so "acknowledged before the restart" would be a moving target. Apache Kafka
            # recovers its log on the next start (the page cache kept what it had written).
            stack.stop_service("kafka", hard=True)
            time.sleep(down_s)
            # The old broker is gone: every acknowledgement so far came from it, every later one from the new one.
            acked_before = list(producer.acked)
            settled_before = _read_ledger(config, "kafka")
            # The topics are gone with the old broker; nobody recreates them but the producer and the workers.
            stack.up()
            back_at = time.monotonic()
            ledger, events = _finish_run(result, config, pool, producer, hotels, settle_timeout)
        before = set(acked_before)
        unsettled_at_stop = before - settled_before.completed - settled_before.dead
        after = set(producer.acked) - before
        result.recovery_s = _first_completion_after(events, back_at)
        result.detail.update(
            down_s=round(back_at - stopped_at, 2),
            acked_before_restart=len(before),
            unsettled_at_stop=len(unsettled_at_stop),
            lost_in_broker=len(unsettled_at_stop - ledger.completed - ledger.dead),
            acked_after_restart=len(after),
            lost_after_restart=len(after - ledger.completed - ledger.dead),
            producer_retries=len(producer.failures),
            producer_errors=sorted({message for _, message in producer.failures})[:3],
        )
        result.detail["durable"] = durable
        result.ok = (
            result.worker_crashes == 0
            and result.detail["lost_after_restart"] == 0
            and bool(after)
            and (result.lost == 0 or not durable)
        )
    finally:
        stack.close()
    return result


# -- 4. bad input -----------------------------------------------------------------------------------------------


def fuzz_corpus() -> list[tuple[str, bytes]]:
    """At least 200 bad messages, each with its category; every one breaks docs/contract.md somehow.

    Deterministic, so a failure names the exact message. JSON objects carry a ``fz-`` id where
    the id itself is not the fault, so their dead letters can be told apart.
    """
    good = {
        "user_id": "u1", "hotel_id": "h1", "check_in": "2027-03-01", "check_out": "2027-03-04",
        "guests": 2, "amount_cents": 12_000,
    }  # fmt: skip
    corpus: list[tuple[str, bytes]] = []
    n = 0

    def obj(category: str, **changes: Any) -> None:
        nonlocal n
        n += 1
        body = {"booking_id": f"fz-{n}", **good}
        for key, value in changes.items():
            if value is _MISSING:
                body.pop(key, None)
            else:
                body[key] = value
        corpus.append((category, encode(body).encode("utf-8")))

    valid_text = encode({"booking_id": "fz-0", **good}).encode()
    # invalid UTF-8
    for i, junk in enumerate([b"\xff", b"\xfe\xfe", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc",
                              b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\x80"]):  # fmt: skip
        corpus.append(("invalid-utf8", junk))
        corpus.append(("invalid-utf8", valid_text[: 20 + i] + junk + valid_text[20 + i :]))
    # truncated JSON
    for cut in range(1, len(valid_text), max(1, len(valid_text) // 25)):
        corpus.append(("truncated-json", valid_text[:cut]))
    for text in [b"", b" ", b"null", b"true", b"42", b'"booking"', b"[]", b"[1,2]", b"{}", b"{'a': 1}", b"NaN",
                 b"{\"booking_id\": }", valid_text + b"garbage", valid_text + valid_text, b"\x00" * 8]:  # fmt: skip
        corpus.append(("not-a-booking-object", text))
    # wrong types
    wrong: list[Any] = [None, True, 1.5, "2", [], {}, [2], "", -0.0]
    for name in ("booking_id", "user_id", "hotel_id", "check_in", "check_out", "guests", "amount_cents"):
        for value in wrong:
            if name in ("user_id", "hotel_id", "booking_id") and isinstance(value, str) and value:
                continue  # a non-empty string is the right type there
            if value is None:
                obj("wrong-type", **{name: _MISSING})
            else:
                obj("wrong-type", **{name: value})
    obj("wrong-type", fault="poison")
    obj("wrong-type", fault={"poison": "yes"})
    obj("wrong-type", fault={"fail_times": "2"})
    obj("wrong-type", created_at="yesterday")
    obj("wrong-type", seq="first")
    # missing fields
    for name in good:
        obj("missing-field", **{name: _MISSING})
    obj("missing-field", **{name: _MISSING for name in good})
    # huge payloads (above MAX_MESSAGE_BYTES; below Kafka's 1 MB message.max.bytes so every backend takes them)
    for size in (MAX_MESSAGE_BYTES + 1, 2 * MAX_MESSAGE_BYTES, 900_000):
        obj("huge", note="x" * size)
        corpus.append(("huge", b"[" + b"1," * (size // 2) + b"1]"))
    # extra-deep nesting
    for depth in (MAX_NESTING + 1, 100, 1000, 50_000):
        obj("deep-nesting", extra=json.loads("[" * min(depth, 900) + "]" * min(depth, 900)))
        corpus.append(("deep-nesting", b"[" * depth + b"]" * depth))
        corpus.append(("deep-nesting", b'{"a":' * depth + b"1" + b"}" * depth))
    # dates out of order or not dates
    for check_in, check_out in [
        ("2027-03-04", "2027-03-01"), ("2027-03-01", "2027-03-01"), ("2027-02-30", "2027-03-01"),
        ("2027-13-01", "2027-14-01"), ("27-03-01", "27-03-04"), ("2027/03/01", "2027/03/04"),
        ("2027-03-01T00:00", "2027-03-04"), ("0000-01-01", "0000-01-02"), ("yesterday", "tomorrow"),
        ("2027-3-1", "2027-3-4"),
    ]:  # fmt: skip
        obj("dates", check_in=check_in, check_out=check_out)
    # numbers out of range
    for name, value in [("guests", 0), ("guests", 11), ("guests", -1), ("guests", 10**30), ("amount_cents", -1),
                        ("amount_cents", -(10**20)), ("guests", 2.0), ("amount_cents", 1e300),
                        ("amount_cents", 12_000.5), ("guests", 3.999)]:  # fmt: skip
        obj("out-of-range", **{name: value})
    # fault directives of the wrong shape
    faults: tuple[Any, ...] = ([], "poison", 1, {"poison": 1}, {"poison": None, "fail_times": "x"}, {"fail_times": -1},
                  {"fail_times": 1001}, {"slow_ms": -5}, {"slow_ms": 10**9}, {"slow_ms": 1.5})  # fmt: skip
    for fault in faults:
        obj("bad-fault", fault=fault)
    corpus.append(("out-of-range", valid_text.replace(b'"guests":2', b'"guests":1e999')))
    corpus.append(("out-of-range", valid_text.replace(b'"guests":2', b'"guests":NaN')))
    corpus.append(("out-of-range", valid_text.replace(b'"guests":2', b'"guests":Infinity')))
    # injection-like strings: harmless as data; the ones in booking_id break its pattern
    for injection in [
        "'; DROP TABLE bookings; --", "$(rm -rf /)", "`reboot`", "<script>alert(1)</script>", "../../etc/passwd",
        "{{7*7}}", "${jndi:ldap://x/a}", "*3\r\n$3\r\nDEL\r\n", "__import__('os').system('id')", "\x00null",
        "a" * 65, "bk 1", "bk\n1", "ünïcødé",
    ]:  # fmt: skip
        obj("injection", booking_id=injection)
    for injection in ["'; DROP TABLE bookings; --", "\r\nFLUSHALL\r\n", "a" * 65, ""]:
        obj("injection", hotel_id=injection, user_id="")
    return corpus


_MISSING = object()


def _independent_send(backend: str, config: Config, messages: list[bytes]) -> None:
    """Send raw bytes without labkit's producer: redis-py commands for Streams and BullMQ, kafka-python for Kafka."""
    names = config.names
    if backend == "kafka":
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, max_request_size=2_000_000, acks="all")
        try:
            for message in messages:
                producer.send(names.topic, value=message)
            producer.flush(30)
        finally:
            producer.close()
        return
    import redis

    client = redis.Redis.from_url(config.redis_url)
    try:
        if backend == "streams":
            for message in messages:
                client.xadd(names.stream, {"booking": message})
            return
        # BullMQ: a job written the way BullMQ's addStandardJob script writes one.
        prefix = f"bull:{names.bullmq_queue}"
        for message in messages:
            job_id = client.incr(f"{prefix}:id")
            client.hset(
                f"{prefix}:{job_id}",
                mapping={
                    "name": "booking",
                    "data": _bullmq_data(message),
                    "opts": json.dumps({"attempts": 3}),
                    "timestamp": int(time.time() * 1000),
                    "delay": 0,
                    "priority": 0,
                    "atm": 0,
                },
            )
            client.lpush(f"{prefix}:wait", job_id)
            client.zadd(f"{prefix}:marker", {"0": 0})
    finally:
        client.close()


def _bullmq_data(message: bytes) -> str:
    """The ``data`` field any BullMQ client would write for ``message``: always JSON.

    A JSON object goes in verbatim; anything else as a JSON string, because a BullMQ client
    JSON-encodes whatever data it is given. (A hand-written hash whose ``data`` is not JSON, not
    UTF-8, or an object nested past Python's recursion limit is not a BullMQ job: the bullmq
    library fails to read it before labkit's handler sees it, so it cannot be dead-lettered;
    docs/drills.md records what the drill observed.)
    """
    text = message.decode("utf-8", "surrogateescape")
    if text.count("{") + text.count("[") <= MAX_NESTING:
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(text, parse_constant=_no_constant), dict):
                return text
    return json.dumps(text)


def _no_constant(name: str) -> None:
    raise ValueError(name)


#: Bad messages also sent through an independent client (the rest go through labkit's producer).
INDEPENDENT_SHARE = 4  # every 4th


def bad_input(
    backend: str,
    workers: int = 2,
    valid: int = 200,
    config: Config | None = None,
    latency_budget_s: float = 10.0,
    settle_timeout: float = 60,
) -> DrillResult:
    """Send the fuzz corpus between valid bookings; every bad message must be dead-lettered with a reason.

    Every fourth bad message goes through an independent client (raw redis-py commands, kafka-python),
    the others through labkit's producer. Passes when each bad message is in the dead-letter
    destination exactly once with a non-empty reason, no worker crashed, every valid booking
    completed, and none took longer than ``latency_budget_s`` from send to completion.
    """
    config = _drill_config(config)
    corpus = fuzz_corpus()
    result = DrillResult("bad-input", backend, 0, detail={"bad_messages": len(corpus)})
    bookings, hotels = _bookings(valid, f"bi{uuid.uuid4().hex[:6]}")
    lab.with_backend(backend, lambda b: b.setup(), config)
    step = max(1, valid // len(corpus) + 1)
    try:
        with _pool(backend, config, WorkerSettings(concurrency=4), workers, "fuzz") as pool:
            started = time.monotonic()
            independent: list[bytes] = []
            through_labkit: list[bytes] = []
            for index, (_, message) in enumerate(corpus):
                (independent if index % INDEPENDENT_SHARE == 0 else through_labkit).append(message)
            _independent_send(backend, config, independent)
            per_batch = max(1, len(through_labkit) // max(1, valid // step))
            acked: list[str] = []

            async def send_all() -> None:
                async with get_backend(backend)(config) as producer:
                    bad = iter(through_labkit)
                    for index in range(0, valid, step):
                        chunk = bookings[index : index + step]
                        await producer.produce([*chunk, *[m for _, m in zip(range(per_batch), bad, strict=False)]])
                        acked.extend(b["booking_id"] for b in chunk)
                    await producer.produce(list(bad))

            asyncio.run(send_all())
            result.seconds = round(time.monotonic() - started, 1)
            _audit(result, config, pool.run_dir, acked, hotels, settle_timeout)
            # The valid ones are settled; give the dead letters the same chance.
            deadline = time.monotonic() + settle_timeout
            while True:
                letters = lab.with_backend(backend, lambda b: b.dead_letters(), config)
                bad_letters = {(letter["source"]): letter for letter in letters if letter["booking_id"] not in hotels}
                if len(bad_letters) >= len(corpus) or time.monotonic() > deadline:
                    break
                time.sleep(_POLL_S)
            result.worker_crashes = _crashes(pool)
            events = pool.events()
        completed = events[(events["event"] == "completed") & events["booking_id"].isin(list(hotels))]
        latency = completed.groupby("booking_id")["ts"].min() - completed.groupby("booking_id")["created_at"].min()
        without_reason = [s for s, letter in bad_letters.items() if not letter["reason"]]
        sources = [letter["source"] for letter in letters if letter["booking_id"] not in hotels]
        result.detail.update(
            independent=len(independent),
            dead_letters=len(sources),
            distinct_dead_letters=len(bad_letters),
            repeated_dead_letters=len(sources) - len(set(sources)),
            without_reason=len(without_reason),
            valid_in_dlq=sum(1 for letter in letters if letter["booking_id"] in hotels),
            max_valid_latency_s=round(float(latency.max()), 2) if not latency.empty else None,
            reasons=_reason_counts(bad_letters.values()),
        )
        result.dead_lettered += len(bad_letters)
        result.produced += len(corpus)
        result.lost += max(0, len(corpus) - len(bad_letters))
        result.ok = (
            result.lost == 0
            and result.worker_crashes == 0
            and len(bad_letters) == len(corpus)
            and not without_reason
            and result.detail["valid_in_dlq"] == 0
            and result.detail["max_valid_latency_s"] is not None
            and result.detail["max_valid_latency_s"] <= latency_budget_s
        )
    finally:
        _cleanup(backend, config)
    return result


def _reason_counts(letters: Any) -> dict[str, int]:
    """Dead-letter reasons grouped by their first words, for the report."""
    counts: dict[str, int] = {}
    for letter in letters:
        words = str(letter["reason"]).removeprefix("bad message: ").split()[:3]
        head = " ".join("N" if w.isdigit() else w for w in words)
        counts[head] = counts.get(head, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# -- 5. slow consumer -------------------------------------------------------------------------------------------

#: Kafka's slow worker: each of the 5 workflow steps waits this long, so a booking takes 15 s: well past
#: max.poll.interval.ms = 6 s plus the rebalance that hands its partitions to a quick worker (3-5 s), so that the
#: quick worker has run the booking again and committed it before the slow one is back in the group. (Back
#: sooner, the slow worker gets its partitions again and starts the same bookings over: they never finish.)
KAFKA_SLOW_STEP_MS = 3000.0

#: Per backend: (settings that protect a slow handler, settings that do not, the booking's fault).
#: Streams: claim idle time 300 ms, bookings take 1.5 s; the heartbeat keeps them. BullMQ: a handler that awaits
#: keeps its lock renewed (loop free); one that blocks the loop for 2.5 s past a 1 s lock loses it. Kafka: the first
#: worker is slow (5 steps x 3 s = 15 s a booking), the others quick (see ``slow_consumer``); max.poll.interval.ms
#: 30 s (default) keeps its bookings, 6 s makes it leave the group mid-booking.
_SLOW = {
    "streams": (
        WorkerSettings(concurrency=2, backoff_ms=300, options={"heartbeat": "1"}),
        WorkerSettings(concurrency=2, backoff_ms=300, options={"heartbeat": "0"}),
        {"slow_ms": 1500},
    ),
    "bullmq": (
        WorkerSettings(concurrency=1, options={"lock_duration_ms": "1000", "stalled_interval_ms": "500"}),
        WorkerSettings(concurrency=1, cpu_ms=2500, options={"lock_duration_ms": "1000", "stalled_interval_ms": "500"}),
        {"slow_ms": 2500},
    ),
    "kafka": (
        WorkerSettings(concurrency=2, step_ms=KAFKA_SLOW_STEP_MS),
        WorkerSettings(concurrency=2, step_ms=KAFKA_SLOW_STEP_MS, options={"max_poll_interval_ms": "6000"}),
        {},
    ),
}


def slow_consumer(
    backend: str,
    protected: bool = True,
    count: int = 6,
    workers: int = 2,
    config: Config | None = None,
    settle_timeout: float = 120,
) -> DrillResult:
    """Handlers slower than the lock / claim idle time / max.poll.interval.ms: duplicates with and without protection.

    ``protected`` uses the lab's defaults and heartbeats (Streams heartbeat on; BullMQ handler that
    awaits, so lock renewal runs; Kafka's default max.poll.interval.ms); otherwise the protection is
    off (heartbeat off; the BullMQ handler blocks the event loop past the lock; max.poll.interval.ms
    below the handler time). ``duplicates`` is the extra workflow starts of the same booking.
    Passes when protected runs have 0 duplicates and unprotected runs show some; no loss either way.

    Kafka runs one slow worker and ``workers - 1`` quick ones rather than slow bookings: a record
    that is slower than max.poll.interval.ms on every delivery is never committed and comes back
    forever (each time a duplicate), holding up its partition; and when every member leaves the
    group at once, the embedded broker can be left without a group leader for good (docs/drills.md).
    Here the slow worker leaves the group mid-booking, a quick worker takes the partition over and
    runs the booking again (the duplicate), and the group carries on.
    """
    config = _drill_config(config)
    good, bad, fault = _SLOW[backend]
    settings = good if protected else bad
    if backend == "streams":
        # A consumer claims only into free handler slots: with every slot of every worker busy, nobody would
        # claim the slow entries and the unprotected run could show no duplicate at all. With as many slots
        # per worker as bookings, some worker always has a free slot while a booking runs.
        settings = dataclasses.replace(settings, concurrency=max(settings.concurrency, count))
    if backend == "bullmq" and not protected:
        fault = {}  # the slowness is cpu_ms (blocking), not an awaited sleep
    result = DrillResult("slow-consumer", backend, 0, detail={"protected": protected, "fault": fault})
    bookings, hotels = _bookings(count, f"sc{uuid.uuid4().hex[:6]}", **fault)
    lab.with_backend(backend, lambda b: b.setup(), config)
    try:
        with _pool(backend, config, settings, 1 if backend == "kafka" else workers, "slow") as pool:
            if backend == "kafka":
                pool.start(workers - 1, ready_timeout=30, step_ms=0.0)  # the quick ones
                _wait_for_assignment(pool, workers, timeout=30)
                bookings = _one_per_slow_partition(pool, config, count)
                hotels = {b["booking_id"]: b["hotel_id"] for b in bookings}
            started = time.monotonic()
            lab.produce(backend, bookings, config)
            _audit(result, config, pool.run_dir, [b["booking_id"] for b in bookings], hotels, settle_timeout)
            result.seconds = round(time.monotonic() - started, 1)
            time.sleep(1.0)  # a duplicate started late still shows in the event log
            result.worker_crashes = _crashes(pool)
            events = pool.events()
        starts = events[events["event"] == "started"].groupby("booking_id").size()
        result.duplicates = max(result.duplicates, int((starts - 1).clip(lower=0).sum()))
        result.detail.update(
            workflow_starts=int(starts.sum()),
            left_group=int((events["event"] == "left_group").sum()),
            settings=asdict(settings),
        )
        no_loss = result.lost == 0 and result.worker_crashes == 0
        result.ok = no_loss and (result.duplicates == 0 if protected else result.duplicates > 0)
    finally:
        _cleanup(backend, config)
    return result


def _one_per_slow_partition(pool: WorkerPool, config: Config, count: int) -> list[dict[str, Any]]:
    """``count`` bookings: one on each partition of the slow worker (the first), the rest on the quick ones'.

    Keyed bookings land where the key's murmur2 hash says (labkit's producer uses the Java client's
    partitioner), so the drill can choose them: the slow worker then runs its bookings side by side
    (15 s in all, not 15 s per booking it happens to get), and it surely gets some.
    """
    from kafka.partitioner.default import murmur2

    events = pool.events()
    assigned = events[events["event"] == "assigned"].groupby("worker")["partitions"].last()
    work = {
        int(p.rsplit("/", 1)[1]): w
        for w, parts in assigned.items()
        for p in parts
        if p.startswith(f"{config.names.topic}/")
    }
    slow = sorted(p for p, w in work.items() if w == pool.workers[0].worker_id)
    quick = sorted(set(work) - set(slow))
    if not slow or not quick:  # the group did not settle as expected: any bookings will do, only slower
        return _bookings(count, f"sc{uuid.uuid4().hex[:6]}")[0]
    wanted = slow + quick * count
    candidates, _ = _bookings(count * 40, f"sc{uuid.uuid4().hex[:6]}")
    chosen: list[dict[str, Any]] = []
    for partition in wanted[:count]:
        for booking in candidates:
            if (
                booking not in chosen
                and (murmur2(booking["booking_id"].encode()) & 0x7FFFFFFF) % len(work) == partition
            ):
                chosen.append(booking)
                break
    return chosen


def _wait_for_assignment(pool: WorkerPool, workers: int, timeout: float) -> None:
    """Kafka: wait until the group has settled (each worker got partitions), so the first record is not a rebalance."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = pool.events()
        assigned = events[events["event"] == "assigned"]
        if assigned["worker"].nunique() >= min(workers, 3):
            return
        time.sleep(_POLL_S)


# -- 6. process hygiene -----------------------------------------------------------------------------------------

_PARENT = textwrap.dedent(
    """
    import json, sys, time
    from labkit.pool import WorkerPool
    pool = WorkerPool(sys.argv[1]).start(int(sys.argv[2]))
    print(json.dumps(pool.pids), flush=True)
    time.sleep(600)
    """
)


def process_hygiene(backend: str, workers: int = 3, config: Config | None = None, limit_s: float = 5.0) -> DrillResult:
    """SIGKILL a process that owns a pool (as a kernel restart does) and time how long its workers outlive it.

    ``recovery_s`` is the time until the last worker is gone; passes when every worker is gone
    within ``limit_s``. (tests/integration/test_pool.py checks the same for CI.)
    """
    config = _drill_config(config)
    result = DrillResult("process-hygiene", backend, 0, detail={"workers": workers})
    env = {**os.environ, **config.to_env(), "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryDirectory() as cwd:
        parent = subprocess.Popen(
            [sys.executable, "-c", _PARENT, backend, str(workers)], stdout=subprocess.PIPE, env=env, cwd=cwd, text=True
        )
        try:
            assert parent.stdout is not None
            line = parent.stdout.readline()
            if not line:
                raise LabkitError(f"the pool's parent process failed to start {backend} workers")
            pids: list[int] = json.loads(line)
            killed = time.monotonic()
            parent.kill()
            parent.wait(10)
            survivors = list(pids)
            while survivors and time.monotonic() - killed < 30:
                survivors = [pid for pid in survivors if _running(pid)]
                time.sleep(0.02)
            result.recovery_s = round(time.monotonic() - killed, 2)
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()
    for pid in survivors:  # never leave one behind, even when the drill fails
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    result.detail.update(survivors=len(survivors), pids=pids)
    result.ok = not survivors and result.recovery_s <= limit_s
    return result


def _running(pid: int) -> bool:
    """A live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
