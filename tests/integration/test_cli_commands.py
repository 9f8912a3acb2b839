"""docs/contract.md's data commands as a learner types them: produce, worker, stats, reset — and their failure lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT, assert_one_line_error, run_labkit

from labkit.config import BACKENDS, Config
from labkit.events import load_run

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.kafka]


def stats(config: Config, backend: str) -> dict[str, int]:
    result = run_labkit("stats", "--backend", backend, "--json", LABKIT_NAMESPACE=config.namespace)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    numbers: dict[str, int] = json.loads(result.stdout)
    return numbers


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
def test_produce_worker_stats_reset(backend: str, lab_config: Config, tmp_path: Path) -> None:
    ns = {"LABKIT_NAMESPACE": lab_config.namespace}
    sent = run_labkit("produce", "--backend", backend, "--count", "5", "--poison", "1", "--seed", "3", **ns)
    assert sent.returncode == 0, sent.stderr
    assert f"{backend}: sent 6 bookings (5 valid, 1 poison)" in sent.stdout
    assert stats(lab_config, backend)["backlog"] == 6

    env = {**os.environ, **ns, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labkit",
            "worker",
            "--backend",
            backend,
            "--concurrency",
            "2",
            "--backoff-ms",
            "100",
            "--run-dir",
            str(tmp_path),
            "--worker-id",
            "cli-w1",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        numbers = stats(lab_config, backend)
        while (numbers["completed"], numbers["dead_lettered"]) != (5, 1) and time.monotonic() < deadline:
            time.sleep(0.5)
            numbers = stats(lab_config, backend)
        assert (numbers["completed"], numbers["dead_lettered"], numbers["retried"]) == (5, 1, 2)
        worker.send_signal(signal.SIGTERM)  # warm stop
        assert worker.wait(timeout=20) == 0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    events = load_run(tmp_path)
    assert list(events.loc[events["event"] == "stopped", "cold"]) == [False]
    assert events.loc[events["event"] == "completed", "booking_id"].nunique() == 5

    cleared = run_labkit("reset", "--backend", backend, **ns)
    assert cleared.returncode == 0, cleared.stderr
    after = stats(lab_config, backend)
    assert (after["completed"], after["dead_lettered"], after["retried"], after["backlog"]) == (0, 0, 0, 0)


def test_produce_paces_to_the_rate(lab_config: Config) -> None:
    started = time.monotonic()
    sent = run_labkit("produce", "-b", "streams", "-n", "20", "--rate", "40", LABKIT_NAMESPACE=lab_config.namespace)
    assert sent.returncode == 0, sent.stderr
    assert time.monotonic() - started >= 0.4  # at 40/s the 17th booking cannot leave before 0.4 s
    assert stats(lab_config, "streams")["backlog"] == 20


@pytest.mark.parametrize(
    "args",
    [
        ("stats", "--backend", "streams"),
        ("produce", "--backend", "bullmq", "--count", "1"),
        ("reset", "--backend", "streams"),
        ("worker", "--backend", "streams"),
    ],
)
def test_redis_down_is_one_line(args: tuple[str, ...], lab_stack: object) -> None:
    code = 3 if args[0] == "worker" else 1
    line = assert_one_line_error(run_labkit(*args, LABKIT_REDIS_URL="redis://127.0.0.1:1/0"), code=code)
    assert line == "Error: Redis is not answering at redis://127.0.0.1:1/0; start the lab with `labkit up`"


def test_kafka_down_is_one_line(lab_stack: object) -> None:
    line = assert_one_line_error(
        run_labkit("produce", "--backend", "kafka", "--count", "1", LABKIT_KAFKA_BOOTSTRAP="127.0.0.1:1")
    )
    assert "127.0.0.1:1" in line


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("produce", "--backend", "rabbitmq", "--count", "1"), "'rabbitmq' is not one of"),
        (("produce", "--backend", "streams", "--count", "-1"), "--count"),
        (("stats",), "Missing option '--backend'"),
        (("worker", "--backend", "kafka", "--concurrency", "0"), "--concurrency"),
    ],
)
def test_bad_arguments_are_one_line(args: tuple[str, ...], complaint: str) -> None:
    line = assert_one_line_error(run_labkit(*args), code=2)
    assert complaint in line


@pytest.mark.timeout(60)
def test_lab_starts_the_stack_and_serves_the_notebooks(lab_stack: object, tmp_path: Path) -> None:
    """The README's first command ends in `labkit lab`: stack healthy, then JupyterLab on notebooks/."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JUPYTER_RUNTIME_DIR": str(tmp_path)}
    lab = subprocess.Popen(
        [sys.executable, "-m", "labkit", "lab", "--no-browser", "--port", "18899", "--ServerApp.port_retries=0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        seen: list[str] = []
        assert lab.stdout is not None
        for line in lab.stdout:
            seen.append(line)
            if "Serving notebooks from local directory" in line:
                break
        assert seen[0].startswith("redis") and "healthy" in seen[0], seen[:3]
        assert seen[-1].rstrip().endswith(str(ROOT / "notebooks")), seen[-3:]
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        lab.wait(timeout=20)
