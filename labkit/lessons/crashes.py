"""Lesson 07: SIGKILL a worker in the middle of a booking and watch each backend hand the booking on.

Every backend promises *at-least-once*: a booking a worker took and did not acknowledge is
delivered again. What differs is the rule that decides a worker is gone, and so how long the
booking waits:

- BullMQ: the job's lock (``lock_duration_ms``) must expire, then a stalled-job check (every
  ``stalled_interval_ms``, run by the surviving workers) moves it back to ``wait``. The check
  moves only jobs an *earlier* check marked as candidates, and a check can be skipped when the
  previous one's guard key has not quite expired, so the job is back within
  ``lockDuration + 2 x stalledInterval`` of its last lock renewal.
- Redis Streams: the entry stays in the dead consumer's pending entries list (PEL) until it has
  been idle ``claim_idle_ms`` (the XAUTOCLAIM min-idle time) and a live consumer's reclaimer claims it.
- Kafka: the broker notices the member is gone when no heartbeat came for ``session.timeout.ms``,
  the survivor learns it at its next heartbeat and the group rebalances; the partition's new owner
  starts again from the last *committed* offset: the record that was running, and any finished
  record whose offset was not committed yet. How long the rebalance takes depends on the broker
  (the embedded one holds every JoinGroup for half the session timeout), so the driver measures
  one before the kill: the second Kafka worker joins after the first has its partitions.

:func:`kill_after_payment` runs the same crash on several backends at once, in one thread (so
that the slow parts, lock expiry and session timeout, overlap): it kills the worker holding one
booking right after that booking's payment was charged and before it was acknowledged, and
records what each broker showed at the kill and after the hand-over. :func:`exceed_max_poll`
shows Kafka's other liveness rule, ``max.poll.interval.ms``. The other functions are pure
analysis of the event logs, and the charts.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.backends.kafka.settings import HEARTBEAT_INTERVAL_MS, SESSION_TIMEOUT_MS
from labkit.booking import BookingGenerator
from labkit.charts import PRODUCTS
from labkit.config import BACKENDS, Config
from labkit.events import load_run
from labkit.lab import new_run, produce, reset, with_backend
from labkit.lessons.figures import Statement, say
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings, count_effects

if TYPE_CHECKING:
    import pandas as pd
    import redis
    from matplotlib.axes import Axes

#: Handler slots per worker: enough that the survivor has a free one when the booking comes back.
CONCURRENCY = 4
#: Librdkafka settings of the lab's Kafka workers (labkit/backends/kafka/settings.py), needed for the bounds.
KAFKA_SESSION_TIMEOUT_S = SESSION_TIMEOUT_MS / 1000
KAFKA_HEARTBEAT_INTERVAL_S = HEARTBEAT_INTERVAL_MS / 1000
#: Two processes' monotonic clocks and Redis' millisecond clock: allow this much when comparing times.
CLOCK_SLACK_S = 0.05
#: How often the driver looks at the brokers while it waits.
_POLL_S = 0.01
_STATS_EVERY_S = 0.25

#: Colours of the charts, one per backend.
COLOURS = {"bullmq": "#d9534f", "streams": "#2b7bba", "kafka": "#3a9a5b"}
#: Each backend's hand-over rule, as the recovery chart labels its window.
RULES = {
    "bullmq": "lock expired → ≤ 2 stalled checks",
    "streams": "idle ≥ claim time → XAUTOCLAIM into a free slot",
    "kafka": "session timeout ± a heartbeat, + the rebalance measured before the kill",
}


@dataclass(frozen=True)
class Kill:
    """One SIGKILL and what the broker said at that moment.

    Args:
        backend: which backend's worker was killed.
        worker: its worker id; ``pid`` its process id.
        mono: ``time.monotonic()`` of the kill (comparable with the event logs' ``mono``).
        ts: wall-clock time of the kill (comparable with Redis' own timestamps).
        source: where the killed booking came from: ``job 3``, ``entry 1700000000000-0``, ``bookings/1/0``.
        rule: the backend's rule for handing the booking on, in words.
        window: seconds after the kill between which that rule hands it on, from what the broker
            showed at the kill (the lock's remaining life, the entry's idle time, the session timeout).
    """

    backend: str
    worker: str
    pid: int
    mono: float
    ts: float
    source: str
    rule: str
    window: tuple[float, float]


@dataclass
class CrashRun:
    """Everything :func:`kill_after_payment` saw: one crash per backend, same bookings on each.

    Args:
        run_dir: the run folder (event logs, confirmation files, outbox).
        idempotent: whether the workers guarded each effect with a per-booking marker.
        bookings: the distinct booking ids sent to every backend (``resent`` was sent twice).
        victim: the booking whose worker was killed after its payment.
        resent: a booking sent twice, as a producer that crashed before the broker's ack would.
        kills: the kill on each backend.
        handed_back: monotonic time at which each broker made the victim deliverable again
            (BullMQ's stalled check, the Streams claim, the Kafka partition's new assignment).
        stats: each backend's counters once it had drained.
        effects: each backend's payments and inventory from the ledger.
        files: each backend's confirmation and email files per booking (``count_effects``).
        pending: Streams' XPENDING rows of the killed consumer's entries, at the kill and after the claim.
        offsets: Kafka's committed offset of every work partition at the kill and after the recovery.
        settings: the worker settings of each backend.
        kafka_rebalance_s: the rebalance measured when the second Kafka worker joined, before the kill
            (first partition revoked to last assigned); NaN without Kafka.
    """

    run_dir: Path
    idempotent: bool
    bookings: list[str]
    victim: str
    resent: str
    kills: dict[str, Kill]
    handed_back: dict[str, float]
    stats: dict[str, dict[str, Any]]
    effects: dict[str, dict[str, dict[str, int]]]
    files: dict[str, dict[str, dict[str, int]]]
    pending: pd.DataFrame
    offsets: pd.DataFrame
    settings: dict[str, WorkerSettings]
    kafka_rebalance_s: float = float("nan")

    @property
    def events(self) -> pd.DataFrame:
        """Every worker event of the run, all backends, sorted by time."""
        return load_run(self.run_dir)

    def kill_table(self) -> pd.DataFrame:
        """The kills: which worker, which booking (by its job, entry or offset), and the rule that brings it back."""
        import pandas as pd

        rows = [
            {"backend": k.backend, "killed": k.worker, "pid": k.pid, "holding": k.source, "rule": k.rule,
             "window_from_s": k.window[0], "window_to_s": k.window[1]}
            for k in self.kills.values()
        ]  # fmt: skip
        return pd.DataFrame(rows).set_index("backend")

    def recovery(self) -> pd.DataFrame:
        """:func:`recovery_table` of this run."""
        return recovery_table(self.events, self.kills, self.victim, self.handed_back)

    def duplicates(self) -> pd.DataFrame:
        """:func:`duplicate_table` of this run."""
        return duplicate_table(self.events, self.stats)

    def effects_frame(self) -> pd.DataFrame:
        """:func:`effects_table` of this run."""
        return effects_table(self.effects, self.files, self.stats, self.bookings, self.victim)

    def charged_more_than_once(self) -> pd.DataFrame:
        """:func:`charges_per_booking` of this run: the bookings some backend charged more than once."""
        return charges_per_booking(self.effects, self.bookings)

    def extra_charges(self) -> pd.DataFrame:
        """:func:`extra_charges_table` of this run: where every charge beyond one per booking came from."""
        return extra_charges_table(self.events, self.effects, self.kills, self.victim, self.resent, self.bookings)

    def lost(self) -> dict[str, int]:
        """Bookings sent but neither completed nor dead-lettered, per backend."""
        return {b: len(self.bookings) - s["completed"] - s["dead_lettered"] for b, s in self.stats.items()}


def crash_settings(
    backend: str,
    idempotent: bool,
    step_ms: float,
    lock_duration_ms: int,
    stalled_interval_ms: int,
    claim_idle_ms: int,
    handler: str = "",
) -> WorkerSettings:
    """The lesson's worker settings for ``backend``; each backend gets only its own recovery knob.

    Streams' claim idle time is its ``backoff_ms`` (the same number is its retry delay). ``handler`` is a
    payment step to run instead of the built-in one (``labkit worker --handler``; the exercises' learner code).
    """
    options: dict[str, str] = {}
    backoff_ms = 200
    if backend == "bullmq":
        options = {"lock_duration_ms": str(lock_duration_ms), "stalled_interval_ms": str(stalled_interval_ms)}
    elif backend == "streams":
        backoff_ms = claim_idle_ms
    return WorkerSettings(
        concurrency=CONCURRENCY,
        idempotent=idempotent,
        step_ms=step_ms,
        backoff_ms=backoff_ms,
        options=options,
        handler=handler,
    )


def kill_after_payment(
    config: Config,
    backends: Sequence[str] = BACKENDS,
    n_bookings: int = 20,
    idempotent: bool = True,
    step_ms: float = 300,
    lock_duration_ms: int = 5000,
    stalled_interval_ms: int = 2000,
    claim_idle_ms: int = 2000,
    seed: int = 7,
    timeout: float = 120,
    progress: bool = True,
    handler: str = "",
) -> CrashRun:
    """Crash one worker per backend after a booking's payment and before its ack, and record the recovery.

    Each backend is reset and gets two workers. It is sent a victim booking first, then
    ``n_bookings`` others, then one of those again (a producer's retry). As soon as the
    victim's payment shows in Redis, the worker running it is SIGKILLed: its payment is
    applied, its confirmation, email and inventory are not, and the broker never heard back.

    Args:
        config: the lab (its namespace keeps the lesson's queues apart).
        backends: which backends to crash, all at the same time.
        n_bookings: bookings besides the victim.
        idempotent: guard each effect with a per-booking marker.
        step_ms: time of each of the five steps; the payment lands ``2 x step_ms`` into a booking.
        lock_duration_ms, stalled_interval_ms: BullMQ's lock and stalled-check settings.
        claim_idle_ms: Redis Streams' XAUTOCLAIM min-idle time.
        seed: the bookings' seed.
        timeout: seconds to wait for the kills and then for every backend to drain.
        progress: show a tqdm bar of settled bookings.
        handler: a payment step to run instead of the built-in charge (``labkit worker --handler``).

    Raises:
        TimeoutError: a victim's payment never showed, or a backend did not drain in time.
    """
    import pandas as pd
    import redis as redis_client

    generator = BookingGenerator(seed=seed, prefix="crash")
    sent = generator.bookings(n_bookings + 1)
    sent[0] = {**sent[0], "booking_id": "crash-victim"}
    victim, resent = sent[0], sent[-1]
    run_dir = new_run("crash-idempotent" if idempotent else "crash-not-idempotent", config)
    settings = {
        b: crash_settings(b, idempotent, step_ms, lock_duration_ms, stalled_interval_ms, claim_idle_ms, handler)
        for b in backends
    }
    for backend in backends:
        reset(backend, config)
    with contextlib.ExitStack() as stack, redis_client.Redis.from_url(config.redis_url) as client:
        pools = {b: stack.enter_context(WorkerPool(b, config, settings[b], run_dir=run_dir)) for b in backends}
        for backend, pool in pools.items():
            pool.start(1 if backend == "kafka" else 2, ready_timeout=30)
        rebalance_s = _second_kafka_worker_joins(pools["kafka"], timeout=60) if "kafka" in pools else float("nan")
        for backend in backends:
            produce(backend, [*sent, resent], config)
        kills, pending_at_kill, offsets_at_kill = _kill_each_after_payment(
            pools, client, config, victim, timeout, rebalance_s
        )
        claimed = pd.DataFrame()
        if "streams" in kills:
            claimed = _wait_for_claim(client, config, kills["streams"], timeout)
        stats = _wait_until_all_drained(pools, len(sent), timeout, progress)
        events = load_run(run_dir)
        offsets_after = _committed_offsets(config) if "kafka" in kills else {}
        handed_back = {b: handed_back_at(events, kill, victim["booking_id"]) for b, kill in kills.items()}
        if "bullmq" in kills:
            handed_back["bullmq"] = _bullmq_stalled_at(client, config, kills["bullmq"])
    return CrashRun(
        run_dir=run_dir,
        idempotent=idempotent,
        bookings=[b["booking_id"] for b in sent],
        victim=victim["booking_id"],
        resent=resent["booking_id"],
        kills=kills,
        handed_back=handed_back,
        stats=stats,
        effects={b: with_backend(b, lambda be: be.ledger.effects(), config) for b in backends},
        files={b: count_effects(run_dir, b) for b in backends},
        pending=_pending_frame(pending_at_kill, claimed),
        offsets=_offsets_frame(offsets_at_kill, offsets_after),
        settings=settings,
        kafka_rebalance_s=rebalance_s,
    )


# -- the driver's steps -------------------------------------------------------------------------


def _wait_for_assignments(pool: WorkerPool, n: int, timeout: float) -> None:
    """Wait until ``n`` Kafka workers have their partitions, so no rebalance runs into the crash."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = pool.events()
        if events[events["event"] == "assigned"]["worker"].nunique() >= n:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{n} Kafka workers were not all assigned partitions within {timeout:g} s")


def _second_kafka_worker_joins(pool: WorkerPool, timeout: float) -> float:
    """With one Kafka worker assigned, start a second and time the rebalance its join causes, in seconds.

    That is the broker's rebalance, measured on the broker in use before anything is killed: the
    first worker revokes its partitions when it learns of the newcomer, both rejoin, both are
    assigned. From the first ``revoked`` to the last ``assigned`` (:func:`join_rebalance_s`).
    """
    _wait_for_assignments(pool, 1, timeout)
    pool.start(1, ready_timeout=30)
    deadline = time.monotonic() + timeout
    while not _rebalanced(events := pool.events(), 2):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the second Kafka worker's join did not complete within {timeout:g} s")
        time.sleep(_POLL_S * 10)
    return join_rebalance_s(events)


def _rebalanced(events: pd.DataFrame, workers: int) -> bool:
    """``workers`` Kafka workers hold partitions, and every one that revoked its own was assigned again since."""
    kafka = events[events["backend"] == "kafka"]
    assigned = kafka[kafka["event"] == "assigned"].groupby("worker")["mono"].max()
    revoked = kafka[kafka["event"] == "revoked"].groupby("worker")["mono"].max()
    return len(assigned) >= workers and all(w in assigned and assigned[w] > t for w, t in revoked.items())


def join_rebalance_s(events: pd.DataFrame) -> float:
    """First ``revoked`` to the last ``assigned`` after it, over the Kafka workers' events; NaN if none revoked."""
    kafka = events[events["backend"] == "kafka"]
    revoked = kafka.loc[kafka["event"] == "revoked", "mono"]
    if revoked.empty:
        return float("nan")
    assigned = kafka.loc[(kafka["event"] == "assigned") & (kafka["mono"] >= revoked.min()), "mono"]
    return float(assigned.max() - revoked.min()) if len(assigned) else float("nan")


def _kill_each_after_payment(
    pools: Mapping[str, WorkerPool],
    client: redis.Redis,
    config: Config,
    victim: Mapping[str, Any],
    timeout: float,
    kafka_rebalance_s: float,
) -> tuple[dict[str, Kill], list[dict[str, Any]], dict[str, int]]:
    """SIGKILL, on each backend, the worker running ``victim`` as soon as its payment is in Redis.

    Returns the kills, Streams' XPENDING rows of the killed consumer right after its kill, and
    Kafka's committed offsets right after its kill.
    """
    booking_id = victim["booking_id"]
    kills: dict[str, Kill] = {}
    pending: list[dict[str, Any]] = []
    offsets: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(kills) < len(pools):
        for backend, pool in pools.items():
            if backend in kills or not client.hexists(config.names.key(backend, "payments"), booking_id):
                continue
            events = pool.events()
            mine = events[events["backend"] == backend]
            started = mine[(mine["event"] == "started") & (mine["booking_id"] == booking_id)].iloc[0]
            pid = pool.kill(str(started["worker"]))
            mono, ts = time.monotonic(), time.time()
            rule, window = _rule_at_kill(backend, pool.settings, client, config, started, pending, kafka_rebalance_s)
            kills[backend] = Kill(backend, str(started["worker"]), pid, mono, ts, str(started["source"]), rule, window)
            if backend == "kafka":
                offsets = _committed_offsets(config)
        if time.monotonic() > deadline:
            missing = sorted(set(pools) - set(kills))
            raise TimeoutError(f"the payment of {booking_id} never showed on {missing} within {timeout:g} s")
        time.sleep(_POLL_S)
    return kills, pending, offsets


def _rule_at_kill(
    backend: str,
    settings: WorkerSettings,
    client: redis.Redis,
    config: Config,
    started: pd.Series,
    pending: list[dict[str, Any]],
    kafka_rebalance_s: float,
) -> tuple[str, tuple[float, float]]:
    """Read the broker's state right after a kill and say when its rule will hand the booking on.

    Streams' XPENDING rows of the killed consumer are appended to ``pending``. Kafka's window: the
    victim's last heartbeat came up to one heartbeat interval before the kill, so its session ends
    ``session.timeout.ms`` minus up to that after the kill; the survivor learns of it at its own next
    heartbeat (up to one interval later) and rebalances, which takes what the rebalance before the
    kill took (``kafka_rebalance_s``).
    """
    if backend == "bullmq":
        job_id = str(started["source"]).removeprefix("job ")
        ttl_s = max(int(client.pttl(f"bull:{config.names.bullmq_queue}:{job_id}:lock")), 0) / 1000
        stalled_s = settings.option("stalled_interval_ms", 0) / 1000
        return "lock expires, then a stalled check moves the job back to wait", (ttl_s, ttl_s + 2 * stalled_s)
    if backend == "streams":
        rows = _xpending(client, config, consumer=str(started["worker"]))
        pending.extend({"moment": "at the kill", **row} for row in rows)
        idle_ms = next(r["idle_ms"] for r in rows if r["entry"] == str(started["source"]).removeprefix("entry "))
        min_idle_ms = max(settings.backoff_ms, 100)  # the backend's MIN_CLAIM_IDLE_MS
        due_s = max(min_idle_ms - idle_ms, 0) / 1000
        reclaim_s = min(min_idle_ms / 2000, 0.5)  # how often a consumer runs XAUTOCLAIM
        # A consumer claims only into a free handler slot: at worst one of its bookings must finish first.
        booking_s = 5 * settings.step_ms / 1000
        return "idle for the claim time, then XAUTOCLAIM into a free slot", (due_s, due_s + reclaim_s + booking_s)
    rebalance_s = 0.0 if math.isnan(kafka_rebalance_s) else kafka_rebalance_s
    return "no heartbeat for session.timeout.ms, then the survivor's next heartbeat and a rebalance", (
        KAFKA_SESSION_TIMEOUT_S - KAFKA_HEARTBEAT_INTERVAL_S + rebalance_s,
        KAFKA_SESSION_TIMEOUT_S + KAFKA_HEARTBEAT_INTERVAL_S + rebalance_s,
    )


def _xpending(client: redis.Redis, config: Config, consumer: str | None = None) -> list[dict[str, Any]]:
    """``XPENDING <stream> <group> - + 100 [consumer]`` as rows: entry, consumer, idle_ms, deliveries."""
    names = config.names
    rows: list[dict[str, Any]] = client.xpending_range(
        names.stream, names.stream_group, "-", "+", 100, consumername=consumer
    )
    return [
        {
            "entry": _text(r["message_id"]),
            "consumer": _text(r["consumer"]),
            "idle_ms": int(r["time_since_delivered"]),
            "deliveries": int(r["times_delivered"]),
        }
        for r in rows
    ]


def _wait_for_claim(client: redis.Redis, config: Config, kill: Kill, timeout: float) -> pd.DataFrame:
    """Wait until the killed consumer's pending list is empty, then show where its entries went."""
    import pandas as pd

    deadline = time.monotonic() + timeout
    while _xpending(client, config, consumer=kill.worker):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody claimed the entries of {kill.worker} within {timeout:g} s")
        time.sleep(_POLL_S)
    return pd.DataFrame([{"moment": "after the claim", **row} for row in _xpending(client, config)])


def _wait_until_all_drained(
    pools: Mapping[str, WorkerPool], expected: int, timeout: float, progress: bool
) -> dict[str, dict[str, Any]]:
    """Wait until every backend has settled ``expected`` bookings with nothing waiting or in flight."""
    from labkit.progress import progress as progress_bar

    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    with progress_bar(total=expected * len(pools), desc="settled", unit="booking", disable=not progress) as bar:
        while len(done) < len(pools):
            settled = 0
            for backend, pool in pools.items():
                stats = done.get(backend) or pool.stats()
                count = stats["completed"] + stats["dead_lettered"]
                if count >= expected and stats["backlog"] == 0 and stats["in_flight"] == 0:
                    done[backend] = stats
                settled += min(count, expected)
            bar.update(settled - bar.n)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sorted(set(pools) - set(done))} not drained after {timeout:g} s")
            time.sleep(_STATS_EVERY_S)
    return {b: done[b] for b in pools}


def _committed_offsets(config: Config) -> dict[str, int]:
    """The consumer group's committed offset of each work partition (-1: nothing committed yet).

    A throwaway consumer that never subscribes, so it never joins the group or moves a partition.
    """
    from confluent_kafka import Consumer, TopicPartition

    names = config.names
    consumer = Consumer(
        {"bootstrap.servers": config.kafka_bootstrap, "group.id": names.kafka_group, "enable.auto.commit": False}
    )
    try:
        partitions = sorted(consumer.list_topics(timeout=5).topics[names.topic].partitions)
        committed = consumer.committed([TopicPartition(names.topic, p) for p in partitions], timeout=5)
        return {f"{tp.topic}/{tp.partition}": max(tp.offset, -1) for tp in committed}
    finally:
        consumer.close()


def _bullmq_stalled_at(client: redis.Redis, config: Config, kill: Kill) -> float:
    """Monotonic time of BullMQ's "stalled" event for the killed job, from the queue's event stream.

    The stream entry id is Redis' clock in milliseconds; the kill's wall and monotonic times
    translate it onto the event logs' time line.
    """
    job_id = kill.source.removeprefix("job ")
    entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(  # type: ignore[assignment]
        f"bull:{config.names.bullmq_queue}:events", min=int(kill.ts * 1000) - 1
    )
    for entry_id, fields in entries:
        if fields.get(b"event") == b"stalled" and fields.get(b"jobId") == job_id.encode():
            redis_ms = int(_text(entry_id).split("-")[0])
            return kill.mono + (redis_ms / 1000 - kill.ts)
    return float("nan")


def _pending_frame(at_kill: list[dict[str, Any]], after: pd.DataFrame) -> pd.DataFrame:
    """The killed consumer's entries at the kill and the same entries (if still pending) after the claim."""
    import pandas as pd

    before = pd.DataFrame(at_kill, columns=["moment", "entry", "consumer", "idle_ms", "deliveries"])
    if after.empty:
        return before
    mine = after[after["entry"].isin(before["entry"])]
    return pd.concat([before, mine], ignore_index=True)[before.columns]


def _offsets_frame(at_kill: Mapping[str, int], after: Mapping[str, int]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame({"committed at the kill": at_kill, "committed after recovery": after})
    frame.index.name = "partition"
    return frame


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- analysis: pure functions of event logs and counters -----------------------------------------


def handed_back_at(events: pd.DataFrame, kill: Kill, booking_id: str) -> float:
    """When the broker made the killed booking deliverable again, as far as the event logs show.

    Kafka: the first ``assigned`` event of another worker, after the kill, that includes the
    victim's partition. Redis Streams: the claim is the redelivery, so the survivor's first
    ``received`` event of the booking. BullMQ's moment is in its own event stream, not in these
    logs: NaN here (see :func:`kill_after_payment`).
    """
    after = events[(events["mono"] > kill.mono) & (events["pid"] != kill.pid)]
    if kill.backend == "kafka":
        partition = kill.source.rsplit("/", 1)[0]
        assigned = after[(after["event"] == "assigned") & (after["backend"] == "kafka")]
        hits = assigned[assigned["partitions"].map(lambda parts: partition in (parts or []))]
        return float(hits["mono"].iloc[0]) if len(hits) else float("nan")
    if kill.backend == "streams":
        mine = after[(after["backend"] == "streams") & (after["booking_id"] == booking_id)]
        got = mine[mine["event"] == "received"]
        return float(got["mono"].iloc[0]) if len(got) else float("nan")
    return float("nan")


def recovery_table(
    events: pd.DataFrame, kills: Mapping[str, Kill], booking_id: str, handed_back: Mapping[str, float]
) -> pd.DataFrame:
    """Seconds from each kill to the hand-over, the redelivery and the completion of the killed booking.

    Columns: ``killed`` (worker), ``window_from_s``/``window_to_s`` (when the backend's rule hands
    the booking on, predicted at the kill), ``handed_back_s``, ``redelivered_s`` (another worker
    started it), ``redelivered_by``, ``survivor_busy`` (bookings that worker was running when the
    window opened, of its ``concurrency`` slots), ``completed_s``, ``same_source`` (the redelivery
    is the same job, entry or offset, not a new message) and ``not_early`` (handed back no earlier
    than the rule allows) and ``in_window`` (handed back between ``window_from_s`` and ``window_to_s``,
    allowing for clock slack).
    """
    import pandas as pd

    rows = []
    for backend, kill in kills.items():
        mine = events[events["backend"] == backend]
        later = mine[(mine["booking_id"] == booking_id) & (mine["mono"] > kill.mono) & (mine["pid"] != kill.pid)]
        started = later[later["event"] == "started"]
        completed = later[later["event"] == "completed"]
        handed = handed_back.get(backend, float("nan")) - kill.mono
        survivor = str(started["worker"].iloc[0]) if len(started) else None
        rows.append(
            {
                "backend": backend,
                "killed": kill.worker,
                "window_from_s": kill.window[0],
                "window_to_s": kill.window[1],
                "handed_back_s": handed,
                "redelivered_s": float(started["mono"].iloc[0] - kill.mono) if len(started) else float("nan"),
                "redelivered_by": survivor,
                "survivor_busy": running_at(mine, survivor, kill.mono + kill.window[0]) if survivor else 0,
                "completed_s": float(completed["mono"].iloc[0] - kill.mono) if len(completed) else float("nan"),
                "same_source": bool(len(started)) and set(started["source"]) == {kill.source},
                "not_early": handed >= kill.window[0] - CLOCK_SLACK_S,
                "in_window": kill.window[0] - CLOCK_SLACK_S <= handed <= kill.window[1] + CLOCK_SLACK_S,
            }
        )
    return pd.DataFrame(rows).set_index("backend")


def recovery_statement(table: pd.DataFrame) -> Statement:
    """What :func:`recovery_table` says, in one sentence printed from it: each hand-over against its window."""
    parts, outside = [], []
    for backend, row in table.iterrows():
        parts.append(
            f"{PRODUCTS.get(str(backend), backend)} {{handed_back_{backend}_s}} "
            f"(window {row['window_from_s']:.1f}–{row['window_to_s']:.1f} s)"
        )
        if not row["in_window"]:
            outside.append(str(backend))
    verdict = "every dot is inside its box" if not outside else f"outside its box: {', '.join(outside)}"
    text = f"Handed back after the kill: {'; '.join(parts)}. In this run {verdict}."
    return say(text, {f"07.handed_back_{b}_s": row["handed_back_s"] for b, row in table.iterrows()})


def running_at(events: pd.DataFrame, worker: str, mono: float) -> int:
    """Workflow runs ``worker`` had begun and not finished (completed or failed) at time ``mono``."""
    mine = events[(events["worker"] == worker) & (events["mono"] <= mono)]
    return int((mine["event"] == "started").sum() - mine["event"].isin(["completed", "failed"]).sum())


def duplicate_table(events: pd.DataFrame, stats: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Duplicates two ways: the workers' ``completed`` events (flag ``duplicate``) and the ledger's counter.

    Columns: ``runs_started`` (workflow runs begun, killed ones included), ``completions``,
    ``distinct_completed``, ``duplicates_in_log``, ``duplicates_in_stats`` and ``agree``.
    """
    import pandas as pd

    rows = []
    for backend, counters in stats.items():
        mine = events[events["backend"] == backend]
        completed = mine[mine["event"] == "completed"]
        in_log = int(completed["duplicate"].fillna(False).astype(bool).sum()) if "duplicate" in completed else 0
        rows.append(
            {
                "backend": backend,
                "runs_started": int((mine["event"] == "started").sum()),
                "completions": len(completed),
                "distinct_completed": completed["booking_id"].nunique(),
                "duplicates_in_log": in_log,
                "duplicates_in_stats": int(counters["duplicates"]),
                "agree": in_log == int(counters["duplicates"]) == len(completed) - completed["booking_id"].nunique(),
            }
        )
    return pd.DataFrame(rows).set_index("backend")


def effects_table(
    effects: Mapping[str, Mapping[str, Mapping[str, int]]],
    files: Mapping[str, Mapping[str, Mapping[str, int]]],
    stats: Mapping[str, Mapping[str, Any]],
    bookings: Sequence[str],
    victim: str,
) -> pd.DataFrame:
    """What the bookings did to the world, per backend, against what they should have done.

    Columns: ``completed``; ``charges`` (payments applied, all bookings), ``victim_charges``,
    ``most_charges`` (of any one booking); ``inventory`` (rooms taken, all hotels);
    ``confirmations`` and ``emails`` (files); ``exact``: every booking charged, confirmed and
    emailed exactly once and one room per completed booking.
    """
    import pandas as pd

    rows = []
    wanted = {b: 1 for b in bookings}
    for backend, applied in effects.items():
        payments, on_disk = applied.get("payments", {}), files[backend]
        completed = int(stats[backend]["completed"])
        inventory = sum(applied.get("inventory", {}).values())
        rows.append(
            {
                "backend": backend,
                "completed": completed,
                "charges": sum(payments.values()),
                "victim_charges": payments.get(victim, 0),
                "most_charges": max(payments.values(), default=0),
                "inventory": inventory,
                "confirmations": sum(on_disk.get("confirmations", {}).values()),
                "emails": sum(on_disk.get("outbox", {}).values()),
                "exact": dict(payments) == wanted
                and inventory == completed == len(bookings)
                and dict(on_disk.get("confirmations", {})) == wanted
                and dict(on_disk.get("outbox", {})) == wanted,
            }
        )
    return pd.DataFrame(rows).set_index("backend")


def charges_per_booking(
    effects: Mapping[str, Mapping[str, Mapping[str, int]]], bookings: Sequence[str]
) -> pd.DataFrame:
    """Payments per booking and backend, only the bookings that some backend did not charge exactly once."""
    import pandas as pd

    frame = pd.DataFrame(
        {backend: [applied.get("payments", {}).get(b, 0) for b in bookings] for backend, applied in effects.items()},
        index=pd.Index(bookings, name="booking_id"),
    )
    return frame[(frame != 1).any(axis=1)]


def extra_charges_table(
    events: pd.DataFrame,
    effects: Mapping[str, Mapping[str, Mapping[str, int]]],
    kills: Mapping[str, Kill],
    victim: str,
    resent: str,
    bookings: Sequence[str],
) -> pd.DataFrame:
    """Every charge beyond one per booking, per backend, and where it came from.

    With idempotency off a card is charged again by every run that gets past the payment step, so the
    extra charges are: the victim's (its killed run charged it, the redelivery again), the booking the
    producer sent twice, and every other booking whose run on the killed worker had charged it and was
    killed before finishing. A run killed before its payment step charges nothing.

    Columns: ``charges``, ``bookings``, ``extra`` (charges − bookings); ``victim``, ``resent`` and
    ``others`` (the extra charges of the victim, of the booking sent twice, of every other booking);
    ``killed_runs`` (runs the killed worker had begun and not finished, the victim's included);
    ``charged_and_killed`` (of those, other bookings charged twice: their killed run had charged them);
    ``explained`` (``extra`` = ``victim`` + ``resent`` + ``others``, and ``others`` = ``charged_and_killed``).
    """
    import pandas as pd

    rows = []
    for backend, kill in kills.items():
        payments = effects[backend].get("payments", {})
        mine = events[(events["backend"] == backend) & (events["pid"] == kill.pid)]
        started = set(mine.loc[mine["event"] == "started", "booking_id"])
        finished = set(mine.loc[mine["event"].isin(["completed", "failed"]), "booking_id"])
        unfinished = started - finished
        others = [b for b in bookings if b not in (victim, resent)]
        extra_others = sum(payments.get(b, 0) - 1 for b in others)
        charged_and_killed = sum(1 for b in unfinished - {victim, resent} if payments.get(b, 0) == 2)
        charges = sum(payments.values())
        extra_victim, extra_resent = payments.get(victim, 0) - 1, payments.get(resent, 0) - 1
        explained = (
            charges - len(bookings)
            == extra_victim + extra_resent + extra_others
            == (extra_victim + extra_resent + charged_and_killed)
        )
        rows.append(
            {
                "backend": backend,
                "charges": charges,
                "bookings": len(bookings),
                "extra": charges - len(bookings),
                "victim": extra_victim,
                "resent": extra_resent,
                "others": extra_others,
                "killed_runs": len(unfinished),
                "charged_and_killed": charged_and_killed,
                "explained": explained,
            }
        )
    return pd.DataFrame(rows).set_index("backend")


def explain_extra_charges(table: pd.DataFrame) -> Statement:
    """:func:`extra_charges_table` in words, one sentence per backend, printed from it."""
    lines = []
    for backend, row in table.iterrows():
        others = int(row["charged_and_killed"])
        also = (
            "no other booking: the killed worker's other runs had not reached the payment step"
            if not others
            else f"{others} other booking{'s' if others > 1 else ''} the killed worker had charged and not finished"
        )
        lines.append(
            f"- **{PRODUCTS.get(str(backend), backend)}**: {int(row['charges'])} charges for "
            f"{int(row['bookings'])} bookings, "
            f"{int(row['extra'])} extra: {int(row['victim'])} for the victim, {int(row['resent'])} for the booking "
            f"sent twice, and {also} (it was in the middle of {int(row['killed_runs'])} run"
            f"{'s' if row['killed_runs'] != 1 else ''} when it died)."
        )
    return say("\n".join(lines))


def claimed_by_survivor(pending: pd.DataFrame, dead: str) -> bool:
    """True when every entry the dead consumer held at the kill was claimed by a live one, counted as a new delivery.

    Args:
        pending: rows ``moment`` ("at the kill" / "after the claim"), ``entry``, ``consumer``, ``deliveries``.
        dead: the killed consumer.
    """
    before = pending[pending["moment"] == "at the kill"].set_index("entry")
    after = pending[pending["moment"] == "after the claim"].set_index("entry")
    if before.empty or set(after.index) != set(before.index):
        return False
    return bool((before["consumer"] == dead).all() and (after["consumer"] != dead).all()) and bool(
        (after["deliveries"] == before.loc[after.index, "deliveries"] + 1).all()
    )


def replayed_from_commit(offsets: pd.DataFrame, kill: Kill) -> bool:
    """True when Kafka's new owner started the killed record again because its offset was never committed.

    The killed record is ``kill.source`` (``topic/partition/offset``); its partition's committed
    offset was at or before it at the kill, and past it once the partition's new owner finished.
    """
    partition, offset = kill.source.rsplit("/", 1)
    if partition not in offsets.index:
        return False
    row = offsets.loc[partition]
    return bool(row["committed at the kill"] <= int(offset) < row["committed after recovery"])


def membership(events: pd.DataFrame) -> pd.DataFrame:
    """Kafka group membership as the workers saw it: ``assigned``, ``revoked``, ``left_group``, ``rejoining``.

    The embedded broker's describe-group answer lists no members, so the workers' own events
    are the record. ``at_s`` counts from the first event of the frame.
    """
    kinds = ["assigned", "revoked", "left_group", "rejoining"]
    rows = events[events["event"].isin(kinds) & (events["backend"] == "kafka")].copy()
    rows["at_s"] = rows["mono"] - events["mono"].min()
    for column in ("partitions", "reason"):
        if column not in rows:
            rows[column] = None
    rows["partitions"] = rows["partitions"].map(lambda p: ", ".join(p) if isinstance(p, list) else "")
    return rows[["at_s", "worker", "event", "partitions", "reason"]].reset_index(drop=True)


# -- max.poll.interval.ms ------------------------------------------------------------------------


@dataclass
class MaxPollRun:
    """What :func:`exceed_max_poll` saw.

    Args:
        run_dir: the run folder.
        slow_worker: the worker whose handler ran past ``max_poll_interval_ms``.
        max_poll_interval_ms: the limit both workers ran with.
        stats: the counters once drained.
    """

    run_dir: Path
    slow_worker: str
    max_poll_interval_ms: int
    stats: dict[str, Any]

    @property
    def events(self) -> pd.DataFrame:
        """Every worker event of the run, sorted by time."""
        return load_run(self.run_dir)

    def table(self) -> pd.DataFrame:
        """:func:`max_poll_table` of this run."""
        return max_poll_table(self.events, self.slow_worker, self.max_poll_interval_ms)

    def chart(self, ax: Axes | None = None) -> Axes:
        """:func:`max_poll_chart` of this run."""
        return max_poll_chart(self.events, self.slow_worker, self.max_poll_interval_ms, ax)


def exceed_max_poll(
    config: Config,
    max_poll_interval_ms: int = 6000,
    n_bookings: int = 6,
    seed: int = 11,
    timeout: float = 120,
    progress: bool = True,
) -> MaxPollRun:
    """Two Kafka workers, one of them slow: each of its bookings takes twice ``max_poll_interval_ms``.

    The slow worker's handler runs past the limit, so the worker leaves the group (event
    ``left_group``) and its partitions, with the running booking's uncommitted offset, go to
    the fast worker. Twice the limit is long enough for that rebalance to finish before the
    slow handler returns and its worker rejoins (``rejoining``), so the booking moves once.
    """
    slow_step_ms = 2 * max_poll_interval_ms / 5  # five steps per booking
    options = {"max_poll_interval_ms": str(max_poll_interval_ms)}
    settings = WorkerSettings(concurrency=1, step_ms=slow_step_ms, options=options)
    reset("kafka", config)
    run_dir = new_run("max-poll", config)
    with WorkerPool("kafka", config, settings, run_dir=run_dir) as pool:
        pool.start(1, ready_timeout=30)
        pool.start(1, ready_timeout=30, step_ms=0)  # the second worker is fast
        _wait_for_assignments(pool, 2, timeout=30)
        produce("kafka", BookingGenerator(seed=seed, prefix="poll").bookings(n_bookings), config)
        stats = pool.wait_until_drained(timeout=timeout, expected=n_bookings, progress=progress)
    return MaxPollRun(run_dir, "kafka-w1", max_poll_interval_ms, stats)


def max_poll_table(events: pd.DataFrame, slow_worker: str, max_poll_interval_ms: int) -> pd.DataFrame:
    """Each time ``slow_worker`` left the group: the booking it was running and where that booking went.

    Columns: ``booking_id``, ``left_after_s`` (from the booking's start to ``left_group``),
    ``over_limit`` (at least ``max.poll.interval.ms``), ``redelivered_to``, ``redelivered_s``,
    ``slow_finished_s`` (the slow handler still finished: its run counts as done or duplicate),
    ``rejoined_s`` (the slow worker's ``rejoining`` event, once that handler returned). Every time counts
    from the booking's start on the slow worker.
    """
    import pandas as pd

    kafka = events[events["backend"] == "kafka"]
    mine = kafka[kafka["worker"] == slow_worker]
    rows = []
    for _, left in mine[mine["event"] == "left_group"].iterrows():
        started = mine[(mine["event"] == "started") & (mine["mono"] < left["mono"])]
        finished = set(mine[(mine["event"] == "completed") & (mine["mono"] < left["mono"])]["source"])
        running = started[~started["source"].isin(finished)]
        if running.empty:
            continue
        run = running.iloc[-1]
        t0 = run["mono"]
        others = kafka[(kafka["worker"] != slow_worker) & (kafka["source"] == run["source"]) & (kafka["mono"] > t0)]
        again = others[others["event"] == "started"]
        slow_done = mine[(mine["event"] == "completed") & (mine["source"] == run["source"])]
        rejoin = mine[(mine["event"] == "rejoining") & (mine["mono"] > left["mono"])]
        rows.append(
            {
                "booking_id": run["booking_id"],
                "left_after_s": left["mono"] - t0,
                "over_limit": left["mono"] - t0 >= max_poll_interval_ms / 1000 - CLOCK_SLACK_S,
                "redelivered_to": str(again["worker"].iloc[0]) if len(again) else None,
                "redelivered_s": float(again["mono"].iloc[0] - t0) if len(again) else float("nan"),
                "slow_finished_s": float(slow_done["mono"].iloc[0] - t0) if len(slow_done) else float("nan"),
                "rejoined_s": float(rejoin["mono"].iloc[0] - t0) if len(rejoin) else float("nan"),
            }
        )
    columns = ["booking_id", "left_after_s", "over_limit", "redelivered_to", "redelivered_s", "slow_finished_s"]
    return pd.DataFrame(rows, columns=[*columns, "rejoined_s"])


# -- charts --------------------------------------------------------------------------------------


def recovery_chart(tables: Mapping[str, pd.DataFrame], ax: Axes | None = None) -> Axes:
    """Kill → hand-over → redelivery → completion, one row per backend and run, on one time axis.

    Args:
        tables: :func:`recovery_table` results by run label, e.g. ``{"idempotency off": ..., "on": ...}``.

    The shaded span is when the backend's rule says the booking comes back, predicted from what
    the broker showed at the kill; the dot is when it did.
    """
    import matplotlib.pyplot as plt

    rows = [(label, backend, row) for label, table in tables.items() for backend, row in table.iterrows()]
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 0.8 * len(rows) + 1.6))
    for y, (_, backend, row) in enumerate(rows):
        colour = COLOURS.get(str(backend), "#555555")
        ax.fill_betweenx([y - 0.3, y + 0.3], row["window_from_s"], row["window_to_s"], color=colour, alpha=0.18)
        ax.text(row["window_from_s"], y - 0.33, RULES.get(str(backend), ""), fontsize=8, color=colour, va="bottom")
        ax.plot([0, row["redelivered_s"]], [y, y], color=colour, lw=1, ls=":")
        ax.plot([row["redelivered_s"], row["completed_s"]], [y, y], color=colour, lw=6, solid_capstyle="butt")
        ax.plot(0, y, marker="X", color="black", ms=9)
        ax.plot(row["handed_back_s"], y, marker="o", color=colour, ms=7, mec="black")
    ax.set_yticks(range(len(rows)), [f"{backend} ({label})" for label, backend, _ in rows])
    ax.set_ylim(len(rows) - 0.5, -0.8)  # top to bottom, with room for the first window's label
    ax.set_xlabel("seconds after the SIGKILL")
    ax.set_title("Kill (X) → handed back (dot; shaded: when the backend's rule allows it) → run again (bar)")
    ax.grid(axis="x", alpha=0.3)
    return ax


def effects_chart(tables: Mapping[str, pd.DataFrame], ax: Axes | None = None) -> Axes:
    """Effects applied beyond one per booking, per backend and run: every bar above zero is a wrong record.

    Args:
        tables: :func:`effects_table` results by run label.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    kinds = {"charges": "extra charges", "inventory": "extra rooms", "confirmations": "extra confirmations"}
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 3.6))
    groups = [(label, backend, row) for label, table in tables.items() for backend, row in table.iterrows()]
    width = 0.8 / len(kinds)
    x = np.arange(len(groups))
    for k, (column, name) in enumerate(kinds.items()):
        extra = [row[column] - row["completed"] for _, _, row in groups]
        ax.bar(x + (k - (len(kinds) - 1) / 2) * width, extra, width, label=name)
    ax.set_xticks(x, [f"{backend}\n{label}" for label, backend, _ in groups])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("applied − completed bookings")
    ax.set_title("Effects beyond one per booking after the crash and the producer's retry")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    return ax


def max_poll_chart(events: pd.DataFrame, slow_worker: str, max_poll_interval_ms: int, ax: Axes | None = None) -> Axes:
    """One lane per Kafka worker: its booking runs as bars, its group membership events as markers.

    The bookings the slow worker was running when it left the group are red, on both workers;
    the dashed line is their start plus ``max.poll.interval.ms``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    kafka = events[events["backend"] == "kafka"]
    moved = max_poll_table(events, slow_worker, max_poll_interval_ms)
    runs = kafka[kafka["event"] == "started"]
    t0 = runs["mono"].min()
    workers = sorted(kafka["worker"].unique())
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 1.3 * len(workers) + 1.4))
    for y, worker in enumerate(workers):
        mine = kafka[kafka["worker"] == worker]
        for _, start in mine[mine["event"] == "started"].iterrows():
            ends = mine[mine["event"].isin(["completed", "failed"]) & (mine["mono"] >= start["mono"])]
            end = ends["mono"].iloc[0] if len(ends) else mine["mono"].max()
            red = start["booking_id"] in set(moved["booking_id"])
            width = max(end - start["mono"], 0.08)  # a fast booking still shows
            colour, layer = ("#d9534f", 3) if red else ("#bbbbbb", 2)
            left = start["mono"] - t0
            ax.barh(y, width, left=left, height=0.35, color=colour, edgecolor="#555555", zorder=layer)
            if red and worker != slow_worker:
                ax.annotate("run again here", (left + width, y), xytext=(6, -16), textcoords="offset points")
        for event, (marker, colour) in _MEMBERSHIP_MARKERS.items():
            at = mine[mine["event"] == event]["mono"] - t0
            ax.plot(at, [y + 0.33] * len(at), ls="", marker=marker, color=colour, ms=9)
    for _, row in moved.iterrows():
        first = runs[(runs["booking_id"] == row["booking_id"]) & (runs["worker"] == slow_worker)]["mono"].min()
        ax.axvline(first - t0 + max_poll_interval_ms / 1000, color="#d9534f", lw=0.8, ls="--")
    ax.set_yticks(range(len(workers)), workers)
    ax.set_ylim(-0.5, len(workers) - 0.3)
    ax.set_xlabel("seconds after the first booking started (dashed: the red booking's start + max.poll.interval.ms)")
    ax.set_title("Booking runs (bars; red: the booking that outran max.poll.interval.ms) and group membership")
    handles = [Line2D([], [], ls="", marker=m, color=c) for m, c in _MEMBERSHIP_MARKERS.values()]
    ax.legend(handles, list(_MEMBERSHIP_MARKERS), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


_MEMBERSHIP_MARKERS = {
    "assigned": ("^", "#3a9a5b"),
    "revoked": ("v", "#999999"),
    "left_group": ("X", "#d9534f"),
    "rejoining": ("P", "#2b7bba"),
}


__all__ = [
    "CrashRun",
    "Kill",
    "MaxPollRun",
    "crash_settings",
    "duplicate_table",
    "effects_chart",
    "explain_extra_charges",
    "effects_table",
    "exceed_max_poll",
    "extra_charges_table",
    "handed_back_at",
    "join_rebalance_s",
    "kill_after_payment",
    "max_poll_chart",
    "max_poll_table",
    "membership",
    "recovery_chart",
    "charges_per_booking",
    "claimed_by_survivor",
    "recovery_statement",
    "recovery_table",
    "replayed_from_commit",
    "running_at",
]
