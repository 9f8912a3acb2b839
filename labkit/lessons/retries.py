"""Retries and backoff, read back from what the workers really did (lesson 03).

Every backend retries a transient failure, but each in its own way: BullMQ parks the job
in its ``delayed`` set for an exponential backoff, Kafka writes the record to a retry
topic with a ``not_before`` header (also exponential), and Redis Streams simply leaves
the entry unacknowledged in the pending list until a consumer's XAUTOCLAIM finds it idle
for ``min-idle`` ms, the same wait for every attempt. This module turns the workers' event
logs into one row per attempt, measures the real gap between a failure and the next
attempt, and sets it against the configured one, so a lesson can show that the gaps
follow the policy instead of asserting it.

It also holds :class:`PendingExplorer`, a small stream of its own on which a learner can
run XREADGROUP, XPENDING and XAUTOCLAIM by hand and see what each returns.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labkit.backends.streams import MAX_RECLAIM_EVERY_S, MIN_CLAIM_IDLE_MS
from labkit.booking import BookingGenerator, encode
from labkit.charts import PRODUCTS
from labkit.config import Config
from labkit.lab import with_backend
from labkit.lessons.figures import Statement, say
from labkit.workflow import WorkerSettings

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

#: Allowed rounding when a measured gap is compared with a configured one: the two ends of a
#: gap are stamped by different clocks' readings in different processes, and BullMQ schedules
#: delays in whole milliseconds. Far below any backoff worth teaching (100 ms and up).
CLOCK_SLACK_MS = 5.0

#: Colours of an attempt's outcome in the timeline.
OUTCOME_COLOURS = {"completed": "#2e7d32", "failed": "#e65100", "dead-lettered": "#212121"}
BACKOFF_COLOUR = "#90caf9"


def configured_gap_ms(backend: str, settings: WorkerSettings, attempt: int) -> float:
    """The wait the backend is configured to leave between a failed ``attempt`` and the next one.

    BullMQ and Kafka double ``backoff_ms`` for every further retry; Streams has no backoff of
    its own: a retry waits until XAUTOCLAIM finds the entry idle for min-idle ms, which the
    lab sets to ``backoff_ms`` (at least ``MIN_CLAIM_IDLE_MS``), the same for every attempt.
    """
    if backend == "streams":
        return float(max(settings.backoff_ms, MIN_CLAIM_IDLE_MS))
    return settings.backoff_for(attempt) * 1000.0


def backoff_policy(settings: WorkerSettings, backends: Iterable[str]) -> pd.DataFrame:
    """The configured wait before every retry, one row per backend, one column per retry (``1→2``, ``2→3`` ...)."""
    import pandas as pd

    retries = range(1, settings.max_attempts)
    rows = {b: {f"{k}→{k + 1}": configured_gap_ms(b, settings, k) for k in retries} for b in backends}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "backend"
    frame.columns.name = "configured wait (ms) before retry"
    return frame


def transient_ids(bookings: Iterable[Mapping[str, Any]]) -> set[str]:
    """``booking_id`` of every booking whose payment is set to fail a few times first (``fault.fail_times``)."""
    return {
        str(b["booking_id"])
        for b in bookings
        if isinstance(b.get("fault"), Mapping) and int(b["fault"].get("fail_times", 0)) > 0
    }


def attempt_timeline(events: pd.DataFrame, settings: WorkerSettings) -> pd.DataFrame:
    """One row per attempt of every booking, from the event log.

    Args:
        events: a run's events (:func:`labkit.load_run`), any number of backends.
        settings: the workers' settings, for the configured backoff after each failed attempt.

    Returns:
        ``backend, booking_id, attempt, start, end, outcome, t_start, t_end, backoff_ms``:
        ``start``/``end`` are monotonic seconds (comparable across the workers of one
        machine); ``t_start``/``t_end`` count from the booking's first attempt; ``outcome``
        is ``completed``, ``failed`` (and retried) or ``dead-lettered``; ``backoff_ms`` is the
        configured wait after a failed attempt (NaN otherwise).
    """
    import pandas as pd

    keys = ["backend", "booking_id", "attempt"]
    columns = [*keys, "start", "end", "outcome", "t_start", "t_end", "backoff_ms"]
    started = events[events["event"] == "started"]
    if started.empty:
        return pd.DataFrame(columns=columns)
    # The first start and first end of an attempt: a redelivery after a crash would repeat them.
    starts = started.groupby(keys, as_index=False)["mono"].min().rename(columns={"mono": "start"})
    ends = (
        events[events["event"].isin(["completed", "failed"])]
        .groupby(keys, as_index=False)
        .agg(end=("mono", "min"), ended_by=("event", "first"))
    )
    dead = events[events["event"] == "dead_lettered"][keys].drop_duplicates().assign(dead=True)
    frame = starts.merge(ends, on=keys, how="left").merge(dead, on=keys, how="left")
    frame["outcome"] = frame["ended_by"].where(frame["dead"].isna(), "dead-lettered")
    first = frame.groupby(["backend", "booking_id"])["start"].transform("min")
    frame["t_start"] = frame["start"] - first
    frame["t_end"] = frame["end"] - first
    frame["attempt"] = frame["attempt"].astype(int)
    # Backends in the order they ran (the lesson's order), not alphabetically.
    order = {b: i for i, b in enumerate(starts.sort_values("start")["backend"].unique())}
    frame["order"] = frame["backend"].map(order)
    frame["backoff_ms"] = [
        configured_gap_ms(b, settings, a) if o == "failed" else math.nan
        for b, a, o in zip(frame["backend"], frame["attempt"], frame["outcome"], strict=True)
    ]
    return frame.sort_values(["order", "booking_id", "attempt"]).reset_index(drop=True)[columns]


def measured_gaps(timeline: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """The real wait between each failed attempt and the next one, next to the configured and announced waits.

    Args:
        timeline: from :func:`attempt_timeline`.
        events: the same run's events, for the delay each backend announced in its
            ``retried`` event (BullMQ's own ``job.delay``, the Streams min-idle, Kafka's
            ``delay_s``).

    Returns:
        ``backend, booking_id, attempt, retry, gap_ms, configured_ms, announced_ms,
        recorded_ms``, one row per retry (``retry`` reads ``1→2``): ``gap_ms`` runs from
        the end of the failed attempt to the start of the next; ``recorded_ms`` is how long
        the backend took to write the retry down (BullMQ: move the job to ``delayed``;
        Streams: reset the entry's idle time; Kafka: produce the retry record).
    """
    import pandas as pd

    keys = ["backend", "booking_id", "attempt"]
    # The timeline is in attempt order within each booking, and its backends in the order they ran.
    following = timeline.groupby(["backend", "booking_id"])[["attempt", "start"]].shift(-1)
    failed = timeline.assign(next_attempt=following["attempt"], next_start=following["start"])
    failed = failed[(failed["outcome"] == "failed") & (failed["next_attempt"] == failed["attempt"] + 1)]
    gaps = pd.DataFrame(
        {
            "backend": failed["backend"],
            "booking_id": failed["booking_id"],
            "attempt": failed["attempt"].astype(int),
            "retry": [f"{a}→{a + 1}" for a in failed["attempt"]],
            "gap_ms": (failed["next_start"] - failed["end"]) * 1000.0,
            "configured_ms": failed["backoff_ms"],
        }
    )
    retried = events[events["event"] == "retried"]
    announced = pd.Series(math.nan, index=retried.index)
    for column, scale in (("delay_ms", 1.0), ("delay_s", 1000.0)):
        if column in retried:
            announced = announced.fillna(retried[column].astype(float) * scale)
    said = retried[keys].assign(announced_ms=announced, said_at=retried["mono"]).drop_duplicates(keys)
    said["attempt"] = said["attempt"].astype(int)
    gaps = gaps.assign(ended=failed["end"]).merge(said, on=keys, how="left")
    gaps["recorded_ms"] = (gaps["said_at"] - gaps["ended"]) * 1000.0
    return gaps.drop(columns=["ended", "said_at"]).reset_index(drop=True)


def gap_table(gaps: pd.DataFrame) -> pd.DataFrame:
    """Measured against configured gap, per backend and retry: the lesson's headline table.

    Returns:
        indexed by ``backend, retry``: ``configured_ms``, ``announced_ms`` (what the
        backend said it would wait), ``measured_min_ms``, ``measured_median_ms``,
        ``measured_max_ms``, ``retries`` (how many were measured), ``shorter`` (gaps
        shorter than configured, beyond ``CLOCK_SLACK_MS`` of rounding: should be 0) and
        ``recorded_max_ms`` (the longest the backend took to write a retry down).
    """
    short = gaps["gap_ms"] < gaps["configured_ms"] - CLOCK_SLACK_MS
    table = (
        gaps.assign(shorter=short)
        .groupby(["backend", "retry"], sort=False)
        .agg(
            configured_ms=("configured_ms", "first"),
            announced_ms=("announced_ms", "median"),
            measured_min_ms=("gap_ms", "min"),
            measured_median_ms=("gap_ms", "median"),
            measured_max_ms=("gap_ms", "max"),
            retries=("gap_ms", "size"),
            shorter=("shorter", "sum"),
            recorded_max_ms=("recorded_ms", "max"),
        )
    )
    return table.round(1)


def median_extra_ms(gaps: pd.DataFrame, backend: str) -> float:
    """The median of ``backend``'s retry gaps minus the configured ones (:func:`measured_gaps`), in ms."""
    mine = gaps[gaps["backend"] == backend]
    return float((mine["gap_ms"] - mine["configured_ms"]).median())


def gaps_statement(gaps: pd.DataFrame, settings: WorkerSettings) -> Statement:
    """How much later than configured each backend retried, printed from :func:`measured_gaps`.

    For Streams it also sets the longest overshoot against the reclaimer's period: a retry waits for the
    entry to be idle for min-idle, then for the reclaimer's next look (every ``min(min-idle / 2, 0.5 s)``),
    then for the claim and the start of the attempt.
    """
    backends = list(dict.fromkeys(gaps["backend"]))
    measured: dict[str, Any] = {f"03.retry_extra_ms_{b}": median_extra_ms(gaps, b) for b in backends}
    said = ", ".join(f"{PRODUCTS.get(str(b), b)} {{retry_extra_ms_{b}}}" for b in backends)
    text = f"The median retry came this much later than configured: {said}."
    if "streams" in backends:
        streams = gaps[gaps["backend"] == "streams"].groupby("retry", sort=False)["gap_ms"].median()
        per_retry = ", ".join(f"{retry} {gap:.0f} ms" for retry, gap in streams.items())
        text += f" Streams' median gaps per retry: {per_retry}, for one configured min-idle."
        min_idle_ms = max(settings.backoff_ms, MIN_CLAIM_IDLE_MS)
        period_ms = min(min_idle_ms / 2, MAX_RECLAIM_EVERY_S * 1000)
        mine = gaps[gaps["backend"] == "streams"]
        worst = float((mine["gap_ms"] - mine["configured_ms"]).max())
        measured["03.streams_overshoot_max_ms"] = worst
        rest = worst - period_ms
        tail = (
            f"{rest:.1f} ms more than one period: the time to write the retry down, then to claim the entry "
            "and start the attempt"
            if rest > 0
            else "within one period"
        )
        text += (
            f" The Streams reclaimer looks every {period_ms:.0f} ms (half the min-idle of {min_idle_ms} ms, at most "
            f"{MAX_RECLAIM_EVERY_S * 1000:.0f} ms); its longest overshoot here was {{streams_overshoot_max_ms}}, "
            f"{tail}."
        )
    return say(text, measured)


def attempt_summary(timeline: pd.DataFrame, transient: set[str]) -> pd.DataFrame:
    """Per backend: how the transient and the steady bookings ended, and on which attempt.

    Returns:
        indexed by backend: ``bookings``, ``transient``, ``transient_completed`` (transient
        bookings whose last attempt completed), ``final_attempts`` (sorted distinct attempt
        numbers on which those completed), ``steady_first_try`` (steady bookings completed
        on attempt 1, out of ``bookings - transient``), ``retries`` (attempts beyond the
        first, the same quantity as ``stats()["retried"]``).
    """
    import pandas as pd

    rows = {}
    for backend, frame in timeline.groupby("backend", sort=False):
        last = frame.sort_values("attempt").groupby("booking_id").tail(1)
        is_transient = last["booking_id"].isin(transient)
        done = last["outcome"] == "completed"
        rows[backend] = {
            "bookings": len(last),
            "transient": int(is_transient.sum()),
            "transient_completed": int((is_transient & done).sum()),
            "final_attempts": sorted(int(a) for a in set(last.loc[is_transient & done, "attempt"])),
            "steady_first_try": int((~is_transient & done & (last["attempt"] == 1)).sum()),
            "retries": len(frame) - len(last),
        }
    summary = pd.DataFrame.from_dict(rows, orient="index")
    summary.index.name = "backend"
    return summary


def retry_waits(events: pd.DataFrame, retry_topic: str) -> pd.DataFrame:
    """Kafka's ``retry_wait`` events: a retry record read before its ``not_before``, and the partition paused for it.

    Returns:
        ``partition, offset, wait_s, retry_topic`` (whether the paused partition belongs to
        ``retry_topic``; the work topic's partitions must never be paused for a backoff).
    """
    import pandas as pd

    waits = events[events["event"] == "retry_wait"]
    if waits.empty:
        return pd.DataFrame(columns=["partition", "offset", "wait_s", "retry_topic"])
    frame = waits[["partition", "offset", "wait_s"]].copy()
    frame["offset"] = frame["offset"].astype(int)
    frame["retry_topic"] = frame["partition"].str.rsplit("/", n=1).str[0] == retry_topic
    return frame.reset_index(drop=True)


def overtakes(events: pd.DataFrame, timeline: pd.DataFrame) -> pd.DataFrame:
    """Kafka: did the records behind a retried booking in its partition wait for it?

    A partition is consumed in offset order, so retrying in place (sleeping in the handler
    or seeking back) would hold every later record of the partition until the retried one
    finally succeeds: at least the sum of its backoffs. With a retry topic they go ahead.

    Args:
        events: a Kafka run's events.
        timeline: :func:`attempt_timeline` of the same run.

    Returns:
        one row per retried booking: ``booking_id, partition, offset``, ``behind`` (records
        after it in its partition), ``retried_behind`` (of those, retried themselves),
        ``overtook`` (of those behind, completed before its last attempt started) and
        ``in_place_wait_ms`` (the least those would have waited with retries in place: its
        configured backoffs added up).
    """
    import pandas as pd

    columns = ["booking_id", "partition", "offset", "behind", "retried_behind", "overtook", "in_place_wait_ms"]
    kafka_events = events[events["backend"] == "kafka"]
    kafka = timeline[timeline["backend"] == "kafka"]
    retried = set(kafka.loc[kafka["outcome"] == "failed", "booking_id"])
    firsts = kafka_events[(kafka_events["event"] == "started") & (kafka_events["attempt"] == 1)]
    source = firsts.drop_duplicates("booking_id").set_index("booking_id")["source"]
    where = source.str.rsplit("/", n=1, expand=True).rename(columns={0: "partition", 1: "offset"})
    where["offset"] = where["offset"].astype(int)
    done = kafka_events[kafka_events["event"] == "completed"].groupby("booking_id")["mono"].min()
    rows = []
    for booking_id in sorted(retried):
        partition, offset = where.loc[booking_id, "partition"], int(where.loc[booking_id, "offset"])
        mine = kafka[kafka["booking_id"] == booking_id]
        later = where[(where["partition"] == partition) & (where["offset"] > offset)].index
        rows.append(
            {
                "booking_id": booking_id,
                "partition": partition,
                "offset": offset,
                "behind": len(later),
                "retried_behind": len(retried.intersection(later)),
                "overtook": int((done.reindex(later) < mine["start"].max()).sum()),
                "in_place_wait_ms": float(mine["backoff_ms"].sum()),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def bullmq_jobs(config: Config, job_ids: Sequence[str]) -> pd.DataFrame:
    """BullMQ's own record of each job: attempts made, the retry options it carries, the errors it kept.

    This is the broker's bookkeeping, independent of labkit's event logs, so it can confirm
    them. Completed jobs are kept up to ``KEEP_COMPLETED``; older ones are skipped.

    Returns:
        ``job_id, booking_id, attempts_made, attempts_started, max_attempts, backoff,
        errors_kept, last_error``.
    """
    import pandas as pd
    from bullmq import Job

    async def read(backend: Any) -> list[dict[str, Any]]:
        rows = []
        for job_id in job_ids:
            job = await Job.fromId(backend.queue, job_id)
            if job is None:
                continue
            backoff = job.opts.get("backoff") or {}
            data = job.data if isinstance(job.data, dict) else {}
            rows.append(
                {
                    "job_id": job.id,
                    "booking_id": data.get("booking_id"),
                    "attempts_made": job.attemptsMade,
                    "attempts_started": job.attemptsStarted,
                    "max_attempts": job.opts.get("attempts"),
                    "backoff": f"{backoff.get('type')} {backoff.get('delay')} ms" if backoff else None,
                    "errors_kept": len(job.stacktrace or []),
                    "last_error": job.failedReason or None,
                }
            )
        return rows

    columns = [
        "job_id", "booking_id", "attempts_made", "attempts_started", "max_attempts", "backoff", "errors_kept",
        "last_error",
    ]  # fmt: skip
    return pd.DataFrame(with_backend("bullmq", read, config), columns=columns)


# -- charts ------------------------------------------------------------------------------------


def plot_attempts(timeline: pd.DataFrame, ax: Axes | None = None, max_bookings: int = 8) -> Axes:
    """Attempts of the retried bookings as dots over time: one row per booking, grouped by backend.

    x counts from each booking's first attempt, so rows line up. A dot marks the start of an
    attempt (its colour: how it ended), a shaded bar the configured backoff after a failure:
    the next dot should sit at or just after the end of the bar.

    Args:
        timeline: from :func:`attempt_timeline`.
        max_bookings: retried bookings shown per backend (the first by booking_id); the title says how many of
            how many each backend shows, and the legend lists only the outcomes that occur.
    """
    import matplotlib.pyplot as plt
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    retried = timeline[timeline.groupby(["backend", "booking_id"])["attempt"].transform("max") > 1]
    rows: list[tuple[str, str]] = []
    shown = []
    for backend, frame in retried.groupby("backend", sort=False):
        ids = sorted(frame["booking_id"].unique())
        rows += [(str(backend), str(b)) for b in ids[:max_bookings]]
        shown.append(f"{backend} {min(len(ids), max_bookings)} of {len(ids)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.6))
    labels = []
    for y, (backend, booking_id) in enumerate(rows):
        attempts = retried[(retried["backend"] == backend) & (retried["booking_id"] == booking_id)]
        labels.append(f"{backend} · {booking_id}")
        ax.plot(attempts["t_start"], [y] * len(attempts), color="#bdbdbd", lw=1, zorder=1)
        for _, a in attempts.iterrows():
            if not math.isnan(a["backoff_ms"]):
                ax.barh(y, a["backoff_ms"] / 1000, left=a["t_end"], height=0.5, color=BACKOFF_COLOUR, zorder=0)
            colour = OUTCOME_COLOURS.get(str(a["outcome"]), "#9e9e9e")
            ax.scatter(a["t_start"], y, s=60, color=colour, zorder=2)
            ax.annotate(str(a["attempt"]), (a["t_start"], y), xytext=(0, 6), textcoords="offset points",
                        ha="center", fontsize=7)  # fmt: skip
        if y and rows[y - 1][0] != backend:
            ax.axhline(y - 0.5, color="#757575", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlim(left=-0.03 * max(float(retried["t_start"].max()), 0.1))
    ax.set_ylim(len(rows) - 0.5, -0.7)
    ax.set_xlabel("seconds since the booking's first attempt")
    ax.set_title(
        "Attempts of the retried bookings (numbers: attempt) and the configured backoff after each failure\n"
        f"retried bookings shown: {', '.join(shown)}"
    )
    seen = set(retried["outcome"])
    handles: list[Artist] = [
        Line2D([], [], marker="o", ls="", color=c, label=o) for o, c in OUTCOME_COLOURS.items() if o in seen
    ]
    handles.append(Patch(color=BACKOFF_COLOUR, label="configured backoff"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return ax


def plot_gaps(gaps: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Every measured gap (dots) against the configured one (a black bar), per backend and retry."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.6))
    groups = list(gaps.groupby(["backend", "retry"], sort=False))
    for x, (_, frame) in enumerate(groups):
        spread = [x + 0.25 * (i / max(len(frame) - 1, 1) - 0.5) for i in range(len(frame))]
        ax.scatter(spread, frame["gap_ms"], s=18, color="#1565c0", alpha=0.7, zorder=2)
        configured = frame["configured_ms"].iloc[0]
        ax.hlines(configured, x - 0.3, x + 0.3, color="black", lw=2.5, zorder=3)
    ax.set_xticks(range(len(groups)), [f"{b}\n{r}" for (b, r), _ in groups])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("gap between attempts (ms)")
    ax.set_title("Measured gap (dots) against the configured backoff (bar)")
    return ax


# -- the pending list, by hand -----------------------------------------------------------------


class PendingExplorer:
    """A small stream with a consumer group of its own, for trying the pending-list commands by hand.

    The Streams worker never shows its pending entries list (PEL) for long: it acknowledges
    within milliseconds. Here nothing is acknowledged until you say so, so every command's
    answer can be read at leisure. Consumers are just names: reading as ``alice`` creates her.

    Args:
        config: the lab (the stream name gets its namespace).
        name: the demo stream's name, next to the lesson's ``bookings`` stream.
        group: the demo group's name.
    """

    def __init__(self, config: Config, name: str = "pel-demo", group: str = "demo-group") -> None:
        import redis

        # Any: redis-py's reply types are a union of every command's shape; these replies are plain.
        self.redis: Any = redis.Redis.from_url(config.redis_url, decode_responses=True)
        self.stream = f"{config.namespace}{name}"
        self.group = group

    def __enter__(self) -> PendingExplorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self, n: int, seed: int = 1) -> list[str]:
        """Start over: a fresh stream of ``n`` bookings and the group at id 0 (nothing delivered yet)."""
        self.redis.delete(self.stream)
        self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        return self.add(n, seed)

    def add(self, n: int, seed: int = 2) -> list[str]:
        """XADD ``n`` more bookings; returns their entry ids."""
        bookings = BookingGenerator(seed=seed, prefix="pel").bookings(n)
        return [str(self.redis.xadd(self.stream, {"booking": encode(b)})) for b in bookings]

    def read(self, consumer: str, start: str = ">", count: int | None = None) -> pd.DataFrame:
        """``XREADGROUP GROUP <group> <consumer> [COUNT n] STREAMS <stream> <start>``.

        ``>`` asks for entries never delivered to anyone; any id (``0``) asks for this
        consumer's own pending entries after that id, delivered before. Each returned row
        shows the entry's delivery count right after the read.
        """
        import pandas as pd

        reply = self.redis.xreadgroup(self.group, consumer, {self.stream: start}, count=count)
        entries = reply[0][1] if reply else []
        counts = self._deliveries([entry_id for entry_id, _ in entries])
        rows = [
            {
                "id": entry_id,
                "booking_id": json.loads(fields["booking"])["booking_id"] if fields else None,
                "deliveries": counts.get(entry_id),
            }
            for entry_id, fields in entries
        ]
        return pd.DataFrame(rows, columns=["id", "booking_id", "deliveries"])

    def ack(self, ids: Iterable[str]) -> int:
        """XACK: done, out of the pending list for good. Returns how many were pending."""
        return int(self.redis.xack(self.stream, self.group, *ids))

    def summary(self) -> pd.DataFrame:
        """``XPENDING <stream> <group>``: how many are pending, the lowest and highest id, and per consumer."""
        import pandas as pd

        answer = self.redis.xpending(self.stream, self.group)
        per_consumer = ", ".join(f"{c['name']}: {c['pending']}" for c in answer["consumers"]) or "-"
        row = {"pending": answer["pending"], "lowest_id": answer["min"], "highest_id": answer["max"],
               "per_consumer": per_consumer}  # fmt: skip
        return pd.DataFrame([row])

    def extended(self, consumer: str | None = None, count: int = 100) -> pd.DataFrame:
        """``XPENDING <stream> <group> - + <count> [<consumer>]``: each pending entry, holder, idle ms, deliveries."""
        import pandas as pd

        entries = self.redis.xpending_range(self.stream, self.group, "-", "+", count, consumername=consumer)
        rows = [
            {"id": e["message_id"], "consumer": e["consumer"], "idle_ms": e["time_since_delivered"],
             "deliveries": e["times_delivered"]}
            for e in entries
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=["id", "consumer", "idle_ms", "deliveries"])

    def autoclaim_walk(self, consumer: str, min_idle_ms: int, count: int, wait: bool = True) -> pd.DataFrame:
        """Walk the whole pending list with XAUTOCLAIM, one call per row, the way a reclaimer does.

        Each call ``XAUTOCLAIM <stream> <group> <consumer> <min-idle> <cursor> COUNT <count>``
        claims at most ``count`` entries idle for at least ``min-idle`` ms and answers the
        cursor to start the next call from; ``0-0`` means the walk reached the end.

        Args:
            wait: first sleep until every pending entry has been idle for ``min_idle_ms``,
                so that the walk's result does not depend on how fast the cells ran.
        """
        import pandas as pd

        if wait:
            self._wait_until_idle(min_idle_ms)
        rows: list[dict[str, Any]] = []
        cursor = "0-0"
        while True:
            next_cursor, claimed, _deleted = self.redis.xautoclaim(
                self.stream, self.group, consumer, min_idle_ms, start_id=cursor, count=count
            )
            ids = [entry_id for entry_id, _ in claimed]
            rows.append({"call": len(rows) + 1, "cursor": cursor, "claimed": len(ids),
                         "first_claimed": ids[0] if ids else None, "last_claimed": ids[-1] if ids else None,
                         "next_cursor": next_cursor})  # fmt: skip
            cursor = next_cursor
            if cursor == "0-0":
                return pd.DataFrame(rows)

    def close(self) -> None:
        """Delete the demo stream (and its group) and close the connection."""
        self.redis.delete(self.stream)
        self.redis.close()

    def _deliveries(self, ids: list[str]) -> dict[str, int]:
        """Delivery count of each of ``ids`` still pending."""
        if not ids:
            return {}
        wanted = set(ids)
        pending = self.redis.xpending_range(self.stream, self.group, min(ids), max(ids), len(ids) + 1000)
        return {e["message_id"]: int(e["times_delivered"]) for e in pending if e["message_id"] in wanted}

    def _wait_until_idle(self, min_idle_ms: int) -> None:
        pending = self.extended(count=10_000)
        if not pending.empty:
            least = float(pending["idle_ms"].min())
            if least < min_idle_ms:
                time.sleep((min_idle_ms - least) / 1000 + 0.02)
