"""Reading a Kafka topic up to its high watermark, the way that is right on every broker.

Two jobs of the Kafka backend need "where does this partition end?": consumer lag (how
many records the group has not committed yet) and reading the dead-letter topic to its
end. The obvious call, ListOffsets(latest) (``get_watermark_offsets(cached=False)``,
``list_offsets``, kafka-python ``end_offsets``), is wrong on the lab's embedded broker
(Tansu): it answers the base offset of the newest record batch plus one, so 3 batches of
10 records look like 21 records, not 30. Every Fetch response carries the partition's
true high watermark, on Tansu and on Apache Kafka alike, so these helpers take it from a
short fetch instead: a throwaway consumer is assigned the partitions, fetches once per
partition (a record, or the end-of-partition event), and reads the watermark librdkafka
cached from that Fetch response.

The consumers here are short-lived on purpose: a librdkafka client that sees a topic deleted and
created again (``labkit reset``) crashes the process (topic_changes.py), so nothing here stays
assigned to a topic between calls, and each call holds ``topic_changes.reading`` for its life. One call costs about
one connection plus one fetch round trip (~50-100 ms locally).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from labkit.backends.kafka import topic_changes
from labkit.backends.kafka.records import headers_of
from labkit.backends.kafka.settings import CONNECT_TIMEOUT_S, unavailable
from labkit.errors import BackendError

#: Records asked for per consume() call while reading; big enough to drain a fetch at once.
_BATCH = 1000
#: One consume() wait while reading: short, so a call returns as soon as every partition answered.
_WAIT_S = 0.02


@dataclass(frozen=True)
class Record:
    """One record read back from a topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


def _reader(client_config: dict[str, Any], group_id: str, **extra: Any) -> Consumer:
    """An assign-only consumer that never commits and stops at each partition's end.

    ``group_id`` is only used to read the group's committed offsets; this consumer never
    joins the group, so it never takes partitions away from the workers.
    """
    return Consumer(
        {
            **client_config,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # An offset before the log start (retention, on Apache Kafka) restarts from the start.
            "auto.offset.reset": "earliest",
            # The end-of-partition event tells us a Fetch answered at the high watermark.
            "enable.partition.eof": True,
            # An empty fetch at the end waits this long on the broker: keep one call fast.
            "fetch.wait.max.ms": 10,
            # Only the watermark is needed from most fetches, not a megabyte of records.
            "max.partition.fetch.bytes": 1024,
            **extra,
        }
    )


def _partitions(consumer: Consumer, topics: list[str], bootstrap: str) -> list[TopicPartition]:
    """The partitions of those ``topics`` that exist, from a metadata request for all topics.

    Asking for all topics (not for one by name) matters: a metadata request naming a
    missing topic makes the embedded broker create it, with 4 partitions.
    """
    try:
        metadata = consumer.list_topics(timeout=CONNECT_TIMEOUT_S)
    except KafkaException:
        raise unavailable(bootstrap) from None
    return [
        TopicPartition(topic, partition)
        for topic in topics
        if topic in metadata.topics and metadata.topics[topic].error is None
        for partition in sorted(metadata.topics[topic].partitions)
    ]


def _fetch_once(
    consumer: Consumer, partitions: list[TopicPartition], deadline: float, keep: list[Record] | None = None
) -> dict[tuple[str, int], tuple[int, int]]:
    """Consume until every assigned partition has answered a Fetch; return its (low, high) watermarks.

    With ``keep`` given, read every partition to its end and collect the records into it;
    without, stop at a partition's first answer (a record or the end event) and pause it.
    """
    todo = {(tp.topic, tp.partition) for tp in partitions}
    marks: dict[tuple[str, int], tuple[int, int]] = {}
    while todo:
        if time.monotonic() > deadline:
            names = ", ".join(f"{t}/{p}" for t, p in sorted(todo))
            raise BackendError(f"Kafka gave no fetch answer for {names} in time; is the broker overloaded?")
        for message in consumer.consume(_BATCH, _WAIT_S):
            where = (cast(str, message.topic()), cast(int, message.partition()))
            error = message.error()
            at_end = error is not None and error.code() == KafkaError._PARTITION_EOF
            if error is not None and not at_end:
                if error.fatal():
                    raise BackendError(f"Kafka client failed: {error.str()}")
                continue  # transient (a broker reconnecting): the fetch is retried
            if where not in todo:
                continue
            if keep is not None and not at_end:
                keep.append(
                    Record(
                        topic=where[0],
                        partition=where[1],
                        offset=cast(int, message.offset()),
                        key=message.key(),
                        value=message.value() or b"",
                        headers=headers_of(message),
                    )
                )
                continue
            tp = TopicPartition(*where)
            marks[where] = consumer.get_watermark_offsets(tp, cached=True)
            todo.discard(where)
            consumer.pause([tp])  # answered: fetch nothing more from it
    return marks


def group_lag(
    client_config: dict[str, Any], group_id: str, topics: list[str], bootstrap: str, timeout_s: float = 10.0
) -> dict[str, int]:
    """Records not yet committed by ``group_id``, per ``topic/partition`` of ``topics`` that exist.

    Lag = Fetch high watermark − committed offset (or the log start when the group has
    committed nothing there yet). Both come from the broker; nothing here needs the workers.

    Raises:
        BrokerUnavailable: the broker does not answer.
        BackendError: a partition did not answer a fetch within ``timeout_s``.
    """
    with topic_changes.reading(bootstrap):  # alive while no topic is re-created (topic_changes.py)
        deadline = time.monotonic() + timeout_s
        consumer = _reader(client_config, group_id)
        try:
            partitions = _partitions(consumer, topics, bootstrap)
            if not partitions:
                return {}
            try:
                committed = consumer.committed(partitions, timeout=CONNECT_TIMEOUT_S)
            except KafkaException:
                raise unavailable(bootstrap) from None
            # Start where the group would resume, so a fetch downloads at most one batch of backlog.
            consumer.assign(
                [
                    TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                    for tp in committed
                ]
            )
            marks = _fetch_once(consumer, partitions, deadline)
            lag: dict[str, int] = {}
            for tp in committed:
                low, high = marks[(tp.topic, tp.partition)]
                start = tp.offset if tp.offset >= 0 else max(low, 0)
                lag[f"{tp.topic}/{tp.partition}"] = max(high - start, 0)
            return lag
        finally:
            consumer.close()


def read_topic(
    client_config: dict[str, Any], group_id: str, topic: str, bootstrap: str, timeout_s: float = 10.0
) -> list[Record]:
    """Every record of ``topic`` from the beginning to the high watermark, by partition then offset.

    Nothing is committed: reading the dead letters never consumes them.

    Raises:
        BrokerUnavailable: the broker does not answer.
        BackendError: a partition did not reach its end within ``timeout_s``.
    """
    with topic_changes.reading(bootstrap):  # alive while no topic is re-created (topic_changes.py)
        deadline = time.monotonic() + timeout_s
        consumer = _reader(client_config, group_id, **{"max.partition.fetch.bytes": 1024 * 1024})
        try:
            partitions = _partitions(consumer, [topic], bootstrap)
            if not partitions:
                return []
            consumer.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in partitions])
            records: list[Record] = []
            _fetch_once(consumer, partitions, deadline, keep=records)
            return sorted(records, key=lambda r: (r.partition, r.offset))
        finally:
            consumer.close()
