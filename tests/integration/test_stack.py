"""The local stack: `up` starts real servers on 127.0.0.1 only, reuses what already runs, refuses what it cannot use
(quickly, never hanging), and `down` stops exactly what `up` started.

Tests that start servers of their own use other ports (the session's + 10) and state folders, so they never fight the
session stack.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labkit import apache_kafka
from labkit.config import Config
from labkit.errors import BrokerUnavailable, StackError
from labkit.stack import KAFKA_CLUSTER_ID, MIN_REDIS_VERSION, Stack

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.kafka]


def _listening_hosts(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port``, read from /proc/net/tcp and tcp6."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                hosts.add(str(ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))))
    return hosts


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (zombies have an empty one)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _servers_on(port: int) -> list[int]:
    """Pids of the servers labkit runs for ``port``: Redis and Tansu name the address, Apache Kafka its properties."""
    return sorted(set(_processes_mentioning(f"127.0.0.1:{port}")) | set(_processes_mentioning(f"server-{port}.")))


def _assert_nothing_runs(home: Path, *ports: int) -> None:
    """No server listens on ``ports`` or is still alive for them, and ``home`` holds no pid file."""
    for port in ports:
        assert _listening_hosts(port) == set()
        assert _servers_on(port) == []
    assert not list(home.glob("pids/*"))


def _ports(config: Config) -> tuple[int, int]:
    return config.redis_address[1], config.kafka_address[1]


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts connections and never answers, like a stuck program that is neither Redis nor Kafka."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.fixture
def old_redis() -> Iterator[int]:
    """A port where a fake Redis 5.0.7 answers (Ubuntu 20.04's version, older than the lab needs)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def reply(command: bytes) -> bytes:
        if command == b"PING":
            return b"+PONG\r\n"
        if command == b"INFO":
            body = b"# Server\r\nredis_version:5.0.7\r\nprocess_id:1\r\n"
            return b"$%d\r\n%s\r\n" % (len(body), body)
        return b"-ERR unknown command\r\n"  # as Redis 5 answers HELLO and CLIENT SETINFO

    def answer(conn: socket.socket) -> None:
        # One reply per command, however the commands arrive: redis-py sends its connect-time CLIENT SETINFO
        # pair back to back before reading either reply, so one read can hold two commands, or half of one.
        pending = b""
        with conn, contextlib.suppress(OSError):
            while chunk := conn.recv(4096):
                pending += chunk
                while (command := _first_resp_command(pending)) is not None:
                    name, size = command
                    pending = pending[size:]
                    conn.sendall(reply(name.upper()))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed at teardown
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        server.close()


def _first_resp_command(data: bytes) -> tuple[bytes, int] | None:
    """The name of the first whole RESP command in ``data`` (``*<n>`` then n bulk strings) and its length in bytes."""
    if not data.startswith(b"*") or (end := data.find(b"\r\n")) < 0:
        return None
    at, name = end + 2, b""
    for i in range(int(data[1:end])):
        if (end := data.find(b"\r\n", at)) < 0:
            return None
        length = int(data[at + 1 : end])  # "$<length>"
        if len(data) < end + 2 + length + 2:
            return None
        if i == 0:
            name = data[end + 2 : end + 2 + length]
        at = end + 2 + length + 2
    return name, at


def _extra_config(lab_stack: Stack, home: Path) -> Config:
    """Ports next to the session stack's, for tests that start servers of their own (Apache Kafka: from its jars)."""
    config = Config(
        redis_url=f"redis://127.0.0.1:{lab_stack.config.redis_address[1] + 10}/0",
        kafka_bootstrap=f"127.0.0.1:{lab_stack.config.kafka_address[1] + 10}",
        home=home,
        kafka=lab_stack.config.kafka,
    )
    apache_kafka.share_jars(lab_stack.config, config)
    return config


def test_up_started_both_servers_and_they_are_healthy(lab_stack: Stack) -> None:
    statuses = lab_stack.status()
    assert [s.service for s in statuses] == ["redis", "kafka"]
    for s in statuses:
        assert s.healthy, s.detail
        assert s.pid is not None and s.started_by == f"labkit (pid {s.pid})", (
            f"{s.service} was already running ({s.started_by}): left by an earlier session? Stop it, or set "
            "LABKIT_TEST_REDIS_PORT / LABKIT_TEST_KAFKA_PORT"
        )
        assert (lab_stack.config.home / "pids" / f"{s.service}.pid").read_text().strip() == str(s.pid)
        assert s.binary and Path(s.binary).is_file()


def test_servers_listen_on_loopback_only(lab_stack: Stack) -> None:
    assert _listening_hosts(lab_stack.config.redis_address[1]) == {"127.0.0.1"}
    assert _listening_hosts(lab_stack.config.kafka_address[1]) == {"127.0.0.1"}


def test_status_names_the_servers_and_their_versions(lab_stack: Stack) -> None:
    redis, kafka = lab_stack.status()
    match = re.fullmatch(r"(Valkey|Redis) (\d+)\.(\d+)\.(\d+)", redis.kind)
    assert match, redis.kind
    assert (int(match[2]), int(match[3])) >= MIN_REDIS_VERSION
    expected = {
        "embedded": r"Tansu \d+\.\d+\.\d+\S* \(embedded, memory only\)",
        "apache": rf"Apache Kafka {re.escape(apache_kafka.KAFKA_VERSION)} \(KRaft, durable\)",
    }
    assert re.fullmatch(expected[lab_stack.config.kafka], kafka.kind), kafka.kind


def test_up_again_reuses_the_running_servers(lab_stack: Stack) -> None:
    before = {s.service: s.pid for s in lab_stack.status()}
    again = Stack(lab_stack.config).up(timeout=10)
    assert {s.service: s.pid for s in again} == before
    assert all(s.healthy and s.started_by == f"labkit (pid {s.pid})" for s in again)
    for port in _ports(lab_stack.config):
        assert len(_servers_on(port)) == 1


def test_a_port_held_by_something_else_fails_fast(silent_listener: int, tmp_path: Path) -> None:
    config = Config(redis_url=f"redis://127.0.0.1:{silent_listener}/0", kafka_bootstrap=f"127.0.0.1:{_free_port()}")
    config = config.with_(home=tmp_path)
    start = time.monotonic()
    with pytest.raises(StackError) as caught:
        Stack(config).up()
    assert time.monotonic() - start < 5
    assert str(caught.value) == (
        f"127.0.0.1:{silent_listener} is in use by something that is not Redis; stop it or set LABKIT_REDIS_URL"
    )
    _assert_nothing_runs(config.home, config.kafka_address[1])


def test_a_kafka_port_held_by_something_else_fails_fast(lab_stack: Stack, silent_listener: int) -> None:
    config = lab_stack.config.with_(kafka_bootstrap=f"127.0.0.1:{silent_listener}")
    start = time.monotonic()
    with pytest.raises(StackError, match=rf"^127\.0\.0\.1:{silent_listener} is in use by .* not a Kafka-protocol"):
        Stack(config).up()
    assert time.monotonic() - start < 5


def test_a_redis_older_than_6_2_is_refused(old_redis: int, tmp_path: Path) -> None:
    config = Config(redis_url=f"redis://127.0.0.1:{old_redis}/0", kafka_bootstrap=f"127.0.0.1:{_free_port()}")
    config = config.with_(home=tmp_path)
    with pytest.raises(StackError, match=rf"^Redis 5\.0\.7 at 127\.0\.0\.1:{old_redis} is too old: .*Redis 6\.2\+"):
        Stack(config).up()
    redis, _kafka = Stack(config).status()
    assert (redis.healthy, redis.started_by) == (False, "external")
    assert "too old" in redis.detail


def test_nothing_is_started_for_a_remote_address(tmp_path: Path) -> None:
    # 127.0.0.2 is not an address `labkit up` serves, so it counts as someone else's server; being loopback,
    # the probe never leaves this machine.
    config = Config(redis_url="redis://127.0.0.2:6379/0", kafka_bootstrap=f"127.0.0.1:{_free_port()}", home=tmp_path)
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"^nothing answers at 127\.0\.0\.2:6379 \(LABKIT_REDIS_URL\)"):
        Stack(config).up()
    assert time.monotonic() - start < 5
    assert _listening_hosts(config.kafka_address[1]) == set()


