"""Real worker processes for notebooks: start, scale, kill and stop them, then wait for the queue to drain.

``WorkerPool`` starts ``python -m workers.<backend>`` processes, exactly what a learner
would type in a terminal, so that a notebook's SIGKILL is a real crash of a real process::

    from labkit.pool import WorkerPool

    with WorkerPool("kafka").start(4) as pool:
        pool.kill(0)                     # crash one worker mid-job
        stats = pool.wait_until_drained(expected=1000)

No worker may outlive the notebook that started it, even when the kernel dies:

- each worker runs in its own session (``start_new_session``), so Ctrl-C in a terminal
  does not reach it and ``os.killpg`` stops it together with anything it started;
- on Linux each worker asks the kernel to SIGKILL it when its parent dies
  (``PR_SET_PDEATHSIG``). That signal fires when the parent *thread* that forked the
  worker exits, not the parent process, so every worker is forked from one long-lived
  daemon thread (the same thread that runs the pool's private event loop): a pool used
  from a short-lived thread keeps its workers;
- an ``atexit`` hook and a ``weakref`` finalizer stop the workers of every pool when the
  interpreter exits normally (kernel restart) or a pool is garbage collected.

The pool never installs signal handlers: the process it runs in (an ipykernel) owns them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from labkit.config import Config, check_backend
from labkit.errors import LabkitError
from labkit.events import load_run
from labkit.lab import loop_thread
from labkit.workflow import WorkerSettings

if TYPE_CHECKING:
    import pandas as pd

    from labkit.backends.base import Backend

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The repository root: ``workers/`` lives next to ``labkit/``. A notebook runs with
#: ``notebooks/`` as its cwd, so the workers need it on PYTHONPATH to import ``workers``.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: How often start() looks for "ready" events and wait_until_drained() asks for stats.
#: 50 ms is noise against a worker start (4 workers ready in 0.8-1.2 s on 2 cores, any
#: backend); a stats call costs a few broker round trips, so 4 a second.
_READY_POLL_S = 0.05
_STATS_POLL_S = 0.25
#: One stats call may wait this long (Kafka's first metadata request can take seconds).
_STATS_CALL_TIMEOUT_S = 30.0
#: At interpreter exit the kernel manager gives a kernel about 5 s before killing it:
#: warm-stop for 3 s, then SIGKILL, so the workers are gone either way.
_EXIT_STOP_TIMEOUT_S = 3.0
#: Lines of a worker's log quoted when it fails to start.
_LOG_TAIL_LINES = 20

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class WorkerInfo:
    """One worker process as the pool sees it.

    Args:
        worker_id: its name in the event log, e.g. ``kafka-w2``.
        pid: its process id (also its process-group id).
        alive: still running.
        exit_code: the exit status once it has exited; negative for a signal (``-9`` = SIGKILL).
        stopped_by_pool: the pool stopped or signalled it; an exit without this is a crash.
        log_path: its stdout and stderr.
    """

    worker_id: str
    pid: int
    alive: bool
    exit_code: int | None
    stopped_by_pool: bool
    log_path: Path


@dataclass
class _Worker:
    """The pool's mutable record of one process; kept apart from the pool so the finalizer can reach it."""

    worker_id: str
    proc: subprocess.Popen[Any]
    log_path: Path
    events_path: Path
    stopped_by_pool: bool = False
    death_reported: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the worker's whole process group; a worker that already exited is not an error."""
        if self.proc.poll() is not None:
            return  # reaped: its pid (and group id) may already belong to someone else
        with contextlib.suppress(ProcessLookupError):  # exited since poll(), not yet reaped
            os.killpg(self.proc.pid, sig)

    def info(self) -> WorkerInfo:
        code = self.proc.poll()
        return WorkerInfo(self.worker_id, self.pid, code is None, code, self.stopped_by_pool, self.log_path)


