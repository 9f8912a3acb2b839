"""Per-booking status: where one booking is now on one backend, how far its workflow got, and how it got there.

The booking service (``GET /api/bookings/{id}``) answers "where is my booking?" from these records.
A job queue and a log differ here, and the lab shows the difference rather than hiding it:

- **BullMQ** keeps per-job state itself: a job is ``waiting``, ``delayed``, ``active``, ``completed`` or
  ``failed``, and a worker reports progress with ``job.updateProgress()`` and per-job lines with
  ``job.log()``, as any BullMQ user does (``labkit.backends.bullmq.JobProgressRecorder``).
- **Redis Streams and Kafka** know only positions: an entry is pending or acknowledged, an offset is
  committed or not; nothing says "booking 42 is charging the card". So the lab keeps what their users
  keep in a database: a status record per booking, a Redis list ``lab:<ns><backend>:status:<booking_id>``
  of transitions (:class:`StatusRecords`), written by the workers (:class:`LabStatusRecorder`).

Either way the answer has one shape (:class:`BookingStatus`). Workers write records only when started
with ``WorkerSettings.track_status`` (``labkit serve`` starts its workers so): without it the handler
holds no recorder and a booking costs nothing more. Records expire :data:`STATUS_TTL_S` after their last
change, and BullMQ keeps the jobs the service sent for as long.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from labkit.config import Names

if TYPE_CHECKING:
    from redis.asyncio import Redis

#: A booking's state on one backend, in the order it normally meets them.
STATES = ("queued", "delayed", "active", "retrying", "completed", "dead_lettered")
#: The workflow's steps (labkit.workflow), in order; ``progress`` is the share of steps already done.
STEPS = ("validate", "charge_payment", "write_confirmation", "send_email", "update_inventory")
#: How long a status record (and a BullMQ job the service sent) is kept after its last change.
STATUS_TTL_S = 3600
#: Transitions kept per booking and backend (a booking sent again and again keeps only its latest story).
HISTORY_LIMIT = 200
#: Bookings the index of recent ones keeps per backend (the dashboard's "recent bookings" panel shows them).
RECENT_KEPT = 8

_encode = json.JSONEncoder(separators=(",", ":")).encode


def progress_at(step: str) -> int:
    """Percent of the workflow done when ``step`` begins: 0 at ``validate``, 80 at ``update_inventory``."""
    return STEPS.index(step) * 100 // len(STEPS)


@dataclass(frozen=True)
class Transition:
    """One entry of a booking's history on one backend.

    Attributes:
        state: one of :data:`STATES`.
        at: Unix time of the change (the writer's clock; the lab runs on one machine).
        step: the workflow step that began, while ``active``.
        progress: percent of the workflow done, 0-100.
        attempt: the delivery attempt (0 before any worker took it).
        worker: the worker that wrote it.
        reason: why it is retrying or dead-lettered.
        due_at: when a delayed booking may start, or when a retry is due.
        duration_ms: a completed run's time from start to completion.
        source: where the delivery came from, in the backend's words (``job 17``, ``entry 1-0``, ``bookings/2/15``).
        replayed_from: the dead letter a replayed booking came from.
    """

    state: str
    at: float
    step: str | None = None
    progress: int = 0
    attempt: int = 0
    worker: str | None = None
    reason: str | None = None
    due_at: float | None = None
    duration_ms: float | None = None
    source: str | None = None
    replayed_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values, fields that are not set left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Transition:
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        return cls(**known)


@dataclass(frozen=True)
class BookingStatus:
    """Where one booking is on one backend: its latest state, and the history that led there."""

    state: str
    step: str | None
    progress: int
    attempts: int
    reason: str | None
    updated_at: float
    history: list[Transition] = field(default_factory=list)
    worker: str | None = None
    duration_ms: float | None = None
    due_at: float | None = None
    next_try_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["history"] = [t.to_dict() for t in self.history]
        return values


def summarize(history: Iterable[Transition], state: str | None = None) -> BookingStatus | None:
    """The status a history leads to: the latest transition's state, step and progress, the highest attempt.

    Args:
        history: transitions in any order; they are sorted by time (writers on several processes append them).
        state: the broker's own word for the current state when it keeps one (BullMQ), else the latest transition's.

    Returns:
        None for an empty history.
    """
    entries = sorted(history, key=lambda t: t.at)
    if not entries:
        return None
    last = entries[-1]
    current = state or last.state
    runs = [t for t in entries if t.state == "active"]
    if current == "completed":
        progress = 100
    elif current in ("active", "retrying", "dead_lettered"):
        progress = runs[-1].progress if runs else 0  # how far the latest run got
    else:
        progress = 0
    return BookingStatus(
        state=current,
        step=runs[-1].step if current == "active" and runs else None,
        progress=progress,
        attempts=max(t.attempt for t in entries),
        reason=last.reason if current in ("retrying", "dead_lettered") else None,
        updated_at=last.at,
        history=entries,
        worker=last.worker or (runs[-1].worker if runs else None),
        duration_ms=last.duration_ms if current == "completed" else None,
        due_at=last.due_at if current == "delayed" else None,
        next_try_at=last.due_at if current == "retrying" else None,
    )


class StatusRecords:
    """The lab's status records of one backend: a Redis list of transitions per booking.

    Args:
        redis: the lab's Redis (``decode_responses`` either way).
        names: the namespace's names.
        backend: the backend whose bookings these are.
    """

    def __init__(self, redis: Redis, names: Names, backend: str) -> None:
        self.redis = redis
        self.names = names
        self.backend = backend

    def key(self, booking_id: str) -> str:
        return self.names.key(self.backend, "status", booking_id)

    async def append(self, entries: Iterable[tuple[str, Transition]]) -> None:
        """Append ``(booking_id, transition)`` pairs in one round trip, keeping each history short and fresh."""
        async with self.redis.pipeline(transaction=False) as pipe:
            self.queue(pipe, entries)
            await pipe.execute()

    def queue(self, pipe: Any, entries: Iterable[tuple[str, Transition]]) -> None:
        """Queue the commands of :meth:`append` on a pipeline the caller executes (with its own commands)."""
        for booking_id, transition in entries:
            key = self.key(booking_id)
            pipe.rpush(key, _encode(transition.to_dict()))
            pipe.ltrim(key, -HISTORY_LIMIT, -1)
            pipe.expire(key, STATUS_TTL_S)

    async def read(self, booking_id: str) -> list[Transition]:
        """The booking's transitions as written (possibly out of time order), empty if it has none."""
        raw = await self.redis.lrange(self.key(booking_id), 0, -1)
        return [Transition.from_dict(json.loads(line)) for line in raw]


class RecentBookings:
    """The newest bookings a producer tracks on one backend: a sorted set ``lab:<ns><backend>:recent`` of booking
    ids scored by the time each was accepted, trimmed to :data:`RECENT_KEPT`.

    Status records are found by booking id, and nothing else lists them, so the dashboard's "recent bookings" panel
    reads this index (one ZREVRANGE a sample) and then each booking's status. The producer writes it in the round
    trip that starts the bookings' status (two commands a batch); a booking sent again moves to the front, with its
    new time (which tells the sampler that a booking it saw finish is running again).
    """

    def __init__(self, names: Names, backend: str) -> None:
        self.key = names.key(backend, "recent")

    def queue(self, pipe: Any, accepted: Iterable[Accepted]) -> None:
        """Queue the commands that add ``accepted`` on a pipeline the caller executes."""
        newest = {a.booking_id: a.at for a in accepted}
        if newest:
            pipe.zadd(self.key, newest)
            pipe.zremrangebyrank(self.key, 0, -RECENT_KEPT - 1)
            pipe.expire(self.key, STATUS_TTL_S)

    async def read(self, redis: Redis) -> list[tuple[str, float]]:
        """``(booking_id, accepted_at)`` of the kept bookings, newest first."""
        found = await redis.zrevrange(self.key, 0, RECENT_KEPT - 1, withscores=True)
        return [(m.decode() if isinstance(m, bytes) else str(m), float(at)) for m, at in found]


@dataclass(frozen=True)
class Accepted:
    """A booking a producer (the service) handed to a backend: what the status records start from.

    Attributes:
        booking_id: the booking.
        where: where it landed, as ``Backend.produce`` answered.
        at: when it was accepted, before it was sent (so it sorts before anything a worker writes).
        due_at: for a delayed booking, when it may start.
        replayed_from: the dead letter it was replayed from.
    """

    booking_id: str
    where: str
    at: float
    due_at: float | None = None
    replayed_from: str | None = None

    def transition(self) -> Transition:
        state = "delayed" if self.due_at is not None else "queued"
        return Transition(state, self.at, due_at=self.due_at, source=self.where, replayed_from=self.replayed_from)


class StatusRecorder(ABC):
    """What a worker tells the status API about each booking it handles, at every transition.

    Args:
        worker: the worker's id, written into every transition.
        retry_delay_s: the backend's delay before retry ``attempt + 1`` (for ``next_try_at``).
    """

    def __init__(self, worker: str, retry_delay_s: Callable[[int], float]) -> None:
        self.worker = worker
        self.retry_delay_s = retry_delay_s

    async def start(self, booking_id: str, attempt: int, source: str) -> BookingRun:
        """A delivery of ``booking_id`` began: it is ``active`` at ``validate``, 0 %."""
        run = BookingRun(self, booking_id, attempt, source, time.monotonic())
        await run.step(STEPS[0])
        return run

    async def dead_lettered(self, booking_id: str, attempt: int, source: str, reason: str) -> None:
        transition = Transition(
            "dead_lettered", time.time(), attempt=attempt, worker=self.worker, reason=reason, source=source
        )
        await self.write(booking_id, transition, progress=False)

    @abstractmethod
    async def write(self, booking_id: str, transition: Transition, progress: bool) -> None:
        """Store one transition; ``progress`` says it is a step of a running workflow (BullMQ: updateProgress)."""


@dataclass
class BookingRun:
    """One delivery of one booking as the status API sees it: its steps, then its verdict."""

    recorder: StatusRecorder
    booking_id: str
    attempt: int
    source: str
    started: float

    def _transition(self, state: str, **detail: Any) -> Transition:
        worker = self.recorder.worker
        return Transition(state, time.time(), attempt=self.attempt, worker=worker, source=self.source, **detail)

    async def step(self, step: str) -> None:
        """``step`` begins."""
        transition = self._transition("active", step=step, progress=progress_at(step))
        await self.recorder.write(self.booking_id, transition, progress=True)

    async def retrying(self, reason: str) -> None:
        """The run failed and the backend will deliver it again after its retry delay."""
        due = time.time() + self.recorder.retry_delay_s(self.attempt)
        await self.recorder.write(self.booking_id, self._transition("retrying", reason=reason, due_at=due), False)

    async def completed(self) -> None:
        duration_ms = round((time.monotonic() - self.started) * 1000, 3)
        transition = self._transition("completed", progress=100, duration_ms=duration_ms)
        await self.recorder.write(self.booking_id, transition, progress=True)


class LabStatusRecorder(StatusRecorder):
    """Writes each transition to the lab's status records (Redis Streams and Kafka workers)."""

    def __init__(self, records: StatusRecords, worker: str, retry_delay_s: Callable[[int], float]) -> None:
        super().__init__(worker, retry_delay_s)
        self.records = records

    async def write(self, booking_id: str, transition: Transition, progress: bool) -> None:
        await self.records.append([(booking_id, transition)])
