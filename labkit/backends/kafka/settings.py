"""The librdkafka settings of every Kafka client the lab runs, and why each differs from the default.

One place for them, so that the workers, the comparison harness's consumers, the lessons'
own producers and the tests all talk to the broker the same way. Every setting here is right
on Apache Kafka and on the embedded broker; the ones chosen because of the embedded broker say
so, and ``labkit.backends.kafka.quirks`` lists them with the broker behaviour they answer.
"""

from __future__ import annotations

import logging
from typing import Any

from labkit.config import Names
from labkit.errors import BrokerUnavailable

#: librdkafka's own log lines (connection failures, rebalances), at DEBUG: labkit reports what matters itself.
client_log = logging.getLogger("labkit.backends.kafka.client")

DEFAULT_PARTITIONS = 3
#: One partition: the dead letters read back in the order they were written, and they are few.
DLQ_PARTITIONS = 1
#: Same as Kafka's ``message.max.bytes``, enforced by the producer, since the embedded broker enforces none.
MAX_MESSAGE_BYTES = 1_000_000

CONNECT_TIMEOUT_S = 3.0
#: A record not acknowledged within this long fails its produce() (broker gone) instead of hanging.
MESSAGE_TIMEOUT_MS = 10_000
#: The smallest session Apache Kafka accepts by default (``group.min.session.timeout.ms``): a dead worker's
#: partitions move after 6 s, not 45. The embedded broker holds every JoinGroup for half of it.
SESSION_TIMEOUT_MS = 6_000
HEARTBEAT_INTERVAL_MS = 2_000
AUTO_COMMIT_INTERVAL_MS = 500
#: An empty fetch waits this long on the broker: p50 latency ~30 ms on the embedded broker instead of ~200.
FETCH_WAIT_MAX_MS = 100
DEFAULT_MAX_POLL_INTERVAL_MS = 30_000


class ClientLog:
    """librdkafka logs through this instead of stderr, demoted to DEBUG.

    A broker that is down makes librdkafka log every reconnect attempt as an error; labkit
    already says so once (BrokerUnavailable), so a notebook cell should not fill with them.
    See them with ``logging.getLogger("labkit.backends.kafka.client").setLevel(logging.DEBUG)``.
    """

    def log(self, level: int, message: str, *args: Any) -> None:
        client_log.debug(message, *args)


def client_config(bootstrap: str) -> dict[str, Any]:
    """What every client shares: the broker's address and the quiet log."""
    return {"bootstrap.servers": bootstrap, "logger": ClientLog()}


def producer_config(bootstrap: str) -> dict[str, Any]:
    """The lab's producer: nothing reported as sent can be lost, reordered or doubled by a retry."""
    return {
        **client_config(bootstrap),
        "client.id": "labkit-producer",
        "acks": "all",
        # No duplicates or reordering when librdkafka retries a lost Produce response.
        "enable.idempotence": True,
        # Wait up to 5 ms to batch records: cheap latency, far fewer requests.
        "linger.ms": 5,
        "message.max.bytes": MAX_MESSAGE_BYTES,
        "message.timeout.ms": MESSAGE_TIMEOUT_MS,
        # The Java client's partitioner: a key lands where a Java or kafka-python producer puts it.
        "partitioner": "murmur2_random",
        # A missing topic is an error, not a topic made with the broker's default partition count.
        "allow.auto.create.topics": False,
    }


def group_consumer_config(
    names: Names, bootstrap: str, client_id: str, max_poll_ms: int = DEFAULT_MAX_POLL_INTERVAL_MS
) -> dict[str, Any]:
    """The settings of every group member the lab runs: workers and the comparison harness alike."""
    return {
        **client_config(bootstrap),
        "client.id": client_id,
        "group.id": names.kafka_group,
        # At-least-once: librdkafka commits only offsets we stored, after the handler finished.
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "auto.commit.interval.ms": AUTO_COMMIT_INTERVAL_MS,
        # Work sent before any worker started is processed (the contract).
        "auto.offset.reset": "earliest",
        "session.timeout.ms": SESSION_TIMEOUT_MS,
        "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
        "max.poll.interval.ms": max_poll_ms,
        "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
        # Eager range assignment: cooperative-sticky takes 7-12 s per join on the embedded broker.
        "partition.assignment.strategy": "range",
    }


def unavailable(bootstrap: str) -> BrokerUnavailable:
    """The one-line error for a broker that does not answer."""
    return BrokerUnavailable(f"Kafka is not answering at {bootstrap}; start the lab with `labkit up`")
