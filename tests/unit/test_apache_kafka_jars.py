"""Where Apache Kafka's pieces come from, and the one-line answers when one is missing (no Java or broker needed)."""

from __future__ import annotations

import os
import re
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, assert_one_line_error

from labkit import apache_kafka
from labkit.config import Config
from labkit.errors import StackError
from labkit.stack import _parse_finalized_features, _uvarint


def fake_java(folder: Path, version: str) -> Path:
    """A ``java`` that only answers ``-version``, on stderr as the real one does."""
    folder.mkdir(parents=True, exist_ok=True)
    java = folder / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2025-04-15' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    return java


@pytest.fixture
def bare_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A PATH with nothing on it (no java, no mvn), and no JAVA_HOME, MAVEN_HOME or LABKIT_KAFKA_HOME."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for name in ("JAVA_HOME", "MAVEN_HOME", "LABKIT_KAFKA_HOME"):
        monkeypatch.delenv(name, raising=False)
    apache_kafka._java_version.cache_clear()
    return empty


def test_no_java_says_which_java_and_how_to_get_one(bare_path: Path) -> None:
    with pytest.raises(StackError) as caught:
        apache_kafka.find_java()
    assert str(caught.value) == (
        "Apache Kafka 4.1.1 needs Java 17 or newer: java was not found on PATH; install one "
        "(e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME to it"
    )


def test_an_old_java_is_named_and_refused(bare_path: Path) -> None:
    java = fake_java(bare_path, "11.0.21")
    with pytest.raises(StackError, match=re.escape(f"({java} is Java 11)")):
        apache_kafka.find_java()


