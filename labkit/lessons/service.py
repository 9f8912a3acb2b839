"""Lesson 09's driver: the booking service as a real process, asked over HTTP as any application would.

:class:`BookingService` starts ``labkit serve`` in a process of its own and owns it the way a
``WorkerPool`` owns workers: stopped by ``stop()`` and its ``with`` block, at interpreter exit (a
kernel restart), and SIGKILLed by the kernel if the notebook's process dies; the service in turn
stops its own workers. Everything else here reads the service's answers into DataFrames and charts.
This module never imports the service's code: it only talks HTTP to it, as curl would.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.config import BACKENDS, Config
from labkit.errors import LabkitError
from labkit.events import load_run
from labkit.pool import REPO_ROOT, spawn_owned

if TYPE_CHECKING:
    import httpx
    import pandas as pd
    from matplotlib.axes import Axes

#: How long start() waits for the service (and its workers) to answer.
START_TIMEOUT_S = 60.0
#: How long stop() gives the service to stop its server and warm-stop its workers before SIGKILL.
STOP_TIMEOUT_S = 25.0
#: Final states: nothing more happens to a booking in one of these (unless it is replayed).
SETTLED = ("completed", "dead_lettered")
#: Colours of the states in the timeline, the workflow's steps shading from light to dark.
STATE_COLOURS = {"queued": "#d9d9d9", "delayed": "#9ecae1", "retrying": "#fdae6b", "dead_lettered": "#d62728",
                 "completed": "#2ca02c"}  # fmt: skip
STEP_COLOURS = {"validate": "#c7e9c0", "charge_payment": "#a1d99b", "write_confirmation": "#74c476",
                "send_email": "#41ab5d", "update_inventory": "#238b45"}  # fmt: skip

_SERVICES: weakref.WeakSet[BookingService] = weakref.WeakSet()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM the process group, wait up to ``timeout``, then SIGKILL it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@atexit.register
def _stop_all_services() -> None:
    for service in list(_SERVICES):
        service.stop()


class BookingService:
    """``labkit serve`` as a process of this notebook, with an HTTP client for its API.

    Args:
        config: the lab (its namespace is the service's).
        port: where it listens [default: a free port].
        workers: worker processes per backend.
        step_ms: simulated I/O time of each workflow step, so that a booking's progress can be watched.
        serve_args: more ``labkit serve`` options, e.g. ``["--concurrency", "4"]``.
    """

    def __init__(
        self,
        config: Config,
        port: int | None = None,
        workers: int = 1,
        step_ms: float = 0.0,
        serve_args: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = config.runs_dir / f"service-{time.strftime('%Y%m%d-%H%M%S')}-{self.port}"
        self.argv = [sys.executable, "-m", "labkit", "serve", "--port", str(self.port), "--workers", str(workers),
                     "--step-ms", repr(float(step_ms)), "--run-dir", str(self.run_dir), *serve_args]  # fmt: skip
        self.proc: subprocess.Popen[Any] | None = None
        self._client: httpx.Client | None = None
        _SERVICES.add(self)

    def __enter__(self) -> BookingService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        alive = self.proc is not None and self.proc.poll() is None
        return f"<BookingService {self.url} alive={alive} run_dir={str(self.run_dir)!r}>"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "service.log"

    def start(self, timeout: float = START_TIMEOUT_S) -> BookingService:
        """Start the service and return once it answers (its workers are ready by then).

        Raises:
            LabkitError: it exited (the reason is its last log line) or did not answer in time.
        """
        import httpx

        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.config.to_env(), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        self.proc = spawn_owned(self.argv, self.log_path, env)
        self._client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabkitError(f"the booking service exited with {self.proc.returncode}: {self.last_log_line()}")
            with contextlib.suppress(httpx.TransportError):
                if self._client.get("/api/health").status_code in (200, 503):
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise LabkitError(f"the booking service did not answer within {timeout:g} s: {self.last_log_line()}")
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the service: it stops its server, then warm-stops its workers. Calling it again does nothing."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None:
            _stop_process(self.proc, timeout)

    def last_log_line(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return next((line for line in reversed(lines) if line.strip()), "(empty log)")

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise LabkitError("the booking service is not running; call start() first")
        return self._client

    # -- the API, as an application calls it --------------------------------------------------

    def book(self, **booking: Any) -> dict[str, Any]:
        """POST one booking; returns the 202 answer. Raises LabkitError with the service's line otherwise."""
        answer = self.client.post("/api/bookings", json=booking)
        if answer.status_code != 202:
            raise LabkitError(f"POST /api/bookings answered {answer.status_code}: {answer.json().get('error')}")
        result: dict[str, Any] = answer.json()
        return result

    def status(self, booking_id: str) -> dict[str, Any]:
        """``GET /api/bookings/{id}``: the booking's state on each backend that knows it."""
        answer = self.client.get(f"/api/bookings/{booking_id}")
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()["backends"]
        return result

    def get(self, path: str, **params: Any) -> Any:
        answer = self.client.get(path, params=params)
        return answer.json()

    def replay(self, backend: str, booking_ids: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"backend": backend}
        if booking_ids is not None:
            body["booking_ids"] = booking_ids
        result: dict[str, Any] = self.client.post("/api/dead-letters/replay", json=body).json()
        return result

    def warm_up(self, timeout: float = 60.0) -> float:
        """Post one booking to every backend and wait until it completed everywhere, so that every worker is
        consuming (a Kafka worker has its partitions only once its group has formed). Returns the seconds it took."""
        started = time.monotonic()
        answer = self.book(user_id="warm-up", hotel_id="warm-up", check_in="2027-01-01", check_out="2027-01-02",
                           guests=1, amount_cents=0)  # fmt: skip
        self.wait_settled([answer["booking_id"]], timeout)
        return time.monotonic() - started

    def wait_settled(
        self, booking_ids: Iterable[str], timeout: float = 60.0, progress: bool = True
    ) -> dict[str, dict[str, Any]]:
        """Wait until every booking is completed or dead-lettered on every backend that took it.

        Progress: a bar of (booking, backend) pairs settled, since a redelivery can take each backend's
        whole failure-detection time.

        Raises:
            TimeoutError: not all settled in time; says which were not.
        """
        from labkit.progress import progress as progress_bar

        waiting = set(booking_ids)
        latest: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        unit = "backends" if len(waiting) == 1 else "bookings×backends"
        with progress_bar(desc="settled", unit=unit, disable=not progress) as bar:
            while waiting:
                for booking_id in sorted(waiting):
                    latest[booking_id] = self.status(booking_id)
                    if all(s["state"] in SETTLED for s in latest[booking_id].values()):
                        waiting.discard(booking_id)
                bar.total = sum(len(status) for status in latest.values())
                bar.n = sum(s["state"] in SETTLED for status in latest.values() for s in status.values())
                bar.refresh()
                if waiting and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{len(waiting)} bookings not settled after {timeout:g} s: {sorted(waiting)[:5]}"
                    )
                if waiting:
                    time.sleep(0.1)
        return latest

    def watch(
        self, booking_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 60.0, every: float = 0.05
    ) -> pd.DataFrame:
        """Ask for one booking's status every ``every`` seconds until ``until(status)``; one row per answer
        and backend: ``t`` (seconds since the first), ``backend``, ``state``, ``step``, ``progress``, ``worker``."""
        rows: list[dict[str, Any]] = []
        start = time.monotonic()
        while True:
            status = self.status(booking_id)
            t = time.monotonic() - start
            keys = ("state", "step", "progress", "attempts", "worker")
            rows += [{"t": round(t, 3), "backend": name, **{k: s.get(k) for k in keys}} for name, s in status.items()]
            if until(status) or t > timeout:
                break
            time.sleep(every)
        import pandas as pd  # only now: a first import takes half a second, longer than a booking

        return pd.DataFrame(rows)

    def worker_pids(self) -> dict[str, int]:
        """Each of the service's workers and its pid, from the "ready" events in its run folder."""
        events = load_run(self.run_dir)
        ready = events[events["event"] == "ready"].drop_duplicates("worker", keep="last")
        return {str(w): int(p) for w, p in zip(ready["worker"], ready["pid"], strict=True)}

    def events(self) -> pd.DataFrame:
        """Every event of the service's workers (labkit.events.load_run of its run folder)."""
        return load_run(self.run_dir)


