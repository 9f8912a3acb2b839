"""The comparison harness: the three backends under one workload, measured as the OpenMessaging Benchmark does.

What makes the comparison fair:

- **One workload** (:class:`Workload`, a dataclass or a YAML file) drives every backend:
  message size, key cardinality, partitions, consumer processes, in-flight messages per
  consumer, producer rate, duration, warm-up, and the work per message (none, I/O-bound
  sleep, CPU-bound loop).
- **Open-loop producer.** Message *i* is due at ``start + i / rate`` whatever the broker
  does, and carries that intended time; latency is measured from it, so a producer held
  up by an overloaded broker does not hide the wait (no coordinated omission). With
  ``rate=0`` (max-rate mode) the producer sends as fast as the broker acknowledges, and
  the rate consumers sustain is the result.
- **End-to-end latency** (intended send → processing finished) of every message goes into
  an HdrHistogram (:mod:`labkit.latency`): p50, p95, p99, p99.9 and max, plus throughput,
  latency and backlog per second. Messages due during the warm-up are left out.
- **Equal acknowledgement settings**, applied by the backends and printed with every
  result (:data:`DURABILITY`): Kafka acks=all with offsets committed after processing;
  XACK after processing; BullMQ's lock, completed when the processor returns.
- **Backlog drain**: a workload with ``pause_at_s`` stops the consumers for ``pause_s``
  while the producer goes on, restarts them, and times how long latency takes to be back
  to normal.
- **Repetitions and metadata**: several runs per backend, reported as median with min–max,
  each row carrying the machine (cores, everything on one host) and the servers that
  answered (Redis or Valkey and version; the embedded broker or Apache Kafka), so a
  chart never says "Kafka" where it measured the embedded broker.

The harness measures the queues, not labkit's booking workflow: its consumers
(``labkit worker --workflow bench``, run by the :class:`~labkit.pool.WorkerPool`) use each
backend's :meth:`~labkit.backends.base.Backend.consume_batches`, which only decodes each
message, does the workload's work and acknowledges. ``benchmarks/bench_overhead.py``
checks it against the raw client loops in the same run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import platform
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from labkit import latency
from labkit.backends import get_backend
from labkit.config import BACKENDS, Config, check_backend
from labkit.errors import BrokerUnavailable, ConfigError, LabkitError
from labkit.lab import new_run, with_backend
from labkit.pool import WorkerPool
from labkit.workflow import WorkerSettings

if TYPE_CHECKING:
    import pandas as pd

    from labkit.backends import Backend
    from labkit.backends.kafka import KafkaBackend

WORKS = ("noop", "io", "cpu")

#: The acknowledgement and durability settings each backend runs with, shown next to every result.
DURABILITY = {
    "bullmq": "job completed when the processor returns (BullMQ's lock: 5 s, renewed; stalled check 2 s); "
    "Redis AOF, fsync every second",
    "streams": "XADD answered by Redis; XACK after processing (consumer group); Redis AOF, fsync every second",
    "kafka": "acks=all, idempotent producer (linger 5 ms); offsets stored after processing, committed every "
    "500 ms; one broker, so one replica",
}
#: Messages the producer hands the client in one call in max-rate mode.
MAX_RATE_BATCH = 500
#: At most this many due messages go in one call at a fixed rate (a producer catching up sends in chunks).
CATCH_UP_BATCH = 2000
#: How often the backlog is sampled.
SAMPLE_EVERY_S = 0.5
#: After the last message is consumed, how long the broker may take to report the empty queue.
BACKLOG_SETTLE_S = 15.0
#: Probe messages sent before measuring: they are all consumed only once every consumer (and, on Kafka,
#: every partition) is live.
PROBES_PER_CONSUMER = 10
PROBE_TIMEOUT_S = 60.0
#: Draining after the run fails only when no message at all was finished for this long.
STALL_TIMEOUT_S = 30.0
#: The cluster id docker-compose.yml gives Apache Kafka: how the harness tells it from another broker.
COMPOSE_KAFKA_CLUSTER_ID = "RfmyWFPERv6RNFw_PX5nnw"
COMPOSE_KAFKA_IMAGE = "apache/kafka:4.1.1"


@dataclass(frozen=True)
class Workload:
    """One benchmark workload, identical for every backend.

    Args:
        name: what to call it in results.
        description: one line for tables.
        rate: target messages per second, open loop; 0 is max-rate mode.
        duration_s: how long the producer runs, warm-up included.
        warmup_s: messages due in the first ``warmup_s`` seconds are not measured.
        message_bytes: approximate size of each JSON message (a booking padded with a ``pad`` field).
        keys: key cardinality: distinct ``booking_id`` values (the Kafka key), each with a rising ``seq``.
        partitions: Kafka partitions of the work topic (Streams and BullMQ have one queue).
        consumers: consumer processes.
        concurrency: messages in flight per consumer process.
        work: ``noop``, ``io`` (``asyncio.sleep(work_ms)``) or ``cpu`` (``work_ms`` of CPU time).
        work_ms: time per message for ``io`` and ``cpu``.
        pause_at_s: backlog drain: stop every consumer this many seconds in (0: never) ...
        pause_s: ... for this long, while the producer goes on, then start them again.
    """

    name: str = "custom"
    description: str = ""
    rate: float = 1000.0
    duration_s: float = 30.0
    warmup_s: float = 5.0
    message_bytes: int = 256
    keys: int = 1000
    partitions: int = 3
    consumers: int = 2
    concurrency: int = 16
    work: str = "noop"
    work_ms: float = 0.0
    pause_at_s: float = 0.0
    pause_s: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            problems.append(f"rate must be 0 (max-rate) or more, got {self.rate}")
        if not 0 <= self.warmup_s < self.duration_s:
            problems.append(f"need 0 <= warmup_s < duration_s, got {self.warmup_s} and {self.duration_s}")
        if not 200 <= self.message_bytes <= 900_000:
            problems.append(f"message_bytes must be 200-900000 (a booking is ~200), got {self.message_bytes}")
        for name in ("keys", "partitions", "consumers", "concurrency"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.work not in WORKS:
            problems.append(f"work must be one of {', '.join(WORKS)}, got {self.work!r}")
        if self.work_ms < 0 or (self.work != "noop" and self.work_ms == 0):
            problems.append(f"work_ms must be > 0 for work={self.work!r} (and never negative), got {self.work_ms}")
        if self.pause_at_s and not (
            self.warmup_s <= self.pause_at_s and self.pause_at_s + self.pause_s < self.duration_s
        ):
            problems.append("the pause must start after the warm-up and end before duration_s")
        if self.pause_at_s and self.pause_s <= 0:
            problems.append("pause_s must be > 0 when pause_at_s is set")
        if problems:
            raise ConfigError(f"workload {self.name!r}: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Workload:
        """A workload from plain values (a YAML document); unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown workload field(s) {unknown}; choose from {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"bad workload: {e}") from None

    @classmethod
    def from_yaml(cls, path: Path | str) -> Workload:
        """Read a workload from a YAML file; its ``name`` defaults to the file's stem."""
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read workload {path}: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"workload {path} must be a YAML mapping of field: value")
        return cls.from_dict({"name": Path(path).stem, **values})

    def replace(self, **changes: Any) -> Workload:
        """A copy with some fields changed, e.g. a shorter run for CI: ``w.replace(duration_s=10)``."""
        return dataclasses.replace(self, **changes)

    def worker_settings(self) -> WorkerSettings:
        """The settings of the harness's consumer processes."""
        return WorkerSettings(
            concurrency=self.concurrency,
            workflow="bench",
            step_ms=self.work_ms if self.work == "io" else 0.0,
            cpu_ms=self.work_ms if self.work == "cpu" else 0.0,
            options={"partitions": str(self.partitions)},
        )

    @property
    def measured_s(self) -> float:
        return self.duration_s - self.warmup_s


