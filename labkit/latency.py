"""End-to-end latency for the comparison harness: noted per message by the consumers, summarised with HdrHistogram.

A message's latency is *intended send time → processing finished*. The producer stamps
each message with the time its schedule said it should be sent (``created_at``), not the
time it actually went out, so a producer that falls behind an overloaded broker cannot
hide the delay (coordinated omission): the wait shows up in every late message.

Consumers do as little as possible while measuring: per message they keep three numbers
(message number, intended time, finish time) in arrays, and write them to
``<run_dir>/bench/<consumer>.npz`` when they stop. The harness then records every
latency into an ``HdrHistogram`` (the ``hdrhistogram`` package) for percentiles, max and
the percentile spectrum, so the summary is exact to three significant digits and nothing
is sampled away.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from array import array
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from hdrh.histogram import HdrHistogram

from labkit.workflow import WorkerSettings, burn_cpu

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

#: Recordable range: 1 µs to 1 hour, 3 significant digits (HdrHistogram's usual setting).
LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS = 1, 3_600_000_000, 3
#: The percentiles every summary reports, and their column names.
PERCENTILES = {"p50_ms": 50.0, "p95_ms": 95.0, "p99_ms": 99.0, "p999_ms": 99.9}
#: How often a consumer rewrites its running count (the harness waits on it).
COUNT_EVERY_S = 0.2


class LatencyRecorder:
    """The harness's consumer-side sink: decode each payload, do the workload's work, note when it finished.

    Args:
        run_dir: the run folder; files go to ``run_dir/bench/<consumer>.{npz,count}``.
        consumer: this consumer's name.
        settings: ``step_ms`` is the I/O time per message (``asyncio.sleep``, up to
            ``concurrency`` messages at once), ``cpu_ms`` the CPU time per message.
    """

    def __init__(self, run_dir: Path, consumer: str, settings: WorkerSettings) -> None:
        self.folder = Path(run_dir) / "bench"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.consumer = consumer
        self.io_s = settings.step_ms / 1000.0
        self.cpu_ms = settings.cpu_ms
        self.concurrency = settings.concurrency
        self.numbers = array("q")
        self.intended = array("d")
        self.finished = array("d")
        self._counter: asyncio.Task[None] | None = None

    async def __call__(self, payloads: list[Any]) -> None:
        """Handle one batch; a payload that is not the harness's JSON is counted with number -1."""
        messages = [_decode(payload) for payload in payloads]
        for message in messages:
            number, intended = message.get("n"), message.get("created_at")
            # type() rather than isinstance: True is an int, and this loop runs for every message.
            self.numbers.append(number if type(number) is int else -1)
            self.intended.append(intended if type(intended) is float else math.nan)
        if self.io_s:
            for start in range(0, len(messages), self.concurrency):
                chunk = len(messages[start : start + self.concurrency])
                await asyncio.gather(*(asyncio.sleep(self.io_s) for _ in range(chunk)))
                self._finish(chunk)
        elif self.cpu_ms:
            for _ in messages:
                burn_cpu(self.cpu_ms)
                self._finish(1)
        else:
            self._finish(len(messages))

    def _finish(self, count: int) -> None:
        now = time.time()
        self.finished.extend([now] * count)

    async def __aenter__(self) -> LatencyRecorder:
        self._counter = asyncio.create_task(self._write_counts())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._counter is not None:
            self._counter.cancel()
        self.save()

    async def _write_counts(self) -> None:
        while True:
            self._write_count()
            await asyncio.sleep(COUNT_EVERY_S)

    def _write_count(self) -> None:
        path = self.folder / f"{self.consumer}.count"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(str(len(self.finished)))
        os.replace(temporary, path)  # atomic: a reader never sees half a number

    def save(self) -> None:
        """Write the arrays (and the final count) for the harness to load."""
        import numpy as np

        np.savez(
            self.folder / f"{self.consumer}.npz",
            n=np.frombuffer(self.numbers, dtype=np.int64),
            intended=np.frombuffer(self.intended, dtype=np.float64),
            finished=np.frombuffer(self.finished, dtype=np.float64),
        )
        self._write_count()