# -- reading the answers ---------------------------------------------------------------------------


def status_table(status: dict[str, Any]) -> pd.DataFrame:
    """One row per backend of one booking's status: state, step, progress, attempts, worker, reason."""
    import pandas as pd

    columns = ["state", "step", "progress", "attempts", "worker", "duration_ms", "reason"]
    frame = pd.DataFrame.from_dict(status, orient="index")
    frame.index.name = "backend"
    return frame.reindex(columns=columns)


def history_frame(status: dict[str, Any], since: float | None = None) -> pd.DataFrame:
    """Every transition of one booking on every backend: ``backend, t, state, step, progress, attempt, worker``.

    ``t`` counts seconds from ``since`` [default: the earliest transition].
    """
    import pandas as pd

    rows = [{"backend": name, **entry} for name, s in status.items() for entry in s["history"]]
    frame = pd.DataFrame(rows)
    start = since if since is not None else frame["at"].min()
    frame["t"] = (frame["at"] - start).round(3)
    columns = ["backend", "t", "state", "step", "progress", "attempt", "worker", "reason", "source"]
    return frame.reindex(columns=columns).sort_values(["backend", "t"], kind="stable").reset_index(drop=True)


def in_order(status: dict[str, Any]) -> bool:
    """Every backend's history runs queued/delayed → active (steps in order, progress rising within a run) → a
    final state, with retries only between runs: what the status promises."""
    from labkit.status import STEPS

    for backend_status in status.values():
        history = backend_status["history"]
        states = [h["state"] for h in history]
        if not states or states[0] not in ("queued", "delayed") or states[-1] not in SETTLED:
            return False
        last_step = -1
        for entry in history[1:]:
            if entry["state"] == "active":
                index = STEPS.index(entry["step"])
                if index not in (0, last_step + 1) and index <= last_step:
                    return False
                last_step = index
            elif entry["state"] == "retrying":
                last_step = -1
    return True


