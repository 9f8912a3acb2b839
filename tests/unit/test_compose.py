"""docker-compose.yml, checked by reading it (no Docker engine is needed, and none runs in CI).

The compose stack must be a drop-in for `labkit up`: the same host addresses as labkit's defaults, only on
127.0.0.1, and a lab container whose settings are the ones Config.from_env reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from labkit import apache_kafka
from labkit.config import DEFAULT_KAFKA_BOOTSTRAP, DEFAULT_REDIS_URL, Config, parse_bootstrap, parse_redis_url

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service["environment"]
    assert isinstance(env, dict), "write environment as a mapping"
    return {name: str(value) for name, value in env.items()}


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` as {NAME: (host, port)}."""
    result = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        result[name] = (host, int(port))
    return result


def test_the_three_services(compose: dict[str, Any]) -> None:
    assert set(_services(compose)) == {"redis", "kafka", "lab"}


def test_kafka_is_apache_kafka_in_kraft_mode(compose: dict[str, Any]) -> None:
    kafka = _services(compose)["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    voter_id, _, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert voter_id == node_id
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    listeners = _listeners(env["KAFKA_LISTENERS"])
    assert listeners[controller][1] == int(voter.rpartition(":")[2])
    assert controller not in _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_NUM_PARTITIONS"] == "3"
    assert "zookeeper" not in yaml.safe_dump(compose).lower()  # no service, setting or value; comments aside


def test_kafka_keeps_its_data_in_a_volume(compose: dict[str, Any]) -> None:
    kafka = _services(compose)["kafka"]
    log_dirs = _env(kafka)["KAFKA_LOG_DIRS"]
    mounts = dict(volume.split(":", 1) for volume in kafka["volumes"])
    assert log_dirs in mounts.values()
    assert set(mounts) <= set(compose["volumes"])


def test_every_published_port_is_on_loopback(compose: dict[str, Any]) -> None:
    published = [(name, port) for name, svc in _services(compose).items() for port in svc.get("ports", [])]
    assert {name for name, _ in published} == {"redis", "kafka", "lab"}
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def _published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """{container port: (host ip, host port)}."""
    result = {}
    for port in service["ports"]:
        host_ip, host_port, container_port = str(port).split(":")
        result[int(container_port)] = (host_ip, int(host_port))
    return result


def test_host_addresses_are_labkits_defaults(compose: dict[str, Any]) -> None:
    services = _services(compose)
    redis_host, redis_port, _db = parse_redis_url(DEFAULT_REDIS_URL)
    assert _published(services["redis"])[6379] == (redis_host, redis_port)

    kafka_env = _env(services["kafka"])
    advertised = _listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    host_listener = [
        name for name, address in advertised.items() if address == parse_bootstrap(DEFAULT_KAFKA_BOOTSTRAP)
    ]
    assert host_listener, f"no advertised listener is {DEFAULT_KAFKA_BOOTSTRAP}"
    container_port = _listeners(kafka_env["KAFKA_LISTENERS"])[host_listener[0]][1]
    assert _published(services["kafka"])[container_port] == parse_bootstrap(DEFAULT_KAFKA_BOOTSTRAP)


def test_lab_settings_are_the_ones_labkit_reads(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    services = _services(compose)
    lab_env = _env(services["lab"])
    assert set(lab_env) == {"LABKIT_REDIS_URL", "LABKIT_KAFKA_BOOTSTRAP"}
    for name, value in lab_env.items():
        monkeypatch.setenv(name, value)
    config = Config.from_env()
    assert (config.redis_url, config.kafka_bootstrap) == (
        lab_env["LABKIT_REDIS_URL"],
        lab_env["LABKIT_KAFKA_BOOTSTRAP"],
    )

    redis_host, redis_port, _db = config.redis_address
    assert redis_host == "redis"
    assert redis_port in {int(str(p).split(":")[-1]) for p in services["redis"]["ports"]}

    kafka_env = _env(services["kafka"])
    advertised = _listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    internal = [name for name, address in advertised.items() if address == config.kafka_address]
    assert internal, f"the lab's {config.kafka_bootstrap} is not an advertised listener"
    assert config.kafka_address[0] == "kafka"
    assert _listeners(kafka_env["KAFKA_LISTENERS"])[internal[0]][1] == config.kafka_address[1]
    assert set(services["lab"]["depends_on"]) == {"redis", "kafka"}


def test_lab_image_runs_jupyterlab_on_the_notebooks(compose: dict[str, Any]) -> None:
    build = _services(compose)["lab"]["build"]
    assert build["context"] == "."
    dockerfile = build["dockerfile_inline"]
    assert dockerfile.startswith("FROM python:3.11-slim")
    assert "pip install --no-cache-dir -e ." in dockerfile
    assert 'CMD ["jupyter", "lab", "--ip", "0.0.0.0", "--no-browser", "notebooks/"]' in dockerfile


def test_kafka_is_the_version_and_settings_labkit_up_runs(compose: dict[str, Any]) -> None:
    """`docker compose up` and `labkit up --kafka apache` run the same Apache Kafka, configured the same way."""
    kafka = _services(compose)["kafka"]
    assert kafka["image"] == f"apache/kafka:{apache_kafka.KAFKA_VERSION}"
    env = _env(kafka)
    # The image turns KAFKA_A_B into a.b (docker/README.md of apache/kafka: "_" is ".", "__" is "_").
    for key, value in apache_kafka.SERVER_SETTINGS.items():
        name = "KAFKA_" + key.replace("_", "__").replace(".", "_").upper()
        assert env.get(name) == value, f"{name} should be {value}, as labkit/apache_kafka.py sets {key}"
