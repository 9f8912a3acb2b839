"""The one small interface every queue technology implements.

A backend knows its broker's vocabulary (jobs, stream entries, records) and nothing of
bookings: it delivers each message to a :class:`~labkit.workflow.BookingHandler`, then
turns the handler's verdict into its own way of acknowledging, retrying and
dead-lettering. Lessons and tests talk only to this interface, so the three systems are
compared doing exactly the same work.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from labkit.booking import booking_id_of, encode
from labkit.config import Config
from labkit.errors import BrokerUnavailable
from labkit.status import (
    Accepted,
    BookingStatus,
    LabStatusRecorder,
    RecentBookings,
    StatusRecorder,
    StatusRecords,
    summarize,
)
from labkit.workflow import BookingHandler, Delivery, Ledger, Result, WorkerSettings

T = TypeVar("T")
Message = Mapping[str, Any] | str | bytes
#: Most messages one fetch of :meth:`Backend.consume_batches` takes (XREADGROUP COUNT, Kafka consume()).
BATCH_FETCH = 500
#: What :meth:`Backend.consume_batches` hands each batch of payloads to: the comparison harness's consumer.
BatchSink = Callable[[list[Any]], Awaitable[None]]


def wire_text(message: Message) -> str | bytes:
    """The text to put on the wire: a dict is encoded (``created_at`` stamped if absent), text is sent as is.

    Sending text or bytes unchanged is how lessons and tests deliver malformed messages.
    """
    if isinstance(message, Mapping):
        booking = dict(message)
        booking.setdefault("created_at", time.time())
        return encode(booking)
    return message


class Backend(ABC):
    """A queue technology doing the booking job.

    Use as an async context manager: ``async with get_backend("kafka")(cfg) as b: ...``.

    Args:
        config: addresses and namespace.
        settings: how workers process bookings (concurrency, attempts, backoff, ...).
    """

    name: ClassVar[str]

    def __init__(self, config: Config, settings: WorkerSettings | None = None) -> None:
        self.config = config
        self.names = config.names
        self.settings = settings or WorkerSettings()
        self._redis: Any = None
        self._ledger: Ledger | None = None

    async def __aenter__(self) -> Backend:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the Redis connection that holds labkit's ledger (every backend has one).

        Raises:
            BrokerUnavailable: Redis does not answer.
        """
        import redis.asyncio as aioredis

        if self._redis is not None:
            return
        self._redis = aioredis.Redis.from_url(self.config.redis_url, socket_connect_timeout=3)
        try:
            await self._redis.ping()
        except (OSError, aioredis.ConnectionError, aioredis.TimeoutError):
            await self._redis.aclose()
            self._redis = None
            raise BrokerUnavailable(
                f"Redis is not answering at {self.config.redis_url}; start the lab with `labkit up`"
            ) from None
        self._ledger = Ledger(self._redis, self.config, self.name)

    async def close(self) -> None:
        """Release every connection."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def redis(self) -> Any:
        """The ``redis.asyncio.Redis`` client (connect first)."""
        return connected(self._redis)

    @property
    def ledger(self) -> Ledger:
        return connected(self._ledger)

    # -- the queue contract -------------------------------------------------------------

    @abstractmethod
    async def setup(self) -> None:
        """Create the work and dead-letter destinations and the consumer group; safe to repeat.

        Work sent before any worker starts waits and is processed once workers start.
        """

    @abstractmethod
    async def produce(self, messages: Iterable[Message], *, delay_ms: int = 0) -> list[str]:
        """Send messages in order and return where each landed (job id, entry id, ``topic/partition/offset``).

        Returns only when the broker has acknowledged every message: a message reported
        as sent survives the producer crashing afterwards.

        With ``delay_ms`` no worker starts a message before ``delay_ms`` after this call: BullMQ's own
        delayed jobs; for Streams and Kafka, which have no delayed delivery, the lab's patterns (a sorted
        set moved into the stream when due; a delay topic whose records wait for their time).
        """

    async def produce_one(self, message: Message, *, delay_ms: int = 0) -> str:
        """Send one message; see :meth:`produce`."""
        return (await self.produce([message], delay_ms=delay_ms))[0]

    @abstractmethod
    async def consume(self, handler: BookingHandler, stop: asyncio.Event) -> None:
        """Deliver messages to ``handler`` with ``settings.concurrency`` in flight, until ``stop`` is set.

        A message is acknowledged only after the handler finished with it (at-least-once):
        a worker killed mid-message leaves it to be delivered again. A ``RETRY`` verdict
        is delivered again after the backoff, without holding up other messages; a
        ``DEAD`` verdict goes to the dead-letter destination once, with its reason. On
        ``stop`` the messages in flight are finished and acknowledged before returning.
        """

    async def send_batch(self, bookings: Sequence[Mapping[str, Any]]) -> None:
        """Send bookings and return once the broker acknowledged every one, like :meth:`produce`.

        The comparison harness's producer (``labkit.bench``): the same acknowledgement as
        ``produce``, but nothing comes back, so a backend may skip the per-message work of
        reporting where each message landed.
        """
        await self.produce(bookings)

    @abstractmethod
    async def consume_batches(self, sink: BatchSink, stop: asyncio.Event, consumer: str) -> None:
        """Hand payloads to ``sink`` in the batches the client fetches them, until ``stop`` is set.

        The comparison harness's consumer (``labkit.bench``): no workflow, ledger or retries,
        only the queue. A batch is acknowledged after ``sink`` returned (at-least-once, as in
        :meth:`consume`), with the same group, lock and commit settings as ``consume``.
        Payloads are what the client gives: bytes (Streams, Kafka) or the job data that
        BullMQ already decoded. ``consumer`` names this consumer to the broker.
        """

    @abstractmethod
    async def dead_letters(self) -> list[dict[str, Any]]:
        """The dead-letter destination's contents: ``booking`` (original text), ``reason``, ``attempts``, ``source``."""

    @abstractmethod
    async def queue_depths(self) -> dict[str, Any]:
        """The broker's own view: at least ``backlog`` (not yet delivered) and ``in_flight`` (delivered, not acked).

        May add backend detail (per-partition lag, pending per consumer, job-state counts).
        """

    @abstractmethod
    async def purge(self) -> None:
        """Empty the work, retry and dead-letter destinations and reset the consumer group."""

    # -- shared behaviour ----------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """docs/contract.md's counters: the ledger's counts plus the broker's backlog and in-flight."""
        counts = await self.ledger.counts()
        depths = await self.queue_depths()
        return {"backend": self.name, **counts, **depths}

    async def reset(self) -> None:
        """Empty this backend's destinations and its counters and effects, then set it up again."""
        await self.purge()
        await self.ledger.reset()
        await self.setup()

    async def dead_letter(self, handler: BookingHandler, delivery: Delivery, result: Result) -> None:
        """Send a message to the dead-letter destination with its reason, count it, and log it."""
        reason = result.reason or "unknown"
        await self.write_dead_letter(delivery, reason)
        await self.ledger.record_dead_letter(result.booking_id, delivery.source)
        handler.events.emit(
            "dead_lettered",
            booking_id=result.booking_id,
            attempt=delivery.attempt,
            source=delivery.source,
            reason=reason,
        )
        if handler.status is not None and result.booking_id is not None:
            await handler.status.dead_lettered(result.booking_id, delivery.attempt, delivery.source, reason)

    # -- per-booking status (labkit.status), for the booking service -----------------------

    def retry_delay_s(self, attempt: int) -> float:
        """Seconds from a failed ``attempt`` to the next one: exponential backoff (Streams overrides it)."""
        return self.settings.backoff_for(attempt)

    @property
    def status_records(self) -> StatusRecords:
        """The lab's per-booking status records of this backend (connect first)."""
        return StatusRecords(self.redis, self.names, self.name)

    def status_recorder(self, worker: str) -> StatusRecorder:
        """What a worker of this backend records its bookings' transitions with: the lab's status records."""
        return LabStatusRecorder(self.status_records, worker, self.retry_delay_s)

    @property
    def recent_bookings(self) -> RecentBookings:
        """The index of the newest bookings a producer tracked on this backend (the dashboard reads it)."""
        return RecentBookings(self.names, self.name)

    async def track_accepted(self, accepted: Sequence[Accepted]) -> None:
        """Start the status of bookings a producer just sent (``queued``, or ``delayed`` until their due time), and
        put them in the index of recent bookings, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            self.status_records.queue(pipe, ((a.booking_id, a.transition()) for a in accepted))
            self.recent_bookings.queue(pipe, accepted)
            await pipe.execute()

    async def booking_status(self, booking_id: str) -> BookingStatus | None:
        """Where ``booking_id`` is on this backend, with its history; None when this backend never saw it."""
        return summarize(await self.status_records.read(booking_id))

    @abstractmethod
    async def live_workers(self) -> list[str]:
        """The workers consuming now, in the broker's own view (each backend says how it knows)."""

    @abstractmethod
    async def write_dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Write one dead letter in this backend's format (docs/contract.md); idempotent per booking where possible."""


def connected(client: T | None) -> T:
    """``client``, or a RuntimeError saying how to connect when the backend is not connected yet."""
    if client is None:
        raise RuntimeError("backend is not connected; use `async with` or await connect()")
    return client


def dead_letter_record(booking: str | bytes, reason: str, attempts: int, source: str) -> dict[str, Any]:
    """The common shape of a dead letter as lessons show it."""
    text = booking.decode("utf-8", "replace") if isinstance(booking, bytes) else booking
    return {
        "booking_id": booking_id_of(text),
        "booking": text,
        "reason": reason,
        "attempts": attempts,
        "source": source,
    }


def json_or_text(value: str) -> Any:
    """Decode JSON if it is JSON, else return the text; for showing dead letters."""
    try:
        return json.loads(value)
    except ValueError:
        return value
