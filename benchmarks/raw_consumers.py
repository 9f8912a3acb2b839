"""The baseline: the plainest correct consumer loop each client allows, with no labkit in it.

Each loop decodes the JSON of every message (the least a real consumer does) and
acknowledges it only after that, like labkit (at-least-once). It stops after ``--idle``
seconds without a message and prints one JSON line: how many messages it handled, and
the monotonic times of the first receive and the last acknowledgement.

    python benchmarks/raw_consumers.py --backend streams --name raw-1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from labkit.config import Config


def streams_loop(config: Config, name: str, idle: float) -> dict[str, Any]:
    """XREADGROUP a batch, decode each entry, XACK the batch."""
    import redis

    names = config.names
    client = redis.Redis.from_url(config.redis_url)
    count, first, last, quiet_since = 0, None, None, time.monotonic()
    while time.monotonic() - quiet_since < idle:
        reply = client.xreadgroup(names.stream_group, name, {names.stream: ">"}, count=100, block=100)
        entries = reply[0][1] if reply else []
        if not entries:
            continue
        first = first or time.monotonic()
        for _, fields in entries:
            json.loads(fields[b"booking"])
        client.xack(names.stream, names.stream_group, *[entry_id for entry_id, _ in entries])
        count += len(entries)
        last = quiet_since = time.monotonic()
    client.close()
    return {"count": count, "first": first, "last": last}


def kafka_loop(config: Config, name: str, idle: float) -> dict[str, Any]:
    """poll a batch, decode each record, store its offset after processing; auto-commit sends them."""
    from confluent_kafka import Consumer

    names = config.names
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
    count, first, last = 0, None, None
    quiet_since = time.monotonic()
    # The first assignment takes a few seconds: wait for it before counting idle time.
    while time.monotonic() - quiet_since < idle or first is None and time.monotonic() - quiet_since < 30:
        records = consumer.consume(num_messages=500, timeout=0.2)
        if not records:
            continue
        first = first or time.monotonic()
        for record in records:
            if record.error():
                continue
            json.loads(record.value())
            consumer.store_offsets(record)
            count += 1
        last = quiet_since = time.monotonic()
    consumer.close()
    return {"count": count, "first": first, "last": last}


def bullmq_loop(config: Config, name: str, idle: float, concurrency: int) -> dict[str, Any]:
    """A bullmq Worker whose processor decodes nothing more than the job data BullMQ already parsed."""
    from bullmq import Worker
    from redis.asyncio import Redis

    state: dict[str, Any] = {"count": 0, "first": None, "last": None}

    async def processor(job: Any, token: str) -> None:
        state["first"] = state["first"] or time.monotonic()
        json.dumps(job.data)

    def completed(*_: Any) -> None:
        state["count"] += 1
        state["last"] = time.monotonic()

    async def run() -> None:
        # The two known traps fixed as labkit fixes them (see labkit/backends/bullmq.py): a client without a
        # socket timeout, and the server version read before run(); anything else would slow the baseline.
        connection = Redis.from_url(config.redis_url, decode_responses=True, socket_timeout=None)
        options = {"connection": connection, "concurrency": concurrency, "autorun": False}
        worker = Worker(config.names.bullmq_queue, processor, options)
        worker.on("completed", completed)
        await worker.blockingRedisConnection.getRedisVersion()
        await worker.redisConnection.getRedisVersion()
        running = asyncio.ensure_future(worker.run())
        started = time.monotonic()
        while True:
            await asyncio.sleep(0.1)
            mark = state["last"] or started
            if time.monotonic() - mark > idle and (state["first"] or time.monotonic() - started > 30):
                break
        await worker.close()
        await running

    asyncio.run(run())
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["bullmq", "streams", "kafka"], required=True)
    parser.add_argument("--name", default="raw-1")
    parser.add_argument("--idle", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    config = Config.from_env()
    if args.backend == "streams":
        result = streams_loop(config, args.name, args.idle)
    elif args.backend == "kafka":
        result = kafka_loop(config, args.name, args.idle)
    else:
        result = bullmq_loop(config, args.name, args.idle, args.concurrency)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
