"""Does each booking's story arrive in order? The drivers, analysis and charts of lesson 05-ordering.

A booking is a sequence of events, ``created`` (seq 0) → ``modified`` (seq 1) →
``cancelled`` (seq 2), sent in that order. Applied in another order the story changes: a
``cancelled`` applied before its ``created`` leaves a live booking that the guest cancelled.

**What counts as a violation.** Each event is one message. From the workers' event logs
every message gets two moments: ``start``, its first ``started`` event (any attempt), and
``done``, its first ``completed`` event (the run that applied it). For two events of one
booking with ``seq a < seq b``:

- the pair is an **order violation** when ``start(b) < done(a)``: ``b`` began before ``a``
  was finished, so ``b`` could not see ``a``'s effects. Processing "in order" means each event
  waits for the one before it; anything less is a race, whoever happens to win it;
- the pair is **applied out of order** when ``done(b) < done(a)``: the race was lost, ``b``
  took effect first. Every such pair is also a violation.

A booking ends in the **wrong state** when its last applied event is not its highest seq
(e.g. ``created`` applied after ``cancelled``). Messages never completed (dead-lettered)
are left out of the pairs. Times are the workers' ``time.monotonic()``, one clock for every
process of the machine, so events of different workers compare directly.

A booking counts as **retried** when any of its messages was started more than once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

from labkit.booking import BookingGenerator
from labkit.config import Config
from labkit.errors import LabkitError
from labkit.lab import produce, reset
from labkit.lessons.figures import Statement, say
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

#: The groups of bookings a report separates: no message retried, or at least one retried.
NO_RETRY = "no retry"
RETRIED = "created retried"

#: Event names by seq, for labels (BookingGenerator(events_per_booking=3)).
EVENT_NAMES = {0: "created", 1: "modified", 2: "cancelled"}

_KEYS = ["config", "booking_id", "seq"]


@dataclass(frozen=True)
class Setup:
    """One way to run the workers: which backend, how many worker processes, and how many bookings each runs at once.

    Args:
        label: the name in tables and charts.
        backend: ``bullmq``, ``streams`` or ``kafka``.
        workers: worker processes.
        concurrency: bookings in flight per worker (Kafka: at most one per partition).
    """

    label: str
    backend: str
    workers: int
    concurrency: int


# -- the messages ------------------------------------------------------------------------------------


def booking_events(n_bookings: int, seed: int = 5, retried: int = 0, jitter_ms: int = 20) -> list[dict[str, Any]]:
    """``n_bookings`` × (created, modified, cancelled), in that order, ready to produce.

    Args:
        n_bookings: bookings; three messages each.
        seed: the same seed gives the same messages.
        retried: how many bookings get ``fault.fail_times = 1`` on their ``created`` event
            only, so that it fails once and is retried while its later events are not.
        jitter_ms: each message gets ``fault.slow_ms``, uniform in ``0..jitter_ms``: real
            handlers never take exactly the same time, and without jitter two events racing
            on two workers would finish in an order set by the scheduler, not by chance.

    Returns:
        the messages, grouped by booking in seq order.
    """
    if not 0 <= retried <= n_bookings:
        raise ValueError(f"retried must be 0..{n_bookings}, got {retried}")
    rng = random.Random(seed)
    events = BookingGenerator(seed=seed, events_per_booking=3, prefix="ord").bookings(n_bookings)
    failing = set(rng.sample(sorted({e["booking_id"] for e in events}), retried))
    messages = []
    for event in events:
        fault: dict[str, int] = {"slow_ms": rng.randint(0, jitter_ms)}
        if event["seq"] == 0 and event["booking_id"] in failing:
            fault["fail_times"] = 1
        messages.append({**event, "fault": fault})
    return messages


def messages_table(messages: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The messages as a table: ``booking_id, seq, event, slow_ms, fail_times``, in send order."""
    import pandas as pd

    rows = [
        {
            "booking_id": m["booking_id"],
            "seq": m["seq"],
            "event": m["event"],
            "slow_ms": m["fault"].get("slow_ms", 0),
            "fail_times": m["fault"].get("fail_times", 0),
        }
        for m in messages
    ]
    return pd.DataFrame(rows, columns=["booking_id", "seq", "event", "slow_ms", "fail_times"])


