"""Config: URL parsing, the namespace prefix on every wire name, and the environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit.config import DEFAULT_KAFKA_BOOTSTRAP, DEFAULT_REDIS_URL, Config, Names, parse_bootstrap, parse_redis_url
from labkit.errors import ConfigError


def test_redis_url_parts() -> None:
    assert parse_redis_url("redis://10.0.0.5:6380/2") == ("10.0.0.5", 6380, 2)
    assert parse_redis_url("redis://cache") == ("cache", 6379, 0)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:6379/0", "unsupported scheme 'http'.*use redis://host:port/db"),
        ("127.0.0.1:6379", "unsupported scheme ''"),
        ("redis://127.0.0.1:port/0", "bad port or database number"),
        ("redis://127.0.0.1:6379/zero", "bad port or database number"),
    ],
)
def test_bad_redis_url_says_what_to_use(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_redis_url(url)


def test_bootstrap_takes_the_first_host() -> None:
    assert parse_bootstrap("kafka:29092, other:9092") == ("kafka", 29092)


@pytest.mark.parametrize("bootstrap", ["localhost", "localhost:", ":9092", "localhost:ninety"])
def test_bad_bootstrap_shows_an_example(bootstrap: str) -> None:
    with pytest.raises(ConfigError, match=f"use host:port, e.g. {DEFAULT_KAFKA_BOOTSTRAP}"):
        parse_bootstrap(bootstrap)


def test_config_validates_on_creation() -> None:
    with pytest.raises(ConfigError, match="LABKIT_REDIS_URL"):
        Config(redis_url="rediss://127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match="LABKIT_KAFKA_BOOTSTRAP"):
        Config(kafka_bootstrap="127.0.0.1")


def test_names_get_the_namespace_prefix() -> None:
    names = Config(namespace="t1234abcd-").names
    assert [names.bullmq_queue, names.bullmq_dlq] == ["t1234abcd-bookings", "t1234abcd-bookings-dlq"]
    assert [names.stream, names.stream_dlq, names.stream_group] == [
        "t1234abcd-bookings",
        "t1234abcd-bookings:dlq",
        "t1234abcd-booking-workers",
    ]
    assert [names.topic, names.topic_retry, names.topic_dlq, names.kafka_group] == [
        "t1234abcd-bookings",
        "t1234abcd-bookings.retry",
        "t1234abcd-bookings.dlq",
        "t1234abcd-booking-workers",
    ]
    assert names.key("streams", "completed") == "lab:t1234abcd-streams:completed"


def test_no_namespace_gives_the_contract_names() -> None:
    names = Names()
    assert (names.stream, names.topic_dlq, names.key("kafka", "retried")) == (
        "bookings",
        "bookings.dlq",
        "lab:kafka:retried",
    )


@pytest.mark.parametrize("namespace", ["has space-", "a/b-", "t:1-", "x" * 65])
def test_bad_namespace_is_rejected(namespace: str) -> None:
    with pytest.raises(ConfigError, match="bad LABKIT_NAMESPACE.*A-Za-z0-9._-"):
        Config(namespace=namespace)


def test_longest_namespace_is_accepted() -> None:
    assert Config(namespace="x" * 64).names.topic == "x" * 64 + "bookings"


def test_from_env_reads_the_labkit_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LABKIT_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("LABKIT_KAFKA_BOOTSTRAP", "kafka:29092")
    monkeypatch.setenv("LABKIT_NAMESPACE", "lesson3-")
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    config = Config.from_env()
    assert (config.redis_address, config.kafka_address) == (("redis", 6379, 0), ("kafka", 29092))
    assert (config.namespace, config.home) == ("lesson3-", tmp_path)
    assert config.to_env()["LABKIT_KAFKA_BOOTSTRAP"] == "kafka:29092"


def test_from_env_defaults_to_the_local_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LABKIT_REDIS_URL", "LABKIT_KAFKA_BOOTSTRAP", "LABKIT_NAMESPACE", "LABKIT_HOME"):
        monkeypatch.delenv(name, raising=False)
    config = Config.from_env()
    assert (config.redis_url, config.kafka_bootstrap, config.namespace) == (
        DEFAULT_REDIS_URL,
        DEFAULT_KAFKA_BOOTSTRAP,
        "",
    )
    assert config.home == Path.home() / ".labkit"


def test_from_env_rejects_a_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABKIT_REDIS_URL", "localhost:6379")
    with pytest.raises(ConfigError, match="unsupported scheme .* in LABKIT_REDIS_URL 'localhost:6379'"):
        Config.from_env()
