"""What is particular to the Redis Streams backend, checked against a real Valkey/Redis server.

Each test runs ``consume()`` in-process as an asyncio task (the cross-backend contract tests
start real worker processes; these look at the stream itself): the entry layout, the group
at id 0, retries as pending entries reclaimed by XAUTOCLAIM after ``backoff_ms`` of idle
time, entries stranded by a dead consumer, the heartbeat, the dead-letter stream, the
group's depths and purge. Everything on the wire is read back with a plain redis client.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis.asyncio as aioredis
from support import consuming, wait_for

from labkit.backends.base import Backend
from labkit.backends.streams import StreamsBackend
from labkit.booking import BookingGenerator, encode
from labkit.config import Config
from labkit.errors import BrokerUnavailable
from labkit.events import EventLog, load_run
from labkit.workflow import BookingHandler, Delivery, Outcome, Result, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.redis]


def bookings(count: int, **fault: Any) -> list[dict[str, Any]]:
    """``count`` valid bookings, each with the same fault directive when one is given."""
    made = BookingGenerator(seed=7).bookings(count)
    if fault:
        for booking in made:
            booking["fault"] = dict(fault)
    return made


def plain_client(config: Config) -> aioredis.Redis:
    return aioredis.Redis.from_url(config.redis_url)


async def completed(backend: Backend) -> int:
    return (await backend.ledger.counts())["completed"]


def events_of(run_dir: Path, event: str) -> pd.DataFrame:
    frame = load_run(run_dir)
    return frame[frame["event"] == event]


@pytest.mark.timeout(30)
def test_each_booking_is_one_entry_whose_booking_field_is_the_text_as_sent(lab_config: Config, tmp_path: Path) -> None:
    booking = bookings(1)[0] | {"created_at": 1.5}
    sent: list[str | bytes] = [encode(booking), "{not json", b"\xff\xfe not utf-8"]

    async def scenario() -> None:
        async with StreamsBackend(lab_config) as backend:
            ids = await backend.produce([booking, *sent[1:]])
        client = plain_client(lab_config)
        try:
            entries = await client.xrange(lab_config.names.stream)
        finally:
            await client.aclose()
        assert [entry_id.decode() for entry_id, _ in entries] == ids
        assert [fields for _, fields in entries] == [
            {b"booking": text.encode() if isinstance(text, str) else text} for text in sent
        ]

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_group_starts_at_id_0_so_entries_sent_before_any_worker_are_processed(
    lab_config: Config, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with StreamsBackend(lab_config) as backend:
            early = await backend.produce(bookings(10))  # before the group exists: XADD creates the stream
            await backend.setup()
            await backend.setup()  # BUSYGROUP the second time: harmless
            client = plain_client(lab_config)
            try:
                (group,) = await client.xinfo_groups(lab_config.names.stream)
                assert group["name"].decode() == lab_config.names.stream_group
                assert group["last-delivered-id"] == b"0-0"
                assert group["lag"] == 10
                late = await backend.produce(BookingGenerator(seed=8).bookings(10))
                async with consuming(backend, tmp_path, "w1"):
                    await wait_for(lambda: _equals(completed(backend), 20), what="20 completions")
                consumers = await client.xinfo_consumers(lab_config.names.stream, lab_config.names.stream_group)
            finally:
                await client.aclose()
            started = events_of(tmp_path, "started")
            assert sorted(started["source"]) == sorted(f"entry {i}" for i in early + late)
            assert set(started["attempt"]) == {1}
            depths = await backend.queue_depths()
            assert (depths["backlog"], depths["in_flight"]) == (0, 0)
            # A warm stop with nothing pending removes the consumer; one with pending entries keeps it.
            assert consumers == []

    asyncio.run(scenario())


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@pytest.mark.timeout(30)
def test_failed_entry_stays_pending_and_is_reclaimed_after_backoff_ms_of_idle_time(
    lab_config: Config, tmp_path: Path
) -> None:
    backoff_ms = 500
    settings = WorkerSettings(max_attempts=3, backoff_ms=backoff_ms)

    async def scenario() -> None:
        async with StreamsBackend(lab_config, settings) as backend:
            await backend.setup()
            (entry_id,) = await backend.produce(bookings(1, fail_times=2))
            async with consuming(backend, tmp_path, "w1"):

                async def first_retry_logged() -> bool:
                    return not events_of(tmp_path, "retried").empty

                await wait_for(first_retry_logged, what="the first retry")
                (pending,) = await backend.redis.xpending_range(
                    lab_config.names.stream, lab_config.names.stream_group, "-", "+", 10
                )
                await wait_for(lambda: _equals(completed(backend), 1), what="the booking to complete")
            frame = load_run(tmp_path)

        # Not acked after the failure: still in w1's pending list, delivered once so far.
        assert pending["message_id"].decode() == entry_id
        assert pending["consumer"] == b"w1"
        assert pending["times_delivered"] == 1
        started = frame[frame["event"] == "started"]
        failed = frame[frame["event"] == "failed"]
        assert list(started["attempt"]) == [1, 2, 3]
        assert list(failed["attempt"]) == [1, 2]
        assert set(started["source"]) == {f"entry {entry_id}"}
        # Each retry came no sooner than backoff_ms after the failure (XAUTOCLAIM min-idle).
        waits = started["mono"].to_numpy()[1:] - failed["mono"].to_numpy()
        assert all(wait >= backoff_ms / 1000 - 0.005 for wait in waits), waits
        assert list(frame[frame["event"] == "retried"]["delay_ms"]) == [backoff_ms, backoff_ms]

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_entries_stranded_in_a_dead_consumers_pending_list_are_claimed_and_completed(
    lab_config: Config, tmp_path: Path
) -> None:
    settings = WorkerSettings(backoff_ms=200)
    stream, group = lab_config.names.stream, lab_config.names.stream_group

    async def scenario() -> None:
        async with StreamsBackend(lab_config, settings) as backend:
            await backend.setup()
            ids = await backend.produce(bookings(5))
            # "ghost" reads everything and dies before acknowledging anything.
            await backend.redis.xreadgroup(group, "ghost", {stream: ">"}, count=10)
            before = await backend.queue_depths()
            async with consuming(backend, tmp_path, "w1"):
                await wait_for(lambda: _equals(completed(backend), 5), what="5 completions")
            after = await backend.queue_depths()

        assert (before["backlog"], before["in_flight"], before["pending_per_consumer"]) == (0, 5, {"ghost": 5})
        assert (after["in_flight"], after["pending_per_consumer"]) == (0, {})
        started = events_of(tmp_path, "started")
        assert sorted(started["source"]) == sorted(f"entry {i}" for i in ids)
        assert set(started["attempt"]) == {2}  # the ghost's delivery was the first

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_entry_delivered_more_than_max_attempts_times_is_dead_lettered_without_running(
    lab_config: Config, tmp_path: Path
) -> None:
    """A booking whose workers were killed on every attempt: the claim count alone sends it to the DLQ."""
    settings = WorkerSettings(max_attempts=3, backoff_ms=200)
    stream, group = lab_config.names.stream, lab_config.names.stream_group

    async def scenario() -> None:
        async with StreamsBackend(lab_config, settings) as backend:
            await backend.setup()
            (entry_id,) = await backend.produce(bookings(1))
            await backend.redis.xreadgroup(group, "ghost", {stream: ">"}, count=1)  # delivery 1
            for _ in range(2):  # deliveries 2 and 3, each to a worker that then died
                await backend.redis.xclaim(stream, group, "ghost", 0, [entry_id])
            async with consuming(backend, tmp_path, "w1"):

                async def dead_lettered() -> bool:
                    return len(await backend.dead_letters()) == 1

                await wait_for(dead_lettered, what="the dead letter")
            (letter,) = await backend.dead_letters()
            depths = await backend.queue_depths()

        assert letter["attempts"] == 4
        assert letter["source"] == entry_id
        assert letter["reason"].startswith("delivered 4 times without a verdict")
        assert events_of(tmp_path, "started").empty  # the workflow never ran again
        assert depths["in_flight"] == 0

    asyncio.run(scenario())


def _slow_booking_runs(lab_config: Config, run_dir: Path, heartbeat: str) -> pd.DataFrame:
    """One booking slower than 3 x backoff_ms, two consumers; returns its ``started`` events."""
    backoff_ms = 300
    # max_attempts high enough that claims without a heartbeat never dead-letter the booking.
    settings = WorkerSettings(backoff_ms=backoff_ms, max_attempts=20, options={"heartbeat": heartbeat})

    async def scenario() -> None:
        async with StreamsBackend(lab_config, settings) as one, StreamsBackend(lab_config, settings) as two:
            await one.setup()
            await one.produce(bookings(1, slow_ms=3 * backoff_ms))
            async with consuming(one, run_dir, "w1"), consuming(two, run_dir, "w2"):

                async def settled() -> bool:
                    frame = load_run(run_dir)
                    runs = (frame["event"] == "started").sum()
                    done = (frame["event"] == "completed").sum()
                    return bool(runs and done == runs and (await one.queue_depths())["in_flight"] == 0)

                await wait_for(settled, what="every run of the slow booking to finish")
                await asyncio.sleep(2 * backoff_ms / 1000)  # time for a late duplicate to show up

    asyncio.run(scenario())
    return events_of(run_dir, "started")


@pytest.mark.timeout(30)
def test_heartbeat_keeps_a_slow_booking_from_being_claimed_by_another_consumer(
    lab_config: Config, tmp_path: Path
) -> None:
    started = _slow_booking_runs(lab_config, tmp_path, heartbeat="1")
    assert len(started) == 1
    assert list(started["attempt"]) == [1]  # JUSTID re-claims never counted as deliveries


@pytest.mark.timeout(30)
def test_without_heartbeat_a_slow_booking_is_processed_more_than_once(lab_config: Config, tmp_path: Path) -> None:
    started = _slow_booking_runs(lab_config, tmp_path, heartbeat="0")
    assert len(started) >= 2
    assert list(started["attempt"]) == list(range(1, len(started) + 1))


@pytest.mark.timeout(30)
def test_dead_letter_stream_entries_for_a_bad_message_and_a_poison_booking(lab_config: Config, tmp_path: Path) -> None:
    settings = WorkerSettings(max_attempts=3, backoff_ms=100)
    malformed = '{"booking_id": "bk-bad", "guests": '

    async def scenario() -> None:
        async with StreamsBackend(lab_config, settings) as backend:
            await backend.setup()
            bad_id, poison_id = await backend.produce([malformed, bookings(1, poison=True)[0]])
            async with consuming(backend, tmp_path, "w1"):

                async def both_dead_lettered() -> bool:
                    return (await backend.redis.xlen(lab_config.names.stream_dlq)) == 2

                await wait_for(both_dead_lettered, what="two dead letters")
            raw = await backend.redis.xrange(lab_config.names.stream_dlq)
            # The same entry dead-lettered again (its worker died before XACK): no second dead letter.
            delivery = Delivery(malformed, 1, f"entry {bad_id}")
            events = EventLog(tmp_path, "w2", "streams")
            handler = BookingHandler(backend.ledger, events, settings, tmp_path)
            await backend.dead_letter(handler, delivery, Result(Outcome.DEAD, None, "bad message: again"))
            events.close()
            letters = await backend.dead_letters()
            depths = await backend.queue_depths()

            fields = {entry[1][b"source_id"].decode(): entry[1] for entry in raw}
            assert [list(f) for f in fields.values()] == [[b"booking", b"reason", b"attempts", b"source_id"]] * 2
            assert fields[bad_id][b"booking"] == malformed.encode()
            assert fields[bad_id][b"reason"].startswith(b"bad message: message is not valid JSON")
            assert fields[bad_id][b"attempts"] == b"1"
            assert fields[poison_id][b"reason"].startswith(b"poison: ")
            assert fields[poison_id][b"attempts"] == b"3"
            assert len(letters) == 2
            assert {(d["source"], d["attempts"]) for d in letters} == {(bad_id, 1), (poison_id, 3)}
            assert depths["in_flight"] == 0  # dead-lettered entries are acknowledged
            failed = events_of(tmp_path, "failed")
            assert list(failed[failed["source"] == delivery.source]["attempt"]) == [1]  # never retried

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_queue_depths_reports_lag_pending_and_pending_per_consumer(lab_config: Config) -> None:
    stream, group = lab_config.names.stream, lab_config.names.stream_group

    async def scenario() -> None:
        async with StreamsBackend(lab_config) as backend:
            empty = await backend.queue_depths()
            await backend.setup()
            ids = await backend.produce(bookings(10))
            await backend.redis.xreadgroup(group, "ghost", {stream: ">"}, count=3)
            await backend.redis.xreadgroup(group, "other", {stream: ">"}, count=2)
            await backend.redis.xack(stream, group, ids[3])
            depths = await backend.queue_depths()
            # Deleting a never-delivered entry makes Redis report lag as null: counted by XRANGE instead.
            await backend.redis.xdel(stream, ids[7])
            (info,) = await backend.redis.xinfo_groups(stream)
            after_delete = await backend.queue_depths()

        assert (empty["backlog"], empty["in_flight"], empty["stream_length"]) == (0, 0, 0)
        assert depths == {
            "backlog": 5,
            "delayed": 0,
            "in_flight": 4,
            "pending_per_consumer": {"ghost": 3, "other": 1},
            "last_delivered_id": ids[4],
            "stream_length": 10,
            "dlq_length": 0,
        }
        assert info["lag"] is None
        assert (after_delete["backlog"], after_delete["stream_length"]) == (4, 9)

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_purge_deletes_streams_group_and_dead_letter_markers(lab_config: Config, tmp_path: Path) -> None:
    names = lab_config.names

    async def scenario() -> None:
        async with StreamsBackend(lab_config) as backend:
            await backend.setup()
            (entry_id,) = await backend.produce(["not json"])
            async with consuming(backend, tmp_path, "w1"):
                await wait_for(lambda: _equals(backend.redis.xlen(names.stream_dlq), 1), what="the dead letter")
            marker = backend.ledger.key("dlq-written")
            assert await backend.redis.sismember(marker, entry_id)
            await backend.purge()
            assert await backend.redis.exists(names.stream, names.stream_dlq, marker) == 0
            assert await backend.dead_letters() == []
            depths = await backend.queue_depths()
            assert (depths["backlog"], depths["in_flight"], depths["stream_length"]) == (0, 0, 0)

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_worker_running_through_a_purge_creates_the_group_again_and_carries_on(
    lab_config: Config, tmp_path: Path
) -> None:
    names = lab_config.names

    async def scenario() -> None:
        async with StreamsBackend(lab_config) as backend:
            await backend.setup()
            await backend.produce(bookings(2))
            async with consuming(backend, tmp_path, "w1"):
                await wait_for(lambda: _equals(completed(backend), 2), what="2 completions")
                await backend.purge()
                await backend.ledger.reset()
                # The worker meets NOGROUP, creates the stream and group again at id 0, and goes on.
                await backend.produce(BookingGenerator(seed=9).bookings(3))
                await wait_for(lambda: _equals(completed(backend), 3), what="3 completions after the purge")
            (group,) = await backend.redis.xinfo_groups(names.stream)

        assert group["name"].decode() == names.stream_group
        assert (group["pending"], group["entries-read"]) == (0, 3)

    asyncio.run(scenario())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(30)
def test_redis_going_away_is_broker_unavailable_not_a_client_exception(lab_config: Config, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with StreamsBackend(lab_config) as backend:
            # Swap in a client for a port nothing listens on: as if the server died after connect().
            await backend.redis.aclose()
            backend._redis = aioredis.Redis(port=_closed_port(), socket_connect_timeout=1)
            for call in (backend.produce(bookings(1)), backend.queue_depths(), backend.setup()):
                with pytest.raises(BrokerUnavailable, match="labkit up"):
                    await call
            events = EventLog(tmp_path, "w1", "streams")
            handler = BookingHandler(backend.ledger, events, backend.settings, tmp_path)
            with pytest.raises(BrokerUnavailable):
                await backend.consume(handler, asyncio.Event())
            events.close()

    asyncio.run(scenario())
