"""The Kafka backend: a keyed topic, a delayed-retry topic, a dead-letter topic and a consumer group.

Layout (docs/contract.md): the work topic ``bookings`` (3 partitions unless
``options["partitions"]`` says otherwise for a new topic), key = ``booking_id``, value =
the JSON text; ``bookings.retry`` with the same partition count; ``bookings.dlq`` with
1 partition, so that the dead letters read back in one order. Workers form the consumer
group ``booking-workers`` over the work and retry topics; how one consumes is
``labkit.backends.kafka.member``.

Delayed bookings (``produce(..., delay_ms=...)``) are the lab's pattern, not a Kafka feature: Kafka
delivers a record as soon as it is written. A delayed booking goes to ``bookings.delay`` (same
partition count, key = ``booking_id``) with a ``not_before`` header (epoch ms), and the workers wait
on it exactly as on a retry record: the partition pauses at the record until it is due, while every
other partition flows. Records of one delay partition wait in order, so a booking due soon behind one
due later waits for it (Kafka users' answer: one delay topic per delay level).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, cast

from confluent_kafka import Consumer, TopicPartition

from labkit.backends.base import BATCH_FETCH, Backend, BatchSink, dead_letter_record, wire_text
from labkit.backends.base import Message as Outgoing
from labkit.backends.kafka import quirks
from labkit.backends.kafka.admin import TopicAdmin
from labkit.backends.kafka.lag import group_lag, read_topic
from labkit.backends.kafka.member import CURRENT_KEY, INFLIGHT_TTL_S, GroupMember
from labkit.backends.kafka.producer import RecordProducer
from labkit.backends.kafka.records import Headers, Send, fetch, header_int
from labkit.backends.kafka.settings import DEFAULT_PARTITIONS, DLQ_PARTITIONS, client_config, group_consumer_config
from labkit.booking import booking_id_of
from labkit.config import Config
from labkit.errors import BackendError, ConfigError
from labkit.workflow import BookingHandler, Delivery, WorkerSettings


class KafkaBackend(Backend):
    """Kafka (Apache Kafka, or the embedded Kafka-protocol broker) doing the booking job.

    Options (``settings.options``): ``partitions`` (for topics created by ``setup``,
    default 3), ``max_poll_interval_ms`` (default 30000, at least 6000) and
    ``broker_repairs`` (``on`` or ``off``: the embedded broker's repairs, see ``quirks``).
    """

    name: ClassVar[str] = "kafka"

    def __init__(self, config: Config, settings: WorkerSettings | None = None) -> None:
        super().__init__(config, settings)
        self.admin = TopicAdmin(config.kafka_bootstrap)
        self.repairs = quirks.Repairs(config)
        self.producer = RecordProducer(config.kafka_bootstrap, self.repairs)
        self._ready = False
        self._consuming = 0

    async def close(self) -> None:
        """Flush the producer, drop the Kafka clients, then close Redis.

        A backend that never produced (the dashboard's sampler) needs no thread for it: at interpreter exit, when
        a kernel shuts down with a view open, none is to be had any more.
        """
        if self.producer.started:
            await asyncio.to_thread(self.producer.flush)
        self.admin = TopicAdmin(self.config.kafka_bootstrap)
        await super().close()

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
        existing = self.admin.topic_partitions()
        partitions = existing.get(names.topic) or int(self.settings.option("partitions", DEFAULT_PARTITIONS))
        if partitions < 1:
            raise ConfigError(f"option partitions={partitions} must be at least 1")
        wanted = {names.topic: partitions, names.topic_retry: partitions, names.topic_delay: partitions}
        wanted[names.topic_dlq] = DLQ_PARTITIONS
        self.admin.create_missing(wanted)

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
        await asyncio.to_thread(self.producer.flush)  # its metadata would describe the deleted topics
        self._ready = False
        names = self.names

        def purge() -> None:
            self.admin.delete_topics([names.topic, names.topic_retry, names.topic_delay, names.topic_dlq])
            self.admin.delete_group(names.kafka_group)

        await asyncio.to_thread(purge)

    async def renew_group(self) -> None:
        """Delete the consumer group (its members must be gone) and recreate it at the offsets it had committed.

        The embedded broker's ``departed-leader`` repair (``quirks.renew_group``), used by the
        comparison harness's backlog drain, which restarts every consumer. A no-op with the
        ``broker_repairs`` option off.
        """
        if not quirks.repairs_enabled(self.settings):
            return
        names = self.names
        topics = [names.topic, names.topic_retry, names.topic_delay]
        await asyncio.to_thread(quirks.renew_group, self.admin, names.kafka_group, topics, self.repairs)

    async def broker_repairs(self) -> dict[str, int]:
        """How often each of the embedded broker's repairs fired in this namespace (see ``quirks``)."""
        return await asyncio.to_thread(self.repairs.counts)

    # -- producing ----------------------------------------------------------------------

    async def produce(self, messages: Iterable[Outgoing], *, delay_ms: int = 0) -> list[str]:
        """Send messages (key = ``booking_id``) and wait until the broker acknowledged every one.

        With ``delay_ms`` they go to the delay topic with ``not_before`` = now + ``delay_ms`` (epoch ms).

        Raises:
            BrokerUnavailable: the broker does not answer, or did not acknowledge in time.
            BackendError: a message is larger than 1 MB (``message.max.bytes``), or a topic is missing.
        """
        await self._ensure_setup()
        batch = list(messages)
        if not batch:
            return []
        not_before = int(time.time() * 1000) + delay_ms if delay_ms else None
        # Encoding a large batch takes a while: do it in the thread too, off the event loop.
        return await asyncio.to_thread(lambda: self.producer.send([self._booking_record(m, not_before) for m in batch]))

    def _booking_record(self, message: Outgoing, not_before: int | None = None) -> Send:
        text = wire_text(message)
        value = text.encode("utf-8") if isinstance(text, str) else text
        if isinstance(message, Mapping):
            booking_id = message.get("booking_id")
            key = booking_id if isinstance(booking_id, str) else None
        else:
            key = booking_id_of(value)  # a malformed message keeps whatever usable id it has
        encoded_key = key.encode("utf-8") if key is not None else None
        if not_before is None:
            return Send(self.names.topic, encoded_key, value)
        # The first delivery, waiting like a retry record (member.py) until its time.
        headers: Headers = [("attempts", b"1"), ("not_before", str(not_before).encode())]
        return Send(self.names.topic_delay, encoded_key, value, headers)

    async def send_batch(self, bookings: Sequence[Mapping[str, Any]]) -> None:
        """Produce bookings (key = ``booking_id``) with one shared delivery callback, and flush."""
        await self._ensure_setup()
        await asyncio.to_thread(self.producer.send_bookings, self.names.topic, bookings)

    # -- consuming ----------------------------------------------------------------------

    async def consume_batches(self, sink: BatchSink, stop: asyncio.Event, consumer: str) -> None:
        """consume() up to BATCH_FETCH records in a thread, hand their values to ``sink``, store their offsets.

        Offsets are stored (one per partition, after the batch) and committed by librdkafka
        every ``auto.commit.interval.ms``, as for ``consume``; the harness reads only the work topic.
        """
        await self._ensure_setup()
        loop = asyncio.get_running_loop()
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-poll")
        member = Consumer(group_consumer_config(self.names, self.config.kafka_bootstrap, consumer))
        try:
            await loop.run_in_executor(thread, member.subscribe, [self.names.topic])
            while not stop.is_set():
                records = await loop.run_in_executor(thread, fetch, member, BATCH_FETCH)
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
        """Run one group member until ``stop``; see ``labkit.backends.kafka.member`` for the design.

        Raises:
            BrokerUnavailable: the broker does not answer at start.
            ConfigError: ``max_poll_interval_ms`` is below the session timeout, or a bad ``broker_repairs``.
        """
        quirks.repairs_enabled(self.settings)  # a bad option is one line now, not a failed task later
        await self._ensure_setup()
        # Create the producer now: it connects and gets its idempotent producer id in the background, so
        # the first retry or dead letter does not hold its partition for the ~0.5 s that takes.
        self.producer.producer  # noqa: B018
        self._consuming += 1
        try:
            await GroupMember(self, handler, stop).run()
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
        current = CURRENT_KEY.get(None)
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
        await asyncio.to_thread(self.producer.send, [Send(self.names.topic_dlq, key, value, headers)])

    async def dead_letters(self) -> list[dict[str, Any]]:
        """The DLQ topic from its first record to its high watermark; reading consumes nothing."""
        records = await asyncio.to_thread(
            read_topic,
            client_config(self.config.kafka_bootstrap),
            f"{self.names.kafka_group}.dlq-reader",
            self.names.topic_dlq,
            self.config.kafka_bootstrap,
        )
        letters = []
        for record in records:
            reason = record.headers.get("reason", b"").decode("utf-8", "replace")
            source = record.headers.get("source", b"").decode("utf-8", "replace")
            letters.append(dead_letter_record(record.value, reason, header_int(record.headers, "attempts", 0), source))
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
            group_lag,
            client_config(self.config.kafka_bootstrap),
            names.kafka_group,
            [names.topic, names.topic_retry, names.topic_delay],
            self.config.kafka_bootstrap,
        )
        reports = (await self.worker_reports()).values()
        running = sum(r["running"] for r in reports)
        prefetched = sum(r["buffered"] for r in reports)
        delayed = sum(n for where, n in lag.items() if where.startswith(f"{names.topic_delay}/"))
        return {
            "backlog": sum(lag.values()),
            "in_flight": running,
            "prefetched": prefetched,
            "delayed": delayed,
            "lag": lag,
        }

    async def live_workers(self) -> list[str]:
        """Workers whose in-flight report in Redis is fresh (each refreshes it every second; it expires 5 s
        after the worker dies): the embedded broker's describe-group answer lists no members."""
        return sorted(await self.worker_reports())

    async def worker_reports(self) -> dict[str, dict[str, Any]]:
        """Each live worker's own report (``lab:<ns>kafka:inflight:<worker>``, refreshed every second):
        ``running`` and ``buffered`` records, its ``assigned`` partitions (``topic/partition``) and
        ``reported_ago_s``, how long ago it last refreshed the report (from the key's remaining time to live).
        """
        prefix = self.ledger.key("inflight", "")
        # SCAN walks the whole keyspace, every namespace's keys: a thousand keys a call keeps it to a call or two.
        keys = [key async for key in self.redis.scan_iter(match=f"{prefix}*", count=1000)]
        if not keys:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
                pipe.pttl(key)
            answers = await pipe.execute()
        reports = {}
        for key, values, ttl_ms in zip(keys, answers[::2], answers[1::2], strict=True):
            if not values:  # expired between the scan and the read
                continue
            reports[_text(key)[len(prefix) :]] = {
                "running": int(values.get(b"running", 0)),
                "buffered": int(values.get(b"buffered", 0)),
                "assigned": json.loads(values.get(b"assigned", b"[]")),
                "reported_ago_s": max(INFLIGHT_TTL_S - max(ttl_ms, 0) / 1000, 0.0),
            }
        return reports


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = ["DEFAULT_PARTITIONS", "DLQ_PARTITIONS", "KafkaBackend"]
