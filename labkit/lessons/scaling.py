"""Scaling experiments: throughput against the number of worker processes, and a backlog draining over time.

One *run* starts ``n`` workers of one backend, waits until they are ready (for Kafka:
until the group has settled, so no rebalance falls inside the measurement), sends a
backlog of bookings at once and samples the backend's stats until it is drained. Its
throughput comes from the workers' own event logs: bookings completed, divided by the
time from the first ``started`` to the last ``completed`` event, so that starting the
processes and joining the Kafka group are not counted.

Which limit a run meets depends on the work (``WorkerSettings``):

- ``step_ms`` > 0 (I/O-bound: each step awaits a sleep, as it would await a payment API):
  a worker with ``concurrency=1`` handles one booking at a time and spends most of it
  waiting, so N workers do about N times the work, until the broker or the CPU is busy;
- ``cpu_ms`` > 0 (CPU-bound: a busy loop): a process keeps one core busy, so beyond one
  process per core the extra processes only take turns;
- Kafka: a partition is consumed by one member of the group, so a group with more
  members than partitions leaves the extra ones idle (see labkit.groups).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labkit.booking import BookingGenerator
from labkit.charts import PRODUCTS, backend_color
from labkit.config import Config
from labkit.errors import LabkitError
from labkit.lab import produce, with_backend
from labkit.lessons.figures import Statement, say
from labkit.lessons.groups import assignment_table, wait_for_assignment
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

#: Seconds between two stats samples while a backlog drains (a Kafka stats call takes ~50 ms).
SAMPLE_EVERY_S = 0.1
#: Kafka partitions of the work topic unless the settings' ``partitions`` option says otherwise (docs/contract.md).
KAFKA_PARTITIONS = 3
RESULT_COLUMNS = [
    "backend", "workers", "bookings", "seconds", "throughput", "booking ms", "CPU busy %", "busy workers",
    "partitions", "idle consumers",
]  # fmt: skip
SAMPLE_COLUMNS = ["backend", "workers", "t", "backlog", "in_flight", "completed"]


@dataclass(frozen=True)
class Scaling:
    """Results of a set of runs.

    Args:
        results: one row per run: ``backend, workers, bookings, seconds`` (first start to last
            completion), ``throughput`` (bookings per second), ``booking ms`` (median wall time of
            one booking, start to completion), ``CPU busy %`` (of all cores, the whole machine,
            while the backlog drained; NaN off Linux), ``busy workers`` (workers that completed
            at least one booking), ``partitions`` (of the Kafka topic; empty for the other
            backends), ``idle consumers`` (Kafka members that got no partition of the work topic;
            0 for the other backends) and ``speedup`` (throughput over the backend's first run,
            normally one worker).
        samples: the backend's stats while each backlog drained: ``backend, workers, t`` (seconds
            since the backlog was sent), ``backlog``, ``in_flight``, ``completed`` (of this run).
        assignments: the Kafka group's assignment in each Kafka run while it drained its backlog,
            indexed by ``workers`` (the run) and ``worker`` (the member), as
            labkit.groups.assignment_table shows it.
    """

    results: pd.DataFrame
    samples: pd.DataFrame
    assignments: pd.DataFrame


def booking_seconds(events: pd.DataFrame) -> pd.Series:
    """Wall-clock seconds of each completed delivery, from its ``started`` to its ``completed`` event.

    For I/O-bound work this stays put as workers are added (each one waits on its own);
    for CPU-bound work with more processes than cores it grows, because they take turns.
    """
    keys = ["worker", "booking_id", "attempt"]
    started = events.loc[events["event"] == "started", [*keys, "mono"]]
    done = events.loc[events["event"] == "completed", [*keys, "mono"]]
    pairs = done.merge(started, on=keys, suffixes=("_done", "_started"))
    return (pairs["mono_done"] - pairs["mono_started"]).rename("seconds")


def cpu_busy() -> tuple[float, float] | None:
    """``(busy, total)`` CPU time of the whole machine so far, from ``/proc/stat`` (Linux); None elsewhere.

    The difference of two readings gives the share of all cores that was busy in between,
    whoever used it: the workers, the brokers, the kernel running the notebook, or anything else.
    """
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy_share(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float:
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return (after[0] - before[0]) / (after[1] - before[1])


def throughput(events: pd.DataFrame) -> tuple[int, float]:
    """Bookings completed in ``events`` and the seconds from the first ``started`` to the last ``completed``."""
    done = events[events["event"] == "completed"]
    started = events[events["event"] == "started"]
    if done.empty:
        return 0, float("nan")
    return len(done), float(done["mono"].max() - started["mono"].min())


def measure(
    backend: str,
    config: Config,
    workers: int,
    bookings: int,
    settings: WorkerSettings,
    tag: str,
    timeout: float = 300,
) -> tuple[dict[str, Any], list[dict[str, Any]], pd.DataFrame]:
    """One run: ``workers`` workers drain a backlog of ``bookings`` sent at once, on a freshly reset backend.

    Args:
        backend: which backend.
        config: the lab.
        workers: worker processes to start.
        bookings: size of the backlog.
        settings: the workers' settings (``step_ms``/``cpu_ms`` choose the kind of work).
        tag: prefix of the booking ids (and seed of the generator).
        timeout: seconds the backlog may take to drain.

    Returns:
        the result row, the stats samples and (Kafka) the group's assignment table.

    Raises:
        TimeoutError: the backlog did not drain in time.
        LabkitError: a booking was dead-lettered (the run measures nothing useful then).
    """
    # From empty destinations. On the embedded broker this also matters for Kafka: a group whose
    # members all left at once (the previous run's stop) can keep a departed member as its leader
    # and never assign partitions again; reset deletes the group.
    with_backend(backend, lambda b: b.reset(), config, settings)  # the settings' options create the topics
    partitions = kafka_partitions(settings)
    sent = BookingGenerator(seed=len(tag), prefix=tag).bookings(bookings)
    with WorkerPool(backend, config, settings) as pool:
        pool.start(workers, ready_timeout=60)
        table = wait_for_assignment(pool, partitions)
        start, cpu_before = time.monotonic(), cpu_busy()
        produce(backend, sent, config)
        samples = []
        while True:
            stats = pool.stats()
            now = time.monotonic() - start
            done = stats["completed"]
            if stats["dead_lettered"]:
                reason = "see lk.dead_letters(backend): a throughput run expects none"
                raise LabkitError(f"{backend}: {stats['dead_lettered']} booking(s) were dead-lettered; {reason}")
            samples.append(
                {"backend": backend, "workers": workers, "t": now, "backlog": stats["backlog"],
                 "in_flight": stats["in_flight"], "completed": done}
            )  # fmt: skip
            if done >= bookings and stats["backlog"] == 0 and stats["in_flight"] == 0:
                cpu = _busy_share(cpu_before, cpu_busy())
                break
            if now > timeout:
                raise TimeoutError(f"{backend} with {workers} workers not drained after {timeout:g} s: {stats}")
            time.sleep(SAMPLE_EVERY_S)
        events = pool.events()
    if backend == "kafka":  # as it was while the backlog drained, with each member's bookings
        table = assignment_table(events, at=float(events.loc[events["event"] == "completed", "mono"].max()))
    count, seconds = throughput(events)
    busy = events.loc[events["event"] == "completed", "worker"].nunique()
    idle = int(table["idle"].sum()) if len(table) else 0
    row = {
        "backend": backend,
        "workers": workers,
        "bookings": count,
        "seconds": seconds,
        "throughput": count / seconds if seconds > 0 else float("nan"),
        "booking ms": float(booking_seconds(events).median()) * 1000,
        "CPU busy %": cpu * 100,
        "busy workers": busy,
        "partitions": partitions if backend == "kafka" else None,
        "idle consumers": idle,
    }
    return row, samples, table


def run_scaling(
    backends: Sequence[str],
    worker_counts: Sequence[int],
    config: Config,
    bookings: int,
    settings: WorkerSettings,
    name: str = "io",
) -> Scaling:
    """Measure every backend at every worker count (see :func:`measure`), with a tqdm bar over the runs."""
    import pandas as pd

    from labkit.progress import progress as progress_bar

    rows, samples = [], []
    assignments: dict[int, pd.DataFrame] = {}  # Kafka runs by worker count
    runs = list(itertools.product(backends, worker_counts))
    with progress_bar(runs, desc=f"{name} runs", unit="run") as bar:
        for backend, workers in bar:
            bar.set_postfix_str(f"{backend}, {workers} worker(s)")
            tag = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{name}-{workers}")  # booking ids allow only these
            row, run_samples, table = measure(backend, config, workers, bookings, settings, tag)
            rows.append(row)
            samples += run_samples
            if backend == "kafka":
                assignments[workers] = table
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    results["speedup"] = results["throughput"] / results.groupby("backend")["throughput"].transform("first")
    results["partitions"] = results["partitions"].astype("Int64")
    tables = pd.concat(assignments, names=["workers"]) if assignments else pd.DataFrame()
    return Scaling(results.round(2), pd.DataFrame(samples, columns=SAMPLE_COLUMNS), tables)


def speedup_table(results: pd.DataFrame) -> pd.DataFrame:
    """Throughput relative to the backend's first (one-worker) run: backends as rows, worker counts as columns."""
    table = results.pivot(index="backend", columns="workers", values="speedup")
    return table.reindex(list(dict.fromkeys(results["backend"])))


