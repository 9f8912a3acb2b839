"""How faithfully a Kafka-protocol broker behaves like Apache Kafka, measured: the rows of the fidelity matrix.

Each probe runs one small experiment against the broker at ``config.kafka_bootstrap`` with
plain librdkafka clients (no labkit worker in the way), on topics and groups of its own
(``<namespace>fidelity-<probe>-<id>``, deleted afterwards), and returns a :class:`Finding`:
the figure, what it means, and whether it is what Apache Kafka does. Lessons print the figure
for the broker they run on; ``benchmarks/kafka_fidelity.py`` runs every probe on both brokers
for docs/embedded-kafka.md; tests/integration/test_kafka_fidelity.py keeps the matrix true.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic  # type: ignore[attr-defined]

from labkit.backends.kafka.settings import HEARTBEAT_INTERVAL_MS, SESSION_TIMEOUT_MS, ClientLog
from labkit.config import Config

#: Longest a probe waits for a group to hand out partitions before it reports "more than" this.
GROUP_WAIT_S = 45.0


@dataclass(frozen=True)
class Finding:
    """One measured row.

    Attributes:
        probe: the row's name (the function that measured it).
        figure: the measurement as a number (seconds, records), or None when it could not be measured.
        unit: what ``figure`` counts.
        text: the result in words, as the matrix shows it.
        kafka_like: whether it is what Apache Kafka does.
    """

    probe: str
    figure: float | None
    unit: str
    text: str
    kafka_like: bool


def _client(config: Config) -> dict[str, Any]:
    return {"bootstrap.servers": config.kafka_bootstrap, "logger": ClientLog()}


def _member(config: Config, group: str, **extra: Any) -> Consumer:
    """A group member with the lab's timeouts (session 6 s, heartbeat 2 s), eager range assignment."""
    return Consumer(
        {
            **_client(config),
            "group.id": group,
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
            "partition.assignment.strategy": "range",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **extra,
        }
    )


@contextlib.contextmanager
def _topic(config: Config, probe: str, partitions: int = 2, **topic_config: str) -> Iterator[str]:
    """A fresh topic for one probe, deleted afterwards (after every client of it has closed)."""
    name = f"{config.namespace}fidelity-{probe}-{uuid.uuid4().hex[:6]}"
    admin = AdminClient(_client(config))
    admin.create_topics([NewTopic(name, partitions, 1, config=topic_config)])[name].result(10)
    deadline = time.monotonic() + 10
    while name not in admin.list_topics(timeout=5).topics and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield name
    finally:
        with contextlib.suppress(KafkaException):
            admin.delete_topics([name])[name].result(10)


def _poll_until(consumers: list[Consumer], done: Callable[[], bool], limit_s: float) -> float | None:
    """Poll every consumer until ``done()``; seconds taken, or None past ``limit_s``."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > limit_s:
            return None
        for consumer in consumers:
            consumer.poll(0.05)
    return time.monotonic() - start


class _Tracker:
    """Keeps each consumer's current assignment from its rebalance callbacks."""

    def __init__(self) -> None:
        self.assigned: dict[int, set[int]] = {}

    def subscribe(self, consumer: Consumer, topic: str) -> None:
        key = id(consumer)
        self.assigned[key] = set()

        def on_assign(_: Consumer, partitions: list[TopicPartition]) -> None:
            self.assigned[key] = {tp.partition for tp in partitions}

        def on_revoke(_: Consumer, partitions: list[TopicPartition]) -> None:
            self.assigned[key] = set()

        consumer.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)

    def owns(self, consumer: Consumer) -> set[int]:
        return self.assigned.get(id(consumer), set())


def _seconds(probe: str, taken: float | None, what: str, apache_bound_s: float) -> Finding:
    if taken is None:
        return Finding(probe, None, "s", f"more than {GROUP_WAIT_S:.0f} s ({what} never happened)", False)
    return Finding(probe, round(taken, 2), "s", f"{taken:.1f} s", taken <= apache_bound_s)


def first_join(config: Config) -> Finding:
    """Seconds from a lone consumer's subscribe to its first assignment."""
    with _topic(config, "join") as topic:
        tracker, member = _Tracker(), _member(config, f"{topic}-g")
        try:
            tracker.subscribe(member, topic)
            taken = _poll_until([member], lambda: bool(tracker.owns(member)), GROUP_WAIT_S)
        finally:
            member.close()
    return _seconds("first_join", taken, "the first assignment", 1.0)


