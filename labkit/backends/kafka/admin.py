"""Topics and the consumer group: create them, delete them, and read or move where the group stands.

Blocking calls, run in a thread by the backend. Every answer the broker does not give in time
becomes :class:`~labkit.errors.BrokerUnavailable`; every refusal a one-line
:class:`~labkit.errors.BackendError`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # documented import path

from labkit.backends.kafka import topic_changes
from labkit.backends.kafka.settings import CONNECT_TIMEOUT_S, client_config, unavailable
from labkit.errors import BackendError

#: How long creating or deleting topics may take to show in the metadata (deletion is asynchronous on Kafka).
TOPIC_WAIT_S = 15.0


class TopicAdmin:
    """An admin client for one broker, made on first use."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._client: AdminClient | None = None

    @property
    def client(self) -> AdminClient:
        if self._client is None:
            self._client = AdminClient(client_config(self.bootstrap))
        return self._client

    def result(self, future: Future[Any]) -> Any:
        """The answer to one admin request; KafkaException for a refusal, BrokerUnavailable for no answer."""
        try:
            return future.result(timeout=CONNECT_TIMEOUT_S + 2)
        except TimeoutError:
            raise unavailable(self.bootstrap) from None

    def topic_partitions(self) -> dict[str, int]:
        """Existing topics and their partition counts.

        The metadata of all topics is asked for, never of one by name: a metadata request
        naming a missing topic makes the embedded broker create it (with 4 partitions).
        """
        try:
            metadata = self.client.list_topics(timeout=CONNECT_TIMEOUT_S)
        except KafkaException:
            raise unavailable(self.bootstrap) from None
        return {name: len(topic.partitions) for name, topic in metadata.topics.items() if topic.error is None}

    def create_missing(self, wanted: dict[str, int]) -> dict[str, int]:
        """Create the topics of ``wanted`` (name -> partitions) that do not exist; returns every topic's count.

        Raises:
            BackendError: a topic could not be created, or did not appear in time.
        """
        with topic_changes.changing(self.bootstrap):  # no reader of ours sees a topic re-created
            existing = self.topic_partitions()
            deadline = time.monotonic() + TOPIC_WAIT_S
            while missing := [NewTopic(t, n, 1) for t, n in wanted.items() if t not in existing]:
                futures = self.client.create_topics(missing, request_timeout=CONNECT_TIMEOUT_S)
                for topic, future in futures.items():
                    try:
                        self.result(future)
                    except KafkaException as e:
                        # Already there (a concurrent setup), or on Apache Kafka still marked for deletion: look again.
                        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                            raise BackendError(f"could not create Kafka topic {topic!r}: {e.args[0].str()}") from None
                existing = self.topic_partitions()
                if any(t not in existing for t in wanted):
                    if time.monotonic() > deadline:
                        missed = sorted(set(wanted) - set(existing))
                        raise BackendError(f"Kafka topics {missed} did not appear; try again")
                    time.sleep(0.2)
            return existing

    def delete_topics(self, topics: list[str]) -> None:
        """Delete those of ``topics`` that exist, and wait until they are gone (so they can be created again).

        Raises:
            BackendError: the broker refused, or they were still being deleted after a while.
        """
        with topic_changes.changing(self.bootstrap):
            present = [t for t in topics if t in self.topic_partitions()]
            if present:
                for topic, future in self.client.delete_topics(present, request_timeout=CONNECT_TIMEOUT_S).items():
                    try:
                        self.result(future)
                    except KafkaException as e:
                        if e.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                            raise BackendError(f"could not delete Kafka topic {topic!r}: {e.args[0].str()}") from None
            deadline = time.monotonic() + TOPIC_WAIT_S
            while any(t in self.topic_partitions() for t in topics):
                if time.monotonic() > deadline:
                    raise BackendError(f"Kafka topics {topics} are still being deleted; try again")
                time.sleep(0.2)

    def delete_group(self, group: str) -> None:
        """Delete a consumer group that has no members (a missing one is fine).

        Raises:
            BackendError: it has live members (Apache Kafka refuses; the embedded broker would disconnect them).
        """
        for future in self.client.delete_consumer_groups([group], request_timeout=CONNECT_TIMEOUT_S).values():
            try:
                self.result(future)
            except KafkaException as e:
                code = e.args[0].code()
                if code == KafkaError.NON_EMPTY_GROUP:
                    raise BackendError(f"consumer group {group!r} has live workers; stop them first") from None
                if code != KafkaError.GROUP_ID_NOT_FOUND:
                    raise BackendError(f"could not delete consumer group {group!r}: {e.args[0].str()}") from None

    def committed(self, group: str, topics: list[str]) -> list[TopicPartition]:
        """The offsets ``group`` has committed on the partitions of ``topics`` (partitions without one left out)."""
        counts = self.topic_partitions()
        partitions = [TopicPartition(t, p) for t in topics for p in range(counts.get(t, 0))]
        # This consumer never subscribes: it only reads the group's committed offsets.
        reader = Consumer({**client_config(self.bootstrap), "group.id": group, "enable.auto.commit": False})
        try:
            return [tp for tp in reader.committed(partitions, timeout=CONNECT_TIMEOUT_S) if tp.offset >= 0]
        finally:
            reader.close()

    def commit(self, group: str, offsets: list[TopicPartition]) -> None:
        """Commit ``offsets`` for ``group`` without joining it (the group must have no members)."""
        writer = Consumer({**client_config(self.bootstrap), "group.id": group, "enable.auto.commit": False})
        try:
            writer.commit(offsets=offsets, asynchronous=False)
        finally:
            writer.close()