#: Named workloads: ``labkit bench --workload NAME``.
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("steady", "1,000 msg/s of 256 B for 60 s, no work", rate=1000, duration_s=60, warmup_s=10),
        Workload("max-rate", "as fast as the broker acknowledges, for 30 s", rate=0, duration_s=30, warmup_s=5),
        Workload(
            "io-bound", "500 msg/s, each 20 ms of I/O (16 in flight per consumer)", rate=500, duration_s=60,
            warmup_s=10, work="io", work_ms=20,
        ),
        Workload(
            "cpu-bound", "300 msg/s, each 2 ms of CPU", rate=300, duration_s=60, warmup_s=10, work="cpu", work_ms=2,
        ),
        Workload(
            "backlog-drain", "500 msg/s; consumers stopped from 20 s to 35 s", rate=500, duration_s=60, warmup_s=10,
            pause_at_s=20, pause_s=15,
        ),
        Workload(
            "overload", "1,000 msg/s into one consumer that can do 200/s (4 in flight x 20 ms)", rate=1000,
            duration_s=20, warmup_s=2, consumers=1, concurrency=4, work="io", work_ms=20,
        ),
        Workload("smoke", "200 msg/s for 6 s: does every backend work?", rate=200, duration_s=6, warmup_s=2),
    )
}  # fmt: skip