def ratio(results: pd.DataFrame, backend: str, workers: int, baseline: int) -> float:
    """Throughput with ``workers`` workers divided by throughput with ``baseline`` workers."""
    by_count = results[results["backend"] == backend].set_index("workers")["throughput"]
    return float(by_count[workers] / by_count[baseline])


def kafka_partitions(settings: WorkerSettings) -> int:
    """The partition count a Kafka topic created with these settings gets."""
    return int(settings.option("partitions", KAFKA_PARTITIONS))


def kafka_capped(results: pd.DataFrame) -> bool:
    """True if every Kafka run with more workers than partitions kept exactly that many of them busy.

    The others were idle members (no partition) and completed nothing. False when no run
    had more workers than partitions: then there is nothing to show.
    """
    kafka = results[results["backend"] == "kafka"]
    beyond = kafka[kafka["workers"] > kafka["partitions"]]
    return (
        len(beyond) > 0
        and bool((beyond["idle consumers"] == beyond["workers"] - beyond["partitions"]).all())
        and bool((beyond["busy workers"] == beyond["partitions"]).all())
    )


def cpu_cores() -> int:
    """The machine's cores as Python sees them (``os.cpu_count()``); a container's CPU quota may allow fewer."""
    return os.cpu_count() or 1


def cpu_worker_counts(cores: int | None = None) -> list[int]:
    """1, one per core, and two per core: the counts that show where CPU-bound work stops scaling."""
    cores = cores or cpu_cores()
    return sorted({1, cores, 2 * cores})


