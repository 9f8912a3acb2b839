"""Apache Kafka as `labkit up --kafka apache` runs it: durable across down/up, and one readable line for each way
it can fail to start. Runs with `pytest --kafka apache` (the README's second command); the session's stack has
fetched the jars, which these private brokers share (own ports and state folders, never the session's broker).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from support import ROOT

from labkit import apache_kafka
from labkit.backends.kafka import KafkaBackend
from labkit.config import Config
from labkit.errors import StackError
from labkit.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.apache_kafka]


def _free_port_pair() -> int:
    """A free port whose successor is free too (the controller's)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.fixture
def private(lab_stack: Stack, tmp_path: Path) -> Iterator[Stack]:
    """A Kafka-only Apache stack of the test's own (free ports, own home), running from the session's jars."""
    assert apache_kafka.locate(lab_stack.config) is not None, "the session's Apache Kafka runs from jars labkit finds"
    config = Config(
        redis_url=lab_stack.config.redis_url,
        kafka_bootstrap=f"127.0.0.1:{_free_port_pair()}",
        home=tmp_path / "home",
        kafka="apache",
        namespace="private-",
    )
    apache_kafka.share_jars(lab_stack.config, config)
    stack = Stack(config, services=["kafka"])
    try:
        yield stack
    finally:
        stack.down()


def _records(config: Config, topic: str, count: int) -> list[bytes]:
    reader = Consumer(
        {"bootstrap.servers": config.kafka_bootstrap, "group.id": "reader", "auto.offset.reset": "earliest"}
    )
    try:
        reader.assign([TopicPartition(topic, p, 0) for p in range(3)])
        values: list[bytes] = []
        for _ in range(200):
            values += [m.value() for m in reader.consume(count, 0.1) if m.error() is None]
            if len(values) >= count:
                break
        return values
    finally:
        reader.close()


def test_the_log_survives_down_and_up_and_the_group_keeps_its_offsets(private: Stack) -> None:
    config = private.config
    [started] = private.up(timeout=120)
    assert started.kind == f"Apache Kafka {apache_kafka.KAFKA_VERSION} (KRaft, durable)"

    async def produce() -> list[str]:
        async with KafkaBackend(config) as backend:
            return await backend.produce([{"booking_id": f"bk-{i}", "n": i} for i in range(30)])

    assert len(asyncio.run(produce())) == 30
    committer = Consumer({"bootstrap.servers": config.kafka_bootstrap, "group.id": config.names.kafka_group})
    committer.commit(offsets=[TopicPartition(config.names.topic, 0, 7)], asynchronous=False)
    committer.close()

    [stopped] = private.down()
    assert stopped.pid == started.pid
    with pytest.raises(ProcessLookupError):
        os.kill(started.pid, 0)
    log = (config.home / "logs" / "kafka.log").read_text()
    assert "[BrokerServer id=1] shut down completed" in log, "SIGTERM ran Kafka's controlled shutdown"

    [again] = private.up(timeout=120)
    assert again.pid != started.pid and again.healthy
    values = _records(config, config.names.topic, 30)
    assert sorted(json.loads(v)["booking_id"] for v in values) == sorted(f"bk-{i}" for i in range(30))
    reader = Consumer({"bootstrap.servers": config.kafka_bootstrap, "group.id": config.names.kafka_group})
    [committed] = reader.committed([TopicPartition(config.names.topic, 0)], timeout=10)
    reader.close()
    assert committed.offset == 7


def test_a_broker_that_exits_while_starting_shows_the_end_of_its_log(private: Stack) -> None:
    controller = apache_kafka.controller_port(private.config)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", controller))
        squatter.listen()
        with pytest.raises(StackError) as caught:
            private.up(timeout=120)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("kafka (") and "exited with code" in message and "while starting" in message
    assert "last lines of" in message and "Address already in use" in message, message
    assert not (private.config.home / "pids" / "kafka.pid").exists()


@pytest.mark.parametrize(
    ("meta", "complaint"),
    [
        (None, "is not a Kafka log folder (it has files but no meta.properties)"),
        ("version=1\nnode.id=2\ncluster.id=Xy\n", "holds the log of another Kafka (node.id '2', cluster.id 'Xy')"),
    ],
)
def test_a_corrupt_or_foreign_log_folder_is_one_line_and_nothing_starts(
    private: Stack, meta: str | None, complaint: str
) -> None:
    folder = apache_kafka.data_dir(private.config)
    (folder / "bookings-0").mkdir(parents=True)
    if meta is not None:
        (folder / "meta.properties").write_text(meta)
    with pytest.raises(StackError) as caught:
        private.up(timeout=60)
    assert complaint in str(caught.value) and "\n" not in str(caught.value)
    assert not (private.config.home / "pids" / "kafka.pid").exists()
    assert private.status()[0].kind == "not running"


def test_a_kafka_distribution_folder_is_run_as_it_is(
    private: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = apache_kafka.cache_dir(private.config).resolve()
    distribution = tmp_path / f"kafka_2.13-{apache_kafka.KAFKA_VERSION}"
    distribution.mkdir()
    (distribution / "libs").symlink_to(cached, target_is_directory=True)
    apache_kafka.cache_dir(private.config).unlink()  # only LABKIT_KAFKA_HOME is left to run from
    monkeypatch.setenv("LABKIT_KAFKA_HOME", str(distribution))
    [status] = private.up(timeout=120)
    assert status.healthy and status.kind == f"Apache Kafka {apache_kafka.KAFKA_VERSION} (KRaft, durable)"
    argv = Path(f"/proc/{status.pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("-cp") + 1] == f"{distribution}/libs/*"


def test_kafka_fetch_fills_an_empty_state_folder_with_the_jars(tmp_path: Path) -> None:
    env = {**os.environ, "LABKIT_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("LABKIT_KAFKA_HOME", None)
    done = subprocess.run(
        [sys.executable, "-m", "labkit", "kafka", "fetch"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    cache = tmp_path / "apache-kafka" / apache_kafka.KAFKA_VERSION / "libs"
    assert done.stdout.strip() == f"Apache Kafka {apache_kafka.KAFKA_VERSION}: cache in {cache}"
    assert "fetching Apache Kafka 4.1.1 with Maven" in done.stderr
    assert (cache / ".complete").is_file() and apache_kafka.version_of_libs(cache) == apache_kafka.KAFKA_VERSION
    jars = {p.name for p in cache.glob("*.jar")}
    assert {f"kafka_2.13-{apache_kafka.KAFKA_VERSION}.jar", "log4j-slf4j-impl-2.24.3.jar"} <= jars
    again = subprocess.run([sys.executable, "-m", "labkit", "kafka", "fetch"], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "fetching" not in again.stderr, "a filled cache is not fetched again"
