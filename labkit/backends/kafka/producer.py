"""The lab's Kafka producer: send records and block until the broker acknowledged each one (acks=all).

Blocking calls, run in a thread by the backend. One librdkafka producer per backend object, made
on first use and replaced if it fails for good (the ``producer-fenced`` repair, see ``quirks``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from labkit.backends.kafka.quirks import Repairs
from labkit.backends.kafka.records import Send, coordinates, location
from labkit.backends.kafka.settings import MAX_MESSAGE_BYTES, MESSAGE_TIMEOUT_MS, producer_config, unavailable
from labkit.booking import encode_plain
from labkit.errors import BackendError, BrokerUnavailable

log = logging.getLogger(__name__)

#: Delivery errors that mean the broker is gone rather than that it refused the record.
UNREACHABLE = (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT)


class RecordProducer:
    """Produces records to one broker and reports where each landed."""

    def __init__(self, bootstrap: str, repairs: Repairs) -> None:
        self.bootstrap = bootstrap
        self.repairs = repairs
        self._producer: Producer | None = None

    @property
    def producer(self) -> Producer:
        """The librdkafka producer; making it starts its connection and idempotent producer id in the background."""
        if self._producer is None:
            self._producer = Producer(producer_config(self.bootstrap))
        return self._producer

    @property
    def started(self) -> bool:
        """A librdkafka producer exists (something was sent, or is about to be): there is something to flush."""
        return self._producer is not None

    def flush(self, timeout: float = 5.0) -> None:
        """Wait for what is in flight, then forget the producer (the next send makes a new one)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(timeout)

    def send(self, records: list[Send]) -> list[str]:
        """Produce ``records`` and block until each has its delivery report; returns their locations.

        Raises:
            BrokerUnavailable: the broker does not answer, or did not acknowledge in time.
            BackendError: a record is larger than ``message.max.bytes`` (nothing is sent), a topic is missing,
                or the broker refused records.
        """
        for i, record in enumerate(records):
            if len(record.value) > MAX_MESSAGE_BYTES:
                raise BackendError(
                    f"message {i} is {len(record.value)} bytes; Kafka accepts at most {MAX_MESSAGE_BYTES} "
                    "(message.max.bytes), nothing was sent"
                )
        producer = self.producer
        locations: list[str | None] = [None] * len(records)
        errors: list[KafkaError] = []
        reported: list[int] = []

        def reporter(index: int) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(error: KafkaError | None, message: Message) -> None:
                if error is not None:
                    errors.append(error)
                else:
                    locations[index] = location(*coordinates(message))
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
        deadline = time.monotonic() + MESSAGE_TIMEOUT_MS / 1000 + 5
        while len(reported) < len(records) and time.monotonic() < deadline:
            try:
                if producer.flush(0.5) == 0 and len(reported) < len(records):
                    time.sleep(0.001)
            except KafkaException as e:
                self._drop_failed(producer, e.args[0])
        if errors and any(error.fatal() for error in errors):
            self._drop_failed(producer, next(error for error in errors if error.fatal()))
        if len(reported) < len(records):
            raise unavailable(self.bootstrap)
        if errors:
            code = errors[0].code()
            if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                raise BackendError(
                    f"Kafka topic {records[0].topic!r} does not exist; run `labkit reset --backend kafka`"
                )
            if code in UNREACHABLE:
                raise unavailable(self.bootstrap)
            raise BackendError(f"Kafka refused {len(errors)} of {len(records)} messages: {errors[0].str()}")
        return [where or "" for where in locations]

    def send_bookings(self, topic: str, bookings: Sequence[Mapping[str, Any]]) -> None:
        """Produce bookings (key = ``booking_id``) with one shared delivery callback, and flush.

        :meth:`send` builds a callback per record to report where it landed; the comparison
        harness needs only to know that every record was acknowledged, which this does for far less.
        """
        producer = self.producer
        errors: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _: Message) -> None:
            if error is not None:
                errors.append(error)

        for booking in bookings:
            value, key = encode_plain(booking), str(booking["booking_id"]).encode("utf-8")
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)  # local queue full: serve delivery reports to make room
        if producer.flush(MESSAGE_TIMEOUT_MS / 1000 + 5) > 0 or any(e.code() in UNREACHABLE for e in errors):
            raise unavailable(self.bootstrap)
        if errors:
            raise BackendError(f"Kafka refused {len(errors)} of {len(bookings)} messages: {errors[0].str()}")

    def _drop_failed(self, producer: Producer, error: KafkaError) -> NoReturn:
        """Forget a producer that failed for good, so that the next send builds a fresh one; then raise.

        An idempotent producer whose broker lost its state (the memory-only embedded broker after a
        restart) fails with a fatal UNKNOWN_PRODUCER_ID; librdkafka's rule is that such an instance can
        only be destroyed. The caller sends the batch again (some records may then arrive twice).
        """
        if self._producer is producer:
            self._producer = None
        self.repairs.fired("producer-fenced", f"Kafka producer failed for good ({error.str()}); replacing it")
        raise BrokerUnavailable(f"the Kafka producer failed ({error.str()}); send again") from None
