"""What one booking costs a worker, part by part: validation, event log, effects, ledger, acknowledgement.

In one process, against the lab's Redis and a scratch run folder, with no broker in the way: the
parts of ``BookingHandler`` timed on their own over ``--count`` bookings, then the whole workflow
(``noop`` and ``booking``) through ``run_batch`` in batches of ``--batch`` (what a Streams or Kafka
worker does with a fetched batch) and through one call per booking (what a BullMQ worker does, and
every worker with step or CPU time). The acknowledgement itself is the broker's and is measured
by ``throughput.py``.

    python benchmarks/booking_cost.py --count 5000

It needs Redis (``labkit up``); it uses a namespace of its own and deletes its keys.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import labkit as lk
from labkit.backends import get_backend
from labkit.booking import encode, parse_booking
from labkit.config import Config
from labkit.events import EventLog
from labkit.workflow import BookingHandler, Delivery, WorkerSettings


def per_booking_us(seconds: float, count: int) -> str:
    return f"{seconds / count * 1e6:8.1f} µs"


async def timed(work: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await work()
    return time.perf_counter() - started


async def whole(handler: BookingHandler, mode: str, batches: list[list[Delivery]]) -> None:
    """The workflow over every booking, batch by batch or one call per booking."""
    for batch in batches:
        if mode == "run_batch":
            await handler.run_batch(batch)
        else:
            for delivery in batch:
                await handler(delivery)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    n, size = args.count, args.batch
    config = Config.from_env(namespace=f"cost{uuid.uuid4().hex[:6]}-")
    payloads = [encode({**b, "created_at": time.time()}).encode() for b in lk.BookingGenerator(seed=3).bookings(n)]
    deliveries = [Delivery(p, 1, f"entry {i}-0") for i, p in enumerate(payloads)]
    batches = [deliveries[i : i + size] for i in range(0, n, size)]
    print(f"{os.cpu_count()} cores; {n} bookings; batches of {size}; Redis at {config.redis_url}")
    rows: list[tuple[str, str]] = []
    async with get_backend("streams")(config, WorkerSettings()) as backend:
        ledger = backend.ledger
        with tempfile.TemporaryDirectory() as scratch:
            run = Path(scratch)
            events = EventLog(run, "cost", "streams")
            handler = BookingHandler(ledger, events, WorkerSettings(), run)
            bookings = [parse_booking(p) for p in payloads]

            async def validate() -> None:
                for batch in batches:
                    handler.validate_batch(batch)

            async def log_lines() -> None:
                for batch in batches:
                    rows_ = [{"booking_id": d.source, "attempt": 1, "source": d.source} for d in batch]
                    events.emit_batch("started", rows_)

            async def log_one_by_one() -> None:
                for d in deliveries:
                    events.emit("started", booking_id=d.source, attempt=1, source=d.source)

            async def redis_effects() -> None:
                for i in range(0, n, size):
                    part = bookings[i : i + size]
                    await ledger.apply_effects("payments", [(b.booking_id, b.booking_id) for b in part], 1, True)
                    await ledger.apply_effects("inventory", [(b.booking_id, b.hotel_id) for b in part], 1, True)

            async def file_effects() -> None:
                for b in bookings:
                    handler._write_confirmation(b)  # noqa: SLF001 - timing the effect itself
                    handler._send_email(b)  # noqa: SLF001

            async def completions() -> None:
                for i in range(0, n, size):
                    await ledger.record_completions([b.booking_id for b in bookings[i : i + size]])

            rows.append(("validation (parse_booking, per batch)", per_booking_us(await timed(validate), n)))
            rows.append(("event log: one line, batch write", per_booking_us(await timed(log_lines), n)))
            rows.append(("event log: one line, one write each", per_booking_us(await timed(log_one_by_one), n)))
            seconds = await timed(redis_effects)
            rows.append(("effects in Redis: payment + inventory, per batch", per_booking_us(seconds, n)))
            rows.append(("effects on disk: confirmation + email files", per_booking_us(await timed(file_effects), n)))
            rows.append(("ledger: completion, per batch", per_booking_us(await timed(completions), n)))
            events.close()
        for workflow in ("noop", "booking"):
            settings = WorkerSettings(workflow=workflow)
            for mode in ("run_batch", "one call each"):
                await ledger.reset()
                with tempfile.TemporaryDirectory() as scratch:
                    run = Path(scratch)
                    events = EventLog(run, "cost", "streams")
                    handler = BookingHandler(ledger, events, settings, run)

                    seconds = await timed(functools.partial(whole, handler, mode, batches))
                    rows.append((f"whole workflow {workflow!r}, {mode}", per_booking_us(seconds, n)))
                    events.close()
        await ledger.reset()
    width = max(len(what) for what, _ in rows)
    for what, cost in rows:
        print(f"{what:{width}}  {cost} per booking")


if __name__ == "__main__":
    asyncio.run(main())