#: msgspec's JSON decoder (in C, as the workers'): the harness's consumer should cost less than the queue it measures.
_decode_json = msgspec.json.Decoder().decode


def _decode(payload: Any) -> Mapping[str, Any]:
    if isinstance(payload, Mapping):
        return payload  # BullMQ already decoded the job data
    try:
        message = _decode_json(payload)
    except msgspec.DecodeError:
        return {}
    return message if isinstance(message, Mapping) else {}


def consumed_count(run_dir: Path) -> int:
    """Messages the run's consumers have finished so far (probes and duplicates included)."""
    total = 0
    for path in (Path(run_dir) / "bench").glob("*.count"):
        try:
            total += int(path.read_text() or 0)
        except (OSError, ValueError):
            continue  # replaced while we read it: the next look sees it
    return total


def load_deliveries(run_dir: Path) -> pd.DataFrame:
    """Every delivery the run's consumers noted: ``n``, ``intended``, ``finished`` (Unix seconds), ``latency_ms``."""
    import numpy as np
    import pandas as pd

    parts = []
    for path in sorted((Path(run_dir) / "bench").glob("*.npz")):
        with np.load(path) as arrays:
            parts.append(pd.DataFrame({name: arrays[name] for name in ("n", "intended", "finished")}))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"n": [], "intended": [], "finished": []})
    frame["latency_ms"] = (frame["finished"] - frame["intended"]) * 1000.0
    return frame


def histogram(latencies_ms: np.ndarray[Any, Any] | pd.Series[float] | list[float]) -> HdrHistogram:
    """An HdrHistogram of latencies given in milliseconds (recorded in microseconds, at least 1 µs)."""
    hist = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
    for value in latencies_ms:
        if not math.isnan(value):
            hist.record_value(min(max(int(round(value * 1000.0)), LOWEST_US), HIGHEST_US))
    return hist


def summary(hist: HdrHistogram) -> dict[str, float]:
    """``p50_ms``, ``p95_ms``, ``p99_ms``, ``p999_ms``, ``max_ms`` and ``count``; NaN percentiles when empty."""
    count = hist.get_total_count()
    result: dict[str, float] = {"count": float(count)}
    for column, percentile in PERCENTILES.items():
        result[column] = hist.get_value_at_percentile(percentile) / 1000.0 if count else math.nan
    result["max_ms"] = hist.get_max_value() / 1000.0 if count else math.nan
    return result


def spectrum(hist: HdrHistogram, ticks_per_half: int = 5) -> pd.DataFrame:
    """The percentile spectrum, as HdrHistogram prints it: ``percentile``, ``latency_ms``, ``one_in``.

    Percentiles close in on 100 by halves (50, 75, 87.5, ...), ``ticks_per_half`` steps
    each, until a step holds less than one recorded value; the max closes the curve. Plot
    ``latency_ms`` against ``one_in = 1 / (1 - percentile/100)`` on a log x axis.
    """
    import pandas as pd

    count = hist.get_total_count()
    rows: list[tuple[float, float]] = []
    if count:
        level = 0
        while True:
            gap = 100.0 / 2**level  # the distance to 100 halves with every level
            for tick in range(ticks_per_half):
                percentile = 100.0 - gap + gap / 2 * tick / ticks_per_half
                rows.append((percentile, hist.get_value_at_percentile(percentile) / 1000.0))
            level += 1
            if count * gap / 100.0 < 1:
                break
        rows.append((100.0, hist.get_max_value() / 1000.0))
    frame = pd.DataFrame(rows, columns=["percentile", "latency_ms"]).drop_duplicates("percentile")
    with_max = frame["percentile"] >= 100.0
    frame["one_in"] = 1.0 / (1.0 - frame["percentile"].where(~with_max, math.nan) / 100.0)
    frame.loc[with_max, "one_in"] = float(max(count, 1))
    # A percentile finer than one in `count` says nothing more than the max does.
    frame = frame[with_max | (frame["one_in"] < count)]
    return frame.reset_index(drop=True)
