"""Where the lab's brokers are, what its queues are called, and where it keeps state.

Everything has a localhost default so that a learner never has to configure anything;
environment variables point the lab at another stack (the docker compose one, a test
stack on other ports) without editing a notebook.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

from labkit.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:9092"

#: Prefix of every key labkit itself writes in Redis (effects, counters), so that a learner
#: can find them with ``redis-cli --scan --pattern 'lab:*'``.
KEY_PREFIX = "lab:"

BACKENDS = ("bullmq", "streams", "kafka")
#: Which Kafka-protocol broker ``labkit up`` starts: Tansu (embedded, memory only; the default, needs only
#: Python) or Apache Kafka (KRaft, durable; needs Java 17 and Maven or LABKIT_KAFKA_HOME).
KAFKA_BROKERS = ("embedded", "apache")

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9._-]{0,64}$")


@dataclass(frozen=True)
class Names:
    """The wire names of docs/contract.md, each with the namespace prefix applied."""

    namespace: str = ""

    def _n(self, name: str) -> str:
        return f"{self.namespace}{name}"

    @property
    def bullmq_queue(self) -> str:
        return self._n("bookings")

    @property
    def bullmq_dlq(self) -> str:
        return self._n("bookings-dlq")

    @property
    def stream(self) -> str:
        return self._n("bookings")

    @property
    def stream_dlq(self) -> str:
        return self._n("bookings:dlq")

    @property
    def stream_delayed(self) -> str:
        """Sorted set of delayed bookings (score: due time in ms), moved into the stream when due: the lab's pattern."""
        return self._n("bookings:delayed")

    @property
    def stream_group(self) -> str:
        return self._n("booking-workers")

    @property
    def topic(self) -> str:
        return self._n("bookings")

    @property
    def topic_retry(self) -> str:
        """Delayed-retry topic: failed bookings wait here so the main partition keeps moving."""
        return self._n("bookings.retry")

    @property
    def topic_delay(self) -> str:
        """Delayed-booking topic: records wait here for their ``not_before`` time, as retries do: the lab's pattern."""
        return self._n("bookings.delay")

    @property
    def topic_dlq(self) -> str:
        return self._n("bookings.dlq")

    @property
    def kafka_group(self) -> str:
        return self._n("booking-workers")

    def key(self, backend: str, *parts: str) -> str:
        """A Redis key of labkit's own bookkeeping, e.g. ``lab:streams:completed``."""
        return ":".join((f"{KEY_PREFIX}{self.namespace}{backend}", *parts))


def parse_redis_url(url: str) -> tuple[str, int, int]:
    """Split ``redis://host:port/db`` into its parts.

    Raises:
        ConfigError: the URL is not a plain ``redis://`` URL.
    """
    parsed = urlparse(url)
    if parsed.scheme != "redis":
        raise ConfigError(f"unsupported scheme {parsed.scheme!r} in LABKIT_REDIS_URL {url!r}; use redis://host:port/db")
    try:
        port = parsed.port or 6379
        db = int(parsed.path.lstrip("/") or 0)
    except ValueError:
        raise ConfigError(f"bad port or database number in LABKIT_REDIS_URL {url!r}") from None
    return parsed.hostname or "127.0.0.1", port, db


def parse_bootstrap(bootstrap: str) -> tuple[str, int]:
    """Split the first ``host:port`` of a Kafka bootstrap list.

    Raises:
        ConfigError: no port, or a port that is not a number.
    """
    first = bootstrap.split(",")[0].strip()
    host, sep, port = first.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"bad LABKIT_KAFKA_BOOTSTRAP {bootstrap!r}; use host:port, e.g. {DEFAULT_KAFKA_BOOTSTRAP}")
    return host, int(port)


def _default_home() -> Path:
    return Path(os.environ.get("LABKIT_HOME") or Path.home() / ".labkit")


@dataclass(frozen=True)
class Config:
    """Addresses, namespace and state folder of one lab.

    Args:
        redis_url: the Redis (or Valkey) server holding BullMQ, Streams and labkit's effects.
        kafka_bootstrap: the Kafka-protocol broker.
        namespace: prefix of every queue, stream, topic, group and key, so that tests and
            lessons can share one stack without touching each other.
        home: state folder: pid files, logs, Redis AOF, and the ``runs/`` of worker event logs.
        kafka: which broker ``labkit up`` starts at ``kafka_bootstrap``: ``"embedded"`` (Tansu) or
            ``"apache"`` (Apache Kafka). A broker that already answers there is used whatever this says.
    """

    redis_url: str = DEFAULT_REDIS_URL
    kafka_bootstrap: str = DEFAULT_KAFKA_BOOTSTRAP
    namespace: str = ""
    home: Path = field(default_factory=_default_home)
    kafka: str = "embedded"

    def __post_init__(self) -> None:
        parse_redis_url(self.redis_url)
        parse_bootstrap(self.kafka_bootstrap)
        if not _NAMESPACE_RE.match(self.namespace):
            raise ConfigError(
                f"bad LABKIT_NAMESPACE {self.namespace!r}; use up to 64 of A-Za-z0-9._- (it prefixes topic names)"
            )
        if self.kafka not in KAFKA_BROKERS:
            raise ConfigError(f"bad LABKIT_KAFKA {self.kafka!r}; choose from {', '.join(KAFKA_BROKERS)}")

    @classmethod
    def from_env(cls, **overrides: object) -> Config:
        """Read ``LABKIT_REDIS_URL``, ``LABKIT_KAFKA_BOOTSTRAP``, ``LABKIT_NAMESPACE``, ``LABKIT_HOME`` and
        ``LABKIT_KAFKA``."""
        env = os.environ
        values: dict[str, object] = {
            "redis_url": env.get("LABKIT_REDIS_URL") or DEFAULT_REDIS_URL,
            "kafka_bootstrap": env.get("LABKIT_KAFKA_BOOTSTRAP") or DEFAULT_KAFKA_BOOTSTRAP,
            "namespace": env.get("LABKIT_NAMESPACE", ""),
            "home": _default_home(),
            "kafka": env.get("LABKIT_KAFKA") or "embedded",
        }
        values.update(overrides)
        values["home"] = Path(str(values["home"])).expanduser()
        return cls(**values)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> Config:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The environment variables that make a child process see this same config."""
        return {
            "LABKIT_REDIS_URL": self.redis_url,
            "LABKIT_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "LABKIT_NAMESPACE": self.namespace,
            "LABKIT_HOME": str(self.home),
            "LABKIT_KAFKA": self.kafka,
        }

    @property
    def names(self) -> Names:
        return Names(self.namespace)

    @property
    def redis_address(self) -> tuple[str, int, int]:
        return parse_redis_url(self.redis_url)

    @property
    def kafka_address(self) -> tuple[str, int]:
        return parse_bootstrap(self.kafka_bootstrap)

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


def check_backend(name: str) -> str:
    """Return ``name`` if it is a backend, else raise a ConfigError listing the choices."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name
