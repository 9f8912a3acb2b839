"""Worker settings that every backend shares."""

from __future__ import annotations

import pytest

from labkit.backends import get_backend
from labkit.errors import ConfigError
from labkit.workflow import WorkerSettings


def test_exponential_backoff_doubles() -> None:
    settings = WorkerSettings(backoff_ms=200)
    assert [settings.backoff_for(n) for n in (1, 2, 3)] == [0.2, 0.4, 0.8]


def test_options_are_numeric_with_defaults() -> None:
    settings = WorkerSettings(options={"lock_duration_ms": "4000"})
    assert settings.option("lock_duration_ms", 1) == 4000.0
    assert settings.option("missing", 7) == 7.0


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="choose from bullmq, streams, kafka"):
        get_backend("rabbitmq")