# -- running a setup ---------------------------------------------------------------------------------


def wait_for_partitions(pool: WorkerPool, workers: int, timeout: float = 60) -> None:
    """Wait until each of ``workers`` Kafka workers holds a partition of the work topic.

    Bookings sent earlier are not lost, but a rebalance in the middle of the run would
    move partitions between workers while they work; waiting first keeps the run simple.
    The embedded broker's describe-group lists no members, so the workers' own
    ``assigned``/``revoked`` events say who holds what.
    """
    topic = pool.config.names.topic
    deadline = time.monotonic() + timeout
    while True:
        held = current_partitions(pool.events(), topic)
        if len(held) >= workers and all(held.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Kafka workers hold {held} after {timeout:g} s; wanted {workers} with a partition each")
        time.sleep(0.25)


def current_partitions(events: pd.DataFrame, topic: str) -> dict[str, set[str]]:
    """Partitions of ``topic`` each worker holds now, replayed from its ``assigned``/``revoked`` events."""
    held: dict[str, set[str]] = {}
    for row in events[events["event"].isin(["assigned", "revoked"])].itertuples():
        mine = held.setdefault(str(row.worker), set())
        names = {p for p in row.partitions if p.rpartition("/")[0] == topic}
        if row.event == "assigned":
            mine |= names
        else:
            mine -= names
    return held


def wait_until_processed(pool: WorkerPool, messages: int, timeout: float = 120, progress: bool = True) -> None:
    """Wait until ``messages`` distinct (booking, seq) messages are completed or dead-lettered, with a progress bar.

    ``lk.stats`` cannot tell: the lab's ledger counts completions per booking_id, so the
    second and third events of a booking count there as duplicates, not as bookings.
    """
    from labkit.progress import progress as progress_bar

    bar = progress_bar(total=messages, desc=f"{pool.backend} events processed", unit="event", disable=not progress)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done = _settled(pool.events())
            bar.update(done - bar.n)
            if done >= messages:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pool.backend}: {done} of {messages} events processed after {timeout:g} s")
            if not pool.pids:
                raise LabkitError(f"{pool.backend}: every worker has exited; see {pool.run_dir / 'logs'}")
            time.sleep(0.25)
    finally:
        bar.close()


def _settled(events: pd.DataFrame) -> int:
    if events.empty or "seq" not in events:
        return 0
    completed = events[events["event"] == "completed"].dropna(subset=["seq"])
    dead = events[events["event"] == "dead_lettered"]
    return len(completed.groupby(["booking_id", "seq"])) + len(dead)


def run_setup(
    setup: Setup,
    config: Config,
    messages: Sequence[dict[str, Any]],
    step_ms: float = 5,
    backoff_ms: int = 1000,
    timeout: float = 120,
) -> pd.DataFrame:
    """Empty the backend, start the setup's workers, send ``messages`` and return the run's events.

    Args:
        setup: backend, workers and concurrency.
        config: the lab.
        messages: what to send, in order (:func:`booking_events`).
        step_ms: simulated I/O per workflow step.
        backoff_ms: wait before a retry. The default, a second, is far longer than the rest of
            a booking's events take, so a retried event is applied after them on every backend.
        timeout: seconds to wait for every message to be processed.

    Returns:
        the workers' events (labkit.events.load_run) with a ``config`` column = ``setup.label``.
    """
    reset(setup.backend, config)
    settings = WorkerSettings(concurrency=setup.concurrency, step_ms=step_ms, backoff_ms=backoff_ms)
    with WorkerPool(setup.backend, config, settings).start(setup.workers) as pool:
        if setup.backend == "kafka":
            wait_for_partitions(pool, setup.workers)
        produce(setup.backend, messages, config)
        wait_until_processed(pool, len(messages), timeout)
    events = pool.events()
    events.insert(0, "config", setup.label)
    return events


