"""The sampler (labkit/sampler.py) on each real backend: it sees bookings complete, a slow one in flight, a poison
one dead-lettered with its reason, the worker alive, (Kafka) every partition owned, the bookings a producer tracked
with their state and progress, and each broker answering with its server and round trip; a broker that does not
answer gives a sample that says so, not an exception. The notebook view (labkit/liveview.py) updates its widgets,
stops with the pool it watches, and stops at a real kernel's shutdown.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from labkit import lab
from labkit.backends import Backend
from labkit.booking import BookingGenerator
from labkit.config import BACKENDS, Config
from labkit.lab import loop_thread
from labkit.pool import WorkerPool
from labkit.sampler import STATES, Sample, Sampler
from labkit.stack import free_port
from labkit.status import Accepted
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


def send_tracked(backend: str, config: Config, bookings: list[dict[str, object]]) -> None:
    """Send bookings and start their status, as the booking service does (so they are recent bookings)."""

    async def send(connected: Backend) -> None:
        at = time.time()
        landed = await connected.produce(bookings)
        accepted = [Accepted(str(b["booking_id"]), where, at) for b, where in zip(bookings, landed, strict=True)]
        await connected.track_accepted(accepted)

    lab.with_backend(backend, send, config)


def recent(sample: Sample, booking_id: str) -> dict[str, object]:
    return next((row for row in sample.bookings if row["booking_id"] == booking_id), {})


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampler_sees_bookings_flow_on_the_real_broker(backend: str, lab_config: Config, tmp_path: Path) -> None:
    settings = WorkerSettings(max_attempts=2, backoff_ms=50, concurrency=4, track_status=True)
    generator = BookingGenerator(seed=14)
    valid = generator.bookings(VALID)
    slow = {**valid[0], "booking_id": "bk-slow", "fault": {"slow_ms": SLOW_MS}}
    poison = {**valid[0], "booking_id": "bk-poison", "fault": {"poison": True}}
    with WorkerPool(backend, lab_config, settings, tmp_path) as pool:
        pool.start(1)
        worker = pool.workers[0].worker_id

        async def run() -> None:
            async with Sampler(lab_config, every_s=0.5, backends=[backend]) as sampler:
                send_tracked(backend, lab_config, [slow])
                in_flight = await _watch(
                    sampler,
                    backend,
                    lambda s: s.states["active"] >= 1 and recent(s, "bk-slow").get("state") == "active",
                    30,
                    "the slow one active",
                )
                if backend == "streams":
                    assert [(e["consumer"], e["deliveries"]) for e in in_flight.pending] == [(worker, 1)]
                running = recent(in_flight, "bk-slow")
                assert (running["step"], running["progress"], running["attempts"]) == ("validate", 0, 1), running
                lab.produce(backend, valid, lab_config)  # untracked: counted, never a recent booking
                send_tracked(backend, lab_config, [poison])
                done = await _watch(
                    sampler,
                    backend,
                    lambda s: (
                        s.states["completed"] == VALID + 1
                        and s.states["failed"] == 1
                        and recent(s, "bk-poison").get("state") == "dead_lettered"
                    ),
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
                assert [row["booking_id"] for row in done.bookings] == ["bk-poison", "bk-slow"]  # newest first
                assert (recent(done, "bk-slow")["state"], recent(done, "bk-slow")["progress"]) == ("completed", 100)
                assert "poison" in str(recent(done, "bk-poison")["reason"])
                wanted = ["kafka", "redis"] if backend == "kafka" else ["redis"]
                assert [b["broker"] for b in done.brokers] == wanted
                for broker in done.brokers:
                    assert broker["answers"] and broker["error"] is None, broker
                    assert 0 < broker["round_trip_ms"] < 1000, broker
                    assert broker["server"].startswith(("Valkey", "Redis", "Tansu", "Apache Kafka")), broker

        asyncio.run(run())


RESETS = """
import sys, time
import labkit as lk
cfg = lk.setup(start_stack=False, namespace=sys.argv[1])
view = lk.dashboard(cfg, live=False, backends=["kafka"])
view.sampler.every_s = 0.2
for i in range(8):
    lk.reset("kafka", cfg)
    lk.produce("kafka", lk.BookingGenerator(seed=i).bookings(20), cfg)
    time.sleep(0.3)
