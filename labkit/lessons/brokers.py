"""Small experiments on the Kafka broker in use, where the embedded broker (Tansu) and Apache Kafka differ.

Each lesson's "Embedded broker" box states a difference as a figure measured on both brokers
(labkit.lessons.figures): these probes measure the figures that the lessons' main experiments do not.
Each one runs on a scratch topic of its own (``<namespace>probe-<what>``) and deletes it, takes about
a second, and returns a plain value that is right on both brokers' terms: what the broker did.

The workarounds the Kafka backend needs for the embedded broker live in labkit/backends/kafka/quirks.py;
docs/embedded-kafka.md has the full matrix.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from labkit.backends.kafka.admin import TopicAdmin
from labkit.backends.kafka.lag import group_lag
from labkit.backends.kafka.settings import client_config
from labkit.config import Config
from labkit.errors import BackendError

if TYPE_CHECKING:
    import pandas as pd

#: How long a probe waits for the broker to answer one request.
TIMEOUT_S = 10.0
#: A record stamped by the producer with this time (2001-09-09): a broker's own clock cannot be mistaken for it.
OLD_TIMESTAMP_MS = 1_000_000_000_000


def scratch(config: Config, what: str) -> str:
    """The name of a probe's scratch topic, in the lesson's namespace."""
    return f"{config.namespace}probe-{what}"


@contextlib.contextmanager
def scratch_topic(
    config: Config, what: str, partitions: int = 1, settings: dict[str, str] | None = None
) -> Iterator[str]:
    """A fresh topic for one probe (with topic ``settings``, e.g. ``message.timestamp.type``), deleted afterwards."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]  # documented import path

    topic = scratch(config, what)
    admin = TopicAdmin(config.kafka_bootstrap)
    admin.delete_topics([topic])
    future = admin.client.create_topics([NewTopic(topic, partitions, 1, config=dict(settings or {}))])[topic]
    try:
        admin.result(future)
    except KafkaException as e:
        raise BackendError(f"could not create the probe topic {topic!r}: {e.args[0].str()}") from None
    deadline = time.monotonic() + TIMEOUT_S
    while topic not in admin.topic_partitions():
        if time.monotonic() > deadline:
            raise BackendError(f"the probe topic {topic!r} did not appear")
        time.sleep(0.1)
    try:
        yield topic
    finally:
        admin.delete_topics([topic])


def _producer(config: Config, **settings: Any) -> Any:
    from confluent_kafka import Producer

    return Producer({**client_config(config.kafka_bootstrap), **settings})


