"""WorkerPool process hygiene: every worker it starts is gone when it should be, however the pool ends.

These tests start real ``python -m workers.streams`` processes (the quickest backend to
start: Redis only) and check the processes themselves through /proc, not the pool's
own bookkeeping, so that a pool lying about its workers would fail them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from labkit import lab
from labkit.booking import BookingGenerator
from labkit.config import Config
from labkit.errors import LabkitError
from labkit.events import load_run
from labkit.pool import REPO_ROOT, WorkerPool
from labkit.workflow import WorkerSettings

pytestmark = [pytest.mark.integration, pytest.mark.redis]

BACKEND = "streams"


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running(pid: int) -> bool:
    """True while ``pid`` is a live process; a zombie (dead, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait until none of ``pids`` runs; returns those still running at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if running(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if running(pid)]


@pytest.mark.timeout(60)
def test_start_waits_until_every_worker_is_ready_and_stop_leaves_nothing(lab_config: Config) -> None:
    pool = WorkerPool(BACKEND, lab_config)
    started = time.monotonic()
    pool.start(2)
    took = time.monotonic() - started
    pids = pool.pids
    assert len(pids) == 2 and all(running(pid) for pid in pids)
    # Each worker's own "ready" event is already on disk when start() returns.
    ready = load_run(pool.run_dir).query("event == 'ready'")
    assert sorted(ready["pid"]) == sorted(pids)
    assert sorted(ready["worker"]) == [f"{BACKEND}-w1", f"{BACKEND}-w2"]
    assert took < 20

    pool.stop()
    assert wait_gone(pids, timeout=0.5) == []  # stop() returns only once they are gone
    assert [w.exit_code for w in pool.workers] == [0, 0]  # SIGTERM is a warm stop: a clean exit
    pool.stop()  # idempotent


@pytest.mark.timeout(60)
def test_every_setting_reaches_the_workers(lab_config: Config) -> None:
    settings = WorkerSettings(
        concurrency=3, max_attempts=5, backoff_ms=150, idempotent=False, workflow="noop", step_ms=2.5, cpu_ms=1.0,
        options={"heartbeat": "0"},
    )  # fmt: skip
    with WorkerPool(BACKEND, lab_config, settings).start(1, concurrency=2) as pool:
        ready = load_run(pool.run_dir).query("event == 'ready'")
    assert ready["settings"].tolist() == [dataclasses.asdict(dataclasses.replace(settings, concurrency=2))]


@pytest.mark.timeout(60)
def test_wait_until_drained_returns_the_stats_or_times_out_with_them(lab_config: Config) -> None:
    with WorkerPool(BACKEND, lab_config).start(2) as pool:
        lab.produce(BACKEND, BookingGenerator(seed=5).bookings(20), lab_config)
        stats = pool.wait_until_drained(timeout=30, expected=20)
        assert (stats["completed"], stats["backlog"], stats["in_flight"]) == (20, 0, 0)
        with pytest.raises(TimeoutError, match=r"not drained after 0.5 s; last stats: .*'completed': 20"):
            pool.wait_until_drained(timeout=0.5, expected=21)


@pytest.mark.timeout(60)
def test_an_exception_inside_with_stops_the_workers(lab_config: Config) -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="lesson cell failed"), WorkerPool(BACKEND, lab_config).start(2) as pool:
        pids = pool.pids
        raise RuntimeError("lesson cell failed")
    assert len(pids) == 2
    assert wait_gone(pids, timeout=0.5) == []


@pytest.mark.timeout(60)
def test_scale_up_and_down_changes_the_live_count(lab_config: Config) -> None:
    with WorkerPool(BACKEND, lab_config).start(1) as pool:
        first = pool.pids
        pool.scale(3)
        assert len(pool.pids) == 3 and pool.pids[0] == first[0]
        assert all(running(pid) for pid in pool.pids)
        grown = pool.pids

        pool.scale(1)
        assert pool.pids == first  # the newest are stopped first
        assert wait_gone(grown[1:], timeout=0.5) == []
        assert [w.exit_code for w in pool.workers] == [None, 0, 0]
        assert [w.worker_id for w in pool.workers] == [f"{BACKEND}-w{k}" for k in (1, 2, 3)]

        pool.scale(2)  # a new name, never a reused one: event logs stay one file per process
        assert len(pool.pids) == 2 and pool.workers[-1].worker_id == f"{BACKEND}-w4"