# -- analysis ----------------------------------------------------------------------------------------


def message_spans(events: pd.DataFrame) -> pd.DataFrame:
    """One row per message (config, booking_id, seq): ``start``, ``done``, ``attempts``, ``retried`` (its booking).

    ``start`` is the first ``started`` event, ``done`` the first ``completed`` one (NaN if
    the message never completed); ``attempts`` counts the times it was started.
    """
    started = events[events["event"] == "started"].dropna(subset=["seq"])
    completed = events[events["event"] == "completed"].dropna(subset=["seq"])
    spans = started.groupby(_KEYS)["mono"].agg(start="min", attempts="count")
    spans["done"] = completed.groupby(_KEYS)["mono"].min()
    spans = spans.reset_index()
    spans["seq"] = spans["seq"].astype(int)
    spans["retried"] = spans.groupby(["config", "booking_id"])["attempts"].transform("max") > 1
    return spans[[*_KEYS, "start", "done", "attempts", "retried"]]


def order_pairs(events: pd.DataFrame) -> pd.DataFrame:
    """Every pair of completed events of one booking (seq a < b), with its verdicts.

    Returns:
        ``config, booking_id, seq_a, seq_b, retried, violation`` (b started before a was
        done) and ``out_of_order`` (b was done before a).
    """
    import pandas as pd

    spans = message_spans(events).dropna(subset=["done"])
    rows = []
    for (config, booking_id), booking in spans.groupby(["config", "booking_id"], sort=True):
        by_seq = booking.sort_values("seq").to_dict("records")
        for a, b in combinations(by_seq, 2):
            rows.append(
                {
                    "config": config,
                    "booking_id": booking_id,
                    "seq_a": a["seq"],
                    "seq_b": b["seq"],
                    "retried": bool(a["retried"]),
                    "violation": bool(b["start"] < a["done"]),
                    "out_of_order": bool(b["done"] < a["done"]),
                }
            )
    columns = ["config", "booking_id", "seq_a", "seq_b", "retried", "violation", "out_of_order"]
    return pd.DataFrame(rows, columns=columns)


def final_events(events: pd.DataFrame) -> pd.DataFrame:
    """Per booking: the seq applied last, and whether that is its highest seq (the state it should end in)."""
    spans = message_spans(events).dropna(subset=["done"])
    last = spans.loc[spans.groupby(["config", "booking_id"])["done"].idxmax()]
    highest = spans.groupby(["config", "booking_id"])["seq"].max()
    frame = last.set_index(["config", "booking_id"])[["seq", "retried"]].rename(columns={"seq": "applied_last"})
    frame["right_state"] = frame["applied_last"] == highest
    return frame.reset_index()


def order_report(*runs: pd.DataFrame) -> pd.DataFrame:
    """Order violations per configuration and group (no retry / created retried), of one or more runs.

    Returns:
        indexed by ``config, group``: ``bookings``, ``pairs`` checked, ``violations`` (pairs),
        ``bookings_violated``, ``out_of_order`` (pairs) and ``wrong_state`` (bookings), in
        the order the configurations first appear in ``events``.
    """
    import pandas as pd

    events = pd.concat(runs, ignore_index=True)
    pairs = order_pairs(events)
    finals = final_events(events)
    pairs["group"] = pairs["retried"].map({False: NO_RETRY, True: RETRIED})
    finals["group"] = finals["retried"].map({False: NO_RETRY, True: RETRIED})
    rows = []
    for config in events["config"].drop_duplicates():
        for group in (NO_RETRY, RETRIED):
            p = pairs[(pairs["config"] == config) & (pairs["group"] == group)]
            f = finals[(finals["config"] == config) & (finals["group"] == group)]
            if f.empty:
                continue
            rows.append(
                {
                    "config": config,
                    "group": group,
                    "bookings": len(f),
                    "pairs": len(p),
                    "violations": int(p["violation"].sum()),
                    "bookings_violated": int(p[p["violation"]]["booking_id"].nunique()),
                    "out_of_order": int(p["out_of_order"].sum()),
                    "wrong_state": int((~f["right_state"]).sum()),
                }
            )
    return pd.DataFrame(rows).set_index(["config", "group"])