def add_partition(config: Config) -> str:
    """Ask the broker to grow a topic of 3 partitions to 4 (``CreatePartitions``); say what it answered.

    Returns:
        ``"3 → 4 partitions"`` when the broker did it, else ``"refused: <the broker's or client's error>"``.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewPartitions  # type: ignore[attr-defined]  # documented import path

    with scratch_topic(config, "partitions", partitions=3) as topic:
        admin = TopicAdmin(config.kafka_bootstrap)
        try:
            admin.result(admin.client.create_partitions([NewPartitions(topic, 4)])[topic])
        except KafkaException as e:
            return f"refused: {e.args[0].name()}"
        deadline = time.monotonic() + TIMEOUT_S
        while (count := admin.topic_partitions().get(topic, 0)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        return f"3 → {count} partitions"


def timestamp_type(config: Config) -> str:
    """Produce one record, stamped 2001 by the producer, to a topic set to ``LogAppendTime``; read it back.

    Returns:
        the record's timestamp type as read back: ``LogAppendTime`` (the broker stamped its own clock, as the
        topic asks) or ``CreateTime`` (it kept the producer's stamp, ignoring the setting).
    """
    from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME

    with scratch_topic(config, "timestamps", 1, {"message.timestamp.type": "LogAppendTime"}) as topic:
        producer = _producer(config)
        producer.produce(topic, b"{}", b"probe", timestamp=OLD_TIMESTAMP_MS)
        if producer.flush(TIMEOUT_S):
            raise BackendError("the probe record was not acknowledged in time")
        consumer = _reader(config, "timestamps")
        try:
            from confluent_kafka import OFFSET_BEGINNING, TopicPartition

            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            message = _first_record(consumer)
            kind, stamp = message.timestamp()
        finally:
            consumer.close()
    if kind == TIMESTAMP_LOG_APPEND_TIME and stamp != OLD_TIMESTAMP_MS:
        return "LogAppendTime"
    return "CreateTime"


def _reader(config: Config, what: str, **settings: Any) -> Any:
    from confluent_kafka import Consumer

    return Consumer(
        {**client_config(config.kafka_bootstrap), "group.id": scratch(config, what), "enable.auto.commit": False,
         "fetch.wait.max.ms": 10, **settings}
    )  # fmt: skip


def _first_record(consumer: Any) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        message = consumer.poll(0.1)
        if message is not None and message.error() is None:
            return message
    raise BackendError("the probe record could not be read back in time")


def aborted_records_read(config: Config) -> int:
    """Write one record in a transaction that is aborted and one in a transaction that commits; count what a
    ``read_committed`` consumer reads of the aborted one (Apache Kafka: 0; it must never see it).
    """
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    with scratch_topic(config, "transactions") as topic:
        producer = _producer(config, **{"transactional.id": scratch(config, "transactions")})
        producer.init_transactions(TIMEOUT_S)
        for verdict, value in (("abort", b'{"txn": "aborted"}'), ("commit", b'{"txn": "committed"}')):
            producer.begin_transaction()
            producer.produce(topic, value, b"probe")
            producer.flush(TIMEOUT_S)
            if verdict == "abort":
                producer.abort_transaction(TIMEOUT_S)
            else:
                producer.commit_transaction(TIMEOUT_S)
        consumer = _reader(config, "transactions", **{"isolation.level": "read_committed",
                                                       "enable.partition.eof": True})  # fmt: skip
        values: list[bytes] = []
        try:
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline:
                message = consumer.poll(0.1)
                if message is None:
                    continue
                if message.error() is None:
                    values.append(message.value() or b"")
                elif message.error().code() == KafkaError._PARTITION_EOF and values:
                    break
        finally:
            consumer.close()
    return sum(b"aborted" in v for v in values)


def end_offsets(config: Config, topic: str) -> pd.DataFrame:
    """Where each partition of ``topic`` ends, asked two ways: ListOffsets(latest) and a Fetch response.

    Returns:
        one row per partition: ``list_offsets`` (what ``get_watermark_offsets(cached=False)`` answers),
        ``fetch_high_watermark`` (the end a Fetch response reports: what the backend's lag uses) and ``missed``
        (records after the first answer's end).
    """
    import pandas as pd
    from confluent_kafka import TopicPartition

    # A group that has committed nothing: its lag is the high watermark minus the log start.
    lag = group_lag(client_config(config.kafka_bootstrap), scratch(config, "ends"), [topic], config.kafka_bootstrap)
    consumer = _reader(config, "ends")
    rows = []
    try:
        for name in sorted(lag, key=lambda n: int(n.rsplit("/", 1)[1])):
            where = TopicPartition(topic, int(name.rsplit("/", 1)[1]))
            low, high = consumer.get_watermark_offsets(where, timeout=TIMEOUT_S, cached=False)
            fetched = max(low, 0) + lag[name]
            rows.append({"partition": name, "list_offsets": high, "fetch_high_watermark": fetched,
                         "missed": fetched - high})  # fmt: skip
    finally:
        consumer.close()
    return pd.DataFrame(rows).set_index("partition")


def described_members(config: Config, group: str | None = None) -> int:
    """How many members the broker's own ``describe_consumer_groups`` lists for ``group`` (the lab's by default)."""
    admin = TopicAdmin(config.kafka_bootstrap)
    group = group or config.names.kafka_group
    [future] = admin.client.describe_consumer_groups([group], request_timeout=TIMEOUT_S).values()
    return len(admin.result(future).members)


def first_assignment_s(events: pd.DataFrame) -> float:
    """Seconds from a Kafka worker's ``ready`` event to its first ``assigned`` event (the first that has one)."""
    kafka = events[events["backend"] == "kafka"]
    for _, mine in kafka.groupby("worker", sort=False):
        ready = mine.loc[mine["event"] == "ready", "mono"]
        assigned = mine.loc[mine["event"] == "assigned", "mono"]
        if len(ready) and len(assigned):
            return float(assigned.min() - ready.min())
    return float("nan")
