"""Consumer groups from the workers' own event logs: who processed what, who owned which partition, and when.

The 02-consumer-groups lesson starts several worker processes per backend and asks three
questions of their event logs (labkit.events):

- **Who processed what?** Every ``completed`` event names its worker, so counting them
  per worker shows how the competing consumers shared the work.
- **Who owns which Kafka partition?** The embedded broker's ``describe_consumer_groups``
  answers with an empty member list, so Kafka workers log their own assignment
  (``assigned``/``revoked`` events, each with ``topic/partition`` names). Replaying those
  events up to a moment gives the group's assignment at that moment, on Apache Kafka too.
- **What happens when a worker joins or leaves?** :func:`join_and_leave` produces at a
  steady rate while the pools scale up and down, and records the moments it asked for it;
  :func:`pauses` measures how long processing stopped around each moment.

Worker ids are backend-prefixed (``kafka-w2``); tables and charts show the short ``w2``,
so that the same worker number has the same column and colour on every backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.backends import get_backend
from labkit.booking import BookingGenerator
from labkit.charts import PRODUCTS
from labkit.config import BACKENDS, Config
from labkit.events import load_run
from labkit.lab import loop_thread, reset
from labkit.lessons.figures import Statement, say
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

#: Seconds between two looks at the event logs while waiting for a Kafka group to settle.
_ASSIGNMENT_POLL_S = 0.2
#: Seconds between two updates of the producing progress bar in :func:`join_and_leave`.
_PROGRESS_POLL_S = 0.2
#: One colour per worker number (w1, w2, ...), the same on every chart of the lesson.
WORKER_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
#: Kafka rows only: the two kinds of assignment event.
_ASSIGNMENT_EVENTS = ("assigned", "revoked")


def worker_label(worker_id: str) -> str:
    """``kafka-w2`` → ``w2``: the pool's worker number, comparable across backends."""
    return worker_id.rsplit("-", 1)[-1]


def _label_order(label: str) -> tuple[int, str]:
    """Sort ``w2`` before ``w10`` (numerically), anything else after."""
    digits = label.lstrip("w")
    return (int(digits), label) if digits.isdigit() else (10**9, label)


def worker_color(label: str) -> str:
    """The colour of worker ``w<k>`` on every chart."""
    order = _label_order(label)[0]
    return WORKER_COLORS[(order - 1) % len(WORKER_COLORS)] if order < 10**9 else "#999999"


def _workers(events: pd.DataFrame) -> list[str]:
    """Every worker that announced itself (``ready``), as short labels in number order."""
    ready = events.loc[events["event"] == "ready", "worker"]
    return sorted({worker_label(w) for w in ready}, key=_label_order)


# -- who processed what ------------------------------------------------------------------------------


def per_worker(events: pd.DataFrame) -> pd.DataFrame:
    """Completed bookings per backend (rows) and worker (columns ``w1``, ``w2``, ...); 0 for a worker that did none.

    Every ``completed`` event counts, duplicates included: this is the work each process did.
    Backends keep the order in which they appear in the log.
    """
    import pandas as pd

    done = events[events["event"] == "completed"]
    backends = list(dict.fromkeys(events.loc[events["event"] == "ready", "backend"]))
    table = pd.crosstab(done["backend"], done["worker"].map(worker_label))
    columns = sorted(set(table.columns) | set(_workers(events)), key=_label_order)
    table = table.reindex(index=backends, columns=columns, fill_value=0).fillna(0).astype(int)
    table.index.name, table.columns.name = "backend", "worker"
    return table