def violations(report: pd.DataFrame, config: str, group: str = NO_RETRY) -> int:
    """Violating pairs of one configuration and group (0 when the group had no bookings)."""
    key = (config, group)
    return int(report.loc[key, "violations"]) if key in report.index else 0


def violated_bookings(report: pd.DataFrame, config: str, group: str = NO_RETRY) -> int:
    """Bookings of one configuration and group with at least one violation (0 when the group had none)."""
    key = (config, group)
    return int(report.loc[key, "bookings_violated"]) if key in report.index else 0


def report_statement(report: pd.DataFrame, parallel: Mapping[str, str]) -> Statement:
    """How many bookings never retried each parallel configuration broke, printed from :func:`order_report`.

    Args:
        parallel: figure key suffix -> configuration label, e.g. ``{"streams_3": "Streams, 3 consumers"}``.
    """
    unretried = report.xs(NO_RETRY, level="group")["bookings"]
    total = int(unretried.max()) if len(unretried) else 0
    measured: dict[str, Any] = {"05.unretried_bookings": total}
    parts = []
    for suffix, label in parallel.items():
        measured[f"05.out_of_order_{suffix}"] = violated_bookings(report, label)
        parts.append(f"{label}: {{out_of_order_{suffix}}}")
    text = "Bookings never retried whose order was broken, of {unretried_bookings}: " + "; ".join(parts) + "."
    return say(text, measured)


def example_booking(events: pd.DataFrame, config: str, retried: bool) -> str:
    """A booking worth drawing: the first (by id) of that group with a pair applied out of order, else a violation."""
    pairs = order_pairs(events)
    pairs = pairs[(pairs["config"] == config) & (pairs["retried"] == retried)]
    for column in ("out_of_order", "violation"):
        hits = pairs[pairs[column]]
        if len(hits):
            return str(hits["booking_id"].min())
    if pairs.empty:
        raise ValueError(f"no {'retried' if retried else 'unretried'} booking in {config!r}")
    return str(pairs["booking_id"].min())


def attempts_of(events: pd.DataFrame, config: str, booking_id: str) -> pd.DataFrame:
    """Every attempt of every message of one booking: ``seq, attempt, start, end, outcome, worker, source``.

    An attempt runs from its ``started`` event to the ``completed`` or ``failed`` event with
    the same source and attempt number (source names the message in every backend: a job,
    an entry, or the original topic/partition/offset of a Kafka record and its retries).
    """
    import pandas as pd

    mine = events[(events["config"] == config) & (events["booking_id"] == booking_id)]
    started = mine[mine["event"] == "started"]
    ends = mine[mine["event"].isin(["completed", "failed"])]
    rows = []
    for s in started.itertuples():
        end = ends[(ends["source"] == s.source) & (ends["attempt"] == s.attempt) & (ends["mono"] >= s.mono)]
        first = end.iloc[0] if len(end) else None
        rows.append(
            {
                "seq": int(s.seq),
                "attempt": int(s.attempt),
                "start": s.mono,
                "end": first["mono"] if first is not None else float("nan"),
                "outcome": first["event"] if first is not None else "unfinished",
                "worker": s.worker,
                "source": s.source,
            }
        )
    return pd.DataFrame(rows, columns=["seq", "attempt", "start", "end", "outcome", "worker", "source"])