def _terminate(workers: Iterable[_Worker], timeout: float) -> None:
    """Warm-stop ``workers`` (SIGTERM), wait up to ``timeout`` seconds, then SIGKILL the stragglers.

    A plain function over the worker records, not a method, so that the atexit hook and the
    weakref finalizer can run it without keeping the pool alive.
    """
    running = [w for w in workers if w.alive()]
    for worker in running:
        worker.stopped_by_pool = True
        worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in running:
        try:
            worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker %s did not stop within %.0f s; killing it", worker.worker_id, timeout)
            worker.signal(signal.SIGKILL)
    for worker in running:
        try:
            worker.proc.wait(timeout=5)  # reap, so no zombie is left behind
        except subprocess.TimeoutExpired:
            log.error("worker %s (pid %d) survived SIGKILL", worker.worker_id, worker.pid)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _die_with_parent_hook() -> Any:
    """A ``preexec_fn`` that makes the child die with its parent (Linux), or None elsewhere.

    Everything is looked up before the fork: between fork and exec the child may only do
    the bare minimum (other threads' locks are frozen in whatever state they were).
    """
    if not sys.platform.startswith("linux"):
        return None  # macOS has no PDEATHSIG: only the atexit hook and the finalizer remain
    prctl = _libc().prctl
    parent = os.getpid()
    getppid, kill, getpid, sigkill = os.getppid, os.kill, os.getpid, signal.SIGKILL

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill)
        if getppid() != parent:  # the parent died before prctl: the signal would never come
            kill(getpid(), sigkill)

    return die_with_parent


# -- the pool ---------------------------------------------------------------------------------------

_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _stop_all_pools() -> None:
    """Interpreter exit (a kernel restart, the end of a script): stop every pool's workers."""
    for pool in list(_POOLS):
        _terminate(pool._workers, _EXIT_STOP_TIMEOUT_S)


