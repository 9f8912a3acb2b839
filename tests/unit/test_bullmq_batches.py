"""How a BullMQ worker groups its jobs into batches: the jobs of one tick together, then whoever arrived while a
batch ran, one batch at a time, each job with its own verdict."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from labkit.backends.bullmq import _JobBatches
from labkit.booking import Booking, BookingGenerator, encode
from labkit.errors import BadMessage
from labkit.workflow import BookingHandler, Delivery, Outcome, Result


class _GatedHandler:
    """The handler's batch interface, with each batch held until the test lets it finish."""

    validate_batch = staticmethod(BookingHandler.validate_batch)

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.received: list[str] = []
        self.alone: list[str] = []
        self.gate = asyncio.Event()
        self.fail_next = False

    def log_received(self, deliveries: Sequence[Delivery], validated: Sequence[Booking | BadMessage]) -> None:
        self.received += [d.source for d in deliveries]

    async def run_batch(
        self, deliveries: Sequence[Delivery], validated: Sequence[Booking | BadMessage]
    ) -> list[Result]:
        self.batches.append([d.source for d in deliveries])
        await self.gate.wait()
        self.gate.clear()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("Redis went away")
        return [Result(Outcome.COMPLETED, b.booking_id if isinstance(b, Booking) else None) for b in validated]

    async def __call__(self, delivery: Delivery) -> Result:
        self.alone.append(delivery.source)
        return Result(Outcome.COMPLETED, "alone")


def _deliveries(count: int, **fields: object) -> list[Delivery]:
    bookings = BookingGenerator(seed=3).bookings(count)
    return [Delivery(encode({**b, **fields}), attempt=1, source=f"job {n}") for n, b in enumerate(bookings, 1)]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_jobs_that_arrive_while_a_batch_runs_form_the_next_batch_one_batch_at_a_time() -> None:
    asyncio.run(_jobs_that_arrive_while_a_batch_runs_form_the_next_batch_one_batch_at_a_time())


async def _jobs_that_arrive_while_a_batch_runs_form_the_next_batch_one_batch_at_a_time() -> None:
    handler = _GatedHandler()
    batches = _JobBatches(handler)  # type: ignore[arg-type]  # the batch interface alone
    first, second = _deliveries(3), _deliveries(5)[3:]
    running = [asyncio.ensure_future(batches.run(d)) for d in first]
    await _settle()
    assert handler.batches == [["job 1", "job 2", "job 3"]]  # the jobs of one tick, together
    running += [asyncio.ensure_future(batches.run(d)) for d in second]
    await _settle()
    assert handler.batches == [["job 1", "job 2", "job 3"]]  # the next batch waits for the one in flight
    assert not any(task.done() for task in running)  # no job has its verdict before its batch is handled
    handler.gate.set()
    await _settle()
    assert handler.batches == [["job 1", "job 2", "job 3"], ["job 4", "job 5"]]
    assert all(task.done() for task in running[:3]) and not any(task.done() for task in running[3:])
    handler.gate.set()
    results = await asyncio.gather(*running)
    ids = [b["booking_id"] for b in BookingGenerator(seed=3).bookings(5)]
    assert [r.booking_id for r in results] == ids  # each processor gets its own job's verdict
    assert handler.received == [f"job {n}" for n in range(1, 6)]


def test_a_failed_batch_fails_each_of_its_jobs_and_the_next_batch_still_runs() -> None:
    asyncio.run(_a_failed_batch_fails_each_of_its_jobs_and_the_next_batch_still_runs())


async def _a_failed_batch_fails_each_of_its_jobs_and_the_next_batch_still_runs() -> None:
    handler = _GatedHandler()
    batches = _JobBatches(handler)  # type: ignore[arg-type]
    deliveries = _deliveries(4)
    handler.fail_next = True
    failing = [asyncio.ensure_future(batches.run(d)) for d in deliveries[:2]]
    await _settle()
    later = [asyncio.ensure_future(batches.run(d)) for d in deliveries[2:]]
    handler.gate.set()
    for task in failing:
        with pytest.raises(ConnectionError):
            await task  # BullMQ then retries or fails that job, as for any processor error
    handler.gate.set()
    assert [r.outcome for r in await asyncio.gather(*later)] == [Outcome.COMPLETED, Outcome.COMPLETED]
    assert handler.batches == [["job 1", "job 2"], ["job 3", "job 4"]]


def test_a_slow_booking_runs_alone_and_holds_up_no_batch() -> None:
    asyncio.run(_a_slow_booking_runs_alone_and_holds_up_no_batch())


async def _a_slow_booking_runs_alone_and_holds_up_no_batch() -> None:
    handler = _GatedHandler()
    batches = _JobBatches(handler)  # type: ignore[arg-type]
    [slow] = _deliveries(1, fault={"slow_ms": 50})
    assert (await batches.run(slow)).booking_id == "alone"
    assert handler.alone == ["job 1"] and handler.received == ["job 1"] and handler.batches == []
