"""The Kafka backend, one module per role.

- ``backend``: :class:`KafkaBackend`, the lab's interface (setup, produce, consume, dead letters, depths);
- ``member``: one worker's membership of the consumer group (poll, in-order handling, commits, retries);
- ``producer``: sending records with acks=all and reporting where each landed;
- ``admin``: topics and the group (create, delete, committed offsets);
- ``lag``: how far the group is behind, measured the way that is right on every broker;
- ``records``: a record's place, headers and fetching; ``settings``: every client's librdkafka settings;
- ``quirks``: where the embedded broker differs from Apache Kafka, and the repairs for it (counted).
"""

from labkit.backends.kafka.backend import KafkaBackend
from labkit.backends.kafka.settings import DEFAULT_PARTITIONS, DLQ_PARTITIONS, MAX_MESSAGE_BYTES

__all__ = ["DEFAULT_PARTITIONS", "DLQ_PARTITIONS", "MAX_MESSAGE_BYTES", "KafkaBackend"]
