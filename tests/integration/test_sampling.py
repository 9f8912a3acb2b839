"""The sampler (labkit/sampler.py) on each real backend: it sees bookings complete, a slow one in flight, a poison
one dead-lettered with its reason, the worker alive, and (Kafka) every partition owned; a broker that does not
answer gives a sample that says so, not an exception.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from labkit import lab
from labkit.booking import BookingGenerator
from labkit.config import BACKENDS, Config
from labkit.pool import WorkerPool
from labkit.sampler import STATES, Sample, Sampler
from labkit.stack import free_port
from labkit.workflow import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.kafka]

VALID = 12
SLOW_MS = 3000


async def _watch(sampler: Sampler, backend: str, check: object, timeout: float, what: str) -> Sample:
    """The first sample of ``backend`` for which ``check(sample)`` is true; fails the test at the deadline."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = await sampler.wait_for_new(seen, timeout=2)
        sample = sampler.latest(backend)
        if sample is not None and sample.ok and check(sample):  # type: ignore[operator]
            return sample
    last = sampler.latest(backend)
    pytest.fail(f"{backend}: no sample showed {what} within {timeout} s; the last: {last}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampler_sees_bookings_flow_on_the_real_broker(backend: str, lab_config: Config, tmp_path: Path) -> None:
    settings = WorkerSettings(max_attempts=2, backoff_ms=50, concurrency=4)
    generator = BookingGenerator(seed=14)
    valid = generator.bookings(VALID)
    slow = {**valid[0], "booking_id": "bk-slow", "fault": {"slow_ms": SLOW_MS}}
    poison = {**valid[0], "booking_id": "bk-poison", "fault": {"poison": True}}
    with WorkerPool(backend, lab_config, settings, tmp_path) as pool:
        pool.start(1)
        worker = pool.workers[0].worker_id

        async def run() -> None:
            async with Sampler(lab_config, every_s=0.5, backends=[backend]) as sampler:
                lab.produce(backend, [slow], lab_config)
                in_flight = await _watch(sampler, backend, lambda s: s.states["active"] >= 1, 30, "the slow one active")
                if backend == "streams":
                    assert [(e["consumer"], e["deliveries"]) for e in in_flight.pending] == [(worker, 1)]
                lab.produce(backend, [*valid, poison], lab_config)
                done = await _watch(
                    sampler,
                    backend,
                    lambda s: s.states["completed"] == VALID + 1 and s.states["failed"] == 1,
                    60,
                    f"{VALID + 1} completed and 1 dead letter",
                )
                assert tuple(done.states) == STATES
                assert done.dead_letter_count == 1
                assert done.dead_letters[0]["booking_id"] == "bk-poison"
                assert "poison" in done.dead_letters[0]["reason"]
                assert [w["id"] for w in done.workers] == [worker]
                assert time.time() - done.workers[0]["last_seen"] < 15
                if backend == "kafka":
                    work = [p for p in done.partitions if p["partition"].startswith(lab_config.names.topic + "/")]
                    assert len(work) == 3 and {p["owner"] for p in work} == {worker}
                rates = [s.throughput for s in sampler.history(backend) if s.throughput]
                assert rates, "no sample measured a throughput"

        asyncio.run(run())


def test_sampler_reports_a_broker_that_does_not_answer(lab_config: Config) -> None:
    nowhere = lab_config.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")

    async def run() -> list[Sample]:
        async with Sampler(nowhere, every_s=0.2, backends=["streams"]) as sampler:
            await sampler.wait_for_new(0, timeout=10)
            return sampler.history("streams")

    samples = asyncio.run(run())
    assert samples and not samples[0].ok
    assert "Redis is not answering" in (samples[0].error or "")


def test_notebook_view_updates_its_widgets_from_the_background_thread(lab_config: Config) -> None:
    from labkit.liveview import LiveView

    waiting_one = "<tr><td>waiting</td><td>1</td>"
    with LiveView(lab_config, live=True, every_s=0.5) as view:
        streams = view._panels["streams"]

        def shown(text: str) -> bool:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and text not in streams.value:
                time.sleep(0.1)
            return text in streams.value

        assert shown("<tr><td>waiting</td><td>0</td>")
        lab.produce("streams", [BookingGenerator(seed=3).bookings(1)[0]], lab_config)  # no worker: it waits
        assert shown(waiting_one), streams.value
        assert bytes(view._chart.value).startswith(b"\x89PNG")
    assert view._updater is None
    static = LiveView(lab_config, live=False, every_s=0.5).start()
    static.wait_for_samples()
    static.stop()
    assert static.widget is None and "consumer lag" in static.snapshot_html()
