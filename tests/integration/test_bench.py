"""The comparison harness against the real test stack: complete results, honest latency under overload, a drain."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from support import assert_one_line_error, run_labkit

from labkit import bench
from labkit.config import BACKENDS, Config

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.kafka]

SHORT = bench.WORKLOADS["smoke"].replace(duration_s=5, warmup_s=1, rate=150)


@pytest.mark.timeout(150)
def test_a_short_run_on_each_backend_gives_complete_results(lab_config: Config, tmp_path: Path) -> None:
    result = bench.run_bench(SHORT, BACKENDS, repetitions=1, config=lab_config, progress=False)
    summary = result.summary.set_index("backend")
    assert list(summary.index) == list(BACKENDS)
    for backend, row in summary.iterrows():
        # Every message the producer was told was stored came out of a consumer, once.
        assert row["sent"] == pytest.approx(SHORT.rate * SHORT.duration_s, abs=1), backend
        assert (row["lost"], row["duplicates"], row["consumed"]) == (0, 0, row["sent"]), backend
        # Messages due after the warm-up are the measured ones: 4 s at 150/s.
        assert row["measured"] == pytest.approx(150 * 4, abs=2), backend
        assert row["throughput_per_s"] == pytest.approx(150, rel=0.15), backend
        percentiles = [row[c] for c in ("p50_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms")]
        assert percentiles[0] > 0 and percentiles == sorted(percentiles), (backend, percentiles)
        assert row["durability"] == bench.DURABILITY[backend] and row["cores"] == os.cpu_count()
    # The server measured is named: the embedded broker is never just "Kafka".
    product, durability = {"embedded": ("Tansu", "embedded"), "apache": ("Apache Kafka", "durable")}[lab_config.kafka]
    assert summary.loc["kafka", "server"].startswith(product) and durability in summary.loc["kafka", "label"]
    assert summary.loc["streams", "server"].startswith(("Valkey", "Redis"))
    for backend, timeline in result.timeline.groupby("backend"):
        assert timeline["produced"].sum() == summary.loc[backend, "sent"]
        assert timeline["consumed"].sum() == summary.loc[backend, "consumed"]
        assert timeline["backlog"].notna().any()
    for backend, spectrum in result.spectrum.groupby("backend"):
        assert spectrum["latency_ms"].is_monotonic_increasing, backend
        assert spectrum["latency_ms"].iloc[-1] == pytest.approx(summary.loc[backend, "max_ms"])
    assert result.metadata["machine"]["cores"] == os.cpu_count()
    assert result.metadata["servers"]["kafka"] == summary.loc["kafka", "server"]

    saved = bench.BenchResult.load(result.save(tmp_path / "results"))
    pd.testing.assert_frame_equal(saved.summary, result.summary, check_dtype=False)
    assert len(saved.timeline) == len(result.timeline) and saved.metadata["workload"]["rate"] == 150
    # The per-message files of the runs are gone: the results are the saved frames.
    assert not list(lab_config.runs_dir.glob("bench-*"))


@pytest.mark.timeout(120)
def test_an_overloaded_run_shows_latency_rising_not_hidden(lab_config: Config) -> None:
    # One consumer that can do 4 / 20 ms = 200 msg/s, fed 600/s: the backlog and the latency must grow all run long.
    overload = bench.WORKLOADS["overload"].replace(rate=600, duration_s=8, warmup_s=1)
    row, timeline, _ = bench.run_once("streams", overload, lab_config)
    assert row["lost"] == 0
    assert row["throughput_per_s"] == pytest.approx(200, rel=0.2)  # the consumer's capacity, not the offered rate
    running = timeline[(timeline["second"] >= 1) & (timeline["second"] < 8)]
    early, late = running["p50_ms"].iloc[:2].mean(), running["p50_ms"].iloc[-2:].mean()
    # Open loop: each message's latency counts from its intended send time, so it grows with the queue.
    assert late > 3 * early and late > 2000, (early, late)
    assert running["backlog"].iloc[-1] > running["backlog"].iloc[1] + 1000
    assert row["p99_ms"] > 3000 and row["p50_ms"] < row["p99_ms"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backlog_drain_times_the_recovery(backend: str, lab_config: Config) -> None:
    # Two consumers stopped together and started again: on Kafka that is also the case the embedded broker
    # mishandles (it keeps the departed group leader), which KafkaBackend.renew_group works around.
    drain = bench.WORKLOADS["backlog-drain"].replace(rate=200, duration_s=12, warmup_s=2, pause_at_s=4, pause_s=3)
    row, timeline, _ = bench.run_once(backend, drain, lab_config)
    # At-least-once: stopping a consumer may hand back what it had in flight (a BullMQ job whose lock lapsed while a
    # loaded machine was slow to close, a Kafka offset not yet committed), so duplicates are allowed but bounded by
    # what the consumers could hold at the stop.
    assert row["lost"] == 0
    assert row["duplicates"] <= drain.consumers * drain.concurrency
    assert row["paused_at_s"] == pytest.approx(4, abs=0.5) and row["resumed_at_s"] - row["paused_at_s"] >= 3
    # 3 s without consumers at 200/s: about 600 waiting, then drained.
    assert row["max_backlog"] >= 400
    assert 0 < row["recovery_s"] < 10
    paused = timeline[(timeline["second"] >= 5) & (timeline["second"] < 7)]
    assert (paused["consumed"] == 0).all()
    assert timeline["backlog"].dropna().iloc[-1] == 0


def test_bench_cli_runs_and_saves(lab_config: Config, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ns = {"LABKIT_NAMESPACE": lab_config.namespace}
    result = run_labkit(
        "bench", "-w", "smoke", "-b", "streams", "-r", "1", "--duration", "3", "--warmup", "1", "--out", str(out), **ns
    )
    assert result.returncode == 0, result.stderr
    assert "streams" in result.stdout and f"results: {out}" in result.stdout
    assert {p.name for p in out.iterdir()} == {"summary.csv", "timeline.csv", "spectrum.csv", "metadata.json"}
    assert json.loads((out / "metadata.json").read_text())["workload"]["duration_s"] == 3


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-w", "nope"], "unknown workload 'nope'"),
        (["--warmup", "9", "--duration", "5"], "warmup_s"),
        (["--rate", "-1"], "--rate"),
        (["-b", "rabbitmq"], "--backend"),
    ],
)
def test_bench_cli_bad_arguments_say_so_in_one_line(args: list[str], words: str, lab_config: Config) -> None:
    line = assert_one_line_error(run_labkit("bench", *args), code=2 if words.startswith("--") else 1)
    assert words in line


def test_bench_cli_with_the_broker_down_says_so_in_one_line() -> None:
    line = assert_one_line_error(run_labkit("bench", "-b", "streams", LABKIT_REDIS_URL="redis://127.0.0.1:1/0"))
    assert "redis at 127.0.0.1:1 is not healthy" in line