def delivery_counts(events: pd.DataFrame, booking_ids: Iterable[str]) -> pd.DataFrame:
    """Per backend: bookings ``sent``, ``completed`` events, ``lost`` (never completed) and ``duplicates``.

    All three systems promise at-least-once, so a duplicate (a booking completed again after a worker lost
    its lock or its partition before acknowledging) is allowed and counted; a lost booking is a bug.
    """
    import pandas as pd

    wanted = set(booking_ids)
    done = events[events["event"] == "completed"]
    rows = {}
    for backend in dict.fromkeys(events.loc[events["event"] == "ready", "backend"]):
        ours = done.loc[(done["backend"] == backend) & done["booking_id"].isin(wanted), "booking_id"]
        rows[backend] = {
            "sent": len(wanted),
            "completed": len(ours),
            "lost": len(wanted - set(ours)),
            "duplicates": len(ours) - ours.nunique(),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("backend")


# -- Kafka assignment --------------------------------------------------------------------------------


def assignment_log(events: pd.DataFrame) -> pd.DataFrame:
    """The ``assigned`` and ``revoked`` events, one row per partition: ``mono, worker, event, topic, partition``.

    An ``assigned`` event with no partitions (a consumer the group had no partition for)
    keeps one row with ``topic`` and ``partition`` empty, so the idle member stays visible.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    kafka = events[events["event"].isin(_ASSIGNMENT_EVENTS) & (events["backend"] == "kafka")]
    if "partitions" not in kafka:
        return pd.DataFrame(columns=["mono", "worker", "event", "topic", "partition"])
    for record in kafka.itertuples():
        base = {"mono": record.mono, "worker": worker_label(record.worker), "event": record.event}
        names = record.partitions if isinstance(record.partitions, list) else []
        if not names:
            rows.append({**base, "topic": None, "partition": None})
        for name in names:
            topic, _, number = name.rpartition("/")
            rows.append({**base, "topic": topic, "partition": int(number)})
    frame = pd.DataFrame(rows, columns=["mono", "worker", "event", "topic", "partition"])
    frame["partition"] = frame["partition"].astype("Int64")
    return frame


def _is_retry(topic: str) -> bool:
    return topic.endswith(".retry")


def _is_work(topic: str) -> bool:
    """The work topic, not one of those assigned alongside it (retries, delayed bookings)."""
    return not topic.endswith((".retry", ".delay"))


def owned_at(events: pd.DataFrame, at: float | None = None) -> dict[str, set[tuple[str, int]]]:
    """Which ``(topic, partition)`` each Kafka worker holds at monotonic time ``at`` [default: the end of the log].

    Replays the Kafka workers' ``assigned``/``revoked`` events in order (other backends'
    events are ignored: their ``w1`` is another process). A worker that has stopped by then
    holds nothing, and only workers that received an assignment (even an empty one) appear.
    """
    import pandas as pd

    events = events[events["backend"] == "kafka"]
    log = assignment_log(events)
    if at is not None:
        log = log[log["mono"] <= at]
    held: dict[str, set[tuple[str, int]]] = {}
    for record in log.itertuples():
        mine = held.setdefault(record.worker, set())
        if pd.isna(record.partition):
            continue
        part = (str(record.topic), int(record.partition))
        if record.event == "assigned":
            mine.add(part)
        else:
            mine.discard(part)
    stopped = events[events["event"] == "stopped"]
    if at is not None:
        stopped = stopped[stopped["mono"] <= at]
    for worker in stopped["worker"]:
        held.pop(worker_label(worker), None)
    return held


def last_completed(events: pd.DataFrame) -> float | None:
    """Monotonic time of the last ``completed`` event: a moment when the workers were still group members."""
    done = events.loc[events["event"] == "completed", "mono"]
    return float(done.max()) if len(done) else None


def assignment_table(events: pd.DataFrame, at: float | None = None) -> pd.DataFrame:
    """The Kafka group's assignment at ``at``, one row per worker, as ``describe_consumer_groups`` would show it.

    Args:
        events: a run's events.
        at: a monotonic time [default: the last completed booking, while the workers were
            still members; after a pool has stopped, the end of the log has no members left].

    Returns:
        one row per member: ``partitions`` (of the work topic), ``retry partitions`` (the
        delayed-retry topic, assigned alongside), ``bookings`` (completed by that worker over
        the whole log) and ``idle`` (a member with no partition of the work topic).
    """
    import pandas as pd

    held = owned_at(events, at if at is not None else last_completed(events))
    kafka = events[events["backend"] == "kafka"]
    done = kafka[kafka["event"] == "completed"]["worker"].map(worker_label).value_counts()
    rows = []
    for worker in sorted(held, key=_label_order):
        work = sorted(p for t, p in held[worker] if _is_work(t))
        retry = sorted(p for t, p in held[worker] if _is_retry(t))
        rows.append(
            {
                "worker": worker,
                "partitions": work,
                "retry partitions": retry,
                "bookings": int(done.get(worker, 0)),
                "idle": not work,
            }
        )
    return pd.DataFrame(rows, columns=["worker", "partitions", "retry partitions", "bookings", "idle"]).set_index(
        "worker"
    )


def partition_sizes(locations: Iterable[str]) -> dict[int, int]:
    """Bookings per partition, from the ``topic/partition/offset`` locations Kafka's produce returned."""
    sizes: dict[int, int] = {}
    for location in locations:
        partition = int(location.split("/")[-2])
        sizes[partition] = sizes.get(partition, 0) + 1
    return dict(sorted(sizes.items()))