def delays_frame(settled: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Delayed bookings, one row per booking and backend: ``due_s`` (its due time after it was accepted),
    ``started_s`` (its first start), ``late_ms`` (start - due: negative would be a broken promise)."""
    import pandas as pd

    rows = []
    for booking_id, status in settled.items():
        for backend, s in status.items():
            history = s["history"]
            accepted = history[0]
            started = next(h for h in history if h["state"] == "active")
            due = accepted.get("due_at") or accepted["at"]
            rows.append({"booking_id": booking_id, "backend": backend, "due_s": round(due - accepted["at"], 3),
                         "started_s": round(started["at"] - accepted["at"], 3),
                         "late_ms": round((started["at"] - due) * 1000, 1)})  # fmt: skip
    return pd.DataFrame(rows).sort_values(["backend", "due_s"]).reset_index(drop=True)


def timeline_chart(status: dict[str, Any], ax: Axes | None = None) -> Axes:
    """One booking's journey on each backend: a bar per backend, coloured by state and step over time."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ax = ax or plt.gca()
    history = history_frame(status)
    end = history["t"].max() + 0.05
    for row, backend in enumerate(b for b in BACKENDS if b in status):
        entries = history[history["backend"] == backend].reset_index(drop=True)
        for i, entry in entries.iterrows():
            stop = entries["t"][i + 1] if i + 1 < len(entries) else end
            colour = STEP_COLOURS.get(entry["step"]) if entry["state"] == "active" else STATE_COLOURS[entry["state"]]
            ax.barh(row, stop - entry["t"], left=entry["t"], color=colour, edgecolor="white", height=0.6)
    ax.set_yticks(range(len(status)), [b for b in BACKENDS if b in status])
    ax.set_xlabel("seconds since the booking was accepted")
    handles = [Patch(color=c, label=n) for n, c in {**STATE_COLOURS, **STEP_COLOURS}.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    ax.set_title("one booking, state by state and step by step")
    return ax


def schedule_chart(delays: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Scheduled (due) against actual start of each delayed booking, per backend; the diagonal is "on time"."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    for backend, group in delays.groupby("backend", sort=False):
        ax.scatter(group["due_s"], group["started_s"], label=str(backend), alpha=0.8)
    top = max(delays["due_s"].max(), delays["started_s"].max()) * 1.05
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="on time")
    ax.set_xlabel("due (s after it was accepted)")
    ax.set_ylabel("started (s after it was accepted)")
    ax.set_title("delayed bookings: never before their time")
    ax.legend()
    return ax


# -- the lesson's experiments ---------------------------------------------------------------------


def all_settled(status: dict[str, Any]) -> bool:
    """True once the booking is completed or dead-lettered on every backend that took it."""
    return all(s["state"] in SETTLED for s in status.values())


def sample_booking(n: int, prefix: str = "lesson") -> dict[str, Any]:
    """A valid booking message (snake_case) with a fresh id; ``n`` varies the hotel and the stay."""
    import uuid

    day = 1 + n % 27
    return {"booking_id": f"{prefix}-{n}-{uuid.uuid4().hex[:6]}", "user_id": f"user-{n:04d}",
            "hotel_id": f"hotel-{n % 20:03d}", "check_in": f"2027-03-{day:02d}", "check_out": f"2027-03-{day + 1:02d}",
            "guests": 2, "amount_cents": 12_000}  # fmt: skip


def sightings(samples: pd.DataFrame) -> pd.DataFrame:
    """When each backend was first seen in each state and step, from :meth:`BookingService.watch`'s answers."""
    first = samples.drop_duplicates(["backend", "state", "step"])
    return first.pivot_table(index=["state", "step"], columns="backend", values="t", aggfunc="min", dropna=False,
                             sort=False).dropna(how="all")  # fmt: skip


def kill_running(service: BookingService, booking_id: str, timeout: float = 30.0) -> pd.DataFrame:
    """SIGKILL, on each backend, the worker running ``booking_id``, as soon as the status shows it active.

    Returns:
        ``backend, worker, pid, step, progress, killed_at`` (Unix time), one row per backend.
    """
    import pandas as pd

    pids = service.worker_pids()
    killed: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(killed) < len(BACKENDS):
        for backend, s in service.status(booking_id).items():
            if backend not in killed and s["state"] == "active" and s["worker"] in pids:
                os.kill(pids[s["worker"]], signal.SIGKILL)
                killed[backend] = {"worker": s["worker"], "pid": pids[s["worker"]], "step": s["step"],
                                   "progress": s["progress"], "killed_at": time.time()}  # fmt: skip
        if time.monotonic() > deadline:
            raise TimeoutError(f"{booking_id} was not seen active on {sorted(set(BACKENDS) - set(killed))}")
        time.sleep(0.02)
    frame = pd.DataFrame.from_dict(killed, orient="index")
    frame.index.name = "backend"
    return frame


def redelivery_table(status: dict[str, Any], killed: pd.DataFrame) -> pd.DataFrame:
    """After :func:`kill_running`: who finished the booking, and how long it waited for a new owner.

    ``handed_over_s`` is the time from the kill to the first step of the next run, on another worker.
    """
    import pandas as pd

    rows = {}
    for backend, row in killed.iterrows():
        history = status[str(backend)]["history"]
        later = [h for h in history if h["at"] > row["killed_at"] and h["state"] == "active"]
        rows[backend] = {"killed": row["worker"], "at step": row["step"], "state": status[str(backend)]["state"],
                         "finished by": status[str(backend)]["worker"], "attempts": status[str(backend)]["attempts"],
                         "handed_over_s": round(later[0]["at"] - row["killed_at"], 2) if later else None}  # fmt: skip
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "backend"
    return frame


def dead_letters_frame(service: BookingService, booking_id: str | None = None) -> pd.DataFrame:
    """``GET /api/dead-letters`` as a table (one booking's, when ``booking_id`` is given)."""
    import pandas as pd

    frame = pd.DataFrame(service.get("/api/dead-letters"), columns=["backend", "booking_id", "reason", "attempts",
                                                                    "source"])  # fmt: skip
    return frame if booking_id is None else frame[frame["booking_id"] == booking_id].reset_index(drop=True)


def reconcile(final: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Posted = completed + dead-lettered, per backend, from each booking's own status; ``lost`` must be 0."""
    import pandas as pd

    rows = {}
    for backend in BACKENDS:
        states = [status[backend]["state"] for status in final.values() if backend in status]
        rows[backend] = {"posted": len(final), "completed": states.count("completed"),
                         "dead_lettered": states.count("dead_lettered"),
                         "lost": len(final) - states.count("completed") - states.count("dead_lettered")}  # fmt: skip
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "backend"
    return frame
