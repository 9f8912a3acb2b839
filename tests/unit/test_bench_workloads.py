"""The comparison harness without servers: workloads, its messages, and the analysis of a run."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labkit import bench
from labkit.booking import encode, encode_plain, parse_booking
from labkit.errors import ConfigError


def test_every_named_workload_is_valid_and_described() -> None:
    for name, workload in bench.WORKLOADS.items():
        assert workload.name == name and workload.description
        settings = workload.worker_settings()
        assert settings.workflow == "bench" and settings.concurrency == workload.concurrency
    assert bench.WORKLOADS["max-rate"].rate == 0
    assert bench.WORKLOADS["backlog-drain"].pause_s > 0


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"rate": -1}, "rate"),
        ({"rate": math.inf}, "rate"),
        ({"warmup_s": 30, "duration_s": 30}, "warmup_s"),
        ({"message_bytes": 10}, "message_bytes"),
        ({"consumers": 0}, "consumers"),
        ({"work": "sleep"}, "work must be one of"),
        ({"work": "io", "work_ms": 0}, "work_ms"),
        ({"pause_at_s": 1, "pause_s": 3, "warmup_s": 5}, "pause"),
        ({"pause_at_s": 10, "pause_s": 0}, "pause_s"),
    ],
)
def test_a_bad_workload_says_which_field_is_wrong(changes: dict[str, object], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        bench.Workload(name="bad", **changes)  # type: ignore[arg-type]


def test_work_maps_to_the_consumer_settings() -> None:
    io = bench.Workload(work="io", work_ms=20, partitions=6).worker_settings()
    assert (io.step_ms, io.cpu_ms, io.options) == (20, 0, {"partitions": "6"})
    cpu = bench.Workload(work="cpu", work_ms=2).worker_settings()
    assert (cpu.step_ms, cpu.cpu_ms) == (0, 2)


def test_a_workload_reads_from_yaml_and_refuses_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "my-load.yaml"
    path.write_text("rate: 250\nduration_s: 12\nwarmup_s: 2\nwork: io\nwork_ms: 5\n")
    workload = bench.get_workload(str(path))
    assert (workload.name, workload.rate, workload.work_ms) == ("my-load", 250, 5)
    path.write_text("rate: 250\nburst: 3\n")
    with pytest.raises(ConfigError, match="unknown workload field.*burst"):
        bench.get_workload(str(path))
    with pytest.raises(ConfigError, match="choose from"):
        bench.get_workload("no-such-workload")


def test_messages_are_valid_bookings_of_the_asked_size_and_key_cardinality() -> None:
    workload = bench.Workload(message_bytes=512, keys=7)
    factory = bench.MessageFactory(workload)
    messages = [factory.booking(n, 1_800_000_000.123457 + n / 1000) for n in range(70)]
    for message in messages:
        parse_booking(json.dumps(message))  # docs/contract.md: any consumer could take these
        assert abs(len(json.dumps(message, separators=(",", ":"))) - 512) <= 16
    assert len({m["booking_id"] for m in messages}) == 7
    by_key = [m["seq"] for m in messages if m["booking_id"] == messages[3]["booking_id"]]
    assert by_key == list(range(10))  # per-key event numbers, for ordering checks
    assert factory.probe(0)["n"] < 0


def test_the_harness_producer_sends_what_the_lab_encoder_writes() -> None:
    # The Kafka harness producer encodes with encode_plain (msgspec). For the factory's messages (Unix times)
    # that is byte for byte what encode (json) writes; for any plain value, the same JSON value.
    factory = bench.MessageFactory(bench.Workload(message_bytes=300, keys=11))
    messages = [factory.booking(n, t) for n in (0, 7, 10**5, 10**9) for t in (0.0, 1_800_000_000.123457, 2e9 + 0.5)]
    messages += [factory.probe(3), {**factory.booking(1, 2.0), "pad": 'ü\n"é✓'}]
    for message in messages:
        assert encode_plain(message) == encode(message).encode("utf-8")
    odd = {**factory.booking(2, 1e-7), "big": 1e16, "small": -(2**63), "nested": [{"x": None, "y": True}]}
    assert json.loads(encode_plain(odd)) == json.loads(encode(odd)) == odd


def _deliveries(start: float, rate: float, seconds: float, latency_s: float) -> pd.DataFrame:
    n = np.arange(int(rate * seconds))
    intended = start + n / rate
    return pd.DataFrame(
        {"n": n, "intended": intended, "finished": intended + latency_s, "latency_ms": np.full(len(n), latency_s * 1e3)}
    )


def test_analysis_leaves_out_the_warm_up_and_accounts_for_every_message() -> None:
    workload = bench.Workload(rate=100, duration_s=10, warmup_s=2)
    start = 1_000_000.0
    frame = _deliveries(start, 100, 10, 0.010)
    frame.loc[frame["intended"] < start + 2, "latency_ms"] = 5000.0  # a slow warm-up must not count
    frame.loc[frame["intended"] < start + 2, "finished"] = frame["intended"] + 5.0
    duplicate = frame.iloc[[500]]
    frame = pd.concat([frame.drop(index=[700]), duplicate, bench_probe_rows()], ignore_index=True)
    sent_log = [(start + s, int(100 * s)) for s in range(1, 11)]
    row, timeline, spectrum = bench._analyse(frame, workload, start, 1000, sent_log, [(start + 1, 3, 1)], None)
    assert row["measured"] == 800  # deliveries of the 800 due after the warm-up: one lost, one twice
    assert row["lost"] == 1 and row["duplicates"] == 1 and row["sent"] == 1000
    assert row["p50_ms"] == pytest.approx(10.0, rel=1e-3) and row["max_ms"] == pytest.approx(10.0, rel=1e-3)
    assert row["produced_per_s"] == pytest.approx(100, rel=0.02)
    assert math.isnan(row["recovery_s"])
    assert timeline["produced"].sum() == 1000
    assert timeline["consumed"].sum() == len(frame) - 3  # probes are not the workload's
    assert spectrum["latency_ms"].is_monotonic_increasing


def test_the_timeline_ends_on_the_backlog_sample_that_shows_the_queue_empty() -> None:
    # The last message finishes at 10.0 s; the broker reports the queue empty in second 11 (a Kafka group's lag
    # falls to 0 only with the offset commit after it): the timeline goes on to that sample.
    workload = bench.Workload(rate=100, duration_s=5, warmup_s=1)
    start = 3_000_000.0
    frame = _deliveries(start, 100, 10, 0.010)
    samples = [(start + 8.5, 40, 2), (start + 10.2, 6, 0), (start + 11.4, 0, 0)]
    _, timeline, _ = bench._analyse(frame, workload, start, 1000, [(start + 10, 1000)], samples, None)
    assert timeline["second"].iloc[-1] == 11
    assert timeline["backlog"].dropna().tolist() == [40, 6, 0]
    assert timeline["consumed"].iloc[-1] == 0


def bench_probe_rows() -> pd.DataFrame:
    return pd.DataFrame({"n": [-1, -2, -3], "intended": [0.0] * 3, "finished": [1.0] * 3, "latency_ms": [1e3] * 3})


def test_recovery_is_timed_from_the_restart_to_the_last_slow_message() -> None:
    start = 2_000_000.0
    frame = _deliveries(start, 100, 30, 0.005)
    paused_at, resumed_at = start + 10, start + 15
    # Messages due during the pause finish after the restart, draining at 200/s: the last one 2.5 s later.
    waiting = (frame["intended"] >= paused_at) & (frame["intended"] < resumed_at)
    frame.loc[waiting, "finished"] = resumed_at + np.arange(waiting.sum()) / 200
    frame["latency_ms"] = (frame["finished"] - frame["intended"]) * 1e3
    recovery = bench._recovery(frame, start + 2, paused_at, resumed_at)
    assert recovery == pytest.approx(2.5, abs=0.1)


class _SlowAtTheEnd:
    """A backend whose send in the run's last half second takes a whole second (a loaded broker)."""

    sent: list[int] = []  # the size of each batch sent

    def __init__(self, config: object, settings: object) -> None:
        pass

    async def __aenter__(self) -> _SlowAtTheEnd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send_batch(self, batch: list[dict[str, object]]) -> None:
        if _SlowAtTheEnd.end - 0.5 < time.time() < _SlowAtTheEnd.end:
            await asyncio.sleep(1.0)
        _SlowAtTheEnd.sent.append(len(batch))

    end = 0.0


def test_the_open_loop_producer_sends_every_message_of_the_run_even_when_it_falls_behind_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workload = bench.Workload(rate=100, duration_s=2, warmup_s=0)
    start = time.time() + 0.2
    _SlowAtTheEnd.end, _SlowAtTheEnd.sent = start + workload.duration_s, []
    monkeypatch.setattr(bench, "get_backend", lambda name: _SlowAtTheEnd)
    producer = bench._Producer("streams", None, workload, start)  # type: ignore[arg-type]
    producer.run()
    assert producer.error is None
    assert _SlowAtTheEnd.sent[0] == 1  # the warm-up probe, before the clock starts
    assert producer.sent == sum(_SlowAtTheEnd.sent[1:]) == 200
