"""What is particular to the Kafka backend, checked against the real Kafka-protocol broker.

Each test runs ``consume()`` in-process as an asyncio task (the cross-backend contract tests
start real worker processes; these look at the topics themselves): the record layout, lag
that stays right after multi-record batches (where the embedded broker's ListOffsets is
wrong), per-key order under concurrency, the retry topic, the dead-letter headers, a broker
that is down, purge, and a handler that outlives ``max.poll.interval.ms``. What is on the
wire is read back with kafka-python, a client independent of the one the backend uses.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from confluent_kafka import Consumer, TopicPartition
from kafka import KafkaConsumer
from kafka import TopicPartition as KafkaPythonPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.partitioner.default import murmur2
from support import consuming, wait_for

from labkit.backends.kafka import KafkaBackend
from labkit.booking import BookingGenerator, encode
from labkit.config import Config
from labkit.errors import BrokerUnavailable, ConfigError
from labkit.events import load_run
from labkit.workflow import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.redis]

PARTITIONS = 3


def bookings(count: int, seed: int = 7, **fault: Any) -> list[dict[str, Any]]:
    """``count`` valid bookings with a fixed ``created_at`` (known wire text), each with ``fault`` if given."""
    made = [b | {"created_at": 1.5} for b in BookingGenerator(seed=seed).bookings(count)]
    if fault:
        for booking in made:
            booking["fault"] = dict(fault)
    return made


def java_partition(key: str, partitions: int = PARTITIONS) -> int:
    """Where the Java client (and kafka-python) puts ``key``: murmur2, as docs/contract.md's keyed topic implies."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def split(location: str) -> tuple[str, int, int]:
    topic, partition, offset = location.rsplit("/", 2)
    return topic, int(partition), int(offset)


async def counts(backend: KafkaBackend) -> dict[str, int]:
    return await backend.ledger.counts()


def events_of(run_dir: Path, event: str) -> pd.DataFrame:
    frame = load_run(run_dir)
    return frame[frame["event"] == event].sort_values("mono")