def get_workload(name_or_path: str | Workload) -> Workload:
    """A named workload, or one read from a ``.yaml`` file."""
    if isinstance(name_or_path, Workload):
        return name_or_path
    if name_or_path in WORKLOADS:
        return WORKLOADS[name_or_path]
    if name_or_path.endswith((".yaml", ".yml")):
        return Workload.from_yaml(name_or_path)
    raise ConfigError(f"unknown workload {name_or_path!r}; choose from {sorted(WORKLOADS)} or give a .yaml file")


# -- messages -----------------------------------------------------------------------------------


class MessageFactory:
    """The harness's messages: valid bookings (docs/contract.md) padded to ``message_bytes``.

    Message ``n`` has ``booking_id`` ``bench-<n mod keys>`` (the Kafka key), ``seq`` ``n // keys``,
    ``created_at`` its intended send time, and its number ``n`` (an extra field, which
    docs/contract.md lets consumers ignore) so that every message can be accounted for.
    """

    def __init__(self, workload: Workload) -> None:
        self.keys = workload.keys
        probe = self.booking(10**5, time.time(), "")  # a typical number and time: sizes vary by a few bytes
        self.pad = "x" * max(0, workload.message_bytes - len(json.dumps(probe, separators=(",", ":"))))

    def booking(self, n: int, intended: float, pad: str | None = None) -> dict[str, Any]:
        return {
            "booking_id": f"bench-{n % self.keys:07d}",
            "user_id": "bench",
            "hotel_id": f"hotel-{n % 50:02d}",
            "check_in": "2027-03-01",
            "check_out": "2027-03-03",
            "guests": 2,
            "amount_cents": 24000,
            "seq": n // self.keys,
            "created_at": intended,
            "n": n,
            "pad": self.pad if pad is None else pad,
        }

    def probe(self, i: int) -> dict[str, Any]:
        """A warm-up message: a negative number, so no result counts it."""
        return {**self.booking(i, 0.0), "n": -1 - i}


# -- the run's moving parts --------------------------------------------------------------------


class _Producer(threading.Thread):
    """The open-loop producer, in a thread with its own event loop and connection.

    ``sent_log`` holds ``(time, messages sent so far)`` after each acknowledged call.
    """

    def __init__(self, backend: str, config: Config, workload: Workload, start_at: float) -> None:
        super().__init__(name=f"bench-producer-{backend}", daemon=True)
        self.backend, self.config, self.workload, self.start_at = backend, config, workload, start_at
        self.factory = MessageFactory(workload)
        self.sent = 0
        self.sent_log: list[tuple[float, int]] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._produce())
        except BaseException as e:  # noqa: BLE001 - handed to the driver, which raises it
            self.error = e

    async def _produce(self) -> None:
        workload, factory = self.workload, self.factory
        end = self.start_at + workload.duration_s
        async with get_backend(self.backend)(self.config, workload.worker_settings()) as backend:
            await backend.send_batch([factory.probe(0)])  # connect and warm up before the clock starts
            while time.time() < self.start_at:
                await asyncio.sleep(min(0.01, max(0.0, self.start_at - time.time())))
            # At a set rate the run's messages are a fixed number, each due at its own time: one the producer is
            # late for is sent late (its latency counts from when it was due), never dropped, even when the
            # clock has passed the end of the run while a slow send was on the wire.
            total = math.ceil(workload.duration_s * workload.rate)
            while not self.halt.is_set():
                now = time.time()
                if (self.sent >= total) if workload.rate else (now >= end):
                    break
                if workload.rate:
                    due = min(int((now - self.start_at) * workload.rate) + 1, total)
                    if due <= self.sent:
                        next_due = self.start_at + self.sent / workload.rate
                        await asyncio.sleep(max(0.0, min(next_due - now, 0.01)))
                        continue
                    numbers = range(self.sent, min(due, self.sent + CATCH_UP_BATCH))
                    batch = [factory.booking(n, self.start_at + n / workload.rate) for n in numbers]
                else:
                    batch = [factory.booking(n, now) for n in range(self.sent, self.sent + MAX_RATE_BATCH)]
                await backend.send_batch(batch)
                self.sent += len(batch)
                self.sent_log.append((time.time(), self.sent))