def shares_follow_partitions(table: pd.DataFrame, locations: Iterable[str]) -> bool:
    """True if every Kafka worker in ``table`` completed exactly the bookings produced to its partitions."""
    sizes = partition_sizes(locations)
    return all(
        bookings == sum(sizes.get(p, 0) for p in owned)
        for owned, bookings in zip(table["partitions"], table["bookings"], strict=True)
    )


def each_partition_owned_once(table: pd.DataFrame, partitions: int) -> bool:
    """True if partitions ``0 .. partitions-1`` of the work topic each have exactly one owner in ``table``."""
    owners = [p for owned in table["partitions"] for p in owned]
    return sorted(owners) == list(range(partitions))


def settled(events: pd.DataFrame, live_workers: Iterable[str], partitions: int) -> bool:
    """A Kafka group is settled when every live worker got an assignment and each partition has one owner.

    During an eager rebalance every member has revoked its partitions, so the owners do
    not cover the topic; before a newcomer's first assignment it is missing from the table.
    """
    held = owned_at(events)
    live = {worker_label(w) for w in live_workers}
    owners = sorted(p for worker in live for t, p in held.get(worker, ()) if _is_work(t))
    return live <= set(held) and owners == list(range(partitions))


def wait_for_assignment(pool: WorkerPool, partitions: int = 3, timeout: float = 60) -> pd.DataFrame:
    """Wait until every live Kafka worker of ``pool`` has its partitions, and return the assignment table.

    A Kafka worker is ready before the group gives it partitions (the join takes about 3 s
    on the embedded broker). Sending work before that would have it processed by whichever
    worker is assigned first, and then moved at the next rebalance. For BullMQ and Streams
    there is no assignment: it returns an empty table at once.

    Raises:
        TimeoutError: the group did not settle in time.
    """
    import pandas as pd

    if pool.backend != "kafka":
        return pd.DataFrame()
    deadline = time.monotonic() + timeout
    while True:
        events = pool.events()
        live = [w.worker_id for w in pool.workers if w.alive]
        if settled(events, live, partitions):
            return assignment_table(events, at=float("inf"))
        if time.monotonic() > deadline:
            held = {w: sorted(parts) for w, parts in owned_at(events).items()}
            raise TimeoutError(f"Kafka group not settled after {timeout:g} s; partitions held: {held}")
        time.sleep(_ASSIGNMENT_POLL_S)


# -- a worker joins and leaves ------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinLeave:
    """One join-and-leave run: the workers' events and the moments the lesson asked for a change.

    Args:
        run_dir: the run folder every pool of the run wrote to.
        events: all workers' events (labkit.events.load_run).
        moments: ``backend, action, mono, workers``: ``start`` (production began), ``join`` (a
            worker was started) and ``leave`` (the newest worker was asked to stop), with the
            number of workers asked for.
        sent: the booking ids produced, the same on every backend.
    """

    run_dir: Path
    events: pd.DataFrame
    moments: pd.DataFrame
    sent: list[str]


async def _produce_at_rate(
    backend: str,
    config: Config,
    bookings: Sequence[dict[str, Any]],
    rate: float,
    start: float,
    sent: list[int],
    limit: list[int | None],
) -> None:
    """Send ``bookings`` at ``rate`` per second from monotonic ``start``, on one connection.

    ``sent[0]`` counts what was sent; production stops once ``limit[0]`` (set by the caller,
    the same for every backend) bookings are out, or the list is exhausted.
    """
    async with get_backend(backend)(config) as connected:
        i = 0
        while i < len(bookings) and (limit[0] is None or i < limit[0]):
            due = min(len(bookings), int((time.monotonic() - start) * rate) + 1)
            if limit[0] is not None:
                due = min(due, limit[0])
            if due > i:
                await connected.produce(bookings[i:due])
                sent[0] += due - i
                i = due
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))


