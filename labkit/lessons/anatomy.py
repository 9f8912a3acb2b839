"""What a message is in each backend, and what a producer trades for speed: the drivers of lesson 01-producers.

The readers here bypass labkit's backends on purpose and use the plain clients a learner
would use (``HGETALL`` and ``XRANGE`` through redis-py, a confluent-kafka consumer), so a
lesson shows what is really stored: a BullMQ job hash, a stream entry, a Kafka record.

The experiments send to scratch destinations named ``<namespace>producer-bench`` (a
queue, a stream, a topic), so they never reach the lab's workers, and delete them
afterwards so memory use stays flat (the embedded Kafka broker keeps every record in RAM).
The acks experiment leaves its topic for a look; :func:`drop_scratch` removes what is left.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labkit.backends.kafka.settings import client_config, producer_config
from labkit.booking import encode
from labkit.config import Config, check_backend
from labkit.errors import BackendError
from labkit.lab import run

if TYPE_CHECKING:
    import pandas as pd
    import redis
    from confluent_kafka import Producer
    from matplotlib.axes import Axes


#: BullMQ's default key prefix: a job lives in the hash ``bull:<queue>:<job id>``.
BULLMQ_PREFIX = "bull"

#: What each field of a BullMQ job hash means (written by BullMQ's Lua scripts, shared by the Python and Node clients).
BULLMQ_FIELDS = {
    "name": "job name; docs/contract.md: booking",
    "data": "the booking object, as JSON text",
    "opts": "job options: attempts allowed, backoff, how many finished jobs to keep",
    "timestamp": "when the job was added (Unix ms)",
    "delay": "ms to wait before the job may run",
    "priority": "0 = plain FIFO order",
    "processedOn": "when a worker last took the job (Unix ms)",
    "finishedOn": "when the job completed or failed for good (Unix ms)",
    "ats": "attempts started",
    "atm": "attempts made (finished, successfully or not)",
    "returnvalue": "what the processor returned (JSON)",
    "failedReason": "the last error message",
    "stacktrace": "the last errors' stack traces",
}

_KAFKA_TIMEOUT_S = 10.0


def _client(config: Config) -> dict[str, Any]:
    """Settings every Kafka client here shares (the lab's own: address and a quiet log)."""
    return client_config(config.kafka_bootstrap)


def scratch_name(config: Config) -> str:
    """The queue, stream and topic the experiments send to: never the lab's own ``bookings``."""
    return f"{config.namespace}producer-bench"


def _redis(config: Config) -> redis.Redis:
    import redis

    return redis.Redis.from_url(config.redis_url, decode_responses=True, socket_connect_timeout=3)


def where_landed(messages: Sequence[Mapping[str, Any]], landed: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """What each backend's producer returned for each message, one column per backend.

    Args:
        messages: the messages sent, in order.
        landed: backend → the list ``lk.produce`` returned (job ids, entry ids, topic/partition/offset).
    """
    import pandas as pd

    frame = pd.DataFrame(
        {"booking_id": [m.get("booking_id") for m in messages], "event": [m.get("event") for m in messages]}
    )
    for backend, places in landed.items():
        frame[backend] = list(places)
    return frame


def redis_persistence(config: Config) -> dict[str, str]:
    """``CONFIG GET appendonly appendfsync``: how much of what Redis acknowledged survives a crash of Redis."""
    with _redis(config) as client:
        settings: dict[str, str] = client.config_get("append*")
    return {name: settings[name] for name in ("appendonly", "appendfsync") if name in settings}


# -- BullMQ: a job is a hash that changes as it is worked on ------------------------------------------


def bullmq_job_key(config: Config, job_id: str) -> str:
    """``bull:<queue>:<job id>``, the hash holding one job of the lab's queue."""
    return f"{BULLMQ_PREFIX}:{config.names.bullmq_queue}:{job_id}"


def bullmq_job_hash(config: Config, job_id: str) -> pd.DataFrame:
    """``HGETALL bull:<queue>:<job id>`` as a table: field, raw value, and what the field means.

    Fields are shown in BULLMQ_FIELDS' order (Redis returns a hash in no particular order).
    """
    import pandas as pd

    with _redis(config) as client:
        raw: dict[str, str] = client.hgetall(bullmq_job_key(config, job_id))
    order = [f for f in BULLMQ_FIELDS if f in raw] + sorted(set(raw) - set(BULLMQ_FIELDS))
    rows = [{"field": f, "value": raw[f], "meaning": BULLMQ_FIELDS.get(f, "")} for f in order]
    return pd.DataFrame(rows, columns=["field", "value", "meaning"]).set_index("field")


def _async_client(config: Config) -> Any:
    """A ``redis.asyncio`` client the way BullMQ needs it (it parses job hashes as text)."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(config.redis_url, decode_responses=True, socket_connect_timeout=3)


def _bullmq_queue(config: Config) -> Any:
    """A ``bullmq.Queue`` on the lab's queue."""
    from bullmq import Queue

    return Queue(config.names.bullmq_queue, {"connection": _async_client(config)})


def bullmq_add(config: Config, booking: Mapping[str, Any], job_id: str) -> dict[str, Any]:
    """Add ``booking`` as a job with a chosen ``jobId``, and read back what Redis kept.

    BullMQ's add script stores nothing when the hash ``bull:<queue>:<jobId>`` exists: it
    logs a ``duplicated`` event and returns the existing id, so only Redis tells which data
    was kept.

    Returns:
        ``returned_id`` (what ``Queue.add`` returned), ``sent_amount`` (the amount in the
        data sent), ``stored_amount`` (the amount in the job hash afterwards) and
        ``jobs_waiting`` (the length of the queue's ``wait`` list).
    """

    async def add() -> str:
        queue = _bullmq_queue(config)
        try:
            job = await queue.add("booking", dict(booking), {"jobId": job_id})
        finally:
            await queue.close()
        return str(job.id)

    returned_id = run(add())
    with _redis(config) as client:
        stored = client.hget(bullmq_job_key(config, job_id), "data")
        waiting = client.llen(f"{BULLMQ_PREFIX}:{config.names.bullmq_queue}:wait")
    return {
        "returned_id": returned_id,
        "sent_amount": booking.get("amount_cents"),
        "stored_amount": _json_object(stored).get("amount_cents") if stored else None,
        "jobs_waiting": int(waiting),
    }


def bullmq_remove(config: Config, job_id: str) -> bool:
    """Remove one job (``Queue.remove``); True if its hash was there before and is gone now."""

    async def remove() -> None:
        queue = _bullmq_queue(config)
        try:
            await queue.remove(job_id)
        finally:
            await queue.close()

    key = bullmq_job_key(config, job_id)
    with _redis(config) as client:
        existed = bool(client.exists(key))
        run(remove())
        return existed and not client.exists(key)


def bullmq_job_events(config: Config, job_id: str) -> pd.DataFrame:
    """The queue's own event stream (``XRANGE bull:<queue>:events``) for one job: added, duplicated, removed..."""
    import pandas as pd

    with _redis(config) as client:
        entries = client.xrange(f"{BULLMQ_PREFIX}:{config.names.bullmq_queue}:events")
    rows = [{"entry_id": entry_id, **fields} for entry_id, fields in entries if fields.get("jobId") == job_id]
    return pd.DataFrame(rows, columns=["entry_id", "event", "jobId"])


# -- Redis Streams: an entry is an id plus fields, and the id is a time ---------------------------------


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """``1700000000000-3`` → ``(1700000000000, 3)``: milliseconds of the Redis clock, and a sequence within it."""
    ms, sep, seq = entry_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"{entry_id!r} is not a stream entry id (<ms>-<seq>)")
    return int(ms), int(seq)


def ids_increase(entry_ids: Iterable[str]) -> bool:
    """True when every id is larger than the one before, comparing (ms, seq) as numbers, as Redis does."""
    parsed = [parse_entry_id(i) for i in entry_ids]
    return all(a < b for a, b in zip(parsed, parsed[1:], strict=False))


def stream_entries(config: Config, stream: str | None = None) -> pd.DataFrame:
    """``XRANGE <stream> - +`` as a table: entry id, its two halves, and the booking each entry carries."""
    import pandas as pd

    with _redis(config) as client:
        entries = client.xrange(stream or config.names.stream)
    rows = []
    for entry_id, fields in entries:
        ms, seq = parse_entry_id(entry_id)
        booking = _json_object(fields.get("booking", ""))
        rows.append(
            {
                "entry_id": entry_id,
                "ms": ms,
                "seq": seq,
                "added_at": pd.Timestamp(ms, unit="ms"),
                "booking_id": booking.get("booking_id"),
                "event": booking.get("event"),
                "fields": sorted(fields),
            }
        )
    return pd.DataFrame(rows, columns=["entry_id", "ms", "seq", "added_at", "booking_id", "event", "fields"])


def xadd_with_id(config: Config, entry_id: str, booking: Mapping[str, Any]) -> str:
    """``XADD <stream> <entry_id> booking <json>`` with an id chosen by hand.

    Returns:
        the id Redis stored, or ``refused: <Redis error>`` when the id is not above the
        stream's last id (Redis never lets a stream's ids go backwards).
    """
    import redis

    with _redis(config) as client:
        try:
            return str(client.xadd(config.names.stream, {"booking": encode(dict(booking))}, id=entry_id))
        except redis.ResponseError as e:
            return f"refused: {e}"


def _json_object(text: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- Kafka: a record is key, value, headers and a timestamp at a partition and offset -----------------


def _admin(config: Config) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient(_client(config))


def _create_topic(config: Config, topic: str, partitions: int = 3) -> None:
    """Create ``topic``, waiting until it is there (an existing one is reused)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    admin = _admin(config)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(_KAFKA_TIMEOUT_S)
    except KafkaException as e:
        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise BackendError(f"could not create Kafka topic {topic!r}: {e.args[0].str()}") from None
    deadline = time.monotonic() + _KAFKA_TIMEOUT_S
    while topic not in admin.list_topics(timeout=_KAFKA_TIMEOUT_S).topics:
        if time.monotonic() > deadline:
            raise BackendError(f"Kafka topic {topic!r} did not appear")
        time.sleep(0.1)


def _delete_topic(config: Config, topic: str) -> None:
    """Delete ``topic`` if it exists, and wait until it is gone (the embedded broker frees its memory only then).

    Apache Kafka deletes asynchronously: creating the topic again too early would find it still there.
    """
    admin = _admin(config)
    if topic not in admin.list_topics(timeout=_KAFKA_TIMEOUT_S).topics:
        return
    admin.delete_topics([topic])[topic].result(_KAFKA_TIMEOUT_S)
    deadline = time.monotonic() + _KAFKA_TIMEOUT_S
    while topic in admin.list_topics(timeout=_KAFKA_TIMEOUT_S).topics:
        if time.monotonic() > deadline:
            raise BackendError(f"Kafka topic {topic!r} is still being deleted")
        time.sleep(0.1)


def _producer(config: Config, **settings: Any) -> Producer:
    from confluent_kafka import Producer

    return Producer({**producer_config(config.kafka_bootstrap), **settings})


def _kafka_settings(acks: str, idempotent: bool, linger_ms: float, batch_size: int | None) -> dict[str, Any]:
    """labkit's words → librdkafka's."""
    settings: dict[str, Any] = {"acks": acks, "enable.idempotence": idempotent, "linger.ms": linger_ms}
    if batch_size is not None:
        settings["batch.num.messages"] = batch_size
    return settings


def _produce_all(producer: Producer, topic: str, records: Sequence[tuple[bytes | None, bytes, Any]]) -> list[Any]:
    """Produce ``(key, value, headers)`` records and block until each has its delivery report.

    Returns:
        one ``(error, partition, offset)`` per record, in send order.
    """
    reports: list[Any] = [None] * len(records)

    def reporter(i: int) -> Callable[[Any, Any], None]:
        def on_delivery(error: Any, message: Any) -> None:
            reports[i] = (error, message.partition(), message.offset())

        return on_delivery

    for i, (key, value, headers) in enumerate(records):
        while True:
            try:
                producer.produce(topic, value, key, headers=headers, on_delivery=reporter(i))
                break
            except BufferError:
                producer.poll(0.01)  # local queue full: serve delivery reports to make room
    if producer.flush(_KAFKA_TIMEOUT_S) > 0:
        raise BackendError(f"Kafka did not acknowledge every record within {_KAFKA_TIMEOUT_S:g} s")
    return reports


def kafka_send(
    config: Config,
    messages: Iterable[Mapping[str, Any]],
    topic: str | None = None,
    headers: Mapping[str, str] | None = None,
    acks: str = "all",
    idempotent: bool = True,
    linger_ms: float = 5,
) -> pd.DataFrame:
    """Send bookings (key = ``booking_id``) with a producer of your settings; returns its delivery reports.

    A delivery report is the producer's answer to "was it sent?": with ``acks=0`` the
    broker never answers, so the report comes back with no offset (``None``).

    Returns:
        one row per message, in send order: ``i, key, partition, offset, error``.
    """
    import pandas as pd

    topic = topic or config.names.topic
    batch = [dict(m) for m in messages]
    records = [
        (str(m["booking_id"]).encode(), encode(m).encode(), list((headers or {}).items()) or None) for m in batch
    ]
    producer = _producer(config, **_kafka_settings(acks, idempotent, linger_ms, None))
    reports = _produce_all(producer, topic, records)
    rows = [
        {"i": i, "key": m["booking_id"], "partition": p, "offset": o, "error": None if e is None else e.str()}
        for i, (m, (e, p, o)) in enumerate(zip(batch, reports, strict=True))
    ]
    return pd.DataFrame(rows, columns=["i", "key", "partition", "offset", "error"])


def kafka_records(config: Config, topic: str | None = None) -> pd.DataFrame:
    """Every record of ``topic`` (default: the lab's ``bookings``), read back with a plain consumer.

    The consumer is assigned every partition from the beginning and stops at each
    partition's end; it never joins or commits for a group, so workers are not disturbed.

    Returns:
        ``partition, offset, key, timestamp, timestamp_type, headers, booking_id, event``,
        sorted by partition and offset.
    """
    import pandas as pd
    from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_CREATE_TIME, Consumer, KafkaError, TopicPartition

    topic = topic or config.names.topic
    consumer = Consumer(
        {
            **_client(config),
            "group.id": f"{config.namespace}anatomy-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )
    rows = []
    try:
        metadata = consumer.list_topics(timeout=_KAFKA_TIMEOUT_S)
        if topic not in metadata.topics:
            raise BackendError(f"Kafka topic {topic!r} does not exist")
        partitions = sorted(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        todo, deadline = set(partitions), time.monotonic() + _KAFKA_TIMEOUT_S
        while todo:
            if time.monotonic() > deadline:
                raise BackendError(f"Kafka partitions {sorted(todo)} of {topic!r} gave no answer in time")
            for message in consumer.consume(1000, 0.05):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        todo.discard(message.partition())
                    continue
                kind, stamp = message.timestamp()
                booking = _json_object(message.value() or b"")
                rows.append(
                    {
                        "partition": message.partition(),
                        "offset": message.offset(),
                        "key": _decode(message.key()) or None,
                        "timestamp": pd.Timestamp(stamp, unit="ms"),
                        "timestamp_type": "CreateTime" if kind == TIMESTAMP_CREATE_TIME else "LogAppendTime",
                        "headers": _header_dict(message.headers()),
                        "booking_id": booking.get("booking_id"),
                        "event": booking.get("event"),
                    }
                )
    finally:
        consumer.close()
    columns = ["partition", "offset", "key", "timestamp", "timestamp_type", "headers", "booking_id", "event"]
    return pd.DataFrame(rows, columns=columns).sort_values(["partition", "offset"], ignore_index=True)


def _decode(value: str | bytes | None) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value or ""


def _header_dict(headers: Any) -> dict[str, str]:
    """Record headers as text (a name given twice keeps its last value)."""
    return {name: _decode(value) for name, value in headers or []}


def same_key_same_partition(records: pd.DataFrame) -> bool:
    """True when every key's records sit in one partition (keyless records are ignored)."""
    keyed = records.dropna(subset=["key"])
    return bool((keyed.groupby("key")["partition"].nunique() == 1).all())


def offsets_follow_send_order(reports: pd.DataFrame) -> bool | None:
    """True when, in every partition, records got increasing offsets in the order they were sent.

    None when some report carries no offset (``acks=0``): without offsets the order cannot be judged.
    """
    if reports["offset"].isna().any():
        return None
    ordered = reports.sort_values("i")
    return bool(ordered.groupby("partition")["offset"].apply(lambda s: s.is_monotonic_increasing).all())


ACKS_SETTINGS = (("0", False), ("1", False), ("all", False), ("all", True))


def acks_experiment(config: Config, bookings: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Send the same bookings with ``acks`` 0, 1 and all (and all + idempotence) to the scratch topic.

    Every record carries a header naming its setting, so reading the topic back counts
    what each setting actually stored. The topic is left for a look (``kafka_records``);
    :func:`drop_scratch` deletes it.

    Returns:
        one row per setting: ``acks, idempotent, sent, reports, offsets_known, stored, errors,
        in_send_order`` (offsets increase in send order in every partition; None when the reports
        carry no offsets, so the order cannot be judged).
    """
    import pandas as pd

    topic = scratch_name(config)
    _delete_topic(config, topic)  # start empty: `stored` counts this run's records only
    _create_topic(config, topic)
    rows = []
    for acks, idempotent in ACKS_SETTINGS:
        label = f"acks={acks}" + (" idempotent" if idempotent else "")
        reports = kafka_send(config, bookings, topic, {"setting": label}, acks=acks, idempotent=idempotent)
        rows.append(
            {
                "setting": label,
                "acks": acks,
                "idempotent": idempotent,
                "sent": len(reports),
                "reports": int(reports["partition"].notna().sum()),
                "offsets_known": int(reports["offset"].notna().sum()),
                "errors": int(reports["error"].notna().sum()),
                "in_send_order": offsets_follow_send_order(reports),
            }
        )
    stored = kafka_records(config, topic)["headers"].map(lambda h: h.get("setting")).value_counts()
    frame = pd.DataFrame(rows).set_index("setting")
    frame.insert(5, "stored", [int(stored.get(label, 0)) for label in frame.index])
    return frame


def drop_scratch(config: Config) -> None:
    """Delete the experiments' scratch topic, stream and BullMQ queue, whatever is left of them."""
    from bullmq import Queue

    _delete_topic(config, scratch_name(config))
    with _redis(config) as client:
        client.delete(scratch_name(config))

    async def obliterate() -> None:
        queue = Queue(scratch_name(config), {"connection": _async_client(config)})
        try:
            await queue.obliterate(force=True)
        finally:
            await queue.close()

    run(obliterate())


# -- throughput: how many messages one round trip carries ----------------------------------------------


class _Rate:
    """Counts what a burst sent, from its first message to its last acknowledgement."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + seconds
        self.sent = 0

    def running(self, batch_size: int = 1) -> bool:
        """Until the time is up, and at least 3 batches sent, so that no point rests on one round trip."""
        return time.perf_counter() < self.deadline or self.sent < 3 * batch_size

    def per_second(self) -> tuple[int, float]:
        """(messages acknowledged, messages per second), measured now."""
        return self.sent, self.sent / (time.perf_counter() - self.start)


def _kafka_burst(config: Config, texts: Sequence[str], batch_size: int, seconds: float) -> tuple[int, float]:
    """Produce for ``seconds`` with ``batch.num.messages=batch_size``; waits for every delivery report."""
    topic = scratch_name(config)
    _create_topic(config, topic)
    try:
        producer = _producer(config, **_kafka_settings("all", True, 5, batch_size))
        # The first send also fetches metadata and a producer id (~0.5 s here): not part of the rate.
        _produce_all(producer, topic, [(b"warm-up", b"{}", None)])
        records = [(_json_object(t).get("booking_id", "").encode(), t.encode()) for t in texts]
        rate = _Rate(seconds)
        # produce() only queues a record: cap what is queued but unacknowledged, or a slow setting
        # would queue far more than it can send in time and the final flush would take minutes.
        window = max(10 * batch_size, 1000)

        def on_delivery(error: Any, message: Any) -> None:
            rate.sent += error is None

        queued = 0
        while rate.running():
            if queued - rate.sent >= window:
                producer.poll(0.001)
                continue
            key, value = records[queued % len(records)]
            producer.produce(topic, value, key, on_delivery=on_delivery)
            queued += 1
            if queued % 100 == 0:
                producer.poll(0)  # serve delivery reports
        if producer.flush(_KAFKA_TIMEOUT_S) > 0:
            raise BackendError(f"Kafka did not acknowledge every record within {_KAFKA_TIMEOUT_S:g} s")
        return rate.per_second()
    finally:
        _delete_topic(config, topic)


def _streams_burst(config: Config, texts: Sequence[str], batch_size: int, seconds: float) -> tuple[int, float]:
    """XADD for ``seconds``, ``batch_size`` entries per pipeline (one round trip each)."""
    import redis.asyncio as aioredis

    key = scratch_name(config)

    async def send() -> tuple[int, float]:
        client = aioredis.Redis.from_url(config.redis_url, socket_connect_timeout=3)
        try:
            await client.ping()  # connect before the clock starts
            rate, i = _Rate(seconds), 0
            while rate.running(batch_size):
                # transaction=False: one round trip for the batch, no MULTI (nothing needs to be atomic).
                async with client.pipeline(transaction=False) as pipe:
                    for _ in range(batch_size):
                        pipe.xadd(key, {"booking": texts[i % len(texts)]})
                        i += 1
                    rate.sent += len(await pipe.execute())
            return rate.per_second()
        finally:
            await client.delete(key)
            await client.aclose()

    return run(send())


def _bullmq_burst(
    config: Config, bookings: Sequence[Mapping[str, Any]], batch_size: int, seconds: float
) -> tuple[int, float]:
    """Add jobs for ``seconds``: ``Queue.add`` one by one (size 1) or ``addBulk`` of ``batch_size``."""
    from bullmq import Queue

    async def send() -> tuple[int, float]:
        client = _async_client(config)
        queue = Queue(scratch_name(config), {"connection": client})
        try:
            await client.ping()
            rate, i = _Rate(seconds), 0
            while rate.running(batch_size):
                chunk = [dict(bookings[(i + k) % len(bookings)]) for k in range(batch_size)]
                i += batch_size
                if batch_size == 1:
                    await queue.add("booking", chunk[0])  # one script call, one round trip
                else:
                    await queue.addBulk([{"name": "booking", "data": b} for b in chunk])  # one MULTI/EXEC
                rate.sent += batch_size
            return rate.per_second()
        finally:
            await queue.obliterate(force=True)
            await queue.close()

    return run(send())


def producer_throughput(
    config: Config,
    backends: Sequence[str],
    bookings: Sequence[Mapping[str, Any]],
    batch_sizes: Sequence[int],
    seconds: float = 1.0,
    progress: bool = True,
) -> pd.DataFrame:
    """One producer sending as fast as it can for ``seconds`` per backend and batch size, to scratch destinations.

    What a batch is differs per backend, and that is the point: Kafka's ``batch.num.messages``
    (records per Produce request, with the lab's ``linger.ms=5``), a Streams pipeline of that
    many XADDs (one round trip), BullMQ's ``addBulk`` of that many jobs (one MULTI/EXEC),
    where size 1 means one ``Queue.add`` per job. ``bookings`` are sent round and round.
    The clock runs from the first send to the last acknowledgement; connecting is not timed.

    Returns:
        one row per backend and batch size: ``backend, batch_size, sent, bookings_per_s``.
    """
    import pandas as pd

    from labkit.progress import progress as progress_bar

    for backend in backends:
        check_backend(backend)
    if any(size < 1 for size in batch_sizes):
        raise ValueError(f"batch sizes must be at least 1, got {list(batch_sizes)}")
    texts = [encode(dict(b)) for b in bookings]
    rows = []
    points = [(backend, size) for backend in backends for size in batch_sizes]
    for backend, size in progress_bar(points, desc="throughput points", unit="point", disable=not progress):
        if backend == "kafka":
            sent, per_s = _kafka_burst(config, texts, size, seconds)
        elif backend == "streams":
            sent, per_s = _streams_burst(config, texts, size, seconds)
        else:
            sent, per_s = _bullmq_burst(config, bookings, size, seconds)
        rows.append({"backend": backend, "batch_size": size, "sent": sent, "bookings_per_s": per_s})
    return pd.DataFrame(rows)


def speedup(results: pd.DataFrame, backend: str) -> float:
    """Throughput at ``backend``'s largest batch size divided by its throughput at the smallest."""
    rows = results[results["backend"] == backend].sort_values("batch_size")
    return float(rows["bookings_per_s"].iloc[-1] / rows["bookings_per_s"].iloc[0])


def linger_experiment(
    config: Config, bookings: Sequence[Mapping[str, Any]], linger_values: Iterable[float], rate: float = 2000
) -> pd.DataFrame:
    """Send bookings at a steady ``rate`` per second, once per ``linger.ms``; count Produce requests and latency.

    A burst fills batches whatever linger is; linger matters for a steady trickle, where it
    is the time a record may wait for company. librdkafka's own statistics count the
    Produce requests it sent.

    Returns:
        one row per linger: ``linger_ms, bookings, produce_requests, bookings_per_request,
        p50_ms`` (median time from produce() to the delivery report).
    """
    import pandas as pd

    topic = scratch_name(config)
    _create_topic(config, topic)
    records = [(str(b["booking_id"]).encode(), encode(dict(b)).encode()) for b in bookings]
    rows = []
    try:
        for linger in linger_values:
            sent, latency = _trickle(config, topic, records, linger, rate)
            rows.append(
                {
                    "linger_ms": linger,
                    "bookings": len(records),
                    "produce_requests": sent,
                    "bookings_per_request": len(records) / sent,
                    "p50_ms": statistics.median(latency) * 1000,
                }
            )
    finally:
        _delete_topic(config, topic)
    return pd.DataFrame(rows)


def _trickle(
    config: Config, topic: str, records: Sequence[tuple[bytes, bytes]], linger_ms: float, rate: float
) -> tuple[int, list[float]]:
    """Produce ``records`` paced at ``rate``/s; returns (Produce requests sent, per-record latencies in s)."""
    snapshots: list[dict[str, Any]] = []
    producer = _producer(
        config,
        **{
            "linger.ms": linger_ms,
            "statistics.interval.ms": 100,
            "stats_cb": lambda s: snapshots.append(json.loads(s)),
        },
    )
    _produce_all(producer, topic, [(b"warm-up", b"{}", None)])
    before = _produce_requests(_fresh_stats(producer, snapshots))
    latency: list[float] = []
    start = time.perf_counter()
    for i, (key, value) in enumerate(records):
        due = start + i / rate
        while (now := time.perf_counter()) < due:
            producer.poll(min(0.001, due - now))  # serves delivery reports while waiting
        producer.produce(topic, value, key, on_delivery=_latency_to(latency, time.perf_counter()))
    while len(latency) < len(records):
        producer.poll(0.001)  # not flush(): flush sends at once and would cut linger short
    after = _produce_requests(_fresh_stats(producer, snapshots))
    producer.flush(_KAFKA_TIMEOUT_S)
    return after - before, latency


def _latency_to(latencies: list[float], sent_at: float) -> Callable[[Any, Any], None]:
    """A delivery callback that appends the seconds since ``sent_at``."""

    def on_delivery(error: Any, message: Any) -> None:
        latencies.append(time.perf_counter() - sent_at)

    return on_delivery


def _fresh_stats(producer: Producer, snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The next statistics snapshot librdkafka emits from now on (it emits one every 100 ms)."""
    seen = len(snapshots)
    deadline = time.monotonic() + 5
    while len(snapshots) <= seen and time.monotonic() < deadline:
        producer.poll(0.05)
    if len(snapshots) <= seen:
        raise BackendError("librdkafka emitted no statistics for 5 s")
    return snapshots[-1]


def _produce_requests(stats: Mapping[str, Any]) -> int:
    return sum(int(b.get("req", {}).get("Produce", 0)) for b in stats["brokers"].values())


# -- charts --------------------------------------------------------------------------------------------

_COLORS = {"bullmq": "#d1495b", "streams": "#edae49", "kafka": "#00798c"}


def throughput_chart(results: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Bookings per second against batch size, one line per backend, both axes logarithmic."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    for backend, rows in results.groupby("backend", sort=False):
        rows = rows.sort_values("batch_size")
        ax.plot(
            rows["batch_size"],
            rows["bookings_per_s"],
            marker="o",
            color=_COLORS.get(str(backend)),
            label=str(backend),
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("messages per round trip (Kafka batch.num.messages, XADD pipeline, addBulk chunk)")
    ax.set_ylabel("bookings sent per second")
    ax.set_title("One producer: bigger batches, fewer round trips, more bookings per second")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax


def linger_chart(results: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Bookings per Produce request (bars) and median delivery latency (line) for each linger.ms."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{v:g}" for v in results["linger_ms"]]
    ax.bar(labels, results["bookings_per_request"], color=_COLORS["kafka"], alpha=0.8)
    ax.set_xlabel("linger.ms")
    ax.set_ylabel("bookings per Produce request (bars)")
    latency = ax.twinx()
    latency.plot(labels, results["p50_ms"], color="black", marker="o")
    latency.set_ylabel("median ms to the delivery report (line)")
    latency.set_ylim(bottom=0)
    ax.set_title("A steady trickle: more bookings per request, each waiting longer")
    return ax