def overtaken_by(events: pd.DataFrame, config: str, booking_id: str, seq: int = 0) -> int:
    """Other Kafka records of the same partition completed while this event waited for its retry.

    A retry done in place would have held every one of them back behind it.
    """
    attempts = attempts_of(events, config, booking_id)
    mine = attempts[attempts["seq"] == seq].sort_values("attempt")
    if len(mine) < 2:
        return 0
    partition = str(mine["source"].iloc[0]).rsplit("/", 1)[0]  # topic/partition of topic/partition/offset
    failed_at, done_at = mine["end"].iloc[0], mine["end"].iloc[-1]
    completed = events[(events["config"] == config) & (events["event"] == "completed")]
    same_partition = completed["source"].astype(str).str.rsplit("/", n=1).str[0] == partition
    between = completed[same_partition & (completed["mono"] > failed_at) & (completed["mono"] < done_at)]
    return int((between["booking_id"] != booking_id).sum())


# -- charts ------------------------------------------------------------------------------------------

_GROUP_COLORS = {NO_RETRY: "#2e86ab", RETRIED: "#e07a5f"}


def violations_chart(report: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Share of bookings with an order violation per configuration, no retry beside created retried.

    The hatched part of each bar is the share that also ended in the wrong state.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 4.5))
    configs = list(dict.fromkeys(report.index.get_level_values("config")))
    width = 0.38
    for k, group in enumerate((NO_RETRY, RETRIED)):
        for i, config in enumerate(configs):
            if (config, group) not in report.index:
                continue
            row = report.loc[(config, group)]
            violated = 100 * row["bookings_violated"] / row["bookings"]
            wrong = 100 * row["wrong_state"] / row["bookings"]
            x = i + (k - 0.5) * width
            ax.bar(x, violated, width, color=_GROUP_COLORS[group], label=group if i == 0 else None)
            ax.bar(x, wrong, width, color="none", edgecolor="black", hatch="///", linewidth=0,
                   label="… and ended in the wrong state" if i == 0 and k == 1 else None)  # fmt: skip
            ax.text(x, violated + 1.5, f"{row['bookings_violated']}/{row['bookings']}", ha="center", fontsize=8)
    ax.set_xticks(range(len(configs)), configs, rotation=15, ha="right")
    ax.set_ylim(0, 112)
    ax.set_ylabel("% of bookings with an order violation")
    ax.set_title("Did each event wait for the one before it? (labels: bookings violated / bookings)")
    ax.legend(title="bookings", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def booking_timeline(events: pd.DataFrame, config: str, booking_id: str, ax: Axes | None = None) -> Axes:
    """One booking's events as bars in time: each attempt from start to end, failures red, retry waits dotted.

    The label at the end of each completed bar says in which place that event was applied.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 2.8))
    attempts = attempts_of(events, config, booking_id)
    zero = attempts["start"].min()
    done = attempts[attempts["outcome"] == "completed"].sort_values("end")
    place = {seq: n for n, seq in enumerate(done["seq"], start=1)}
    colors = {"completed": "#3d9970", "failed": "#d1495b", "unfinished": "#999999"}
    for seq, rows in attempts.groupby("seq"):
        rows = rows.sort_values("attempt")
        for r in rows.itertuples():
            start_ms, end_ms = (r.start - zero) * 1000, (r.end - zero) * 1000
            ax.barh(seq, end_ms - start_ms, left=start_ms, height=0.5, color=colors[r.outcome])
            ax.text(start_ms, seq + 0.33, f"{r.worker} #{r.attempt}", fontsize=7)
            if r.outcome == "completed":
                ax.text(end_ms, seq, f"  applied {_ordinal(place[int(seq)])}", va="center", fontsize=8)
        for before, after in zip(rows.itertuples(), list(rows.itertuples())[1:], strict=False):
            ax.plot([(before.end - zero) * 1000, (after.start - zero) * 1000], [seq, seq], ":", color="#d1495b")
    ax.set_yticks(
        sorted(attempts["seq"].unique()),
        [f"{s} {EVENT_NAMES.get(int(s), '')}" for s in sorted(attempts["seq"].unique())],
    )
    ax.invert_yaxis()
    ax.set_xlabel("ms since the booking's first event started")
    ax.set_title(f"{config}: booking {booking_id} (green: completed, red: failed, dotted: waiting for a retry)")
    ax.margins(x=0.12)
    return ax


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")
