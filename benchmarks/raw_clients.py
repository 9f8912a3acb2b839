"""The baseline: the plainest correct loop each client allows, with no labkit in it.

Each loop uses the client library labkit itself uses (redis.asyncio, confluent-kafka, the
bullmq package), and the broker-side settings labkit uses (BullMQ's lock, stalled check and
retention of finished jobs; Kafka's acks=all and idempotence), so a comparison with it
measures labkit's own work, not a choice of client or of settings.

- ``--role consume``: decode the JSON of every message (the least a real consumer does)
  and acknowledge it only after that (at-least-once), as labkit does. It stops after
  ``--idle`` seconds without a message.
- ``--role produce``: encode a booking per message with ``json.dumps`` and send batches of
  500 as fast as the broker acknowledges them (Kafka acks=all), for ``--seconds``.

Either prints one JSON line: how many messages it handled, the monotonic times of the
first and last, and ``marks``: ``[unix time, messages so far]`` after each batch.

    python benchmarks/raw_clients.py --backend streams --role consume --name raw-1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from labkit.backends.bullmq import KEEP_COMPLETED, KEEP_FAILED, LOCK_DURATION_MS, STALLED_INTERVAL_MS
from labkit.config import Config

BATCH = 500
#: BullMQ job options as labkit sends them: finished jobs are trimmed, not kept forever.
RETENTION = {"removeOnComplete": {"count": KEEP_COMPLETED}, "removeOnFail": {"count": KEEP_FAILED}}


class Tally:
    """Counts messages and notes when each batch was done."""

    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.marks: list[tuple[float, int]] = []

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.first = self.first or now
        self.count += n
        self.last = now
        self.marks.append((time.time(), self.count))

    def result(self) -> dict[str, Any]:
        return {"count": self.count, "first": self.first, "last": self.last, "marks": self.marks}


def booking(n: int) -> dict[str, Any]:
    return {
        "booking_id": f"raw-{n % 1000:07d}", "user_id": "raw", "hotel_id": f"hotel-{n % 50:02d}",
        "check_in": "2027-03-01", "check_out": "2027-03-03", "guests": 2, "amount_cents": 24000,
        "seq": n // 1000, "created_at": time.time(), "n": n, "pad": "x" * 25,
    }  # fmt: skip


async def streams_consume(config: Config, name: str, idle: float) -> Tally:
    """XREADGROUP a batch, decode each entry, XACK the batch."""
    import redis.asyncio as aioredis

    names, tally = config.names, Tally()
    client = aioredis.Redis.from_url(config.redis_url)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < idle:
        reply = await client.xreadgroup(names.stream_group, name, {names.stream: ">"}, count=BATCH, block=100)
        entries = reply[0][1] if reply else []
        if not entries:
            continue
        for _, fields in entries:
            json.loads(fields[b"booking"])
        await client.xack(names.stream, names.stream_group, *[entry_id for entry_id, _ in entries])
        tally.add(len(entries))
        quiet_since = time.monotonic()
    await client.aclose()
    return tally


async def streams_produce(config: Config, seconds: float) -> Tally:
    """XADD batches in one pipelined round trip each."""
    import redis.asyncio as aioredis

    tally = Tally()
    client = aioredis.Redis.from_url(config.redis_url)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        async with client.pipeline(transaction=False) as pipe:
            for n in range(tally.count, tally.count + BATCH):
                pipe.xadd(config.names.stream, {"booking": json.dumps(booking(n))})
            await pipe.execute()
        tally.add(BATCH)
    await client.aclose()
    return tally


def kafka_consume(config: Config, name: str, idle: float) -> Tally:
    """poll a batch, decode each record, store its offset after processing; auto-commit sends them."""
    from confluent_kafka import Consumer

    names, tally = config.names, Tally()
    consumer = Consumer(
        {
            "bootstrap.servers": config.kafka_bootstrap,
            "group.id": names.kafka_group,
            "client.id": name,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 2000,
            "fetch.wait.max.ms": 100,
        }
    )
    consumer.subscribe([names.topic])
    quiet_since = time.monotonic()
    # The first assignment takes a few seconds: wait for it before counting idle time.
    while time.monotonic() - quiet_since < idle or tally.first is None and time.monotonic() - quiet_since < 30:
        records = consumer.consume(num_messages=BATCH, timeout=0.1)
        if not records:
            continue
        for record in records:
            if record.error():
                continue
            json.loads(record.value())
            consumer.store_offsets(record)
        tally.add(len(records))
        quiet_since = time.monotonic()
    consumer.close()
    return tally


def kafka_produce(config: Config, seconds: float) -> Tally:
    """produce a batch (acks=all, idempotent, linger 5 ms, as labkit), then flush it."""
    from confluent_kafka import Producer

    tally = Tally()
    producer = Producer(
        {"bootstrap.servers": config.kafka_bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5}
    )
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for n in range(tally.count, tally.count + BATCH):
            message = booking(n)
            producer.produce(config.names.topic, json.dumps(message), message["booking_id"])
            producer.poll(0)
        producer.flush()
        tally.add(BATCH)
    return tally


async def bullmq_consume(config: Config, name: str, idle: float, concurrency: int, record: bool = False) -> Tally:
    """A bullmq Worker whose processor encodes the job data BullMQ already decoded.

    With ``record``, the processor also stores the booking id in a Redis set before it returns, one SADD per
    job: the plainest way to keep labkit's promise that a completion is recorded before the job is acked.
    """
    from bullmq import Worker
    from redis.asyncio import Redis

    tally = Tally()

    recorder = Redis.from_url(config.redis_url)
    completed = config.names.key("bullmq", "raw-completed")  # a lab key: the benchmark's reset deletes it

    async def processor(job: Any, token: str) -> None:
        json.dumps(job.data)
        if record:
            await recorder.sadd(completed, job.data["booking_id"])

    # The two known traps fixed as labkit fixes them (see labkit/backends/bullmq.py): a client without a
    # socket timeout, and the server version read before run(); anything else would slow the baseline.
    connection = Redis.from_url(config.redis_url, decode_responses=True, socket_timeout=None)
    options = {
        "connection": connection,
        "concurrency": concurrency,
        "autorun": False,
        "lockDuration": LOCK_DURATION_MS,
        "stalledInterval": STALLED_INTERVAL_MS,
        "removeOnComplete": {"count": KEEP_COMPLETED},
        "removeOnFail": {"count": KEEP_FAILED},
    }
    worker = Worker(config.names.bullmq_queue, processor, options)
    worker.on("completed", lambda *_: tally.add(1))
    await worker.blockingRedisConnection.getRedisVersion()
    await worker.redisConnection.getRedisVersion()
    running = asyncio.ensure_future(worker.run())
    started = time.monotonic()
    while True:
        await asyncio.sleep(0.1)
        mark = tally.last or started
        if time.monotonic() - mark > idle and (tally.first or time.monotonic() - started > 30):
            break
    await worker.close()
    await running
    await recorder.aclose()
    return tally


async def bullmq_produce(config: Config, seconds: float) -> Tally:
    """Queue.addBulk batches of jobs."""
    from bullmq import Queue
    from redis.asyncio import Redis

    tally = Tally()
    queue = Queue(config.names.bullmq_queue, {"connection": Redis.from_url(config.redis_url, decode_responses=True)})
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        jobs = [
            {"name": "booking", "data": booking(n), "opts": RETENTION} for n in range(tally.count, tally.count + BATCH)
        ]
        await queue.addBulk(jobs)
        tally.add(BATCH)
    await queue.close()
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["bullmq", "streams", "kafka"], required=True)
    parser.add_argument("--role", choices=["consume", "produce"], default="consume")
    parser.add_argument("--name", default="raw-1")
    parser.add_argument("--idle", type=float, default=2.0, help="consume: stop after this long without a message")
    parser.add_argument("--seconds", type=float, default=10.0, help="produce: for this long")
    parser.add_argument("--concurrency", type=int, default=16, help="BullMQ worker concurrency")
    parser.add_argument("--record", action="store_true", help="BullMQ: store each completion in Redis before the ack")
    args = parser.parse_args()
    config = Config.from_env()
    if args.role == "produce":
        runs = {
            "streams": lambda: asyncio.run(streams_produce(config, args.seconds)),
            "kafka": lambda: kafka_produce(config, args.seconds),
            "bullmq": lambda: asyncio.run(bullmq_produce(config, args.seconds)),
        }
    else:
        runs = {
            "streams": lambda: asyncio.run(streams_consume(config, args.name, args.idle)),
            "kafka": lambda: kafka_consume(config, args.name, args.idle),
            "bullmq": lambda: asyncio.run(bullmq_consume(config, args.name, args.idle, args.concurrency, args.record)),
        }
    print(json.dumps(runs[args.backend]().result()), flush=True)


if __name__ == "__main__":
    main()
