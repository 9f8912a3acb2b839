"""WorkerPool's pure helpers: the worker command line and the reason quoted when a worker fails to start."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from labkit import worker
from labkit.errors import ConfigError
from labkit.pool import WorkerPool, _failure_reason, _new_run_dir, _settings_argv
from labkit.workflow import WorkerSettings


def test_settings_argv_is_accepted_by_the_worker_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every WorkerSettings field survives the trip through ``labkit worker``'s flags."""
    settings = WorkerSettings(
        concurrency=7, max_attempts=4, backoff_ms=150, idempotent=False, workflow="noop", step_ms=2.5, cpu_ms=0.5,
        options={"lock_duration_ms": "5000", "heartbeat": "0"},
    )  # fmt: skip
    seen: list[WorkerSettings] = []

    async def fake_run_worker(backend: str, config: object, parsed: WorkerSettings, *rest: object) -> int:
        seen.append(parsed)
        return 0

    monkeypatch.setattr(worker, "run_worker", fake_run_worker)
    result = CliRunner().invoke(worker.worker_command, ["--backend", "streams", *_settings_argv(settings)])
    assert result.exit_code == 0, result.output
    assert seen == [settings]


@pytest.mark.parametrize(
    ("log", "reason"),
    [
        ("Error: Redis is not answering at redis://127.0.0.1:1/0; start the lab with `labkit up`\n",
         "Redis is not answering at redis://127.0.0.1:1/0; start the lab with `labkit up`"),
        ("2026-11-27 21:00:00,000 INFO starting\n2026-11-27 21:00:01,000 ERROR Kafka is not answering\n",
         "Kafka is not answering"),
        ('Traceback (most recent call last):\n  File "x.py", line 1\nImportError: no module named foo\n',
         "ImportError: no module named foo"),
        ("", "(empty log)"),
    ],
)  # fmt: skip
def test_failure_reason_quotes_the_most_useful_line(tmp_path: Path, log: str, reason: str) -> None:
    path = tmp_path / "w.log"
    path.write_text(log)
    assert _failure_reason(path) == reason


def test_each_pool_gets_its_own_run_folder(tmp_path: Path) -> None:
    first, second = _new_run_dir(tmp_path, "kafka"), _new_run_dir(tmp_path, "kafka")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.startswith("kafka-") and second.parent == tmp_path


def test_unknown_backend_and_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backend 'rabbit'"):
        WorkerPool("rabbit", run_dir=tmp_path)
    with pytest.raises(TypeError, match="unknown worker setting"):
        WorkerPool("streams", run_dir=tmp_path).start(1, concurency=2)
