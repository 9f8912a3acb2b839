"""Latency bookkeeping of the comparison harness: percentiles on inputs with known answers, and the recorder."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from labkit import latency
from labkit.workflow import WorkerSettings

# HdrHistogram with 3 significant digits: a reported value is within 0.1% of the true one.
PRECISION = 1e-3


def close(actual: float, expected: float) -> bool:
    return abs(actual - expected) <= expected * PRECISION + 1e-3


def test_uniform_latencies_give_their_exact_percentiles() -> None:
    hist = latency.histogram(np.arange(1, 10_001, dtype=float))  # 1 ms .. 10 s, each once
    result = latency.summary(hist)
    assert result["count"] == 10_000
    assert close(result["p50_ms"], 5000)
    assert close(result["p95_ms"], 9500)
    assert close(result["p99_ms"], 9900)
    assert close(result["p999_ms"], 9990)
    assert close(result["max_ms"], 10_000)


def test_a_rare_outlier_shows_only_in_the_tail() -> None:
    # 990 fast messages and 10 slow ones: p99 is still fast, p99.9 and max are the slow ones.
    hist = latency.histogram([2.0] * 990 + [750.0] * 10)
    result = latency.summary(hist)
    assert close(result["p50_ms"], 2.0) and close(result["p99_ms"], 2.0)
    assert close(result["p999_ms"], 750.0) and close(result["max_ms"], 750.0)


def test_sub_microsecond_and_nan_latencies_are_handled() -> None:
    hist = latency.histogram([0.0, -0.5, math.nan, 0.0004])
    assert hist.get_total_count() == 3  # NaN (never finished) is not a latency
    assert latency.summary(hist)["max_ms"] == pytest.approx(0.001)  # clamped to the 1 µs floor


def test_an_empty_histogram_reports_nan_not_zero() -> None:
    result = latency.summary(latency.histogram([]))
    assert result["count"] == 0
    assert all(math.isnan(result[k]) for k in ("p50_ms", "p99_ms", "max_ms"))
    assert latency.spectrum(latency.histogram([])).empty


def test_spectrum_rises_to_the_max_and_reaches_the_tail() -> None:
    values = np.random.default_rng(7).exponential(10.0, 100_000)
    hist = latency.histogram(values)
    frame = latency.spectrum(hist)
    assert frame["percentile"].is_monotonic_increasing and frame["percentile"].is_unique
    assert frame["latency_ms"].is_monotonic_increasing
    assert frame["one_in"].is_monotonic_increasing and frame["one_in"].is_unique
    assert frame["percentile"].iloc[-1] == 100.0
    assert close(frame["latency_ms"].iloc[-1], float(values.max()))
    # 100,000 values resolve one-in-100,000: the spectrum goes past the 99.99th percentile.
    assert frame["percentile"].iloc[-2] > 99.99
    at_50 = frame.set_index("percentile").loc[50.0]
    assert close(at_50["latency_ms"], float(np.median(values)))
    assert at_50["one_in"] == pytest.approx(2.0)
    assert frame["one_in"].iloc[0] == pytest.approx(1.0)  # the 0th percentile: the fastest message
    assert frame["one_in"].iloc[-1] == len(values)  # the max: one in all of them


def test_recorder_notes_every_payload_and_its_latency(tmp_path: Path) -> None:
    recorder = latency.LatencyRecorder(tmp_path, "c1", WorkerSettings(workflow="bench"))
    sent = time.time() - 0.25
    payloads = [
        json.dumps({"n": 0, "created_at": sent}).encode(),
        {"n": 1, "created_at": sent},  # BullMQ hands over decoded job data
        b"\xff not json",
        json.dumps([1, 2]),
    ]

    async def go() -> None:
        async with recorder:
            await recorder(payloads)

    asyncio.run(go())
    assert latency.consumed_count(tmp_path) == 4
    frame = latency.load_deliveries(tmp_path)
    assert frame["n"].tolist() == [0, 1, -1, -1]
    good = frame[frame["n"] >= 0]
    assert ((good["latency_ms"] >= 250) & (good["latency_ms"] < 2000)).all()
    assert frame.loc[frame["n"] < 0, "latency_ms"].isna().all()


def test_io_work_runs_concurrency_messages_at_a_time(tmp_path: Path) -> None:
    recorder = latency.LatencyRecorder(tmp_path, "c1", WorkerSettings(workflow="bench", concurrency=5, step_ms=40))
    now = time.time()
    started = time.monotonic()
    asyncio.run(recorder([json.dumps({"n": n, "created_at": now}) for n in range(10)]))
    elapsed = time.monotonic() - started
    assert 0.08 <= elapsed < 0.5  # two waves of 5, not ten sleeps in a row (0.4 s) or one wave
    finished = sorted(set(recorder.finished))
    assert len(finished) == 2 and finished[1] - finished[0] >= 0.035


def test_cpu_work_burns_cpu_time_per_message(tmp_path: Path) -> None:
    recorder = latency.LatencyRecorder(tmp_path, "c1", WorkerSettings(workflow="bench", cpu_ms=5))
    cpu_before = time.thread_time()
    asyncio.run(recorder([json.dumps({"n": n, "created_at": time.time()}) for n in range(4)]))
    assert time.thread_time() - cpu_before >= 0.02
    assert list(recorder.finished) == sorted(recorder.finished) and len(set(recorder.finished)) == 4