def _newcomers_busy(events: pd.DataFrame, newcomers: Iterable[str]) -> bool:
    """True once every worker in ``newcomers`` has completed a booking."""
    done = set(events.loc[events["event"] == "completed", "worker"])
    return set(newcomers) <= done


def _kafka_settled(pools: dict[str, WorkerPool], events: pd.DataFrame) -> bool:
    pool = pools.get("kafka")
    if pool is None:
        return True
    live = [w.worker_id for w in pool.workers if w.alive]
    return settled(events, live, int(pool.settings.option("partitions", 3)))


def join_and_leave(
    backends: Sequence[str],
    config: Config,
    run_dir: Path,
    workers: int = 2,
    rate: float = 20.0,
    phase_s: float = 8.0,
    settings: WorkerSettings | None = None,
    seed: int = 1,
    settle_timeout: float = 60,
    drain_timeout: float = 120,
) -> JoinLeave:
    """Produce at a steady rate through three phases: ``workers`` workers, one more, and back to ``workers``.

    All backends run at the same time, each with its own pool and producer, so their
    timelines share one clock and every backend gets the same bookings. After ``phase_s``
    seconds each pool scales up by one (``pool.scale``). The leave (the newest worker is
    warm-stopped) comes ``phase_s`` seconds later, but not before every newcomer has
    completed a booking and the Kafka group has settled; production ends ``phase_s`` after
    the leave, once the Kafka group has settled again. So a slow rebalance (a loaded
    machine) stretches a phase instead of hiding the join. Progress: a tqdm bar of bookings sent.

    Each backend is reset first: the drain waits for the run's bookings from zero, and on
    the embedded broker a consumer group whose members all left at once (an earlier pool's
    stop) can keep a departed member as its leader and never assign partitions again;
    ``reset`` deletes the group.

    Args:
        backends: which backends to run side by side.
        config: the lab (with the lesson's namespace).
        run_dir: where every pool writes its events.
        workers: workers before the join and after the leave.
        rate: bookings per second per backend; keep it below what ``workers`` workers handle.
        phase_s: seconds of each phase, at least.
        settings: the workers' settings.
        seed: seed of the bookings.
        settle_timeout: seconds a phase may be stretched while waiting for the newcomers and Kafka.
        drain_timeout: seconds each backend may take to finish after production ends.
    """
    import pandas as pd

    from labkit.progress import progress as progress_bar

    for backend in backends:
        reset(backend, config)
    most = int(rate * (3 * phase_s + 2 * settle_timeout)) + 1  # enough for the longest possible run
    bookings = BookingGenerator(seed=seed, prefix="join").bookings(most)
    moments: list[dict[str, Any]] = []
    limit: list[int | None] = [None]
    with contextlib.ExitStack() as stack:
        pools = {b: stack.enter_context(WorkerPool(b, config, settings, run_dir=run_dir)) for b in backends}
        for pool in pools.values():
            pool.start(workers)
        for pool in pools.values():
            wait_for_assignment(pool)
        start = time.monotonic()
        counters = {b: [0] for b in backends}
        producers = [
            asyncio.run_coroutine_threadsafe(
                _produce_at_rate(b, config, bookings, rate, start, counters[b], limit), loop_thread().loop
            )
            for b in backends
        ]
        moments += [{"backend": b, "action": "start", "mono": start, "workers": workers} for b in backends]
        with progress_bar(total=int(rate * 3 * phase_s) * len(backends), desc="bookings sent", unit="booking") as bar:

            def wait(until: float, ready: Callable[[pd.DataFrame], bool]) -> None:
                """Until ``until`` has passed and ``ready(events)`` holds (at most settle_timeout longer)."""
                while time.monotonic() < until + settle_timeout:
                    bar.update(sum(c[0] for c in counters.values()) - bar.n)
                    if time.monotonic() >= until and ready(load_run(run_dir)):
                        return
                    time.sleep(_PROGRESS_POLL_S)

            wait(start + phase_s, lambda events: True)
            for backend, pool in pools.items():
                moments.append({"backend": backend, "action": "join", "mono": time.monotonic(), "workers": workers + 1})
                pool.scale(workers + 1)
            newcomers = [pool.workers[-1].worker_id for pool in pools.values()]
            wait(
                moments[-1]["mono"] + phase_s,
                lambda events: _newcomers_busy(events, newcomers) and _kafka_settled(pools, events),
            )
            for backend, pool in pools.items():
                moments.append({"backend": backend, "action": "leave", "mono": time.monotonic(), "workers": workers})
                pool.scale(workers)
            wait(moments[-1]["mono"] + phase_s, lambda events: _kafka_settled(pools, events))
            limit[0] = min(len(bookings), int((time.monotonic() - start) * rate) + 1)
            for producer in producers:
                producer.result()
            bar.total = bar.n = sum(c[0] for c in counters.values())
            bar.refresh()
        count = limit[0]
        for pool in pools.values():
            pool.wait_until_drained(timeout=drain_timeout, expected=count)
    sent = [booking["booking_id"] for booking in bookings[:count]]
    return JoinLeave(run_dir, load_run(run_dir), pd.DataFrame(moments), sent)