def scaling_statement(results: pd.DataFrame, step_ms: float) -> Statement:
    """Per backend, from its fewest to its most workers: the speedup, the machine's CPU busy and the booking time.

    Printed from :func:`run_scaling`'s results, so the lesson's account of why the bars fall short of
    perfect scaling is this run's numbers, not a memory of another run's.
    """
    lines, measured = [], {}
    for backend, mine in results.groupby("backend", sort=False):
        mine = mine.sort_values("workers")
        first, last = mine.iloc[0], mine.iloc[-1]
        key = f"06.speedup_{backend}"
        measured[key] = float(last["throughput"] / first["throughput"])
        lines.append(
            f"- {PRODUCTS.get(str(backend), backend)}: {int(first['workers'])} → {int(last['workers'])} workers gave "
            f"{{speedup_{backend}}} the throughput (perfect: {last['workers'] / first['workers']:.0f}x); the "
            f"machine's CPU was {first['CPU busy %']:.1f} % → {last['CPU busy %']:.1f} % busy, and a booking took "
            f"{first['booking ms']:.1f} → {last['booking ms']:.1f} ms, of which {5 * step_ms:g} ms is waiting."
        )
    return say("\n".join(lines), measured)


def steps_statement(results: pd.DataFrame) -> Statement:
    """Per backend, the throughput each step up in the worker count gave, printed from :func:`run_scaling`."""
    lines = []
    for backend, mine in results.groupby("backend", sort=False):
        mine = mine.sort_values("workers")
        steps = [
            f"{int(a['workers'])} → {int(b['workers'])}: {b['throughput'] / a['throughput']:.2f}x"
            for (_, a), (_, b) in zip(mine.iterrows(), mine.iloc[1:].iterrows(), strict=False)
        ]
        lines.append(f"- {PRODUCTS.get(str(backend), backend)}: {'; '.join(steps)}.")
    return say("\n".join(lines))


