"""One sampler for the live views: each backend read about once a second into a ring buffer (about 10 minutes).

The dashboard of ``labkit serve`` (and any other viewer) reads the buffer, never the brokers, so the load on the
brokers does not grow with the number of viewers. Every sample has the same names on every backend, and
:data:`WORDS` gives each system's own word beside each name, because the three systems count different things:

- ``waiting``: BullMQ's ``wait`` list; the Streams group's lag (entries never delivered); the Kafka group's
  lag over the work and retry topics (which counts what is in flight too: Kafka knows only committed offsets).
- ``delayed``: BullMQ's ``delayed`` set (backoffs too); the lab's ``bookings:delayed`` sorted set; the lag of
  the ``bookings.delay`` topic. ``prioritized`` is BullMQ's alone.
- ``active``: BullMQ's ``active`` list; the Streams pending entries list (delivered, not acknowledged); the
  records the Kafka workers report running.
- ``completed`` and ``failed``: the lab's ledger (completed bookings, dead letters), the same on every backend.

Two more panels have the same names everywhere too: the **recent bookings** (the newest ones a producer tracked,
``labkit serve`` does, each with its status: :data:`labkit.status.STATES`, the step and the progress, in
:data:`BOOKING_WORDS` each system's word for where it is), and **broker health** (each broker the backend needs:
whether it answers, its server, one request's round trip; :data:`BROKERS` says what each one holds there).

A sample is built from the backends' own read methods (``Ledger.counts``, ``queue_depths``, ``dead_letters``,
``live_workers``' sources) by the pure functions :func:`bullmq_sample`, :func:`streams_sample` and
:func:`kafka_sample`, so that a recorded broker answer can be replayed in a unit test. A backend whose broker
does not answer gives a sample with ``ok`` False and its ``error``, and still its broker health: a viewer keeps
the last good sample's panels on screen, says how old they are, and shows which broker is down.

What a sample costs the brokers (docs/dashboard.md has the measured figures): the reads above, a PING to Redis
(and an ApiVersions request to Kafka) for the health, and one ZREVRANGE of the recent bookings' index plus the status
of each recent booking that has not finished (a finished one is read once, until it is sent again); the dead
letters are read again only when the ledger's count of them changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from labkit.backends import Backend, get_backend
from labkit.backends.kafka import topic_changes
from labkit.config import BACKENDS, Config
from labkit.errors import LabkitError
from labkit.stack import Stack, kafka_round_trip_ms
from labkit.status import BookingStatus

#: The state names every sample has, in a booking's order.
STATES = ("waiting", "delayed", "prioritized", "active", "completed", "failed")
#: Each system's own word for each state (None: the system has no such state).
WORDS: dict[str, dict[str, str | None]] = {
    "bullmq": {
        "waiting": "wait", "delayed": "delayed", "prioritized": "prioritized", "active": "active",
        "completed": "completed (ledger)", "failed": "dead letters in bookings-dlq",
    },
    "streams": {
        "waiting": "group lag", "delayed": "bookings:delayed (sorted set)", "prioritized": None,
        "active": "pending (PEL)", "completed": "acknowledged (ledger)", "failed": "dead letters in bookings:dlq",
    },
    "kafka": {
        "waiting": "consumer lag", "delayed": "bookings.delay lag", "prioritized": None,
        "active": "running (worker reports)", "completed": "committed (ledger)",
        "failed": "dead letters in bookings.dlq",
    },
}  # fmt: skip
#: What each system calls a worker, the things it waits in and what tells the sampler a worker is alive.
TERMS = {
    "bullmq": {"worker": "worker (Redis connection)", "alive": "named connection in CLIENT LIST; last seen = its idle"},
    "streams": {"worker": "consumer", "alive": "XINFO CONSUMERS idle under 10 s"},
    "kafka": {"worker": "group member", "alive": "its in-flight report in Redis, refreshed every second"},
}
#: Each system's word for where a booking is, per status state (labkit.status.STATES: the same on every backend).
BOOKING_WORDS: dict[str, dict[str, str]] = {
    "bullmq": {
        "queued": "job in wait", "delayed": "job in delayed", "active": "job active (job.progress)",
        "retrying": "job delayed for its backoff", "completed": "job completed",
        "dead_lettered": "job failed, in bookings-dlq",
    },
    "streams": {
        "queued": "entry not yet delivered", "delayed": "in bookings:delayed", "active": "entry pending (PEL)",
        "retrying": "entry pending, claimed when idle", "completed": "entry acknowledged (XACK)",
        "dead_lettered": "entry in bookings:dlq",
    },
    "kafka": {
        "queued": "record not yet consumed", "delayed": "record in bookings.delay", "active": "record running",
        "retrying": "record in bookings.retry", "completed": "offset stored for commit",
        "dead_lettered": "record in bookings.dlq",
    },
}  # fmt: skip
#: The brokers each backend needs, each with what it holds there (the health panel's words).
BROKERS: dict[str, list[tuple[str, str]]] = {
    "bullmq": [("redis", "the queue: BullMQ keeps its jobs in Redis (PING)")],
    "streams": [("redis", "the stream and its group (PING)")],
    "kafka": [("kafka", "the topics and the group (an ApiVersions request)"),
              ("redis", "the lab's ledger and status records (PING)")],
}  # fmt: skip
#: Booking states after which a booking's status no longer changes (unless it is sent again, with a new time).
FINISHED = ("completed", "dead_lettered")
#: Seconds between two samples of one backend, and how many samples the buffer keeps (10 minutes).
EVERY_S = 1.0
KEEP = 600
#: Most pending entries and dead letters a sample carries (the newest); counts cover all of them.
SHOWN = 20


@dataclass(frozen=True)
class Sample:
    """One backend at one moment, in the names every backend shares.

    Attributes:
        backend: ``bullmq``, ``streams`` or ``kafka``.
        at: Unix time the sample was taken.
        ok: False when the broker did not answer (``error`` says why; the other fields are empty).
        states: a count per :data:`STATES` name (None where the system has no such state).
        counters: the ledger's counters (``completed``, ``dead_lettered``, ``retried``, ``duplicates``, ``runs``).
        throughput: bookings completed per second since the previous good sample (None for the first).
        backlog: not yet delivered (the broker's own ``queue_depths`` view).
        in_flight: delivered, not yet acknowledged.
        workers: ``{"id", "last_seen", "detail"}`` per live worker.
        partitions: Kafka only: ``{"partition", "lag", "owner"}`` per partition of the work, retry and delay topics.
        consumers: Streams only: ``{"name", "pending", "idle_ms"}`` per consumer of the group.
        pending: Streams only: the pending entries list (oldest first, at most :data:`SHOWN`):
            ``{"id", "consumer", "idle_ms", "deliveries"}``.
        dead_letters: the newest dead letters (at most :data:`SHOWN`): ``{"booking_id", "reason", "attempts",
            "source"}``; ``dead_letter_count`` counts them all.
        bookings: the recent bookings, newest first (see :func:`booking_row`).
        brokers: the health of each broker the backend needs, also when ``ok`` is False (see :func:`broker_row`).
        error: why the broker did not answer.
    """

    backend: str
    at: float
    ok: bool = True
    states: dict[str, int | None] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    throughput: float | None = None
    backlog: int | None = None
    in_flight: int | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    partitions: list[dict[str, Any]] = field(default_factory=list)
    consumers: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    dead_letter_count: int = 0
    bookings: list[dict[str, Any]] = field(default_factory=list)
    brokers: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _letters(letters: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    keep = ("booking_id", "reason", "attempts", "source")
    return [{k: letter.get(k) for k in keep} for letter in list(letters)[-SHOWN:]]


def _common(
    backend: str, at: float, counts: Mapping[str, int], depths: Mapping[str, Any], letters: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    return {
        "backend": backend,
        "at": at,
        "counters": dict(counts),
        "backlog": depths.get("backlog"),
        "in_flight": depths.get("in_flight"),
        "dead_letters": _letters(letters),
        "dead_letter_count": len(letters),
    }


def bullmq_sample(
    at: float,
    counts: Mapping[str, int],
    depths: Mapping[str, Any],
    clients: Iterable[Mapping[str, Any]],
    letters: Sequence[Mapping[str, Any]],
) -> Sample:
    """A BullMQ sample from ``Ledger.counts()``, ``queue_depths()``, ``Queue.get_workers()`` (parsed CLIENT LIST
    entries: ``rawname`` ``bull:<queue>:w:<worker>``, ``idle`` in seconds) and ``dead_letters()``."""
    own = depths.get("states", {})
    states = {name: own.get(name, 0) for name in ("waiting", "delayed", "prioritized", "active")}
    states.update(completed=counts.get("completed", 0), failed=counts.get("dead_lettered", 0))
    seen: dict[str, float] = {}
    for client in clients:
        worker = str(client.get("rawname", "")).partition(":w:")[2]
        if worker:  # a worker has several connections: the most recent one counts
            seen[worker] = max(seen.get(worker, 0.0), at - float(client.get("idle", 0)))
    workers = [{"id": w, "last_seen": t, "detail": "connected"} for w, t in sorted(seen.items())]
    return Sample(**_common("bullmq", at, counts, depths, letters), states=states, workers=workers)


def _ledger_states(counts: Mapping[str, Any], depths: Mapping[str, Any]) -> dict[str, int | None]:
    """The job states of a backend without BullMQ's job states (Streams, Kafka), from the ledger and the depths.

    Waiting is the backlog less what is delayed; nothing is prioritized there.
    """
    delayed = int(depths.get("delayed") or 0)
    backlog = depths.get("backlog")
    return {
        "waiting": None if backlog is None else backlog - delayed,
        "delayed": delayed,
        "prioritized": None,
        "active": depths.get("in_flight"),
        "completed": counts.get("completed", 0),
        "failed": counts.get("dead_lettered", 0),
    }


def streams_sample(
    at: float,
    counts: Mapping[str, int],
    depths: Mapping[str, Any],
    consumers: Iterable[Mapping[str, Any]],
    pending: Iterable[Mapping[str, Any]],
    letters: Sequence[Mapping[str, Any]],
    live_idle_ms: int,
) -> Sample:
    """A Streams sample from ``Ledger.counts()``, ``queue_depths()``, XINFO CONSUMERS, XPENDING's extended form
    (``message_id``, ``consumer``, ``time_since_delivered``, ``times_delivered``) and ``dead_letters()``."""
    states = _ledger_states(counts, depths)
    group = [{"name": _text(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"])} for c in consumers]
    workers = [
        {"id": c["name"], "last_seen": at - c["idle_ms"] / 1000, "detail": f"{c['pending']} pending"}
        for c in group
        if c["idle_ms"] < live_idle_ms
    ]
    entries = [
        {"id": _text(e["message_id"]), "consumer": _text(e["consumer"]), "idle_ms": int(e["time_since_delivered"]),
         "deliveries": int(e["times_delivered"])}
        for e in pending
    ]  # fmt: skip
    return Sample(
        **_common("streams", at, counts, depths, letters),
        states=states,
        workers=workers,
        consumers=group,
        pending=entries,
    )


def kafka_sample(
    at: float,
    counts: Mapping[str, int],
    depths: Mapping[str, Any],
    reports: Mapping[str, Mapping[str, Any]],
    letters: Sequence[Mapping[str, Any]],
) -> Sample:
    """A Kafka sample from ``Ledger.counts()``, ``queue_depths()`` (``lag`` per ``topic/partition``),
    ``KafkaBackend.worker_reports()`` (each member's assignment and how long ago it reported) and
    ``dead_letters()``."""
    states = _ledger_states(counts, depths)
    owners = {p: worker for worker, report in reports.items() for p in report.get("assigned", ())}
    partitions = [
        {"partition": p, "lag": lag, "owner": owners.get(p)}
        for p, lag in sorted(depths.get("lag", {}).items(), key=lambda item: _partition_order(item[0]))
    ]
    workers = [
        {"id": worker, "last_seen": at - float(r.get("reported_ago_s", 0)),
         "detail": f"{len(r.get('assigned', ()))} partitions, {r.get('running', 0)} running"}
        for worker, r in sorted(reports.items())
    ]  # fmt: skip
    return Sample(
        **_common("kafka", at, counts, depths, letters), states=states, workers=workers, partitions=partitions
    )


def _partition_order(name: str) -> tuple[str, int]:
    topic, _, partition = name.rpartition("/")
    return topic, int(partition) if partition.isdigit() else -1


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def booking_row(booking_id: str, accepted_at: float, status: BookingStatus | None) -> dict[str, Any]:
    """One recent booking as the panel shows it, from ``Backend.booking_status`` (None: its status is gone,
    expired or reset): ``state`` (labkit.status.STATES, or None), ``step`` while active, ``progress`` in percent,
    ``attempts``, ``reason`` when retrying or dead-lettered, and when it was accepted and last changed."""
    if status is None:
        return {"booking_id": booking_id, "accepted_at": accepted_at, "state": None, "step": None, "progress": 0,
                "attempts": 0, "reason": None, "updated_at": accepted_at}  # fmt: skip
    return {
        "booking_id": booking_id,
        "accepted_at": accepted_at,
        "state": status.state,
        "step": status.step,
        "progress": status.progress,
        "attempts": status.attempts,
        "reason": status.reason,
        "updated_at": status.updated_at,
    }


def broker_row(
    service: str, address: str, server: str | None, round_trip_ms: float | None, error: str | None
) -> dict[str, Any]:
    """One broker's health: ``broker`` (``redis`` or ``kafka``), ``answers``, the ``server`` that answered (product
    and version, as ``labkit status`` names it), one request's ``round_trip_ms``, or the ``error``."""
    return {
        "broker": service,
        "address": address,
        "answers": error is None,
        "server": server,
        "round_trip_ms": None if round_trip_ms is None else round(round_trip_ms, 2),
        "error": error,
    }


async def read_sample(
    backend: Backend, letters_of: Callable[[Mapping[str, int]], Awaitable[Sequence[Mapping[str, Any]]]] | None = None
) -> Sample:
    """Ask ``backend``'s brokers now and shape the answers as a :class:`Sample` (connect first); without the
    recent bookings and the broker health, which a :class:`Sampler` adds.

    Args:
        backend: the connected backend.
        letters_of: how to get the dead letters, given the ledger's counts [default: ``backend.dead_letters()``].

    Raises:
        LabkitError, RedisError, OSError: a broker did not answer.
    """
    at = time.time()
    counts = await backend.ledger.counts()
    depths = await backend.queue_depths()
    letters = await (letters_of(counts) if letters_of is not None else backend.dead_letters())
    if backend.name == "bullmq":
        return bullmq_sample(at, counts, depths, await backend.queue.get_workers(), letters)  # type: ignore[attr-defined]
    if backend.name == "streams":
        from labkit.backends.streams import LIVE_IDLE_MS

        names = backend.names
        try:
            consumers = await backend.redis.xinfo_consumers(names.stream, names.stream_group)
            pending = await backend.redis.xpending_range(names.stream, names.stream_group, "-", "+", SHOWN)
        except ResponseError:  # no stream or group yet
            consumers, pending = [], []
        return streams_sample(at, counts, depths, consumers, pending, letters, LIVE_IDLE_MS)
    return kafka_sample(at, counts, depths, await backend.worker_reports(), letters)  # type: ignore[attr-defined]


def _one_line(error: BaseException) -> str:
    return (str(error) or type(error).__name__).splitlines()[0]


class BackendWatch:
    """One backend as one sampler task sees it, sample after sample: its connections, the names of the servers
    that answered, the recent bookings already seen finished (not read again until sent again), and the dead
    letters with the count they were read at (read again when it changes).

    Args:
        backend: the backend (connected by the watch).
        config: the lab (its addresses).
    """

    def __init__(self, backend: Backend, config: Config) -> None:
        self.backend = backend
        self.config = config
        self.servers: dict[str, str] = {}
        self.finished: dict[tuple[str, float], dict[str, Any]] = {}
        self.letters: tuple[int, Sequence[Mapping[str, Any]]] | None = None

    async def sample(self) -> Sample:
        """A sample now: the brokers' health first; the rest only when every broker answered."""
        at = time.time()
        brokers = await self.health()
        down = next((b for b in brokers if not b["answers"]), None)
        if down is not None:
            return Sample(backend=self.backend.name, at=at, ok=False, brokers=brokers, error=down["error"])
        try:
            sample = await read_sample(self.backend, self.dead_letters)
            bookings = await self.bookings()
        except (LabkitError, RedisError, OSError) as e:
            return Sample(backend=self.backend.name, at=at, ok=False, brokers=brokers, error=_one_line(e))
        return dataclasses.replace(sample, bookings=bookings, brokers=brokers)

    async def health(self) -> list[dict[str, Any]]:
        """Each broker of :data:`BROKERS`: one request timed (Redis PING, Kafka ApiVersions), and the server's name,
        asked once while it keeps answering (``labkit status``'s probe, in a thread)."""
        rows = []
        for service, _ in BROKERS[self.backend.name]:
            round_trip_ms, error = await self._round_trip(service)
            if error is not None:
                self.servers.pop(service, None)  # it may come back as another server
            elif service not in self.servers:
                self.servers[service] = await asyncio.to_thread(self._server, service)
            address = self.config.kafka_bootstrap if service == "kafka" else self.config.redis_url
            rows.append(broker_row(service, address, self.servers.get(service), round_trip_ms, error))
        return rows

    def _server(self, service: str) -> str:
        """The server's product and version as ``labkit status`` names it (its Kafka probe is a client: it takes
        its turn with topic changes, see labkit/backends/kafka/topic_changes.py)."""
        with topic_changes.reading(self.config.kafka_bootstrap) if service == "kafka" else contextlib.nullcontext():
            [status] = Stack(self.config, services=[service]).status()
        return status.kind

    async def _round_trip(self, service: str) -> tuple[float | None, str | None]:
        """Milliseconds of one request (Redis: PING on the backend's connection; Kafka: ApiVersions, on a socket of
        its own, since no Kafka client may live across a topic's re-creation), or why there was no answer."""
        try:
            if service == "kafka":
                return await asyncio.to_thread(kafka_round_trip_ms, *self.config.kafka_address), None
            await self.backend.connect()
            started = time.perf_counter()
            await self.backend.redis.ping()
        except (LabkitError, RedisError, OSError) as e:
            return None, _one_line(e)
        return (time.perf_counter() - started) * 1000, None

    async def dead_letters(self, counts: Mapping[str, int]) -> Sequence[Mapping[str, Any]]:
        """The dead letters, read again only when the ledger's count of them changed (a Kafka read is a consumer of
        its own: half of what a Kafka sample cost the process and the broker)."""
        count = counts.get("dead_lettered", 0)
        if self.letters is None or self.letters[0] != count:
            self.letters = (count, await self.backend.dead_letters())
        return self.letters[1]

    async def bookings(self) -> list[dict[str, Any]]:
        """The recent bookings, newest first: each unfinished one's status read now, a finished one's remembered."""
        rows = []
        recent = await self.backend.recent_bookings.read(self.backend.redis)
        for booking_id, accepted_at in recent:
            row = self.finished.get((booking_id, accepted_at))
            if row is None:
                row = booking_row(booking_id, accepted_at, await self.backend.booking_status(booking_id))
                if row["state"] in FINISHED or row["state"] is None:  # None: its record expired, for good
                    self.finished[(booking_id, accepted_at)] = row
            rows.append(row)
        shown = set(recent)
        self.finished = {key: row for key, row in self.finished.items() if key in shown}
        return rows


def with_throughput(sample: Sample, previous: Sample | None) -> Sample:
    """``sample`` with its ``throughput``: completed bookings per second since ``previous`` (a good sample)."""
    if not sample.ok or previous is None or not previous.ok or sample.at <= previous.at:
        return sample
    done = sample.counters.get("completed", 0) - previous.counters.get("completed", 0)
    rate = max(done, 0) / (sample.at - previous.at)
    return Sample(**{**sample.__dict__, "throughput": round(rate, 2)})


class Sampler:
    """Samples each backend every :data:`EVERY_S` into a ring buffer of :data:`KEEP` samples per backend.

    One task per backend, so a broker that is slow or down delays only its own backend's samples. Use
    ``async with Sampler(config):`` or ``await start()`` / ``await stop()`` inside a running event loop.

    Args:
        config: the lab (addresses and namespace).
        every_s: seconds between two samples of one backend.
        keep: samples kept per backend.
        backends: which backends to sample.
    """

    def __init__(
        self, config: Config, every_s: float = EVERY_S, keep: int = KEEP, backends: Sequence[str] = BACKENDS
    ) -> None:
        self.config = config
        self.every_s = every_s
        self.backends = tuple(backends)
        self.buffers: dict[str, deque[Sample]] = {name: deque(maxlen=keep) for name in self.backends}
        self.sequence = 0
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def __aenter__(self) -> Sampler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if not self._tasks:
            self._stopping = False
            self._tasks = [asyncio.create_task(self._sample_forever(name)) for name in self.backends]

    async def stop(self) -> None:
        """Cancel the sampling tasks and wait for them to end.

        A cancellation can be lost on its way through a client library (redis-py has had such bugs:
        redis/redis-py#2028, #2551), and the task would then sample on and this wait never end: a SIGTERMed
        `labkit serve` on Apache Kafka, with a second service beside it, hung in its shutdown here in 2 of its
        first 3 tries, the Streams task cancelled yet asleep between two samples. So each task also looks at a
        flag before every sample, and ends within one.
        """
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def latest(self, backend: str) -> Sample | None:
        """The newest sample of ``backend`` (good or not), None before the first."""
        buffer = self.buffers[backend]
        return buffer[-1] if buffer else None

    def last_good(self, backend: str) -> Sample | None:
        """The newest sample of ``backend`` whose broker answered."""
        return next((s for s in reversed(self.buffers[backend]) if s.ok), None)

    def history(self, backend: str) -> list[Sample]:
        """Every sample kept for ``backend``, oldest first."""
        return list(self.buffers[backend])

    async def wait_for_new(self, seen: int, timeout: float | None = None) -> int:
        """Wait until a sample newer than sequence number ``seen`` arrives (or ``timeout``); the current number."""
        if self.sequence == seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self.sequence

    def _add(self, sample: Sample) -> None:
        buffer = self.buffers[sample.backend]
        previous = next((s for s in reversed(buffer) if s.ok), None)
        buffer.append(with_throughput(sample, previous))
        self.sequence += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def _sample_forever(self, name: str) -> None:
        watch = BackendWatch(get_backend(name)(self.config), self.config)
        try:
            while not self._stopping:
                started = time.monotonic()
                self._add(await watch.sample())
                await asyncio.sleep(max(self.every_s - (time.monotonic() - started), 0.05))
        finally:
            with contextlib.suppress(LabkitError, RedisError, OSError):
                await watch.backend.close()