def read_topic(config: Config, topic: str, expected: int, settle_s: float = 0.5) -> list[ConsumerRecord]:
    """Every record of ``topic``, read with kafka-python until ``expected`` arrived and ``settle_s`` more."""
    consumer = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [KafkaPythonPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + 15
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        settle = time.monotonic() + settle_s
        while time.monotonic() < settle:
            for batch in consumer.poll(timeout_ms=100).values():
                records.extend(batch)
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def partition_count(config: Config, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap, group_id=None)
    try:
        return len(consumer.partitions_for_topic(topic) or ())
    finally:
        consumer.close()


@pytest.mark.timeout(60)
def test_records_are_keyed_by_booking_id_with_the_json_text_as_value(lab_config: Config) -> None:
    sent: list[Any] = [*bookings(30), "{not json"]

    async def scenario() -> list[str]:
        async with KafkaBackend(lab_config) as backend:
            return await backend.produce(sent)

    locations = asyncio.run(scenario())
    topic = lab_config.names.topic
    assert partition_count(lab_config, topic) == PARTITIONS
    assert partition_count(lab_config, lab_config.names.topic_retry) == PARTITIONS
    assert partition_count(lab_config, lab_config.names.topic_dlq) == 1
    records = {(r.partition, r.offset): r for r in read_topic(lab_config, topic, len(sent))}
    assert len(records) == len(sent)
    for message, location in zip(sent, locations, strict=True):
        where, partition, offset = split(location)
        assert where == topic
        record = records[(partition, offset)]
        if isinstance(message, dict):
            assert record.key == message["booking_id"].encode()
            assert record.value == encode(message).encode()
            # The producer hashes keys like the Java client: any Kafka client finds a booking's partition.
            assert partition == java_partition(message["booking_id"])
        else:
            assert record.key is None  # no booking_id to key it by
            assert record.value == message.encode()
    assert {p for p, _ in records} == set(range(PARTITIONS))


@pytest.mark.timeout(60)
def test_lag_counts_every_record_of_multi_record_batches(lab_config: Config, tmp_path: Path) -> None:
    # 30 events of one booking: one key, so one partition, sent as 3 produce calls = 3 batches of 10 records.
    base = bookings(1)[0]
    events = [base | {"seq": seq} for seq in range(30)]

    async def scenario() -> None:
        async with KafkaBackend(lab_config, WorkerSettings(workflow="noop", concurrency=3)) as backend:
            locations = []
            for start in (0, 10, 20):
                locations += await backend.produce(events[start : start + 10])
            topic, partition, _ = split(locations[0])
            assert {split(loc)[:2] for loc in locations} == {(topic, partition)}
            depths = await backend.queue_depths()
            assert depths["lag"][f"{topic}/{partition}"] == 30
            assert depths["backlog"] == 30
            assert depths["in_flight"] == 0

            # What naive lag would use: ListOffsets(latest). Kafka says 30; the embedded broker says the
            # base offset of the newest batch + 1 = 21 (docs/embedded-kafka.md). The backend must not depend on it.
            probe = Consumer({"bootstrap.servers": lab_config.kafka_bootstrap, "group.id": "naive-lag"})
            try:
                _, list_offsets_end = probe.get_watermark_offsets(TopicPartition(topic, partition), 5, cached=False)
            finally:
                probe.close()
            assert list_offsets_end in (21, 30)

            async with consuming(backend, tmp_path):
                await wait_for(lambda: _backlog_is(backend, 0), what="backlog 0")
            depths = await backend.queue_depths()
            assert set(depths["lag"].values()) == {0}
            assert len(depths["lag"]) == 3 * PARTITIONS  # the work, retry and delay topics
            assert (await counts(backend))["runs"] == 30

    asyncio.run(scenario())


async def _backlog_is(backend: KafkaBackend, value: int) -> bool:
    return bool((await backend.queue_depths())["backlog"] == value)


@pytest.mark.timeout(60)
def test_each_keys_events_are_handled_in_order_while_partitions_run_concurrently(
    lab_config: Config, tmp_path: Path
) -> None:
    events = [e | {"created_at": 1.5} for e in BookingGenerator(seed=3, events_per_booking=3).bookings(40)]
    settings = WorkerSettings(concurrency=2, step_ms=2)

    async def scenario() -> None:
        async with KafkaBackend(lab_config, settings) as backend:
            await backend.produce(events)
            async with consuming(backend, tmp_path):
                # Every event's run, not 40 completed bookings: that count is reached when the last booking's
                # first event is done, with its later events still to run (and dropped by the warm stop).
                await wait_for(lambda: _runs_are(backend, 120), what="120 workflow runs")

    asyncio.run(scenario())
    completed = events_of(tmp_path, "completed")
    assert len(completed) == 120
    for booking_id, rows in completed.groupby("booking_id"):
        assert list(rows["seq"]) == [0, 1, 2], booking_id
    # Handler calls overlapped (partitions concurrently), but never more than `concurrency` at once.
    frame = load_run(tmp_path)
    steps = frame[frame["event"].isin(["started", "completed"])].sort_values("mono")
    running = (steps["event"] == "started").astype(int) - (steps["event"] == "completed").astype(int)
    assert running.cumsum().max() == settings.concurrency


async def _completed_is(backend: KafkaBackend, value: int) -> bool:
    return (await counts(backend))["completed"] == value


async def _runs_are(backend: KafkaBackend, value: int) -> bool:
    return (await counts(backend))["runs"] >= value


@pytest.mark.timeout(60)
def test_retries_wait_in_the_retry_topic_without_blocking_their_partition(lab_config: Config, tmp_path: Path) -> None:
    settings = WorkerSettings(concurrency=1, max_attempts=3, backoff_ms=600)
    faulty = bookings(1, seed=11, fail_times=2)[0]
    partition = java_partition(faulty["booking_id"])
    neighbours = [b for b in bookings(40, seed=12) if java_partition(b["booking_id"]) == partition][:6]
    assert len(neighbours) == 6

    async def scenario() -> str:
        async with KafkaBackend(lab_config, settings) as backend:
            [origin] = await backend.produce([faulty])
            await backend.produce(neighbours)  # behind the faulty booking, in the same partition
            async with consuming(backend, tmp_path):
                await wait_for(lambda: _completed_is(backend, 7), what="7 completed bookings")
            return origin

    origin = asyncio.run(scenario())
    started = events_of(tmp_path, "started")
    attempts = started[started["booking_id"] == faulty["booking_id"]]
    assert list(attempts["attempt"]) == [1, 2, 3]
    assert set(attempts["source"]) == {origin}  # every attempt names the original record
    gaps = attempts["mono"].diff().dropna().tolist()
    assert gaps[0] >= settings.backoff_for(1)
    assert gaps[1] >= settings.backoff_for(2)
    # The neighbours did not wait for the retries: all were done before attempt 2 began.
    completed = events_of(tmp_path, "completed")
    neighbour_done = completed[completed["booking_id"].isin([b["booking_id"] for b in neighbours])]
    assert len(neighbour_done) == 6
    assert neighbour_done["mono"].max() < attempts["mono"].iloc[1]

    retries = read_topic(lab_config, lab_config.names.topic_retry, 2)
    assert [r.partition for r in retries] == [partition, partition]
    assert {r.key for r in retries} == {faulty["booking_id"].encode()}
    assert {r.value for r in retries} == {encode(faulty).encode()}
    headers = [dict(r.headers) for r in retries]
    assert [h["attempts"] for h in headers] == [b"2", b"3"]
    assert {h["source"] for h in headers} == {origin.encode()}
    gap_ms = int(headers[1]["not_before"]) - int(headers[0]["not_before"])
    assert gap_ms >= settings.backoff_for(2) * 1000  # each not_before = failure time + that attempt's backoff


@pytest.mark.timeout(60)
def test_dead_letters_keep_key_value_and_carry_reason_attempts_source(lab_config: Config, tmp_path: Path) -> None:
    settings = WorkerSettings(max_attempts=2, backoff_ms=100)
    poison = bookings(1, seed=21, poison=True)[0]
    malformed = '{"booking_id": "bk-broken", "guests": "two"}'
    not_json = b"\xff\xfe not even utf-8"

    async def scenario() -> tuple[list[str], list[dict[str, Any]]]:
        async with KafkaBackend(lab_config, settings) as backend:
            sent = await backend.produce([poison, malformed, not_json])
            async with consuming(backend, tmp_path):
                await wait_for(lambda: _dead_is(backend, 3), what="3 dead letters")
            return sent, await backend.dead_letters()

    sources, letters = asyncio.run(scenario())
    records = read_topic(lab_config, lab_config.names.topic_dlq, 3)
    by_source = {dict(r.headers)["source"].decode(): r for r in records}
    assert set(by_source) == set(sources)  # each dead letter names its original record, once

    poisoned = by_source[sources[0]]
    assert poisoned.key == poison["booking_id"].encode()
    assert poisoned.value == encode(poison).encode()
    assert dict(poisoned.headers)["attempts"] == b"2"
    assert dict(poisoned.headers)["reason"].decode().startswith("poison:")

    bad = by_source[sources[1]]
    assert bad.key == b"bk-broken"  # a malformed message keeps the id it had as its key
    assert bad.value == malformed.encode()
    assert dict(bad.headers)["attempts"] == b"1"
    assert dict(bad.headers)["reason"].decode().startswith("bad message:")

    garbage = by_source[sources[2]]
    assert garbage.key is None
    assert garbage.value == not_json
    assert dict(garbage.headers)["attempts"] == b"1"

    assert sorted((d["source"], d["attempts"], d["reason"]) for d in letters) == sorted(
        (dict(r.headers)["source"].decode(), int(dict(r.headers)["attempts"]), dict(r.headers)["reason"].decode())
        for r in records
    )
    assert {d["booking_id"] for d in letters} == {poison["booking_id"], "bk-broken", None}


async def _dead_is(backend: KafkaBackend, value: int) -> bool:
    return (await counts(backend))["dead_lettered"] == value


def _dead_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
def test_a_broker_that_is_down_raises_broker_unavailable_quickly(lab_config: Config) -> None:
    config = lab_config.with_(kafka_bootstrap=f"127.0.0.1:{_dead_port()}")

    async def scenario() -> None:
        async with KafkaBackend(config) as backend:
            calls: list[Callable[[], Awaitable[Any]]] = [
                backend.setup,
                lambda: backend.produce(bookings(1)),
                backend.queue_depths,
                backend.dead_letters,
                backend.purge,
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(BrokerUnavailable) as raised:
                    await call()
                assert time.monotonic() - started < 6
                message = str(raised.value)
                assert "\n" not in message
                assert config.kafka_bootstrap in message

    asyncio.run(scenario())


@pytest.mark.timeout(90)
def test_purge_then_setup_leaves_empty_topics_and_no_group(lab_config: Config, tmp_path: Path) -> None:
    settings = WorkerSettings(max_attempts=1, workflow="noop")
    names = lab_config.names

    async def scenario() -> None:
        async with KafkaBackend(lab_config, settings) as backend:
            await backend.produce([*bookings(20), "{not json"])
            async with consuming(backend, tmp_path):
                await wait_for(lambda: _completed_is(backend, 20), what="20 completed bookings")
                await wait_for(lambda: _dead_is(backend, 1), what="the dead letter")
            await backend.reset()
            depths = await backend.queue_depths()
            assert depths["backlog"] == 0
            assert len(depths["lag"]) == 3 * PARTITIONS  # the work, retry and delay topics
            assert await backend.dead_letters() == []
            assert await counts(backend) == {
                "completed": 0,
                "dead_lettered": 0,
                "retried": 0,
                "duplicates": 0,
                "runs": 0,
            }
            # The group's committed offsets went with it: a consumer of the new topics starts from nothing.
            probe = Consumer({"bootstrap.servers": lab_config.kafka_bootstrap, "group.id": names.kafka_group})
            try:
                committed = probe.committed([TopicPartition(names.topic, p) for p in range(PARTITIONS)], timeout=5)
            finally:
                probe.close()
            assert all(tp.offset < 0 for tp in committed)
            # The recreated topic works and starts again at offset 0.
            [location] = await backend.produce(bookings(1, seed=99))
            assert split(location)[2] == 0

    asyncio.run(scenario())
    for topic in (names.topic, names.topic_retry, names.topic_dlq):
        expected = 1 if topic == names.topic else 0
        assert len(read_topic(lab_config, topic, expected)) == expected
    assert partition_count(lab_config, names.topic) == PARTITIONS


@pytest.mark.timeout(30)
def test_max_poll_interval_below_the_session_timeout_is_refused_in_one_line(lab_config: Config, tmp_path: Path) -> None:
    settings = WorkerSettings(options={"max_poll_interval_ms": "1000"})

    async def scenario() -> None:
        async with KafkaBackend(lab_config, settings) as backend:
            with pytest.raises(ConfigError, match=r"max_poll_interval_ms=1000 .* at least 6000"):
                async with consuming(backend, tmp_path):
                    pass

    asyncio.run(scenario())


@pytest.mark.timeout(90)
def test_a_handler_slower_than_max_poll_interval_makes_the_worker_leave_the_group(
    lab_config: Config, tmp_path: Path
) -> None:
    settings = WorkerSettings(options={"max_poll_interval_ms": "6000"})
    slow = bookings(1, seed=31, slow_ms=6500)[0]

    async def scenario() -> None:
        async with KafkaBackend(lab_config, settings) as backend:
            await backend.produce([slow])
            async with consuming(backend, tmp_path):
                # The first run is given up after 6 s; once it returns the worker rejoins and the
                # uncommitted record is delivered again: Kafka's rule costs a duplicate run.
                await wait_for(lambda: _started_times(tmp_path, slow["booking_id"], 2), timeout=40, what="a rerun")

    asyncio.run(scenario())
    frame = load_run(tmp_path)
    left = frame[frame["event"] == "left_group"]
    assert len(left) >= 1
    assert "max.poll.interval.ms=6000" in left["reason"].iloc[0]
    first_start = frame[(frame["event"] == "started")]["mono"].iloc[0]
    assert 6.0 <= left["mono"].iloc[0] - first_start < 7.5
    order = [e for e in frame["event"] if e in ("left_group", "revoked", "rejoining", "assigned")]
    assert order[:5] == ["assigned", "left_group", "revoked", "rejoining", "assigned"]
    assert (frame["event"] == "completed").sum() >= 1


async def _started_times(run_dir: Path, booking_id: str, times: int) -> bool:
    frame = load_run(run_dir)
    return bool(((frame["event"] == "started") & (frame["booking_id"] == booking_id)).sum() >= times)


@pytest.mark.timeout(60)
def test_renewing_the_group_keeps_its_offsets_and_is_counted_as_a_repair(lab_config: Config, tmp_path: Path) -> None:
    names = lab_config.names

    async def scenario() -> None:
        async with KafkaBackend(lab_config, WorkerSettings(workflow="noop")) as backend:
            await backend.produce(bookings(12))
            async with consuming(backend, tmp_path):
                await wait_for(lambda: _completed_is(backend, 12), what="12 completed bookings")
            await wait_for(lambda: _backlog_is(backend, 0), what="the offsets committed")
            assert set((await backend.broker_repairs()).values()) == {0}
            await backend.renew_group()
            assert (await backend.broker_repairs())["departed-leader"] == 1
            assert (await backend.queue_depths())["backlog"] == 0  # the group stands where it stood
        async with KafkaBackend(lab_config, WorkerSettings(options={"broker_repairs": "off"})) as off:
            await off.renew_group()  # switched off: does nothing, counts nothing
            assert (await off.broker_repairs())["departed-leader"] == 1

    asyncio.run(scenario())
    probe = Consumer({"bootstrap.servers": lab_config.kafka_bootstrap, "group.id": names.kafka_group})
    try:
        committed = probe.committed([TopicPartition(names.topic, p) for p in range(PARTITIONS)], timeout=5)
    finally:
        probe.close()
    assert sum(tp.offset for tp in committed if tp.offset > 0) == 12
