"""The Kafka backend: a keyed topic, a delayed-retry topic, a dead-letter topic and a consumer group.

Layout (CONTRACT.md): the work topic ``bookings`` (3 partitions unless
``options["partitions"]`` says otherwise for a new topic), key = ``booking_id``, value =
the JSON text; ``bookings.retry`` with the same partition count; ``bookings.dlq`` with
1 partition, so that the dead letters read back in one order. Workers form the consumer
group ``booking-workers`` over the work and retry topics.

How a worker consumes (``consume``):

- One librdkafka consumer per worker. Its poll runs in a dedicated thread, one call at a
  time (confluent-kafka 2.16 serialises every call on a consumer: a call from another
  thread waits until a running poll returns). Offsets, pauses and seeks are applied
  between two polls, on the event loop, where they cost microseconds.
- Records go into one buffer per partition, and one task per partition hands them to
  the handler in offset order: per-key order is kept (a key always lands in the same
  partition) while different partitions run concurrently, at most
  ``settings.concurrency`` handler calls at once. A full buffer pauses its partition
  (backpressure) while the others keep flowing.
- At-least-once: ``enable.auto.commit`` with ``enable.auto.offset.store=false``; a
  record's offset is stored only after the handler finished with it (and after its retry
  or dead letter was written), and librdkafka commits stored offsets every
  ``auto.commit.interval.ms`` (500 ms), on rebalance and on close. A SIGKILL therefore
  redelivers what was running plus up to 500 ms of finished records: that is the
  duplicate window the idempotency lesson measures.
- ``max.poll.interval.ms`` (``options["max_poll_interval_ms"]``, default 30000): Kafka's
  liveness rule says a consumer that spends longer than this on what it polled has
  failed and must give its partitions to someone else. This worker keeps polling while
  handlers run, so librdkafka's own check would only fire if the event loop itself is
  blocked (``cpu_ms``); to keep the rule for slow handlers, the worker enforces it per
  record: when one handler has run longer than ``max.poll.interval.ms`` it leaves the
  group (event ``left_group``), its partitions are reassigned, the slow record will be
  delivered again elsewhere (a duplicate), and the worker rejoins (event ``rejoining``)
  once that handler returns. Set it above the slowest handler you expect, and at least to
  ``session.timeout.ms`` (6000).
- Retries never block a partition: a RETRY verdict is produced to the retry topic with
  headers ``attempts`` (the next attempt), ``not_before`` (epoch ms) and ``source`` (the
  original ``topic/partition/offset``), then the original offset is stored. A retry
  record read before its time pauses only its retry partition (event ``retry_wait``);
  when it is due the partition seeks back to it and resumes. Records of one retry partition wait in
  order, so a long backoff holds up shorter ones behind it (Kafka's usual answer: one
  retry topic per delay).
- Rebalances: revoked partitions finish their running record (up to
  ``max.poll.interval.ms``), store and commit its offset, and drop what was buffered.
  Events ``assigned``/``revoked`` carry the partitions, since the embedded broker's
  describe-group answer lists no members.

Client settings that matter on the embedded broker (Tansu), see EMBEDDED-KAFKA.md:
``session.timeout.ms=6000`` and ``heartbeat.interval.ms=2000`` (it holds each JoinGroup
for half the session timeout: 23 s to the first assignment with the defaults),
``fetch.wait.max.ms=100`` (p50 latency ~30 ms instead of ~200 ms), eager ``range``
assignment (cooperative-sticky takes 7-12 s per join there), and topics created up front
(it cannot add partitions, and it auto-creates unknown topics with 4 partitions).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # documented import path
from redis.exceptions import RedisError

from labkit.backends.base import BATCH_FETCH, Backend, BatchSink, dead_letter_record, wire_text
from labkit.backends.base import Message as Outgoing
from labkit.backends.kafka_lag import group_lag, read_topic
from labkit.booking import booking_id_of, encode
from labkit.config import Config
from labkit.errors import BackendError, BrokerUnavailable, ConfigError, LabkitError
from labkit.workflow import BookingHandler, Delivery, Outcome, Result, WorkerSettings

log = logging.getLogger(__name__)
#: librdkafka's own log lines (connection failures, rebalances), at DEBUG: labkit reports what matters itself.
client_log = logging.getLogger(f"{__name__}.client")


class _ClientLog:
    """librdkafka logs through this instead of stderr, demoted to DEBUG.

    A broker that is down makes librdkafka log every reconnect attempt as an error; labkit
    already says so once (BrokerUnavailable), so a notebook cell should not fill with them.
    See them with ``logging.getLogger("labkit.backends.kafka.client").setLevel(logging.DEBUG)``.
    """

    def log(self, level: int, message: str, *args: Any) -> None:
        client_log.debug(message, *args)


DEFAULT_PARTITIONS = 3
#: One partition: the dead letters read back in the order they were written, and they are few.
DLQ_PARTITIONS = 1
#: Same as Kafka's ``message.max.bytes``, enforced by the producer, since the embedded broker enforces none.
MAX_MESSAGE_BYTES = 1_000_000

_CONNECT_TIMEOUT_S = 3.0
#: A record not acknowledged within this long fails its produce() (broker gone) instead of hanging.
_MESSAGE_TIMEOUT_MS = 10_000
_SESSION_TIMEOUT_MS = 6_000
_HEARTBEAT_INTERVAL_MS = 2_000
_AUTO_COMMIT_INTERVAL_MS = 500
_FETCH_WAIT_MAX_MS = 100
_DEFAULT_MAX_POLL_INTERVAL_MS = 30_000
#: One poll waits at most this long, which bounds how late a stop or a stored offset is seen.
_POLL_WAIT_S = 0.1
_POLL_BATCH = 500
#: Records buffered per partition before it is paused, and the level at which it resumes.
_BUFFER_HIGH = 256
_BUFFER_LOW = 64
_INFLIGHT_TTL_S = 5
_INFLIGHT_REFRESH_S = 1.0
_TOPIC_WAIT_S = 15.0
#: Seconds between two looks at the group's health (missing topics, partitions without a consumer).
_GROUP_CHECK_EVERY_S = 2.0
#: A partition may stay without a consumer this long before a worker forces a rebalance: well above a normal
#: rebalance (3-6 s on the embedded broker) plus the 5 s a dead worker's report lives on in Redis.
_ORPHAN_GRACE_S = 12.0
#: ... and only a worker whose own assignment has not changed for as long: a rebalance under way revokes every
#: member's partitions within a heartbeat interval (eager protocol). Shorter (6 s) was measured to make things
#: worse while workers are killed every 6-10 s: forced rebalances then pile onto the ones the kills cause.
_SETTLED_S = _ORPHAN_GRACE_S

#: ``(key,)`` of the record being handled, so that its dead letter keeps exactly the original key (even none).
_CURRENT_KEY: contextvars.ContextVar[tuple[bytes | None] | None] = contextvars.ContextVar("kafka_record_key")
#: Delivery errors that mean the broker is gone rather than that it refused the record.
_UNREACHABLE = (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT)


def _fetch(consumer: Consumer, most: int = _POLL_BATCH) -> list[Message]:
    """Wait for the first record, then take what else is ready, up to ``most``.

    ``consume(n, timeout)`` would wait the whole timeout for ``n`` records, holding back
    records that are already there when traffic is light.
    """
    first = consumer.poll(_POLL_WAIT_S)
    if first is None:
        return []
    return [first, *consumer.consume(most - 1, 0)]


def _unavailable(bootstrap: str) -> BrokerUnavailable:
    return BrokerUnavailable(f"Kafka is not answering at {bootstrap}; start the lab with `labkit up`")


def _location(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


def _coordinates(message: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a record librdkafka delivered or fetched (never None for those)."""
    return cast(str, message.topic()), cast(int, message.partition()), cast(int, message.offset())