def _moment(moments: pd.DataFrame, backend: str, action: str) -> float | None:
    rows = moments[(moments["backend"] == backend) & (moments["action"] == action)]
    return float(rows["mono"].iloc[0]) if len(rows) else None


def longest_gap(times: Sequence[float], since: float, until: float) -> float:
    """The longest stretch in ``[since, until]`` with no event at ``times`` (seconds; the ends count as edges)."""
    inside = sorted(t for t in times if since < t < until)
    edges = [since, *inside, until]
    return max(b - a for a, b in zip(edges, edges[1:], strict=False))


def pauses(run: JoinLeave) -> pd.DataFrame:
    """How the join and the leave disturbed each backend, one row per backend (seconds).

    Columns:
        ``newcomer's first booking``: from asking for the new worker to its first completed booking.
        ``longest pause after join`` / ``after leave``: the longest stretch with no booking
            completed by anyone, from the moment to the next one (the end of production for the
            leave). Bookings arrive every ``1/rate`` s, so a healthy group's pauses stay near that.
        ``Kafka rebalance after join`` / ``after leave``: from the first ``revoked`` event after
            the moment to the last ``assigned`` event before the next moment (Kafka only).
    """
    import pandas as pd

    events, moments = run.events, run.moments
    done = events[events["event"] == "completed"]
    rows = []
    for backend in moments["backend"].drop_duplicates():
        join, leave = _moment(moments, backend, "join"), _moment(moments, backend, "leave")
        if join is None or leave is None:
            continue
        mine = events[events["backend"] == backend]
        ends = mine.loc[mine["event"] == "completed", "mono"]
        finish = float(ends.max()) if len(ends) else leave
        times = list(done.loc[done["backend"] == backend, "mono"])
        row: dict[str, Any] = {"backend": backend}
        newcomer = _newcomer(mine, join)
        first = done[(done["backend"] == backend) & (done["worker"] == newcomer) & (done["mono"] >= join)]
        row["newcomer's first booking"] = float(first["mono"].min()) - join if len(first) else float("nan")
        row["longest pause after join"] = longest_gap(times, join, leave)
        row["longest pause after leave"] = longest_gap(times, leave, max(finish, leave))
        if backend == "kafka":
            row["Kafka rebalance after join"] = rebalance_seconds(mine, join, leave)
            row["Kafka rebalance after leave"] = rebalance_seconds(mine, leave, finish)
        rows.append(row)
    return pd.DataFrame(rows).set_index("backend").round(2)


def pauses_statement(table: pd.DataFrame) -> Statement:
    """:func:`pauses` in one sentence printed from it: the longest pause after the join, and Kafka's rebalance."""
    keys = {backend: f"02.join_pause_{backend}_s" for backend in table.index if backend in BACKENDS}
    said = ", ".join(f"{PRODUCTS[b]} {{join_pause_{b}_s}}" for b in keys)
    measured: dict[str, Any] = {key: table.loc[b, "longest pause after join"] for b, key in keys.items()}
    text = f"Longest stretch without a completed booking after the join: {said}."
    if "kafka" in table.index:
        measured["02.join_rebalance_s"] = table.loc["kafka", "Kafka rebalance after join"]
        text += " Kafka's rebalance itself took {join_rebalance_s}."
    return say(text, measured)