def rebalance_pause(config: Config) -> Finding:
    """Seconds from a second consumer's subscribe until both own partitions again (an eager rebalance)."""
    with _topic(config, "rebalance", partitions=4) as topic:
        tracker = _Tracker()
        first, second = _member(config, f"{topic}-g"), _member(config, f"{topic}-g")
        try:
            tracker.subscribe(first, topic)
            _poll_until([first], lambda: bool(tracker.owns(first)), GROUP_WAIT_S)
            tracker.subscribe(second, topic)
            taken = _poll_until(
                [first, second], lambda: bool(tracker.owns(first)) and bool(tracker.owns(second)), GROUP_WAIT_S
            )
        finally:
            first.close()
            second.close()
    return _seconds("rebalance_pause", taken, "the rebalance", 4.0)


_KILLABLE_MEMBER = textwrap.dedent(
    """
    import sys, time
    from confluent_kafka import Consumer
    bootstrap, group, topic, session_ms, heartbeat_ms = sys.argv[1:6]
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "session.timeout.ms": int(session_ms),
                  "heartbeat.interval.ms": int(heartbeat_ms), "partition.assignment.strategy": "range",
                  "enable.auto.commit": False})
    c.subscribe([topic], on_assign=lambda consumer, parts: print("assigned", len(parts), flush=True))
    while True:
        c.poll(0.1)
    """
)


def sigkill_recovery(config: Config) -> Finding:
    """Seconds from SIGKILLing one of two members until the survivor owns every partition."""
    with _topic(config, "sigkill", partitions=4) as topic:
        group = f"{topic}-g"
        victim = subprocess.Popen(
            [sys.executable, "-c", _KILLABLE_MEMBER, config.kafka_bootstrap, group, topic]
            + [str(SESSION_TIMEOUT_MS), str(HEARTBEAT_INTERVAL_MS)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        tracker, survivor = _Tracker(), _member(config, group)
        try:
            assert victim.stdout is not None
            if victim.stdout.readline().split()[:1] != ["assigned"]:
                return Finding("sigkill_recovery", None, "s", "the member to kill never joined", False)
            tracker.subscribe(survivor, topic)
            both = _poll_until([survivor], lambda: 0 < len(tracker.owns(survivor)) < 4, GROUP_WAIT_S)
            if both is None:
                return Finding("sigkill_recovery", None, "s", "the two members never shared the partitions", False)
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            taken = _poll_until([survivor], lambda: len(tracker.owns(survivor)) == 4, GROUP_WAIT_S)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            survivor.close()
    # Apache Kafka: the session expires after 6 s, then one rebalance (the survivor rejoins at once).
    return _seconds("sigkill_recovery", taken, "the hand-over", SESSION_TIMEOUT_MS / 1000 + 4)


def all_members_leave(config: Config) -> Finding:
    """Seconds until a new member gets partitions after every member of a group left at the same moment."""
    with _topic(config, "leave") as topic:
        group, tracker = f"{topic}-g", _Tracker()
        members = [_member(config, group) for _ in range(2)]
        for member in members:
            tracker.subscribe(member, topic)
        _poll_until(members, lambda: all(tracker.owns(m) for m in members), GROUP_WAIT_S)
        for member in members:
            member.close()
        newcomer = _member(config, group)
        try:
            tracker.subscribe(newcomer, topic)
            taken = _poll_until([newcomer], lambda: bool(tracker.owns(newcomer)), GROUP_WAIT_S)
        finally:
            newcomer.close()
    return _seconds("all_members_leave", taken, "a new member's assignment", 4.0)


def list_offsets_after_batches(config: Config) -> Finding:
    """The end ListOffsets(latest) reports after 3 batches of 10 records (30 is right)."""
    with _topic(config, "offsets", partitions=1) as topic:
        producer = Producer({**_client(config), "linger.ms": 50})
        for _ in range(3):
            for i in range(10):
                producer.produce(topic, f"r{i}".encode())
            producer.flush(10)
        probe = Consumer({**_client(config), "group.id": f"{topic}-probe"})
        try:
            _, end = probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=5, cached=False)
        finally:
            probe.close()
    return Finding("list_offsets_after_batches", end, "offset", f"{end} (30 is right)", end == 30)


def read_committed_hides_aborted(config: Config) -> Finding:
    """Records a read_committed consumer sees of 5 committed and 5 aborted ones (5 is right)."""
    with _topic(config, "txn", partitions=1) as topic:
        producer = Producer({**_client(config), "transactional.id": f"{topic}-tx"})
        producer.init_transactions(15)
        for verdict in ("commit", "abort"):
            producer.begin_transaction()
            for i in range(5):
                producer.produce(topic, f"{verdict}-{i}".encode())
            producer.flush(10)
            (producer.commit_transaction if verdict == "commit" else producer.abort_transaction)(15)
        reader = _member(config, f"{topic}-g", **{"isolation.level": "read_committed", "enable.partition.eof": True})
        seen: list[bytes] = []
        try:
            reader.assign([TopicPartition(topic, 0, 0)])
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                message = reader.poll(0.2)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        break
                    continue
                seen.append(message.value() or b"")
        finally:
            reader.close()
    aborted = sum(1 for v in seen if v.startswith(b"abort"))
    return Finding(
        "read_committed_hides_aborted", len(seen), "records", f"{len(seen)} seen, {aborted} of them aborted",
        aborted == 0 and len(seen) == 5,
    )  # fmt: skip


def partition_increase(config: Config) -> Finding:
    """Partitions after asking for 3 -> 4 (4 is right)."""
    with _topic(config, "grow", partitions=3) as topic:
        admin = AdminClient(_client(config))
        try:
            admin.create_partitions([NewPartitions(topic, 4)])[topic].result(10)
        except KafkaException as e:
            return Finding("partition_increase", 3, "partitions", f"refused: {e.args[0].str()}", False)
        deadline = time.monotonic() + 10
        count = 3
        while time.monotonic() < deadline and (count := len(admin.list_topics(timeout=5).topics[topic].partitions)) < 4:
            time.sleep(0.1)
    return Finding("partition_increase", count, "partitions", f"{count} partitions", count == 4)


def retention(config: Config, wait_s: float = 20.0) -> Finding:
    """Records of a closed segment still there ``wait_s`` s after retention.ms=1000 expired them (0 is right)."""
    with _topic(config, "retention", partitions=1, **{"retention.ms": "1000", "segment.ms": "500"}) as topic:
        producer = Producer(_client(config))
        for i in range(10):
            producer.produce(topic, f"old-{i}".encode())
        producer.flush(10)
        time.sleep(1.5)
        producer.produce(topic, b"new")  # rolls the segment of the old ones, which retention may then delete
        producer.flush(10)
        probe = Consumer({**_client(config), "group.id": f"{topic}-probe"})
        try:
            deadline = time.monotonic() + wait_s
            while True:
                start, _ = probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=5, cached=False)
                if start >= 10 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            probe.close()
    kept = max(10 - start, 0)
    return Finding("retention", kept, "records", f"{kept} of 10 expired records kept after {wait_s:.0f} s", kept == 0)