@pytest.mark.timeout(60)
def test_kill_signals_exactly_the_chosen_worker(lab_config: Config) -> None:
    with WorkerPool(BACKEND, lab_config).start(3) as pool:
        before = pool.pids
        killed = pool.kill(1)
        assert killed == before[1]
        assert not running(killed)
        assert all(running(pid) for pid in (before[0], before[2]))
        assert pool.pids == [before[0], before[2]]
        assert pool.workers[1].exit_code == -signal.SIGKILL

        # By name, and SIGTERM as a warm stop.
        assert pool.kill(f"{BACKEND}-w3", signal.SIGTERM) == before[2]
        assert wait_gone([before[2]]) == []
        with pytest.raises(IndexError):
            pool.kill(5)


@pytest.mark.timeout(60)
def test_a_death_the_pool_did_not_cause_is_reported(lab_config: Config, caplog: pytest.LogCaptureFixture) -> None:
    with WorkerPool(BACKEND, lab_config).start(2) as pool:
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)  # the OOM killer, as far as the pool can tell
        assert wait_gone([victim]) == []
        with caplog.at_level(logging.WARNING, logger="labkit.pool"):
            seen = pool.workers
            pool.workers  # noqa: B018  (a second look must not report it again)
        assert seen[0].exit_code == -signal.SIGKILL and not seen[0].stopped_by_pool
        warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
        assert warnings == [f"worker {BACKEND}-w1 exited with -9 (out of memory?)"]
        assert len(pool.pids) == 1


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_connect_fails_start_with_the_reason(lab_config: Config) -> None:
    dead = lab_config.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    pool = WorkerPool(BACKEND, dead)
    with pytest.raises(LabkitError, match=r"streams-w\d exited with 3 before it was ready: Redis is not answering"):
        pool.start(2, ready_timeout=15)
    assert [w.alive for w in pool.workers] == [False, False]
    assert wait_gone([w.pid for w in pool.workers], timeout=0.5) == []


@pytest.mark.timeout(60)
def test_workers_started_from_a_short_lived_thread_survive_it(lab_config: Config) -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits; the pool forks from its own thread.
    pool = WorkerPool(BACKEND, lab_config)
    starter = threading.Thread(target=pool.start, args=(2,))
    starter.start()
    starter.join()
    try:
        pids = pool.pids
        assert len(pids) == 2
        time.sleep(0.5)  # PDEATHSIG would have struck by now
        assert all(running(pid) for pid in pids)
    finally:
        pool.stop()


PARENT_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from labkit.pool import WorkerPool
    pool = WorkerPool("streams").start(2)
    print(json.dumps(pool.pids), flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)  # no stop(): the atexit hook must do it
    time.sleep(60)  # waits here to be SIGKILLed
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ending", ["sigkill", "exit"])
def test_workers_die_with_their_parent(lab_config: Config, tmp_path: Path, ending: str) -> None:
    """A kernel killed by a restart (SIGKILL) or a script that forgets stop() leaves no worker behind."""
    env = {**os.environ, **lab_config.to_env(), "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_SCRIPT, ending],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        text=True,
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, f"the parent script failed: {parent.stderr.read() if parent.stderr else ''}"
        pids = json.loads(line)
        assert len(pids) == 2 and all(running(pid) for pid in pids)
        if ending == "sigkill":
            parent.kill()
        assert parent.wait(timeout=10) == (-signal.SIGKILL if ending == "sigkill" else 0)
        assert wait_gone(pids, timeout=5) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