view.stop()
print("samples", sum(s.ok for s in view.sampler.history("kafka")))
"""


def test_kafka_resets_under_a_sampling_view_do_not_crash_the_process(lab_config: Config) -> None:
    """librdkafka crashes a process whose client sees a topic re-created (labkit/backends/kafka/topic_changes.py);
    before the readers took turns with topic changes, the first or second reset here crashed (SIGSEGV)."""
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", RESETS, lab_config.names.namespace], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    assert int(run.stdout.split()[-1]) >= 5, run.stdout


def test_sampler_reports_a_broker_that_does_not_answer(lab_config: Config) -> None:
    nowhere = lab_config.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")

    async def run() -> list[Sample]:
        async with Sampler(nowhere, every_s=0.2, backends=["streams"]) as sampler:
            await sampler.wait_for_new(0, timeout=10)
            return sampler.history("streams")

    samples = asyncio.run(run())
    assert samples and not samples[0].ok
    assert "Redis is not answering" in (samples[0].error or "")
    [redis] = samples[0].brokers
    assert not redis["answers"] and redis["round_trip_ms"] is None and "Redis is not answering" in redis["error"]


def test_notebook_view_updates_its_widgets_from_the_background_thread(lab_config: Config) -> None:
    from labkit.liveview import LiveView

    waiting_one = "<tr><td>waiting</td><td>1</td>"
    with LiveView(lab_config, live=True, every_s=0.5) as view:
        streams = view._panels["streams"]
        # Every other lab call of the kernel runs on the loop that updates the widgets: it must stay free. (A
        # matplotlib chart drawn there every 5 s held it 0.4-9 s at a time, and a lesson cell crawled.)
        longest, until = 0.0, time.monotonic() + 5.5
        while time.monotonic() < until:
            started = time.monotonic()
            loop_thread().run(asyncio.sleep(0))
            longest = max(longest, time.monotonic() - started)
            time.sleep(0.02)
        assert longest < 0.5, f"a lab call waited {longest:.2f} s for the live view's loop"

        def shown(text: str) -> bool:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and text not in streams.value:
                time.sleep(0.1)
            return text in streams.value

        assert shown("<tr><td>waiting</td><td>0</td>")
        lab.produce("streams", [BookingGenerator(seed=3).bookings(1)[0]], lab_config)  # no worker: it waits
        assert shown(waiting_one), streams.value
        assert "<svg role='img' aria-label='backlog: latest 1" in streams.value  # the live chart moved too
        assert "Broker health" in streams.value and "<td>yes</td>" in streams.value
    assert view._updater is None and not view.running
    static = LiveView(lab_config, live=False, every_s=0.5).start()
    static.wait_for_samples()
    static.stop()
    assert static.widget is None and "consumer lag" in static.snapshot_html()


def test_notebook_view_stops_with_the_pool_it_watches(lab_config: Config, tmp_path: Path) -> None:
    import labkit as lk

    with WorkerPool("streams", lab_config, run_dir=tmp_path).start(1) as pool:
        view = lk.dashboard(lab_config, live=True, pool=pool)
        view.wait_for_samples()
        assert view.running and view.sampler._tasks
    assert not view.running and not view.sampler._tasks and view._updater is None  # no task samples any more


def test_notebook_view_stops_at_kernel_shutdown(lab_config: Config, tmp_path: Path) -> None:
    """A real kernel with a pool and a live view: asked to shut down, it exits by itself (no kill), the view's
    sampler stopped on the way and the worker gone."""
    from nbval.kernel import CURRENT_ENV_KERNEL_NAME, start_new_kernel

    stopped = tmp_path / "view-stopped"
    code = f"""
import labkit as lk
cfg = lk.Config.from_env().with_(namespace={lab_config.names.namespace!r})
pool = lk.WorkerPool("streams", cfg, run_dir={str(tmp_path)!r}).start(1)
view = lk.dashboard(cfg, live=True)
view.wait_for_samples()
stop = view.stop
def noting_stop(*args, **kwargs):
    try:
        stop(*args, **kwargs)
        outcome = f"sampling: {{bool(view.sampler._tasks)}}"
    except BaseException as e:
        outcome = f"stop failed: {{e!r}}"
    open({str(stopped)!r}, "w").write(outcome)
view.stop = noting_stop
print(pool.pids[0], flush=True)
"""
    repo = str(Path(__file__).resolve().parents[2])  # this checkout's labkit, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    manager, client = start_new_kernel(kernel_name=CURRENT_ENV_KERNEL_NAME, cwd=str(tmp_path), env=env)
    try:
        printed: list[str] = []
        reply = client.execute_interactive(
            code, timeout=60, output_hook=lambda m: printed.append(m["content"].get("text", ""))
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        worker = int("".join(printed).split()[-1])
        process = manager.provisioner.process  # type: ignore[union-attr]
        started = time.monotonic()
        manager.shutdown_kernel(now=False)  # a shutdown request, as Jupyter's "Shut down kernel" sends
        took = time.monotonic() - started
    finally:
        client.stop_channels()
        if manager.is_alive():
            manager.shutdown_kernel(now=True)
    assert process.returncode == 0, f"the kernel did not exit by itself ({process.returncode}) after {took:.1f} s"
    assert stopped.read_text() == "sampling: False"
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