def _fake_redis_server(folder: Path, version: str, then: str) -> Path:
    """An executable named redis-server that reports ``version`` and, when started, runs the shell code ``then``."""
    folder.mkdir()
    script = folder / "redis-server"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "Redis server v={version} sha=00000000:0"; exit 0; fi\n'
        f"{then}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_a_server_dying_at_start_is_reported_and_the_rest_stopped(
    lab_stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _fake_redis_server(tmp_path / "bin", "7.2.4", 'echo "FATAL: cannot open the AOF (simulated)" >&2; exit 1')
    monkeypatch.setenv("LABKIT_REDIS_SERVER", str(script))
    config = _extra_config(lab_stack, tmp_path / "home")
    with pytest.raises(StackError) as caught:
        Stack(config).up(timeout=20)
    message = str(caught.value)
    assert message.startswith(f"redis ({script}) exited with code 1 while starting; last lines of ")
    assert message.endswith("redis.log: FATAL: cannot open the AOF (simulated)")
    _assert_nothing_runs(config.home, *_ports(config))  # the broker it had started alongside is stopped again


def test_a_server_that_never_answers_times_out_with_its_log(
    lab_stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "fake.pid"
    then = f'echo $$ > {pid_file}; echo "waiting for a disk that never comes (simulated)"; exec sleep 60'
    monkeypatch.setenv("LABKIT_REDIS_SERVER", str(_fake_redis_server(tmp_path / "bin", "7.2.4", then)))
    config = _extra_config(lab_stack, tmp_path / "home")
    start = time.monotonic()
    with pytest.raises(StackError) as caught:
        Stack(config).up(timeout=1.5)
    # It gave up rather than waiting for the fake server, which would answer never (it sleeps 60 s); how long
    # giving up takes on top of the 1.5 s is the machine's (9.5 s was seen on a loaded runner), not the check's.
    assert time.monotonic() - start < 45
    assert re.fullmatch(
        rf"redis at {config.redis_address[0]}:{config.redis_address[1]} was not healthy within 1\.5 s "
        r"\(Connection refused\); last lines of \S+/redis\.log: waiting for a disk that never comes \(simulated\)",
        str(caught.value),
    ), str(caught.value)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    _assert_nothing_runs(config.home, *_ports(config))


def test_a_redis_binary_older_than_6_2_is_refused(
    lab_stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _fake_redis_server(tmp_path / "bin", "6.0.16", "exit 1")
    monkeypatch.setenv("LABKIT_REDIS_SERVER", str(script))
    config = _extra_config(lab_stack, tmp_path / "home")
    with pytest.raises(StackError, match=r"^LABKIT_REDIS_SERVER=.* cannot be used: Redis 6\.0\.16 is older than 6\.2"):
        Stack(config).up()
    _assert_nothing_runs(config.home, *_ports(config))


def test_down_stops_only_what_up_started(lab_stack: Stack, tmp_path: Path) -> None:
    owner = Stack(_extra_config(lab_stack, tmp_path / "owner"))
    started = owner.up()
    pids = {s.service: s.pid for s in started}
    assert all(s.healthy and s.started_by.startswith("labkit") for s in started)
    try:
        # Another state folder sees the same servers as external: it reuses them, and its down leaves them alone.
        other = Stack(owner.config.with_(home=tmp_path / "other"))
        seen = other.up(timeout=10)
        assert [(s.started_by, s.pid, s.healthy) for s in seen] == [("external", None, True)] * 2
        if owner.config.kafka == "embedded":
            assert seen[1].kind == f"Kafka-protocol broker (cluster id {KAFKA_CLUSTER_ID})"
        else:  # read from the broker's own answer (ApiVersions features), not from a pid file
            assert seen[1].kind.startswith("Apache Kafka 4.1 (KRaft, metadata.version 4.1-IV1"), seen[1].kind
        assert other.down() == []
        assert {s.service: s.pid for s in owner.status() if s.healthy} == pids
    finally:
        stopped = owner.down()
    assert {s.service: s.pid for s in stopped} == pids
    for pid in pids.values():
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    _assert_nothing_runs(owner.config.home, *_ports(owner.config))
    assert [(s.healthy, s.kind, s.started_by) for s in owner.status()] == [(False, "not running", "")] * 2
    assert owner.down() == []