def _newcomer(events: pd.DataFrame, join: float) -> str | None:
    """The worker that announced itself first after ``join``."""
    ready = events[(events["event"] == "ready") & (events["mono"] >= join)]
    return str(ready["worker"].iloc[0]) if len(ready) else None


def rebalance_seconds(events: pd.DataFrame, since: float, until: float) -> float:
    """First ``revoked`` after ``since`` → last ``assigned`` before ``until``: one eager rebalance, in seconds.

    NaN when no partition was revoked in the window (no rebalance happened).
    """
    window = events[(events["mono"] >= since) & (events["mono"] <= until)]
    revoked = window.loc[window["event"] == "revoked", "mono"]
    if not len(revoked):
        return float("nan")
    assigned = window.loc[(window["event"] == "assigned") & (window["mono"] >= revoked.min()), "mono"]
    return float(assigned.max() - revoked.min()) if len(assigned) else float("nan")


def eager_rebalance(run: JoinLeave) -> bool:
    """True if, in Kafka's rebalance after the join, every old member gave back every partition it held.

    That is the eager protocol (``range``, ``roundrobin``): stop everything, then reassign.
    Under ``cooperative-sticky`` only the partitions that change owner would be revoked.
    """
    kafka = run.events[run.events["backend"] == "kafka"]
    join, leave = _moment(run.moments, "kafka", "join"), _moment(run.moments, "kafka", "leave")
    if join is None or leave is None:
        return False
    before = owned_at(kafka, join)
    log = assignment_log(kafka)
    window = log[(log["mono"] >= join) & (log["mono"] <= leave) & (log["event"] == "revoked")]
    revoked: dict[str, set[tuple[str, int]]] = {}
    for record in window.dropna(subset=["partition"]).itertuples():
        revoked.setdefault(record.worker, set()).add((str(record.topic), int(record.partition)))
    held = {worker: parts for worker, parts in before.items() if parts}
    return bool(held) and all(parts <= revoked.get(worker, set()) for worker, parts in held.items())


def unowned_spans(events: pd.DataFrame, partitions: int = 3) -> list[tuple[float, float]]:
    """Monotonic ``(start, end)`` stretches in which some Kafka work partition had no owner.

    Only after the group first owned every partition, and up to the last completed booking:
    the pool's final stop is not a rebalance. During an eager rebalance this is the time
    from the first revoked partition to the last one assigned again.
    """
    end = last_completed(events)
    changes = events[events["event"].isin([*_ASSIGNMENT_EVENTS, "stopped"])]["mono"]
    spans: list[tuple[float, float]] = []
    covered_once, since = False, None
    for at in sorted(set(changes)):
        if end is not None and at > end:
            break
        owners = {p for parts in owned_at(events, at).values() for t, p in parts if _is_work(t)}
        full = owners >= set(range(partitions))
        if full and since is not None:
            spans.append((since, at))
            since = None
        elif not full and covered_once and since is None:
            since = at
        covered_once = covered_once or full
    if since is not None and end is not None:
        spans.append((since, end))
    return spans


def owners_by_phase(run: JoinLeave, partitions: int = 3) -> pd.DataFrame:
    """Owner of each Kafka work partition at the end of each phase: before the join, after it, after the leave."""
    import pandas as pd

    moments = run.moments[run.moments["backend"] == "kafka"]
    kafka = run.events[run.events["backend"] == "kafka"]
    join, leave = _moment(moments, "kafka", "join"), _moment(moments, "kafka", "leave")
    if join is None or leave is None:
        return pd.DataFrame()
    done = kafka.loc[kafka["event"] == "completed", "mono"]
    phases = {"before the join": join, "after the join": leave, "after the leave": float(done.max())}
    rows = {}
    for phase, at in phases.items():
        owner = {p: worker for worker, parts in owned_at(kafka, at).items() for t, p in parts if _is_work(t)}
        rows[phase] = [owner.get(p, "-") for p in range(partitions)]
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[f"partition {p}" for p in range(partitions)])
    frame.index.name = "owner at the end of"
    return frame


# -- charts -----------------------------------------------------------------------------------------