def _headers(message: Message) -> dict[str, bytes]:
    headers = message.headers() or []
    pairs = headers.items() if isinstance(headers, dict) else headers
    return {name: value.encode() if isinstance(value, str) else value or b"" for name, value in pairs}


def _header_int(headers: Mapping[str, bytes], name: str, default: int) -> int:
    try:
        return int(headers[name])
    except (KeyError, ValueError):
        return default


#: Record headers as the producer takes them.
Headers = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True)
class _Send:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers | None = None


class KafkaBackend(Backend):
    """Kafka (or the embedded Kafka-protocol broker) doing the booking job.

    Options (``settings.options``): ``partitions`` (for topics created by ``setup``,
    default 3) and ``max_poll_interval_ms`` (default 30000, at least 6000).
    """

    name: ClassVar[str] = "kafka"

    def __init__(self, config: Config, settings: WorkerSettings | None = None) -> None:
        super().__init__(config, settings)
        self._client: dict[str, Any] = {"bootstrap.servers": self.config.kafka_bootstrap, "logger": _ClientLog()}
        self._admin: AdminClient | None = None
        self._producer: Producer | None = None
        self._ready = False
        self._consuming = 0

    # -- clients ------------------------------------------------------------------------

    def _get_admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self._client)
        return self._admin

    def _get_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(
                {
                    **self._client,
                    "client.id": "labkit-producer",
                    "acks": "all",
                    # No duplicates or reordering when librdkafka retries a lost Produce response.
                    "enable.idempotence": True,
                    # Wait up to 5 ms to batch records: cheap latency, far fewer requests.
                    "linger.ms": 5,
                    "message.max.bytes": MAX_MESSAGE_BYTES,
                    "message.timeout.ms": _MESSAGE_TIMEOUT_MS,
                    # The Java client's partitioner: a key lands where a Java or kafka-python producer puts it.
                    "partitioner": "murmur2_random",
                    # A missing topic is an error, not a 4-partition topic made by the embedded broker.
                    "allow.auto.create.topics": False,
                }
            )
        return self._producer

    async def close(self) -> None:
        """Flush the producer, drop the Kafka clients, then close Redis."""
        producer, self._producer, self._admin = self._producer, None, None
        if producer is not None:
            await asyncio.to_thread(producer.flush, 5.0)
        await super().close()

    def _admin_result(self, future: Future[Any]) -> Any:
        """The answer to one admin request; KafkaException for a refusal, BrokerUnavailable for no answer."""
        try:
            return future.result(timeout=_CONNECT_TIMEOUT_S + 2)
        except TimeoutError:
            raise _unavailable(self.config.kafka_bootstrap) from None

    def _topic_partitions(self) -> dict[str, int]:
        """Existing topics and their partition counts (metadata for all topics: naming one would create it)."""
        try:
            metadata = self._get_admin().list_topics(timeout=_CONNECT_TIMEOUT_S)
        except KafkaException:
            raise _unavailable(self.config.kafka_bootstrap) from None
        return {name: len(topic.partitions) for name, topic in metadata.topics.items() if topic.error is None}

    # -- setup and purge ----------------------------------------------------------------

    async def setup(self) -> None:
        """Create the work, retry and dead-letter topics if missing; safe to repeat.

        Raises:
            BrokerUnavailable: the broker does not answer.
            BackendError: a topic could not be created (e.g. still being deleted after ``purge``).
        """
        await asyncio.to_thread(self._setup_blocking)
        self._ready = True

    def _setup_blocking(self) -> None:
        names = self.names
        existing = self._topic_partitions()
        partitions = existing.get(names.topic) or int(self.settings.option("partitions", DEFAULT_PARTITIONS))
        if partitions < 1:
            raise ConfigError(f"option partitions={partitions} must be at least 1")
        wanted = {names.topic: partitions, names.topic_retry: partitions, names.topic_dlq: DLQ_PARTITIONS}
        deadline = time.monotonic() + _TOPIC_WAIT_S
        while missing := [NewTopic(t, n, 1) for t, n in wanted.items() if t not in existing]:
            futures = self._get_admin().create_topics(missing, request_timeout=_CONNECT_TIMEOUT_S)
            for topic, future in futures.items():
                try:
                    self._admin_result(future)
                except KafkaException as e:
                    # Already there (a concurrent setup), or on Apache Kafka still marked for deletion: look again.
                    if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise BackendError(f"could not create Kafka topic {topic!r}: {e.args[0].str()}") from None
            existing = self._topic_partitions()
            if any(t not in existing for t in wanted):
                if time.monotonic() > deadline:
                    raise BackendError(f"Kafka topics {sorted(set(wanted) - set(existing))} did not appear; try again")
                time.sleep(0.2)
        for topic, count in wanted.items():
            if existing[topic] != count:
                log.info("topic %s already exists with %d partitions (wanted %d)", topic, existing[topic], count)

    async def _ensure_setup(self) -> None:
        """Create the topics before anything touches them: a produce to a missing topic would fail."""
        if not self._ready:
            await self.setup()

    async def purge(self) -> None:
        """Delete the three topics and the consumer group; ``reset`` then recreates the topics empty.

        Stop every worker first: deleting a topic under a live consumer crashed the Python
        process on the embedded broker, and deleting the group of a live worker
        disconnects it (Apache Kafka refuses with NON_EMPTY_GROUP).

        Raises:
            BackendError: this backend object is consuming right now, or the broker refused.
            BrokerUnavailable: the broker does not answer.
        """
        if self._consuming:
            raise BackendError("stop this backend's consume() before purging: a consumer must not outlive its topics")
        producer, self._producer = self._producer, None
        if producer is not None:
            await asyncio.to_thread(producer.flush, 5.0)  # its metadata would describe the deleted topics
        self._ready = False
        await asyncio.to_thread(self._purge_blocking)

    def _purge_blocking(self) -> None:
        names = self.names
        topics = [names.topic, names.topic_retry, names.topic_dlq]
        admin = self._get_admin()
        present = [t for t in topics if t in self._topic_partitions()]
        if present:
            for topic, future in admin.delete_topics(present, request_timeout=_CONNECT_TIMEOUT_S).items():
                try:
                    self._admin_result(future)
                except KafkaException as e:
                    if e.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                        raise BackendError(f"could not delete Kafka topic {topic!r}: {e.args[0].str()}") from None
        self._delete_group()
        # Deletion is asynchronous on Apache Kafka: wait until the topics are gone, so setup() can recreate them.
        deadline = time.monotonic() + _TOPIC_WAIT_S
        while any(t in self._topic_partitions() for t in topics):
            if time.monotonic() > deadline:
                raise BackendError(f"Kafka topics {topics} are still being deleted; try again")
            time.sleep(0.2)

    # -- producing ----------------------------------------------------------------------

    def _delete_group(self) -> None:
        group = self.names.kafka_group
        for future in self._get_admin().delete_consumer_groups([group], request_timeout=_CONNECT_TIMEOUT_S).values():
            try:
                self._admin_result(future)
            except KafkaException as e:
                code = e.args[0].code()
                if code == KafkaError.NON_EMPTY_GROUP:
                    raise BackendError(f"consumer group {group!r} has live workers; stop them first") from None
                if code != KafkaError.GROUP_ID_NOT_FOUND:
                    raise BackendError(f"could not delete consumer group {group!r}: {e.args[0].str()}") from None

    async def renew_group(self) -> None:
        """Delete the consumer group (its members must be gone) and recreate it at the offsets it had committed.

        Where the group stood is kept, so on Apache Kafka this changes nothing. On the embedded
        broker it clears what all members leaving at once leave behind: the group keeps its
        departed leader, and members joining later can wait a minute or more for partitions
        (docs/embedded-kafka.md). The comparison harness's backlog drain restarts every consumer.
        """
        await asyncio.to_thread(self._renew_group_blocking)

    def _renew_group_blocking(self) -> None:
        names = self.names
        counts = self._topic_partitions()
        partitions = [TopicPartition(t, p) for t in (names.topic, names.topic_retry) for p in range(counts.get(t, 0))]
        # Neither consumer subscribes: they only read and write the group's committed offsets.
        settings = {**self._client, "group.id": names.kafka_group, "enable.auto.commit": False}
        reader = Consumer(settings)
        try:
            committed = [tp for tp in reader.committed(partitions, timeout=_CONNECT_TIMEOUT_S) if tp.offset >= 0]
        finally:
            reader.close()
        self._delete_group()
        if committed:
            writer = Consumer(settings)
            try:
                writer.commit(offsets=committed, asynchronous=False)
            finally:
                writer.close()

    async def produce(self, messages: Iterable[Outgoing]) -> list[str]:
        """Send messages (key = ``booking_id``) and wait until the broker acknowledged every one.

        Raises:
            BrokerUnavailable: the broker does not answer, or did not acknowledge in time.
            BackendError: a message is larger than 1 MB (``message.max.bytes``), or a topic is missing.
        """
        await self._ensure_setup()
        batch = list(messages)
        if not batch:
            return []
        # Encoding a large batch takes a while: do it in the thread too, off the event loop.
        return await asyncio.to_thread(lambda: self._send([self._booking_record(m) for m in batch]))

    def _booking_record(self, message: Outgoing) -> _Send:
        text = wire_text(message)
        value = text.encode("utf-8") if isinstance(text, str) else text
        if isinstance(message, Mapping):
            booking_id = message.get("booking_id")
            key = booking_id if isinstance(booking_id, str) else None
        else:
            key = booking_id_of(value)  # a malformed message keeps whatever usable id it has
        return _Send(self.names.topic, key.encode("utf-8") if key is not None else None, value)

    def _send(self, records: list[_Send]) -> list[str]:
        """Produce ``records`` and block until each has its delivery report; returns their locations."""
        for i, record in enumerate(records):
            if len(record.value) > MAX_MESSAGE_BYTES:
                raise BackendError(
                    f"message {i} is {len(record.value)} bytes; Kafka accepts at most {MAX_MESSAGE_BYTES} "
                    "(message.max.bytes), nothing was sent"
                )
        producer = self._get_producer()
        locations: list[str | None] = [None] * len(records)
        errors: list[KafkaError] = []
        reported: list[int] = []

        def reporter(index: int) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(error: KafkaError | None, message: Message) -> None:
                if error is not None:
                    errors.append(error)
                else:
                    locations[index] = _location(*_coordinates(message))
                reported.append(index)

            return on_delivery

        for i, record in enumerate(records):
            while True:
                try:
                    producer.produce(
                        record.topic, record.value, record.key, headers=record.headers, on_delivery=reporter(i)
                    )
                    break
                except BufferError:
                    producer.poll(0.05)  # local queue full: serve delivery reports to make room
                except KafkaException as e:
                    raise BackendError(f"Kafka refused message {i}: {e.args[0].str()}") from None
        # Delivery reports may be served by another thread's flush(); wait for all of ours, bounded.
        deadline = time.monotonic() + _MESSAGE_TIMEOUT_MS / 1000 + 5
        while len(reported) < len(records) and time.monotonic() < deadline:
            try:
                if producer.flush(0.5) == 0 and len(reported) < len(records):
                    time.sleep(0.001)
            except KafkaException as e:
                self._drop_failed_producer(producer, e.args[0])
        if errors and any(error.fatal() for error in errors):
            self._drop_failed_producer(producer, next(error for error in errors if error.fatal()))
        if len(reported) < len(records):
            raise _unavailable(self.config.kafka_bootstrap)
        if errors:
            code = errors[0].code()
            if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                raise BackendError(
                    f"Kafka topic {records[0].topic!r} does not exist; run `labkit reset --backend kafka`"
                )
            if code in _UNREACHABLE:
                raise _unavailable(self.config.kafka_bootstrap)
            raise BackendError(f"Kafka refused {len(errors)} of {len(records)} messages: {errors[0].str()}")
        return [location or "" for location in locations]

    async def send_batch(self, bookings: Sequence[Mapping[str, Any]]) -> None:
        """Produce bookings (key = ``booking_id``) with one shared delivery callback, and flush.

        ``produce`` builds a callback per record to report where it landed; the harness needs
        only to know that every record was acknowledged (acks=all), which this does for far less.
        """
        await self._ensure_setup()
        await asyncio.to_thread(self._send_batch, bookings)

    def _send_batch(self, bookings: Sequence[Mapping[str, Any]]) -> None:
        producer = self._get_producer()
        errors: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _: Message) -> None:
            if error is not None:
                errors.append(error)

        topic = self.names.topic
        for booking in bookings:
            value, key = encode(booking).encode("utf-8"), str(booking["booking_id"]).encode("utf-8")
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)  # local queue full: serve delivery reports to make room
        if producer.flush(_MESSAGE_TIMEOUT_MS / 1000 + 5) > 0 or any(e.code() in _UNREACHABLE for e in errors):
            raise _unavailable(self.config.kafka_bootstrap)
        if errors:
            raise BackendError(f"Kafka refused {len(errors)} of {len(bookings)} messages: {errors[0].str()}")

    def _drop_failed_producer(self, producer: Producer, error: KafkaError) -> NoReturn:
        """Forget a producer that failed for good, so that the next send builds a fresh one; then raise.

        An idempotent producer whose broker lost its state (the memory-only embedded broker after a
        restart) fails with a fatal UNKNOWN_PRODUCER_ID; librdkafka's rule is that such an instance can
        only be destroyed. The caller sends the batch again (some records may then arrive twice).
        """
        if self._producer is producer:
            self._producer = None
        log.warning("Kafka producer failed for good (%s); the next send starts a new one", error.str())
        raise BrokerUnavailable(f"the Kafka producer failed ({error.str()}); send again") from None

    # -- consuming ----------------------------------------------------------------------

    def group_consumer_config(self, client_id: str, max_poll_ms: int = _DEFAULT_MAX_POLL_INTERVAL_MS) -> dict[str, Any]:
        """The settings of every group member the lab runs: workers and the comparison harness alike."""
        return {
            **self._client,
            "client.id": client_id,
            "group.id": self.names.kafka_group,
            # At-least-once: librdkafka commits only offsets we stored, after the handler finished.
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": _AUTO_COMMIT_INTERVAL_MS,
            # Work sent before any worker started is processed (CONTRACT.md).
            "auto.offset.reset": "earliest",
            "session.timeout.ms": _SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": _HEARTBEAT_INTERVAL_MS,
            "max.poll.interval.ms": max_poll_ms,
            "fetch.wait.max.ms": _FETCH_WAIT_MAX_MS,
            "partition.assignment.strategy": "range",
        }

    async def consume_batches(self, sink: BatchSink, stop: asyncio.Event, consumer: str) -> None:
        """consume() up to BATCH_FETCH records in a thread, hand their values to ``sink``, store their offsets.

        Offsets are stored (one per partition, after the batch) and committed by librdkafka
        every ``auto.commit.interval.ms``, as for ``consume``; the harness reads only the work topic.
        """
        await self._ensure_setup()
        loop = asyncio.get_running_loop()
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-poll")
        member = Consumer(self.group_consumer_config(consumer))
        try:
            await loop.run_in_executor(thread, member.subscribe, [self.names.topic])
            while not stop.is_set():
                records = await loop.run_in_executor(thread, _fetch, member, BATCH_FETCH)
                fetched = [record for record in records if record.error() is None]
                if not fetched:
                    continue
                await sink([record.value() for record in fetched])
                # A partition's records come in offset order: the last one of each is where to resume.
                last = {cast(int, record.partition()): cast(int, record.offset()) for record in fetched}
                member.store_offsets(offsets=[TopicPartition(self.names.topic, p, o + 1) for p, o in last.items()])
        finally:
            await loop.run_in_executor(thread, member.close)  # commits the stored offsets, leaves the group
            thread.shutdown(wait=False)

    async def consume(self, handler: BookingHandler, stop: asyncio.Event) -> None:
        """Run one group member until ``stop``; see the module docstring for the design.

        Raises:
            BrokerUnavailable: the broker does not answer at start.
            ConfigError: ``max_poll_interval_ms`` is below the session timeout.
        """
        await self._ensure_setup()
        # Create the producer now: it connects and gets its idempotent producer id in the background, so
        # the first retry or dead letter does not hold its partition for the ~0.5 s that takes.
        self._get_producer()
        self._consuming += 1
        try:
            await _GroupMember(self, handler, stop).run()
        finally:
            self._consuming -= 1

    # -- dead letters -------------------------------------------------------------------

    async def write_dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Produce to the DLQ topic: original key and value, headers ``reason``, ``attempts``, ``source``.

        Not idempotent: a worker killed between this write and storing the record's
        offset writes the dead letter again on redelivery (the ledger counts distinct ones).
        """
        payload = delivery.payload
        value = payload.encode("utf-8") if isinstance(payload, str) else payload
        current = _CURRENT_KEY.get(None)
        if current is not None:
            key = current[0]
        else:  # not called while handling a record: key it by booking_id, as produce() does
            booking_id = booking_id_of(value)
            key = booking_id.encode("utf-8") if booking_id else None
        headers: Headers = [
            ("reason", reason.encode("utf-8")),
            ("attempts", str(delivery.attempt).encode()),
            ("source", delivery.source.encode("utf-8")),
        ]
        await self._ensure_setup()
        await asyncio.to_thread(self._send, [_Send(self.names.topic_dlq, key, value, headers)])

    async def dead_letters(self) -> list[dict[str, Any]]:
        """The DLQ topic from its first record to its high watermark; reading consumes nothing."""
        records = await asyncio.to_thread(
            read_topic,
            self._client,
            f"{self.names.kafka_group}.dlq-reader",
            self.names.topic_dlq,
            self.config.kafka_bootstrap,
        )
        letters = []
        for record in records:
            reason = record.headers.get("reason", b"").decode("utf-8", "replace")
            source = record.headers.get("source", b"").decode("utf-8", "replace")
            letters.append(dead_letter_record(record.value, reason, _header_int(record.headers, "attempts", 0), source))
        return letters

    # -- the broker's view --------------------------------------------------------------

    async def queue_depths(self) -> dict[str, Any]:
        """``backlog``: the group's lag over the work and retry topics; ``in_flight``: records being handled.

        ``lag`` maps ``topic/partition`` to records after the group's committed offset,
        with the end taken from a Fetch response (ListOffsets(latest) is wrong on the
        embedded broker). Lag counts everything not committed, so on Kafka ``backlog``
        includes the records in flight and those finished in the last auto-commit
        interval (500 ms). The broker cannot see what a worker holds, so each worker
        reports it in Redis every second (key expires 5 s after a worker dies):
        ``in_flight`` = records handed to a handler and not finished, ``prefetched`` =
        records fetched into a worker's partition buffers, waiting for their turn.
        """
        names = self.names
        lag = await asyncio.to_thread(
            group_lag, self._client, names.kafka_group, [names.topic, names.topic_retry], self.config.kafka_bootstrap
        )
        running = prefetched = 0
        async for key in self.redis.scan_iter(match=self.ledger.key("inflight", "*"), count=100):
            counts = await self.redis.hgetall(key)
            running += int(counts.get(b"running", 0))
            prefetched += int(counts.get(b"buffered", 0))
        return {"backlog": sum(lag.values()), "in_flight": running, "prefetched": prefetched, "lag": lag}


@dataclass(frozen=True)
class _Record:
    """A fetched record with what the worker needs to know about it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    #: The delivery attempt: 1 on the work topic, the ``attempts`` header on the retry topic.
    attempt: int
    #: The original work-topic record, carried through retries in the ``source`` header.
    source: str

    @property
    def where(self) -> str:
        return _location(self.topic, self.partition, self.offset)