class WorkerPool:
    """Real worker processes of one backend, started from a notebook or a test.

    Args:
        backend: ``bullmq``, ``streams`` or ``kafka``.
        config: the lab to work on [default: ``Config.from_env()``]; its namespace is passed
            to every worker.
        settings: how the workers process bookings; ``start(**overrides)`` can change fields.
        run_dir: where the event logs, worker logs, confirmations and outbox go
            [default: a new ``<runs_dir>/<backend>-<timestamp>`` per pool].

    Every worker of the pool writes to the same run folder, so :meth:`events` shows the
    whole run as one DataFrame.
    """

    def __init__(
        self,
        backend: str,
        config: Config | None = None,
        settings: WorkerSettings | None = None,
        run_dir: Path | str | None = None,
    ) -> None:
        self.backend = check_backend(backend)
        self.config = config or Config.from_env()
        self.settings = settings or WorkerSettings()
        self.run_dir = Path(run_dir) if run_dir is not None else _new_run_dir(self.config.runs_dir, backend)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._workers: list[_Worker] = []
        self._next_index = 1
        self._stats_backend: Backend | None = None
        self._on_stop: list[Callable[[], object]] = []
        _POOLS.add(self)
        # Stops this pool's workers if the pool is garbage collected while they run. It holds
        # the worker list, never the pool, or the pool could not be collected at all.
        self._finalizer = weakref.finalize(self, _terminate, self._workers, _EXIT_STOP_TIMEOUT_S)

    # -- context manager ----------------------------------------------------------------

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        live = sum(w.alive() for w in self._workers)
        return f"<WorkerPool {self.backend} live={live} run_dir={str(self.run_dir)!r}>"

    # -- processes ----------------------------------------------------------------------

    def start(self, n: int, ready_timeout: float = 20, **settings_overrides: Any) -> WorkerPool:
        """Start ``n`` more workers and return once every one of them is ready.

        Args:
            n: how many worker processes to start.
            ready_timeout: seconds each batch may take to connect and announce itself.
            **settings_overrides: WorkerSettings fields to change, e.g. ``concurrency=8``;
                they apply to every worker the pool starts from now on.

        A worker is ready once it is connected and has written its "ready" event. A Kafka
        worker gets its partitions only when the group join completes, about 3 s later on
        the embedded broker; bookings sent meanwhile wait, they are not lost.

        Returns:
            the pool itself, so that ``with WorkerPool("kafka").start(4) as pool:`` works.

        Raises:
            LabkitError: a worker exited before it was ready (the reason is quoted from its
                log), or was not ready in time. Every worker of this call is stopped first.
        """
        if n < 0:
            raise ValueError(f"n must be 0 or more, got {n}")
        if settings_overrides:
            fields = {f.name for f in dataclasses.fields(WorkerSettings)}
            unknown = sorted(set(settings_overrides) - fields)
            if unknown:
                raise TypeError(f"unknown worker setting(s) {unknown}; choose from {sorted(fields)}")
            self.settings = dataclasses.replace(self.settings, **settings_overrides)
        started: list[_Worker] = []
        try:
            for _ in range(n):
                started.append(self._spawn())
            self._wait_ready(started, ready_timeout)
        except BaseException:
            _terminate(started, timeout=2)  # they never did any work: no need for a long warm stop
            raise
        return self

    def scale(self, n: int, ready_timeout: float = 20, stop_timeout: float = 10) -> None:
        """Start or warm-stop workers until ``n`` are alive; the newest are stopped first."""
        if n < 0:
            raise ValueError(f"n must be 0 or more, got {n}")
        live = self._live()
        if n > len(live):
            self.start(n - len(live), ready_timeout)
        elif n < len(live):
            _terminate(live[n:], stop_timeout)

    def kill(self, i: int | str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to one worker: a crash by default (SIGKILL), a warm stop with SIGTERM.

        Args:
            i: index into the live workers (oldest first), or a worker id such as ``kafka-w2``.
            sig: the signal.

        Returns:
            the pid that was signalled.
        """
        worker = self._find(i)
        worker.stopped_by_pool = True
        worker.signal(sig)
        if sig == signal.SIGKILL:
            # Wait for the kernel to finish it off, so the next look at `workers` shows it dead.
            try:
                worker.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                log.warning("worker %s still running 2 s after SIGKILL", worker.worker_id)
        return worker.pid

    def stop(self, timeout: float = 10) -> None:
        """Warm-stop every worker (SIGTERM), wait up to ``timeout`` seconds, then SIGKILL the rest.

        In-flight bookings of a warm-stopped worker are finished and acknowledged. Calling
        stop again, or on a pool that never started, does nothing.
        """
        _terminate(self._workers, timeout)
        self._report_deaths()
        if self._stats_backend is not None:
            backend, self._stats_backend = self._stats_backend, None
            try:
                loop_thread().run(backend.close(), timeout=5)
            except Exception as e:  # closing a connection must not hide the stop itself
                log.debug("closing the stats connection failed: %s", e)
        callbacks, self._on_stop = self._on_stop, []
        for callback in callbacks:
            try:
                callback()
            except Exception as e:  # what watched the pool must not hide the stop itself
                log.warning("stopping %r with the pool failed: %s", callback, e)

    def on_stop(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once, when this pool stops (``stop()``, the end of its ``with`` block), after its
        workers are gone: what watches the pool stops with it (``lk.dashboard(pool=pool)``)."""
        self._on_stop.append(callback)

    @property
    def workers(self) -> list[WorkerInfo]:
        """Every worker this pool started, oldest first; ``pd.DataFrame(pool.workers)`` shows them as a table.

        Looking is also when the pool notices crashes: each exit it did not cause is logged once as a warning.
        """
        self._report_deaths()
        return [w.info() for w in self._workers]

    @property
    def pids(self) -> list[int]:
        """Pids of the live workers, oldest first."""
        return [w.pid for w in self._live()]

    def _live(self) -> list[_Worker]:
        self._report_deaths()
        return [w for w in self._workers if w.alive()]

    def _find(self, i: int | str) -> _Worker:
        if isinstance(i, str):
            for worker in self._workers:
                if worker.worker_id == i:
                    return worker
            raise LabkitError(f"no worker {i!r} in this pool; its workers: {[w.worker_id for w in self._workers]}")
        live = self._live()
        if not -len(live) <= i < len(live):
            raise IndexError(f"worker index {i} out of range: {len(live)} live worker(s)")
        return live[i]

    def _report_deaths(self) -> None:
        """Log each exit the pool did not cause, once: with no traceback, it is usually the OOM killer."""
        for worker in self._workers:
            code = worker.proc.poll()
            if code is not None and not worker.stopped_by_pool and not worker.death_reported:
                worker.death_reported = True
                log.warning("worker %s exited with %s (out of memory?)", worker.worker_id, code)

    def _spawn(self) -> _Worker:
        worker_id = f"{self.backend}-w{self._next_index}"
        self._next_index += 1
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{worker_id}.log"
        argv = [
            sys.executable,
            "-m",
            f"workers.{self.backend}",
            *_settings_argv(self.settings),
            "--run-dir",
            str(self.run_dir),
            "--worker-id",
            worker_id,
        ]
        proc = spawn_owned(argv, log_path, self._child_env())
        worker = _Worker(worker_id, proc, log_path, self.run_dir / "events" / f"{worker_id}.jsonl")
        self._workers.append(worker)
        log.info("started %s (pid %d)", worker_id, proc.pid)
        return worker

    def _child_env(self) -> dict[str, str]:
        env = {**os.environ, **self.config.to_env(), "PYTHONUNBUFFERED": "1"}
        if (REPO_ROOT / "workers" / "__init__.py").exists():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        return env

    def _wait_ready(self, workers: list[_Worker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(workers)
        while waiting:
            for worker in list(waiting):
                if _has_ready_event(worker):
                    waiting.remove(worker)
                    continue
                code = worker.proc.poll()
                if code is not None:
                    worker.death_reported = True  # reported right here, as the error
                    raise LabkitError(
                        f"worker {worker.worker_id} exited with {code} before it was ready: "
                        f"{_failure_reason(worker.log_path)} (log: {worker.log_path})"
                    )
            if waiting and time.monotonic() > deadline:
                names = ", ".join(w.worker_id for w in waiting)
                raise LabkitError(
                    f"worker(s) {names} not ready after {timeout:g} s; is the broker slow or down? "
                    f"last log line: {_failure_reason(waiting[0].log_path)} (log: {waiting[0].log_path})"
                )
            time.sleep(_READY_POLL_S)

    # -- the queue ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The backend's counters (``completed``, ``dead_lettered``, ``retried``, ``duplicates``,
        ``backlog``, ``in_flight``, ...), as ``labkit stats`` shows them."""
        return loop_thread().run(self._stats(), timeout=_STATS_CALL_TIMEOUT_S)

    async def _stats(self) -> dict[str, Any]:
        # One connection for the pool's life: a Kafka client takes a while to get its metadata.
        if self._stats_backend is None:
            from labkit.backends import get_backend

            backend = get_backend(self.backend)(self.config, self.settings)
            await backend.connect()
            self._stats_backend = backend
        try:
            return await self._stats_backend.stats()
        except BaseException:
            # Start afresh next time: a broken connection (a restarted broker) must not stick.
            backend, self._stats_backend = self._stats_backend, None
            with contextlib.suppress(Exception):
                await backend.close()
            raise

    def wait_until_drained(
        self, timeout: float = 60, expected: int | None = None, progress: bool = False
    ) -> dict[str, Any]:
        """Wait until nothing is waiting or in flight (and ``expected`` bookings are settled).

        Args:
            timeout: seconds to wait.
            expected: if given, also wait until ``completed + dead_lettered`` reaches it, so
                that a queue which is empty only because the producer is still sending does
                not count as drained.
            progress: show a tqdm progress bar of settled bookings (needs ``expected``).

        Returns:
            the final stats.

        Raises:
            TimeoutError: not drained in time; the message holds the last stats.
        """
        deadline = time.monotonic() + timeout
        bar = None
        if progress and expected is not None:
            from labkit.progress import progress as progress_bar

            bar = progress_bar(total=expected, desc=f"{self.backend} settled", unit="booking")
        confirmed = False
        try:
            while True:
                stats = self.stats()
                settled = stats["completed"] + stats["dead_lettered"]
                if bar is not None:
                    bar.update(min(settled, expected or settled) - bar.n)
                done = stats["backlog"] == 0 and stats["in_flight"] == 0 and (expected is None or settled >= expected)
                # Without `expected`, ask twice: between a read and its ack a message can be briefly
                # invisible to both counters.
                if done and (confirmed or expected is not None):
                    return stats
                confirmed = done
                if time.monotonic() > deadline:
                    live = len(self._live())
                    hint = "" if live else "; no worker of this pool is alive"
                    raise TimeoutError(f"{self.backend} not drained after {timeout:g} s{hint}; last stats: {stats}")
                time.sleep(_STATS_POLL_S)
        finally:
            if bar is not None:
                bar.close()

    def events(self) -> pd.DataFrame:
        """Every event of this pool's workers, as one DataFrame sorted by time (see labkit.events.load_run)."""
        return load_run(self.run_dir)


def spawn_owned(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[Any]:
    """Start ``argv`` as a process this interpreter owns: its own session, output appended to ``log_path``,
    and SIGKILLed by the kernel when this interpreter dies (forked from the helper thread, which lives as
    long as the interpreter: PR_SET_PDEATHSIG follows the forking thread)."""
    with open(log_path, "ab") as log_file:
        proc: subprocess.Popen[Any] = loop_thread().call(
            subprocess.Popen,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent_hook(),
        )
    return proc


def _settings_argv(settings: WorkerSettings) -> list[str]:
    """The ``labkit worker`` flags that reproduce ``settings`` in the child process."""
    argv = [
        "--concurrency", str(settings.concurrency),
        "--max-attempts", str(settings.max_attempts),
        "--backoff-ms", str(settings.backoff_ms),
        "--idempotent" if settings.idempotent else "--no-idempotent",
        "--workflow", settings.workflow,
        "--step-ms", repr(float(settings.step_ms)),
        "--cpu-ms", repr(float(settings.cpu_ms)),
    ]  # fmt: skip
    for key, value in settings.options.items():
        argv += ["-o", f"{key}={value}"]
    if settings.track_status:
        argv.append("--track-status")
    if settings.handler:
        argv += ["--handler", settings.handler]
    return argv


def _new_run_dir(runs_dir: Path, backend: str) -> Path:
    """A fresh ``<backend>-<timestamp>`` folder; a suffix keeps two pools of the same second apart."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{backend}-{datetime.now():%Y%m%d-%H%M%S}"
    for k in range(1, 1000):
        path = runs_dir / (stem if k == 1 else f"{stem}-{k}")
        try:
            path.mkdir()  # atomic: two pools (even in two processes) never share a folder
            return path
        except FileExistsError:
            continue
    raise LabkitError(f"could not create a new run folder in {runs_dir}; delete old runs there")


def _has_ready_event(worker: _Worker) -> bool:
    """True once the worker's own process (by pid: a reused run folder has older logs) logged "ready"."""
    try:
        with open(worker.events_path, encoding="utf-8") as f:
            for line in f:
                if '"ready"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # half-written line
                if record.get("event") == "ready" and record.get("pid") == worker.pid:
                    return True
    except FileNotFoundError:
        pass
    return False


def _failure_reason(log_path: Path) -> str:
    """The most useful line of a worker's log: its last error, else its last line (a traceback's exception).

    The worker command reports a fatal error as click does (``Error: <reason>``); logged
    errors look like ``<time> ERROR <reason>``. Either way only the reason is kept.
    """
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "(no log)"
    tail = lines[-_LOG_TAIL_LINES:]
    for line in reversed(tail):
        if line.startswith("Error: "):
            return line.removeprefix("Error: ")
        _, sep, message = line.partition(" ERROR ")
        if sep:
            return message
    return tail[-1] if tail else "(empty log)"