class _Sampler(threading.Thread):
    """Asks the broker for its backlog every SAMPLE_EVERY_S, in a thread with its own connection."""

    def __init__(self, backend: str, config: Config, settings: WorkerSettings) -> None:
        super().__init__(name=f"bench-sampler-{backend}", daemon=True)
        self.backend, self.config, self.settings = backend, config, settings
        self.samples: list[tuple[float, int, int]] = []
        self.halt = threading.Event()

    def saw_empty(self) -> bool:
        """The latest sample shows nothing waiting and nothing in flight."""
        return bool(self.samples) and self.samples[-1][1:] == (0, 0)

    def run(self) -> None:
        asyncio.run(self._sample())

    async def _sample(self) -> None:
        async with get_backend(self.backend)(self.config, self.settings) as backend:
            while not self.halt.is_set():
                try:
                    depths = await backend.queue_depths()
                    self.samples.append((time.time(), int(depths["backlog"]), int(depths["in_flight"])))
                except LabkitError:
                    pass  # a missed sample is a gap in the chart, not a failed run
                await asyncio.sleep(SAMPLE_EVERY_S)


def _wait_for(condition: Callable[[], bool], timeout: float, what: str, fail: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            if fail:
                raise LabkitError(f"benchmark: {what} after {timeout:g} s")
            return
        time.sleep(0.05)


def _wait_for_drain(run_dir: Path, expected: int) -> None:
    """Wait until the consumers have finished ``expected`` messages, however long a backlog takes, while they progress.

    Raises:
        LabkitError: no message was finished for STALL_TIMEOUT_S.
    """
    done, last_progress = latency.consumed_count(run_dir), time.monotonic()
    while done < expected:
        time.sleep(0.1)
        now_done = latency.consumed_count(run_dir)
        if now_done > done:
            done, last_progress = now_done, time.monotonic()
        elif time.monotonic() - last_progress > STALL_TIMEOUT_S:
            raise LabkitError(
                f"benchmark: the backlog did not drain: {expected - done} messages left and none finished "
                f"for {STALL_TIMEOUT_S:g} s (are the consumers stuck?)"
            )


# -- results ------------------------------------------------------------------------------------


def servers(config: Config, needed: Sequence[str] = ("redis", "kafka")) -> dict[str, str]:
    """What answered at the lab's addresses, in words a chart can carry: ``{"redis": ..., "kafka": ...}``.

    Raises:
        BrokerUnavailable: a server in ``needed`` is not healthy.
    """
    from labkit.stack import Stack

    statuses = Stack(config).status()
    for status in statuses:
        if status.service in needed and not status.healthy:
            raise BrokerUnavailable(f"{status.service} at {status.address} is not healthy: {status.detail}")
    found = {status.service: status.kind for status in statuses}
    kafka = found.get("kafka", "unknown")
    if COMPOSE_KAFKA_CLUSTER_ID in kafka:
        kafka = f"Apache Kafka ({COMPOSE_KAFKA_IMAGE} from docker-compose.yml, KRaft, 1 broker)"
    return {"redis": found.get("redis", "unknown"), "kafka": kafka}


def machine() -> dict[str, Any]:
    """The host: cores, CPU, Python, and the fact that clients and brokers share it."""
    return {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "host": "clients and brokers share one machine",
    }


def backend_label(backend: str, server: Mapping[str, str]) -> str:
    """A chart label that names the server measured, e.g. ``Kafka (Tansu 0.6.0, embedded, memory only)``."""
    if backend == "kafka":
        return f"Kafka on {server['kafka']}"
    product = "BullMQ" if backend == "bullmq" else "Redis Streams"
    return f"{product} on {server['redis']}"


@dataclass
class BenchResult:
    """Everything one ``run_bench`` measured, as tidy DataFrames plus metadata.

    Attributes:
        summary: one row per backend and repetition: throughput, latency percentiles, counts,
            the workload's fields, the server and the durability settings.
        timeline: one row per backend, repetition and second: ``second`` (since the producer
            started), ``produced``, ``consumed``, ``backlog``, ``p50_ms``, ``p99_ms``.
        spectrum: the percentile spectrum per backend and repetition (:func:`labkit.latency.spectrum`).
        metadata: workload, machine, servers, durability, date.
    """

    summary: pd.DataFrame
    timeline: pd.DataFrame
    spectrum: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)

    def medians(self) -> pd.DataFrame:
        """Per backend: the median of each figure over the repetitions, with min and max (``<figure>_min/_max``)."""
        import pandas as pd

        figures = ["throughput_per_s", "p50_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms", "recovery_s"]
        grouped = self.summary.groupby("backend", sort=False)[figures]
        table = pd.concat(
            [grouped.median(), grouped.min().add_suffix("_min"), grouped.max().add_suffix("_max")], axis=1
        )
        table["repetitions"] = grouped.size()
        table["server"] = self.summary.groupby("backend", sort=False)["server"].first()
        return table

    def save(self, folder: Path | str, fmt: str = "csv") -> Path:
        """Write ``summary``, ``timeline`` and ``spectrum`` (CSV, or Parquet if pyarrow is installed) and
        ``metadata.json`` into ``folder``; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("summary", "timeline", "spectrum"):
            frame: pd.DataFrame = getattr(self, name)
            if fmt == "parquet":
                try:
                    frame.to_parquet(folder / f"{name}.parquet", index=False)
                except ImportError:
                    raise ConfigError("Parquet needs pyarrow: pip install pyarrow, or use --format csv") from None
            elif fmt == "csv":
                frame.to_csv(folder / f"{name}.csv", index=False)
            else:
                raise ConfigError(f"unknown format {fmt!r}; use csv or parquet")
        (folder / "metadata.json").write_text(json.dumps(self.metadata, indent=2, default=str), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> BenchResult:
        """Read back what :meth:`save` wrote (CSV or Parquet)."""
        import pandas as pd

        folder = Path(folder)
        frames = {}
        for name in ("summary", "timeline", "spectrum"):
            parquet = folder / f"{name}.parquet"
            frames[name] = pd.read_parquet(parquet) if parquet.exists() else pd.read_csv(folder / f"{name}.csv")
        metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
        return cls(frames["summary"], frames["timeline"], frames["spectrum"], metadata)


def _analyse(
    deliveries: pd.DataFrame,
    workload: Workload,
    start_at: float,
    sent: int,
    sent_log: list[tuple[float, int]],
    samples: list[tuple[float, int, int]],
    pause: tuple[float, float] | None,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """One run's summary row, per-second timeline and percentile spectrum."""
    import numpy as np
    import pandas as pd

    ours = deliveries[deliveries["n"] >= 0]
    window = (start_at + workload.warmup_s, start_at + workload.duration_s)
    measured = ours[(ours["intended"] >= window[0]) & (ours["intended"] < window[1])]
    hist = latency.histogram(measured["latency_ms"].to_numpy())
    finished_in_window = ours[(ours["finished"] >= window[0]) & (ours["finished"] < window[1])]
    produced_in_window = np.interp(window, [t for t, _ in sent_log] or [0], [n for _, n in sent_log] or [0])
    unique = int(ours["n"].nunique())
    row: dict[str, Any] = {
        "target_rate": workload.rate,
        "produced_per_s": float(produced_in_window[1] - produced_in_window[0]) / workload.measured_s,
        "throughput_per_s": len(finished_in_window) / workload.measured_s,
        **latency.summary(hist),
        "sent": sent,
        "consumed": len(ours),
        "lost": sent - unique,
        "duplicates": len(ours) - unique,
        "max_backlog": max((b for _, b, _ in samples), default=0),
        "recovery_s": math.nan,
    }
    row["measured"] = int(row.pop("count"))

    seconds = ((ours["finished"] - start_at) // 1).astype(int)
    per_second = ours.groupby(seconds)["latency_ms"]
    timeline = pd.DataFrame(
        {
            "consumed": per_second.size(),
            "p50_ms": per_second.quantile(0.5),
            "p99_ms": per_second.quantile(0.99),
        }
    )
    backlog = pd.Series([b for _, b, _ in samples], index=[int(t - start_at) for t, _, _ in samples])
    # Up to the last backlog sample too: the broker reports the queue empty after the last message finished
    # (Kafka's lag falls to 0 with the next offset commit), and the timeline must end on that sample.
    last = int(max(workload.duration_s, timeline.index.max() if len(timeline) else 0, max(backlog.index, default=0)))
    timeline = timeline.reindex(range(0, last + 1)).rename_axis("second")
    timeline["consumed"] = timeline["consumed"].fillna(0).astype(int)
    sent_at = pd.Series([n for _, n in sent_log], index=[int(t - start_at) for t, _ in sent_log])
    sent_at = sent_at.groupby(level=0).max().reindex(timeline.index).ffill().fillna(0)
    timeline["produced"] = sent_at.diff().fillna(sent_at).astype(int)
    timeline["backlog"] = backlog.groupby(level=0).last().reindex(timeline.index)
    timeline = timeline.reset_index()[["second", "produced", "consumed", "backlog", "p50_ms", "p99_ms"]]

    row["paused_at_s"] = row["resumed_at_s"] = math.nan
    if pause is not None:
        row["recovery_s"] = _recovery(ours, start_at + workload.warmup_s, *pause)
        row["paused_at_s"], row["resumed_at_s"] = pause[0] - start_at, pause[1] - start_at
    return row, timeline, latency.spectrum(hist)


def _recovery(ours: pd.DataFrame, steady_from: float, paused_at: float, resumed_at: float) -> float:
    """Seconds from the consumers' restart until the last message slower than normal finished.

    Normal is twice the p99 of messages finished between the warm-up and the pause (at least 50 ms).
    """
    before = ours[(ours["finished"] >= steady_from) & (ours["finished"] < paused_at)]["latency_ms"]
    normal = max(2 * float(before.quantile(0.99)) if len(before) else 0.0, 50.0)
    slow = ours[(ours["finished"] >= resumed_at) & (ours["latency_ms"] > normal)]
    return float(slow["finished"].max() - resumed_at) if len(slow) else 0.0


# -- running ------------------------------------------------------------------------------------


def run_once(
    backend: str,
    workload: Workload,
    config: Config | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """One run of ``workload`` on ``backend`` in a namespace of its own; returns (summary row, timeline, spectrum).

    Raises:
        LabkitError: consumers did not start, or the run did not drain in time.
        BrokerUnavailable: a broker is down.
    """
    backend = check_backend(backend)
    base = config or Config.from_env()
    config = dataclasses.replace(base, namespace=f"{base.namespace}bench{uuid.uuid4().hex[:6]}-")
    settings = workload.worker_settings()
    with_backend(backend, lambda b: b.setup(), config, settings)
    run_dir = new_run(f"bench-{backend}", config)
    factory = MessageFactory(workload)
    try:
        with WorkerPool(backend, config, settings, run_dir) as pool:
            pool.start(workload.consumers, ready_timeout=30)
            probes = [
                factory.probe(i) for i in range(PROBES_PER_CONSUMER * max(workload.consumers, workload.partitions))
            ]
            with_backend(backend, lambda b: b.send_batch(probes), config, settings)
            _wait_for(lambda: latency.consumed_count(run_dir) >= len(probes), PROBE_TIMEOUT_S, "consumers not all live")
            counted_before = latency.consumed_count(run_dir)
            sampler = _Sampler(backend, config, settings)
            sampler.start()
            start_at = time.time() + 1.0
            producer = _Producer(backend, config, workload, start_at)
            producer.start()
            pause = _drive(pool, producer, workload, start_at, progress, backend)
            producer.join()
            if producer.error is not None:
                raise producer.error
            expected = counted_before + 1 + producer.sent  # +1: the producer's own warm-up probe
            _wait_for_drain(run_dir, expected)
            # The broker's view lags the consumers' (Kafka commits every 500 ms; a sample takes a fetch round
            # trip, longer on a busy machine): give it time to show the empty queue the run ends with.
            _wait_for(sampler.saw_empty, BACKLOG_SETTLE_S, "the broker still reports a backlog", fail=False)
            sampler.halt.set()
            sampler.join()
        deliveries = latency.load_deliveries(run_dir)
        return _analyse(deliveries, workload, start_at, producer.sent, producer.sent_log, sampler.samples, pause)
    finally:
        with_backend(backend, lambda b: b.purge(), config, settings)
        shutil.rmtree(run_dir, ignore_errors=True)


def _drive(
    pool: WorkerPool, producer: _Producer, workload: Workload, start_at: float, progress: bool, backend: str
) -> tuple[float, float] | None:
    """Wait out the run (with a progress bar), pausing the consumers if the workload says so."""
    bar = None
    if progress:
        from labkit.progress import progress as progress_bar

        bar = progress_bar(total=round(workload.duration_s), desc=f"{backend} {workload.name}", unit="s")
    pause: tuple[float, float] | None = None
    try:
        while producer.is_alive():
            elapsed = time.time() - start_at
            if workload.pause_at_s and pause is None and elapsed >= workload.pause_at_s:
                paused_at = time.time()
                pool.stop()
                if backend == "kafka":
                    with_backend(backend, _renew_kafka_group, pool.config, pool.settings)
                time.sleep(max(0.0, paused_at + workload.pause_s - time.time()))
                restarted_at = time.time()  # recovery counts the consumers' start-up: it is part of a restart
                pool.start(workload.consumers, ready_timeout=30)
                pause = (paused_at, restarted_at)
            if bar is not None:
                bar.update(max(0, min(round(elapsed), bar.total) - bar.n))
            time.sleep(0.1)
    finally:
        if bar is not None:
            bar.close()
        producer.halt.set()
    return pause


async def _renew_kafka_group(backend: Backend) -> None:
    """See KafkaBackend.renew_group: the embedded broker strands a group whose members all left at once."""
    await cast("KafkaBackend", backend).renew_group()


def run_bench(
    workload: Workload | str = "smoke",
    backends: Sequence[str] = BACKENDS,
    repetitions: int = 3,
    config: Config | None = None,
    progress: bool = True,
) -> BenchResult:
    """Run ``workload`` ``repetitions`` times on each backend (interleaved: b1 b2 b3 b1 b2 b3 ...).

    Interleaving spreads slow drifts of a shared machine over every backend alike.

    Returns:
        a :class:`BenchResult`; ``result.medians()`` is the table to quote.
    """
    import pandas as pd

    workload = get_workload(workload)
    if repetitions < 1:
        raise ConfigError(f"repetitions must be at least 1, got {repetitions}")
    config = config or Config.from_env()
    names = [check_backend(b) for b in backends]
    found = servers(config, needed=["redis", *(["kafka"] if "kafka" in names else [])])
    common = {"workload": workload.name, **{f"workload_{k}": v for k, v in dataclasses.asdict(workload).items()}}
    rows, timelines, spectra = [], [], []
    for repetition in range(1, repetitions + 1):
        for backend in names:
            row, timeline, spectrum = run_once(backend, workload, config, progress)
            key = {"backend": backend, "repetition": repetition}
            rows.append(
                {
                    **key,
                    **row,
                    "label": backend_label(backend, found),
                    "server": found["kafka" if backend == "kafka" else "redis"],
                    "durability": DURABILITY[backend],
                    "cores": os.cpu_count(),
                    **common,
                }
            )
            timelines.append(timeline.assign(**key))
            spectra.append(spectrum.assign(**key))
    metadata = {
        "workload": dataclasses.asdict(workload),
        "backends": names,
        "repetitions": repetitions,
        "machine": machine(),
        "servers": found,
        "durability": {b: DURABILITY[b] for b in names},
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    return BenchResult(
        pd.DataFrame(rows), pd.concat(timelines, ignore_index=True), pd.concat(spectra, ignore_index=True), metadata
    )