@dataclass(eq=False)
class _Partition:
    """One assigned partition inside a worker: its buffer, its in-order task and its pause reasons."""

    topic: str
    partition: int
    pending: deque[_Record] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    #: Monotonic start of the record being handled, None when idle.
    started: float | None = None
    #: The running record was given up (max.poll.interval.ms exceeded): its offset must not be stored.
    abandoned: bool = False
    revoked: bool = False
    #: Why it is paused: "full" (buffer) and/or "wait" (a retry record not yet due).
    paused_for: set[str] = field(default_factory=set)
    #: The offset the next dispatched record must have; older ones are refetches after a seek.
    next_offset: int | None = None
    #: Offset to store (last finished + 1), not yet handed to librdkafka.
    done_offset: int | None = None
    wait_timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def name(self) -> str:
        return f"{self.topic}/{self.partition}"


class _GroupMember:
    """One consume() call: a librdkafka group consumer plus its per-partition tasks.

    Every call on the consumer happens either in ``self._thread`` (poll, subscribe,
    commit, close: the calls that may run rebalance callbacks) or on the event loop while
    no poll is running (store_offsets, pause, resume, seek). Rebalance callbacks run in
    the poll thread and hand the bookkeeping to the event loop, which is free meanwhile.
    """

    def __init__(self, backend: KafkaBackend, handler: BookingHandler, stop: asyncio.Event) -> None:
        self.backend = backend
        self.handler = handler
        self.events = handler.events
        self.stop = stop
        self.names = backend.names
        settings = backend.settings
        max_poll_ms = int(settings.option("max_poll_interval_ms", _DEFAULT_MAX_POLL_INTERVAL_MS))
        if max_poll_ms < _SESSION_TIMEOUT_MS:
            raise ConfigError(
                f"max_poll_interval_ms={max_poll_ms} is too small; use at least {_SESSION_TIMEOUT_MS} "
                "(the session timeout) and more than the slowest booking takes"
            )
        self.max_poll_s = max_poll_ms / 1000
        #: Bound on a rebalance callback waiting for the event loop, so a dead loop cannot hang the poll thread.
        self.callback_timeout_s = self.max_poll_s + 10
        self.topics = [self.names.topic, self.names.topic_retry]
        self.slots = asyncio.Semaphore(settings.concurrency)
        self.parts: dict[tuple[str, int], _Partition] = {}
        #: Tasks still running a record of a partition given up after max.poll.interval.ms.
        self.orphans: set[asyncio.Task[None]] = set()
        #: pause/resume/seek calls queued for the next gap between polls, with the partition they are for.
        self.ops: list[tuple[_Partition, Callable[[Consumer], None]]] = []
        self.left_group = False
        #: Monotonic time of this worker's last assign or revoke: a group in the middle of a rebalance is not stuck.
        self.assignment_changed = time.monotonic()
        self.failure: BaseException | None = None
        self.loop = asyncio.get_running_loop()
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-poll")
        self.consumer = Consumer(
            {**backend.group_consumer_config(self.events.worker_id, max_poll_ms), "error_cb": self._on_client_error}
        )

    # -- the poll loop ------------------------------------------------------------------

    async def run(self) -> None:
        reporter = asyncio.create_task(self._report_in_flight())
        watcher = asyncio.create_task(self._watch_group())
        try:
            await self._in_thread(self._subscribe)
            while not self.stop.is_set() and self.failure is None:
                await self._enforce_max_poll()
                self._apply_ops()
                self._dispatch(await self._in_thread(self._poll))
        finally:
            watcher.cancel()  # before the shutdown: it must not resubscribe a closing consumer
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            try:
                await self._shutdown()
            finally:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
                with contextlib.suppress(RedisError, OSError):
                    await self.backend.redis.delete(self.backend.ledger.key("inflight", self.events.worker_id))
        if self.failure is not None:
            raise self.failure

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.loop.run_in_executor(self.thread, fn, *args)

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def _poll(self) -> list[Message]:
        return _fetch(self.consumer)

    def _apply_ops(self) -> None:
        """Hand finished offsets and queued pause/resume/seek calls to librdkafka (no poll is running)."""
        offsets = []
        for part in self.parts.values():
            if part.done_offset is not None:
                offsets.append(TopicPartition(part.topic, part.partition, part.done_offset))
                part.done_offset = None
        if offsets:
            try:
                self.consumer.store_offsets(offsets=offsets)
            except KafkaException as e:  # the partition left us in a rebalance: its next owner redoes it
                log.debug("store_offsets: %s", e)
        ops, self.ops = self.ops, []
        for part, op in ops:
            if part.revoked:
                continue  # revoked by the last poll's rebalance: librdkafka refuses calls on it
            try:
                op(self.consumer)
            except KafkaException as e:
                log.debug("pause/resume/seek on %s: %s", part.name, e)

    def _dispatch(self, messages: list[Message]) -> None:
        """Route fetched records to their partition buffers, holding back retries that are not due."""
        now_ms = time.time() * 1000
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_poll_error(error)
                continue
            topic, partition, offset = _coordinates(message)
            part = self.parts.get((topic, partition))
            if part is None or part.revoked or "wait" in part.paused_for:
                continue  # fetched before a rebalance or a seek back: not ours to handle now
            if part.next_offset is not None and offset < part.next_offset:
                continue  # fetched again after a seek: already buffered
            if part.topic == self.names.topic_retry:
                headers = _headers(message)
                not_before = _header_int(headers, "not_before", 0)
                if not_before > now_ms:
                    self._wait_for_retry(part, offset, (not_before - now_ms) / 1000)
                    continue
                attempt = _header_int(headers, "attempts", 2)
                source = headers.get("source", b"").decode("utf-8", "replace") or _location(topic, partition, offset)
            else:
                attempt, source = 1, _location(topic, partition, offset)
            key = message.key()
            record = _Record(topic, partition, offset, key, message.value() or b"", attempt, source)
            part.next_offset = offset + 1
            part.pending.append(record)
            part.wakeup.set()
            self.events.emit(
                "received",
                booking_id=key.decode("utf-8", "replace") if key else None,
                attempt=record.attempt,
                source=record.source,
                record=record.where,
            )
            if len(part.pending) >= _BUFFER_HIGH and "full" not in part.paused_for:
                self._pause(part, "full")

    def _pause(self, part: _Partition, reason: str) -> None:
        if not part.paused_for:
            tp = part.tp
            self.ops.append((part, lambda c: c.pause([tp])))
        part.paused_for.add(reason)

    def _unpause(self, part: _Partition, reason: str) -> None:
        part.paused_for.discard(reason)
        if part.paused_for or part.revoked:
            return
        # Resume where this worker stopped taking records; librdkafka dropped its prefetch on pause.
        if part.next_offset is not None:
            seek_to = TopicPartition(part.topic, part.partition, part.next_offset)
            self.ops.append((part, lambda c: c.seek(seek_to)))
        tp = part.tp
        self.ops.append((part, lambda c: c.resume([tp])))

    def _wait_for_retry(self, part: _Partition, offset: int, delay_s: float) -> None:
        """Pause this retry partition at ``offset`` until it is due; the other partitions keep flowing."""
        self._pause(part, "wait")
        part.next_offset = offset  # refetched from here on resume
        part.wait_timer = self.loop.call_later(delay_s, self._unpause, part, "wait")
        self.events.emit("retry_wait", partition=part.name, offset=offset, wait_s=round(delay_s, 3))

    def _on_poll_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._MAX_POLL_EXCEEDED:
            # The event loop did not poll in time (a CPU-bound handler?): librdkafka left the group and rejoins.
            log.warning("%s: %s", self.events.worker_id, error.str())
            self.events.emit("left_group", reason=error.str())
        elif error.fatal():
            self.failure = BackendError(f"Kafka consumer failed: {error.str()}")
        else:
            log.warning("%s: Kafka consumer error: %s", self.events.worker_id, error.str())

    def _on_client_error(self, error: KafkaError) -> None:
        """librdkafka's client-level errors (broker down, reconnecting); runs in the poll thread."""
        log.warning("Kafka client error: %s", error.str())

    async def _enforce_max_poll(self) -> None:
        """Kafka's liveness rule per record: leave the group while a handler runs past max.poll.interval.ms."""
        now = time.monotonic()
        if not self.left_group:
            late = [p for p in self.parts.values() if p.started is not None and now - p.started > self.max_poll_s]
            if not late:
                return
            for part in late:
                part.abandoned = True
                if part.task is not None:
                    self.orphans.add(part.task)  # rejoin only once it returns, whenever the revoke is served
            names = ", ".join(p.name for p in late)
            reason = f"a handler on {names} ran longer than max.poll.interval.ms={self.max_poll_s * 1000:.0f}"
            log.warning("%s: %s; leaving the consumer group", self.events.worker_id, reason)
            self.events.emit("left_group", reason=reason, partitions=[p.name for p in late])
            self.left_group = True
            await self._in_thread(self.consumer.unsubscribe)
        elif not any(not task.done() for task in self.orphans):
            self.orphans.clear()
            self.left_group = False
            self.events.emit("rejoining")
            await self._in_thread(self._subscribe)

    # -- the group watch ----------------------------------------------------------------

    async def _watch_group(self) -> None:
        """Repair what the consumer group does not repair by itself: missing topics, partitions nobody consumes.

        Two faults seen on the embedded broker, and possible (rarer) on Apache Kafka:

        - The topics are gone (a memory-only broker restarted): the group rejoins with an empty
          assignment, and librdkafka does not rebalance when the topics come back (it cannot tell a
          recreated topic from the old one). The watch recreates them (``setup``), and the next rule
          rebalances the group onto them.
        - A partition has no consumer, while the group is settled: the embedded broker can complete a
          rebalance with a partition assigned to a member that died during it, and no later rebalance
          follows. When no live worker reports a partition for ``_ORPHAN_GRACE_S`` and this worker's
          own assignment has not changed for ``_SETTLED_S`` (so no rebalance is under way), one worker
          (a Redis token) leaves and rejoins the group, which makes the group rebalance.

        On Apache Kafka a dead member's session expiry always rebalances, so the second rule only
        fires in a group that is stuck; it costs one extra rebalance. Workers report their assignment
        with their in-flight counts, so a group member that does not (another program) makes the
        watch stand aside.
        """
        unowned_since: float | None = None
        while True:
            await asyncio.sleep(_GROUP_CHECK_EVERY_S)
            if self.left_group:
                unowned_since = None
                continue
            try:
                unowned = await self._unowned_partitions()
            except (LabkitError, RedisError, OSError) as e:  # broker or Redis briefly away: look again later
                log.debug("%s: group check skipped: %s", self.events.worker_id, e)
                continue
            now = time.monotonic()
            if not unowned:
                unowned_since = None
                continue
            unowned_since = unowned_since or now
            if now - unowned_since < _ORPHAN_GRACE_S or now - self.assignment_changed < _SETTLED_S:
                continue
            token = self.backend.ledger.key("rebalance-token", self.names.kafka_group)
            # One worker at a time: on the embedded broker, a group leader that leaves while another member's
            # leave is still being served leaves the group without a leader for good (see docs/drills.md).
            if not await self.backend.redis.set(token, self.events.worker_id, nx=True, ex=int(_ORPHAN_GRACE_S)):
                continue
            unowned_since = None
            await self._rejoin(f"partitions without a consumer: {', '.join(sorted(unowned))}")

    async def _unowned_partitions(self) -> set[str]:
        """Partitions of the work and retry topics that no live worker reports as assigned; recreate missing topics."""
        counts = await asyncio.to_thread(self.backend._topic_partitions)
        if any(topic not in counts for topic in self.topics):
            log.warning("%s: topics %s are gone (broker restarted?); creating them again", self.events.worker_id,
                        [t for t in self.topics if t not in counts])  # fmt: skip
            await self.backend.setup()
            self.events.emit("topics_recreated", topics=[t for t in self.topics if t not in counts])
            counts = await asyncio.to_thread(self.backend._topic_partitions)
        expected = {f"{topic}/{p}" for topic in self.topics for p in range(counts.get(topic, 0))}
        redis = self.backend.redis
        owned: set[str] = set()
        async for key in redis.scan_iter(match=self.backend.ledger.key("inflight", "*"), count=100):
            assigned = await redis.hget(key, "assigned")
            if assigned is None:
                return set()  # a member that does not report its assignment: the watch cannot judge
            owned.update(json.loads(assigned))
        return expected - owned

    async def _rejoin(self, reason: str) -> None:
        """Leave the group and join it again as a new member: the coordinator must then rebalance.

        Subscribing again without leaving is not enough: a member that rejoins with unchanged metadata
        gets its old assignment back, without a rebalance, on Kafka and on the embedded broker alike.
        """
        log.warning("%s: %s; leaving and rejoining the consumer group", self.events.worker_id, reason)
        self.events.emit("rejoining", reason=reason)
        await self._in_thread(self.consumer.unsubscribe)
        # Let the poll loop serve the revoke, so that librdkafka sends LeaveGroup before the new JoinGroup.
        deadline = time.monotonic() + 5
        while self.parts and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        await self._in_thread(self._subscribe)

    # -- rebalance callbacks: run in the poll thread ------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(partitions)
        # A partition paused before a rebalance stays paused when it comes back: start it clean.
        consumer.resume(partitions)
        asyncio.run_coroutine_threadsafe(self._assigned(partitions), self.loop).result(self.callback_timeout_s)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        future = asyncio.run_coroutine_threadsafe(self._release(partitions, lost=False), self.loop)
        offsets = future.result(self.callback_timeout_s)
        if offsets:
            try:
                consumer.store_offsets(offsets=offsets)
                # Commit now: the next owner starts right after what this worker finished.
                consumer.commit(asynchronous=False)
            except KafkaException as e:
                if e.args[0].code() != KafkaError._NO_OFFSET:
                    log.warning("%s: commit on revoke failed: %s", self.events.worker_id, e.args[0].str())

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a clean handover (this member was thrown out): nothing can be committed."""
        future = asyncio.run_coroutine_threadsafe(self._release(partitions, lost=True), self.loop)
        future.result(self.callback_timeout_s)

    # -- bookkeeping on the event loop --------------------------------------------------

    async def _assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            part = _Partition(tp.topic, tp.partition)
            part.task = asyncio.create_task(self._work(part), name=f"kafka {part.name}")
            part.task.add_done_callback(self._task_done)
            self.parts[(tp.topic, tp.partition)] = part
        self.assignment_changed = time.monotonic()
        self.events.emit("assigned", partitions=[f"{tp.topic}/{tp.partition}" for tp in partitions])

    async def _release(self, partitions: list[TopicPartition], lost: bool) -> list[TopicPartition]:
        """Drop revoked partitions: finish their running records and return the offsets to commit."""
        parts = [p for tp in partitions if (p := self.parts.pop((tp.topic, tp.partition), None)) is not None]
        self.assignment_changed = time.monotonic()
        for part in parts:
            part.revoked = True
            part.pending.clear()
            if part.wait_timer is not None:
                part.wait_timer.cancel()
        finishing = [asyncio.create_task(p.idle.wait()) for p in parts if p.started is not None and not p.abandoned]
        if finishing:
            _, late = await asyncio.wait(finishing, timeout=self.max_poll_s)
            for waiter in late:
                waiter.cancel()
        for part in parts:
            assert part.task is not None
            if part.started is not None:
                # Still running after max.poll.interval.ms: given up, its offset is not stored, and it
                # must end before this worker rejoins or stops. Handlers are never cancelled.
                part.abandoned = True
                self.orphans.add(part.task)
            else:
                part.task.cancel()
        self.events.emit("revoked", partitions=[f"{tp.topic}/{tp.partition}" for tp in partitions], lost=lost)
        return [TopicPartition(p.topic, p.partition, p.done_offset) for p in parts if p.done_offset is not None]

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()

    async def _work(self, part: _Partition) -> None:
        """Hand this partition's records to the handler one at a time, in offset order."""
        while not part.revoked:
            if not part.pending:
                part.wakeup.clear()
                await part.wakeup.wait()
                continue
            record = part.pending.popleft()
            if "full" in part.paused_for and len(part.pending) <= _BUFFER_LOW:
                self._unpause(part, "full")
            # Waiting for a free slot is not handling: the max.poll.interval.ms clock starts inside.
            async with self.slots:
                part.started = time.monotonic()
                part.idle.clear()
                try:
                    await self._process(record)
                    if not part.abandoned:
                        part.done_offset = record.offset + 1  # store offset after processing: at-least-once
                finally:
                    part.started = None
                    part.idle.set()

    async def _process(self, record: _Record) -> None:
        """Run the handler, then act on its verdict: nothing, a retry record, or a dead letter."""
        delivery = Delivery(payload=record.value, attempt=record.attempt, source=record.source)
        result = await self.handler(delivery)
        _CURRENT_KEY.set((record.key,))
        if result.outcome is Outcome.RETRY:
            await self._retry(record, delivery, result)
        elif result.outcome is Outcome.DEAD:
            await self.backend.dead_letter(self.handler, delivery, result)

    async def _retry(self, record: _Record, delivery: Delivery, result: Result) -> None:
        """Park the record in the retry topic with its due time; the original offset is stored afterwards."""
        delay = self.backend.settings.backoff_for(delivery.attempt)
        not_before = int((time.time() + delay) * 1000)
        headers: Headers = [
            ("attempts", str(delivery.attempt + 1).encode()),
            ("not_before", str(not_before).encode()),
            ("source", delivery.source.encode("utf-8")),
        ]
        send = _Send(self.names.topic_retry, record.key, record.value, headers)
        [where] = await asyncio.to_thread(self.backend._send, [send])
        self.events.emit(
            "retried",
            booking_id=result.booking_id,
            attempt=delivery.attempt,
            next_attempt=delivery.attempt + 1,
            delay_s=delay,
            source=delivery.source,
            record=where,
            reason=result.reason,
        )

    async def _report_in_flight(self) -> None:
        """Publish this worker's in-flight counts in Redis: the broker cannot see them."""
        redis = self.backend.redis
        key = self.backend.ledger.key("inflight", self.events.worker_id)
        while True:
            running = sum(1 for p in self.parts.values() if p.started is not None)
            running += sum(1 for task in self.orphans if not task.done())
            buffered = sum(len(p.pending) for p in self.parts.values())
            try:
                async with redis.pipeline(transaction=True) as pipe:
                    # The assignment too: the group watch of every worker compares the union with the topics.
                    assigned = json.dumps(sorted(p.name for p in self.parts.values()))
                    pipe.hset(key, mapping={"running": running, "buffered": buffered, "assigned": assigned})
                    pipe.expire(key, _INFLIGHT_TTL_S)
                    await pipe.execute()
            except (RedisError, OSError) as e:
                log.warning("could not report in-flight counts to Redis: %s", e)
            await asyncio.sleep(_INFLIGHT_REFRESH_S)

    # -- stopping -----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Finish running records, commit their offsets, then leave the group."""
        try:
            for part in self.parts.values():
                part.pending.clear()  # not started: the next owner gets them
            # A failed task already set self.failure; run() raises it once the consumer is closed.
            await asyncio.gather(*(p.idle.wait() for p in self.parts.values()), *self.orphans, return_exceptions=True)
            self._apply_ops()
            await self._in_thread(self._commit)
            # close() revokes the partitions (callbacks run), commits and sends LeaveGroup.
            await self._in_thread(self.consumer.close)
        finally:
            for part in self.parts.values():
                if part.task is not None:
                    part.task.cancel()
            self.thread.shutdown(wait=False)

    def _commit(self) -> None:
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("%s: final commit failed: %s", self.events.worker_id, e.args[0].str())


__all__ = ["DEFAULT_PARTITIONS", "DLQ_PARTITIONS", "MAX_MESSAGE_BYTES", "KafkaBackend"]