def restart_durability(config: Config, restart: Callable[[], None]) -> Finding:
    """Records acknowledged (acks=all) before the broker is SIGKILLed and restarted that it still has (20 is right).

    Args:
        restart: crashes the broker at ``config.kafka_bootstrap`` and starts it again (a private stack's).
    """
    topic = f"{config.namespace}fidelity-restart-{uuid.uuid4().hex[:6]}"
    admin = AdminClient(_client(config))
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(10)
    producer = Producer({**_client(config), "acks": "all"})
    for i in range(20):
        producer.produce(topic, f"kept-{i}".encode())
    producer.flush(10)
    restart()
    probe = Consumer({**_client(config), "group.id": f"{topic}-probe"})
    try:
        metadata = probe.list_topics(timeout=10)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            return Finding("restart_durability", 0, "records", "0 of 20: the topic is gone", False)
        low, high = probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)
    finally:
        probe.close()
    kept = max(high - low, 0)
    return Finding("restart_durability", kept, "records", f"{kept} of 20 kept", kept == 20)


#: The probes that need only a running broker, in the order of the matrix.
PROBES: dict[str, Callable[[Config], Finding]] = {
    "first_join": first_join,
    "rebalance_pause": rebalance_pause,
    "sigkill_recovery": sigkill_recovery,
    "all_members_leave": all_members_leave,
    "list_offsets_after_batches": list_offsets_after_batches,
    "read_committed_hides_aborted": read_committed_hides_aborted,
    "partition_increase": partition_increase,
    "retention": retention,
}