def plot_per_worker(counts: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Stacked bars: bookings completed per backend, one colour per worker (the table of :func:`per_worker`)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    bottom = [0] * len(counts)
    for worker in counts.columns:
        values = list(counts[worker])
        bars = ax.bar(counts.index, values, bottom=bottom, label=worker, color=worker_color(worker))
        ax.bar_label(bars, labels=[str(v) if v else "" for v in values], label_type="center", fontsize=9)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("bookings completed")
    ax.set_title("Who processed what: competing consumers share one queue")
    ax.legend(title="worker", bbox_to_anchor=(1.01, 1), loc="upper left")
    return ax


def plot_timeline(run: JoinLeave, backend: str, ax: Axes | None = None) -> Axes:
    """One row per worker, one dot per completed booking, over time; the join and leave marked.

    For Kafka the periods in which each worker held partitions are shaded and labelled
    (``p0``, ``p1``...), so the rebalance shows as the gap where nobody held anything.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(11, 2.4))
    events = run.events[run.events["backend"] == backend]
    start = _moment(run.moments, backend, "start") or float(events["mono"].min())
    labels = _workers(events)
    row = {label: i for i, label in enumerate(labels)}
    done = events[events["event"] == "completed"]
    for label in labels:
        mine = done[done["worker"].map(worker_label) == label]
        ax.scatter(mine["mono"] - start, [row[label]] * len(mine), s=6, color=worker_color(label), zorder=3)
    if backend == "kafka":
        _shade_ownership(events, start, row, ax)
        for i, (since, until) in enumerate(unowned_spans(events)):
            legend = "a partition has no owner" if i == 0 else None
            ax.axvspan(since - start, until - start, color="#f4c7c3", alpha=0.6, zorder=0, label=legend)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    for action, style in (("join", "--"), ("leave", ":")):
        at = _moment(run.moments, backend, action)
        if at is not None:
            ax.axvline(at - start, color="black", linestyle=style, linewidth=1)
            ax.annotate(f" {action}", (at - start, len(labels) - 0.5), fontsize=9, va="top")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(backend)
    return ax


def _shade_ownership(events: pd.DataFrame, start: float, row: dict[str, int], ax: Axes) -> None:
    """Grey spans where a Kafka worker held work partitions, each labelled with them."""
    import pandas as pd

    log = assignment_log(events)
    log = log[log["topic"].isna() | log["topic"].fillna("").map(_is_work)]
    end = float(events["mono"].max())
    stopped = events[events["event"] == "stopped"].groupby("worker")["mono"].min()
    for worker, rows in log.groupby("worker"):
        held: set[int] = set()
        since = 0.0
        changes = [(m, list(g.itertuples())) for m, g in rows.groupby("mono", sort=True)]
        for mono, records in changes:
            before = set(held)
            for r in records:
                if not pd.isna(r.partition):
                    (held.add if r.event == "assigned" else held.discard)(int(r.partition))
            if before != held:
                _span(ax, row.get(str(worker)), since, mono, before, start)
                since = mono
        finish = min([end, *[m for w, m in stopped.items() if worker_label(str(w)) == worker]])
        _span(ax, row.get(str(worker)), since, finish, held, start)


def _span(ax: Axes, y: int | None, since: float, until: float, held: set[int], start: float) -> None:
    if y is None or not held or until <= since:
        return
    ax.barh(y, until - since, left=since - start, height=0.6, color="#dddddd", zorder=1)
    ax.text(since - start + 0.1, y + 0.18, ",".join(f"p{p}" for p in sorted(held)), fontsize=7, color="#555555")


def plot_timelines(run: JoinLeave, backends: Sequence[str] | None = None) -> list[Axes]:
    """:func:`plot_timeline` for each backend, stacked on one time axis (seconds since production began)."""
    import matplotlib.pyplot as plt

    backends = list(backends or run.moments["backend"].drop_duplicates())
    fig, axes = plt.subplots(len(backends), 1, figsize=(11, 1.1 + 1.4 * len(backends)), sharex=True, squeeze=False)
    for ax, backend in zip(axes[:, 0], backends, strict=True):
        plot_timeline(run, backend, ax=ax)
    axes[-1, 0].set_xlabel("seconds since production began")
    fig.suptitle("Who processed each booking: a worker joins (--) and leaves (:)")
    fig.tight_layout()
    return list(axes[:, 0])