def test_java_home_comes_before_path(bare_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_java(bare_path, "11.0.21")
    home_java = fake_java(tmp_path / "jdk" / "bin", "17.0.15")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    assert apache_kafka.find_java() == str(home_java)


def test_no_maven_and_no_jars_say_what_to_install(bare_path: Path, tmp_path: Path) -> None:
    fake_java(bare_path, "17.0.15")
    config = Config(home=tmp_path / "home")
    assert apache_kafka.locate(config) is None
    with pytest.raises(StackError) as caught:
        apache_kafka.resolve(config)
    message = str(caught.value)
    assert "Maven (mvn) was not found" in message and "LABKIT_KAFKA_HOME" in message and "\n" not in message


def test_a_kafka_home_without_libs_is_refused(bare_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABKIT_KAFKA_HOME", str(tmp_path))
    with pytest.raises(StackError, match=r"has no libs/kafka_2\.13-\*\.jar"):
        apache_kafka.locate(Config(home=tmp_path / "home"))


def test_a_kafka_home_is_used_as_it_is(bare_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    libs = tmp_path / "kafka_2.13-4.2.0" / "libs"
    libs.mkdir(parents=True)
    (libs / "kafka_2.13-4.2.0.jar").touch()
    (libs / "kafka-clients-4.2.0.jar").touch()
    monkeypatch.setenv("LABKIT_KAFKA_HOME", str(libs.parent))
    found = apache_kafka.locate(Config(home=tmp_path / "home"))
    assert found is not None and (found.libs, found.version) == (libs, "4.2.0")
    assert found.classpath == f"{libs}/*"


def test_a_cache_counts_only_once_complete(bare_path: Path, tmp_path: Path) -> None:
    config = Config(home=tmp_path)
    cache = apache_kafka.cache_dir(config)
    cache.mkdir(parents=True)
    (cache / f"kafka_2.13-{apache_kafka.KAFKA_VERSION}.jar").touch()
    assert apache_kafka.locate(config) is None, "a fetch that did not finish is not used"
    (cache / ".complete").write_text("4.1.1\n")
    found = apache_kafka.locate(config)
    assert found is not None and found.libs == cache and found.version == apache_kafka.KAFKA_VERSION


def test_the_shipped_pom_fetches_the_version_the_lab_runs() -> None:
    pom = apache_kafka.POM.read_text()
    assert f"<kafka.version>{apache_kafka.KAFKA_VERSION}</kafka.version>" in pom
    assert "<artifactId>kafka_2.13</artifactId>" in pom and "<artifactId>log4j-slf4j-impl</artifactId>" in pom
    assert apache_kafka.LOG_CONFIG.is_file()


def test_server_properties_keep_the_broker_on_loopback_and_its_log_in_the_state_folder(tmp_path: Path) -> None:
    config = Config(kafka_bootstrap="127.0.0.1:29092", home=tmp_path)
    settings = dict(line.split("=", 1) for line in apache_kafka.server_properties(config).splitlines())
    assert settings["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert settings["advertised.listeners"] == settings["listeners"]
    assert settings["controller.quorum.bootstrap.servers"] == "127.0.0.1:29093"
    assert settings["log.dirs"] == str(tmp_path / "apache-kafka" / "data-29092")
    assert settings["process.roles"] == "broker,controller" and settings["node.id"] == "1"
    assert settings["offsets.topic.replication.factor"] == settings["offsets.topic.num.partitions"] == "1"
    assert settings["group.initial.rebalance.delay.ms"] == "0"


def test_a_log_folder_is_formatted_only_when_empty_and_refused_when_foreign(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    assert apache_kafka.check_log_folder(folder) is False  # missing: format it
    folder.mkdir()
    assert apache_kafka.check_log_folder(folder) is False  # empty: format it
    (folder / "bookings-0").mkdir()
    with pytest.raises(StackError, match=r"is not a Kafka log folder \(it has files but no meta.properties\)"):
        apache_kafka.check_log_folder(folder)
    (folder / "meta.properties").write_text("version=1\nnode.id=3\ncluster.id=abc\n")
    with pytest.raises(StackError, match=r"holds the log of another Kafka \(node.id '3'"):
        apache_kafka.check_log_folder(folder)
    (folder / "meta.properties").write_text("#written by kafka\nversion=1\nnode.id=1\ncluster.id=abc\n")
    assert apache_kafka.check_log_folder(folder) is True


def test_cluster_ids_look_like_kafkas() -> None:
    ids = {apache_kafka.new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) and not i.startswith("-") for i in ids)


def test_the_version_is_read_from_what_the_broker_logged() -> None:
    log = "[x] INFO Kafka version: 4.0.0 (AppInfoParser)\n...\n[y] INFO Kafka version: 4.1.1 (AppInfoParser)\n"
    assert apache_kafka.logged_version(log) == "4.1.1"
    assert apache_kafka.logged_version("nothing yet") is None


def _compact(text: str) -> bytes:
    return _uvarint(len(text) + 1) + text.encode()


def test_finalized_features_are_read_from_an_api_versions_v3_answer() -> None:
    api_keys = _uvarint(2 + 1) + b"".join(struct.pack(">hhh", k, 0, 4) + b"\x00" for k in (0, 18))
    features = _uvarint(2 + 1) + b"".join(
        _compact(name) + struct.pack(">hh", level, 1) + b"\x00" for name, level in (("metadata.version", 27), ("x", 2))
    )
    supported = _uvarint(0 + 1)
    tagged = _uvarint(2) + _uvarint(0) + _uvarint(len(supported)) + supported
    tagged += _uvarint(2) + _uvarint(len(features)) + features
    answer = struct.pack(">ih", 0x1AB, 0) + api_keys + struct.pack(">i", 0) + tagged
    assert _parse_finalized_features(answer) == {"metadata.version": 27, "x": 2}
    # Tansu and brokers without features answer no tagged fields: nothing finalised.
    assert _parse_finalized_features(struct.pack(">ih", 0x1AB, 0) + api_keys + struct.pack(">i", 0) + b"\x00") == {}
    # An error code (e.g. UNSUPPORTED_VERSION) means no features either.
    assert _parse_finalized_features(struct.pack(">ih", 0x1AB, 35) + b"\x00" * 8) == {}


def _labkit(*args: str, path: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": str(path),
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "LABKIT_HOME": str(home / ".labkit"),
        "LABKIT_REDIS_URL": "redis://127.0.0.1:1/0",
        "LABKIT_KAFKA_BOOTSTRAP": "127.0.0.1:1",
    }
    return subprocess.run([sys.executable, "-m", "labkit", *args], capture_output=True, text=True, env=env, timeout=60)


def test_up_apache_without_java_is_one_line(bare_path: Path, tmp_path: Path) -> None:
    line = assert_one_line_error(_labkit("up", "--kafka", "apache", path=bare_path, home=tmp_path))
    assert line.startswith("Error: Apache Kafka 4.1.1 needs Java 17 or newer: java was not found on PATH")


def test_kafka_fetch_without_maven_is_one_line(bare_path: Path, tmp_path: Path) -> None:
    fake_java(bare_path, "17.0.15")
    line = assert_one_line_error(_labkit("kafka", "fetch", path=bare_path, home=tmp_path))
    assert "Maven (mvn) was not found" in line
    assert not (tmp_path / ".labkit" / "apache-kafka" / apache_kafka.KAFKA_VERSION / "libs").exists()


def test_a_bad_kafka_choice_is_one_line(tmp_path: Path) -> None:
    line = assert_one_line_error(_labkit("up", "--kafka", "confluent", path=Path(os.defpath), home=tmp_path), code=2)
    assert "'confluent' is not one of 'embedded', 'apache'" in line