def kafka_pair_statement(results: pd.DataFrame, assignments: pd.DataFrame) -> Statement:
    """What the 2-worker Kafka run did: the busier worker's partitions and share, and the pair's speedup."""
    if 2 not in set(results.loc[results["backend"] == "kafka", "workers"]) or assignments.empty:
        return say("No Kafka run with 2 workers here: add 2 to `WORKER_COUNTS` to see one.")
    pair = assignments.loc[2]
    busiest = pair["bookings"].idxmax()
    share = pair.loc[busiest, "bookings"] / pair["bookings"].sum() * 100
    fewest = int(results.loc[results["backend"] == "kafka", "workers"].min())
    speedup = ratio(results, "kafka", 2, fewest)
    return say(
        f"With 2 Kafka workers, {busiest} owned {len(pair.loc[busiest, 'partitions'])} of the "
        f"{kafka_partitions_of(results)} partitions and completed {share:.0f} % of the bookings; the pair was "
        f"{speedup:.2f}x as fast as {fewest} worker{'s' if fewest > 1 else ''}."
    )


def kafka_partitions_of(results: pd.DataFrame) -> int:
    """The partition count of the Kafka runs in ``results``."""
    partitions = results.loc[results["backend"] == "kafka", "partitions"].dropna()
    return int(partitions.iloc[0]) if len(partitions) else KAFKA_PARTITIONS


# -- charts -----------------------------------------------------------------------------------------


def plot_throughput(results: pd.DataFrame, backend: str, ax: Axes | None = None, cores: int | None = None) -> Axes:
    """Bars: bookings per second at each worker count; dashed: perfect scaling from the first run.

    The dashed line stops rising where a hard limit says it must: at the partition count for
    Kafka, and at ``cores`` processes when given (for CPU-bound work).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    mine = results[results["backend"] == backend].sort_values("workers")
    counts = list(mine["workers"])
    positions = range(len(counts))
    bars = ax.bar(positions, mine["throughput"], color=backend_color(backend), alpha=0.8)
    ax.bar_label(bars, labels=[f"{v:.0f}" for v in mine["throughput"]], label_type="center", fontsize=8, color="white")
    partitions = mine["partitions"].dropna()
    limits: dict[str, int] = {}
    if len(partitions):
        limits["partitions"] = int(partitions.iloc[0])
    if cores:
        limits["cores"] = cores
    per_worker = float(mine["throughput"].iloc[0]) / counts[0]
    if limits:
        name = min(limits, key=lambda k: limits[k])
        cap = limits[name]
        ideal = [per_worker * min(n, cap) for n in counts]
        label = f"perfect, capped at {cap} {name}"
    else:
        ideal = [per_worker * n for n in counts]
        label = "perfect scaling"
    ax.plot(positions, ideal, "k--", linewidth=1, marker="o", markersize=3, label=label)
    for i, idle in zip(positions, mine["idle consumers"], strict=True):
        if idle:
            ax.annotate(f"{idle} idle", (i, 0), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(list(positions), [str(n) for n in counts])
    ax.set_xlabel("worker processes")
    ax.set_title(backend)
    top = max([*ideal, *mine["throughput"]])
    ax.set_ylim(0, max(ax.get_ylim()[1], top * 1.3))  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left")
    return ax


def plot_throughputs(results: pd.DataFrame, title: str, cores: int | None = None) -> list[Axes]:
    """:func:`plot_throughput` for every backend side by side; the title states the machine's cores."""
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(results["backend"]))
    fig, axes = plt.subplots(1, len(backends), figsize=(4 * len(backends), 3.6), sharey=True, squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        plot_throughput(results, backend, ax=ax, cores=cores)
    axes[0, 0].set_ylabel("bookings per second")
    fig.suptitle(f"{title}, on a machine with {cpu_cores()} cores")
    fig.tight_layout()
    return list(axes[0])


def plot_draining(samples: pd.DataFrame, backend: str, ax: Axes | None = None) -> Axes:
    """The backlog over time after it was sent, one curve per worker count."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    mine = samples[samples["backend"] == backend]
    for workers, curve in mine.groupby("workers"):
        ax.plot(curve["t"], curve["backlog"], marker=".", markersize=3, label=f"{workers} worker(s)")
    ax.set_xlabel("seconds since the backlog was sent")
    ax.set_title(backend)
    ax.legend(fontsize=8)
    return ax


def plot_drainings(samples: pd.DataFrame, title: str) -> list[Axes]:
    """:func:`plot_draining` for every backend side by side."""
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(samples["backend"]))
    fig, axes = plt.subplots(1, len(backends), figsize=(4 * len(backends), 3.4), sharey=True, squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        plot_draining(samples, backend, ax=ax)
    axes[0, 0].set_ylabel("backlog (bookings waiting)")
    fig.suptitle(title)
    fig.tight_layout()
    return list(axes[0])
