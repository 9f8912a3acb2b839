"""Where the embedded broker (Tansu) differs from Apache Kafka, and what the Kafka backend does about it.

One module for every workaround, so that each can be counted, checked on Apache Kafka, and
one day deleted. Two kinds:

- **Settings** that are always on and right on both brokers (a session timeout, lag taken from
  a Fetch response, ...): :data:`QUIRKS` names them, with the broker behaviour each answers.
- **Repairs** that act when the broker has left the group or the producer in a state Apache
  Kafka never leaves them in. Each one is counted when it fires (:class:`Repairs`: a Redis hash
  per namespace, plus a ``broker_repair`` event in the worker's log), and the
  ``broker_repairs`` option (``on``, the default, or ``off``) turns the group repairs off, so a
  drill can show what a run on Apache Kafka does without them (docs/embedded-kafka.md).

The measured figures (both brokers, side by side) are in docs/embedded-kafka.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from labkit.errors import ConfigError, LabkitError

if TYPE_CHECKING:
    from labkit.backends.kafka.admin import TopicAdmin
    from labkit.backends.kafka.member import GroupMember
    from labkit.config import Config
    from labkit.workflow import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quirk:
    """One behaviour of the embedded broker that Apache Kafka does not have, and the lab's answer.

    Attributes:
        name: the short name counters and docs use.
        broker: what the embedded broker does (measured; docs/embedded-kafka.md).
        answer: what labkit does about it, and where.
        repair: True for a repair that fires at run time (and is counted), False for a setting that is always on.
        on_apache: what the answer does on Apache Kafka.
    """

    name: str
    broker: str
    answer: str
    repair: bool
    on_apache: str


QUIRKS: dict[str, Quirk] = {
    q.name: q
    for q in (
        Quirk(
            "orphaned-partitions",
            "a rebalance can complete with a partition assigned to a member that died during it, and no later "
            "rebalance follows: the partition has no consumer for good",
            "GroupWatch: when no live worker reports a partition for 12 s in a settled group, one worker leaves "
            "and rejoins, which makes the group rebalance",
            True,
            "a dead member's session expiry always rebalances; the watch sees no orphan and never fires",
        ),
        Quirk(
            "topics-lost",
            "memory only: a restart loses every topic, offset and group; librdkafka does not rebalance when the "
            "topics come back (librdkafka#3255), so the group sits on an empty assignment",
            "GroupWatch: recreates missing work and retry topics, then the orphan rule rebalances the group",
            True,
            "the log is durable: topics survive a restart and the watch never fires",
        ),
        Quirk(
            "departed-leader",
            "a group whose members all leave at once keeps its departed leader; members joining later can wait a "
            "minute or more for partitions",
            "renew_group (before restarting every consumer): delete the empty group and commit its offsets again",
            True,
            "where the group stood is kept, so it changes nothing",
        ),
        Quirk(
            "producer-fenced",
            "after a restart the broker has forgotten the idempotent producer: fatal UNKNOWN_PRODUCER_ID",
            "RecordProducer: drop the failed producer (librdkafka can only destroy it) and build a fresh one",
            True,
            "producer state is durable; it fires only if the producer is really fenced",
        ),
        Quirk(
            "join-held",
            "every JoinGroup is held for half the session timeout: 23 s to the first assignment with the defaults",
            "settings: session.timeout.ms=6000, heartbeat.interval.ms=2000",
            False,
            "6000 ms is Apache Kafka's smallest allowed session (group.min.session.timeout.ms): faster failover",
        ),
        Quirk(
            "list-offsets-latest",
            "ListOffsets(latest) answers the base offset of the newest batch + 1 (3 batches of 10 look like 21)",
            "lag: the end of a partition is the high watermark of a Fetch response",
            False,
            "the Fetch high watermark is the end on every broker",
        ),
        Quirk(
            "auto-create",
            "a metadata request naming a missing topic creates it with 4 partitions",
            "admin: metadata for all topics; producer: allow.auto.create.topics=false; topics created up front",
            False,
            "the same calls; topics are created with the partitions asked for",
        ),
        Quirk(
            "no-message-max-bytes",
            "no broker-side message.max.bytes: 5 MB records are accepted",
            "settings: the producer enforces message.max.bytes=1000000, as Apache Kafka's broker would",
            False,
            "the same limit, now enforced on both sides",
        ),
        Quirk(
            "slow-cooperative",
            "cooperative-sticky rebalances take 7-12 s (2-3 rounds) per join",
            "settings: eager range assignment",
            False,
            "range is Apache Kafka's long-time default",
        ),
        Quirk(
            "no-group-members",
            "describe_consumer_groups lists no members",
            "workers report their own assignment (events assigned/revoked, a Redis hash per worker)",
            False,
            "the same reports; the broker's own view agrees",
        ),
        Quirk(
            "delete-under-consumer",
            "deleting a topic under a live librdkafka consumer crashes the Python process (segfault)",
            "short-lived readers for lag and dead letters; purge refuses while this backend consumes",
            False,
            "a consumer of a deleted topic only logs errors; the same care costs nothing",
        ),
        Quirk(
            "fetch-long-poll",
            "an empty fetch re-checks at max_wait/2, /4, ...: p50 latency ~200 ms with the default 500 ms",
            "settings: fetch.wait.max.ms=100",
            False,
            "Apache Kafka answers a fetch as soon as data arrives; 100 ms only bounds an idle poll",
        ),
    )
}
#: The quirks whose repair fires at run time, in the order the docs list them.
REPAIRS = tuple(name for name, quirk in QUIRKS.items() if quirk.repair)


def repairs_enabled(settings: WorkerSettings) -> bool:
    """The ``broker_repairs`` option: ``on`` (default) or ``off``.

    Raises:
        ConfigError: another value.
    """
    value = settings.options.get("broker_repairs", "on").lower()
    if value not in ("on", "off"):
        raise ConfigError(f"option broker_repairs={value!r}; use on or off")
    return value == "on"


class Repairs:
    """Counts of the repairs that fired, per namespace, in a Redis hash (``lab:<ns>kafka:broker-repairs``).

    Counting uses a short-lived synchronous connection: repairs are rare (a broker restart, a stuck
    group), and some fire in a librdkafka thread with no event loop.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.key = config.names.key("kafka", "broker-repairs")

    def fired(self, name: str, detail: str) -> None:
        """Count one firing of the repair ``name`` and log why."""
        if name not in REPAIRS:
            raise ValueError(f"unknown repair {name!r}; choose from {', '.join(REPAIRS)}")
        log.warning("broker repair %s: %s", name, detail)
        import redis

        try:
            with redis.Redis.from_url(self.config.redis_url, socket_timeout=2, socket_connect_timeout=2) as client:
                client.hincrby(self.key, name, 1)
        except (RedisError, OSError) as e:
            log.warning("could not count broker repair %s: %s", name, e)

    def counts(self) -> dict[str, int]:
        """How often each repair fired in this namespace (every repair listed, 0 if it never fired)."""
        import redis

        with redis.Redis.from_url(self.config.redis_url, socket_timeout=2, socket_connect_timeout=2) as client:
            raw: dict[bytes, bytes] = client.hgetall(self.key)
        found = {k.decode(): int(v) for k, v in raw.items()}
        return {name: found.get(name, 0) for name in REPAIRS}


def renew_group(admin: TopicAdmin, group: str, topics: list[str], repairs: Repairs) -> None:
    """Delete the consumer group (its members must be gone) and recreate it at the offsets it had committed.

    The ``departed-leader`` repair. Where the group stood is kept, so on Apache Kafka this changes
    nothing. On the embedded broker it clears what all members leaving at once leave behind.
    """
    committed = admin.committed(group, topics)
    admin.delete_group(group)
    if committed:
        admin.commit(group, committed)
    repairs.fired("departed-leader", f"group {group} renewed at {len(committed)} committed offsets")


#: Seconds between two looks at the group's health (missing topics, partitions without a consumer).
GROUP_CHECK_EVERY_S = 2.0
#: A partition may stay without a consumer this long before a worker forces a rebalance: well above a normal
#: rebalance (3-6 s on the embedded broker) plus the 5 s a dead worker's report lives on in Redis.
ORPHAN_GRACE_S = 12.0
#: ... and only a worker whose own assignment has not changed for as long: a rebalance under way revokes every
#: member's partitions within a heartbeat interval (eager protocol). Shorter (6 s) was measured to make things
#: worse while workers are killed every 6-10 s: forced rebalances then pile onto the ones the kills cause.
SETTLED_S = ORPHAN_GRACE_S


class GroupWatch:
    """The ``orphaned-partitions`` and ``topics-lost`` repairs, run by every worker beside its poll loop.

    - The topics are gone (a memory-only broker restarted): the group rejoins with an empty
      assignment, and librdkafka does not rebalance when the topics come back (it cannot tell a
      recreated topic from the old one). The watch recreates them (``setup``), and the next rule
      rebalances the group onto them.
    - A partition has no consumer, while the group is settled: when no live worker reports a
      partition for :data:`ORPHAN_GRACE_S` and this worker's own assignment has not changed for
      :data:`SETTLED_S` (so no rebalance is under way), one worker (a Redis token) leaves and
      rejoins the group, which makes the group rebalance.

    On Apache Kafka a dead member's session expiry always rebalances, so the second rule only
    fires in a group that is stuck; it costs one extra rebalance. Workers report their assignment
    with their in-flight counts, so a group member that does not (another program) makes the
    watch stand aside.
    """

    def __init__(self, member: GroupMember) -> None:
        self.member = member
        self.backend = member.backend
        self.worker_id = member.events.worker_id

    async def run(self) -> None:
        unowned_since: float | None = None
        closing = self.member.closing
        while not closing.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(closing.wait(), GROUP_CHECK_EVERY_S)
                return
            if self.member.left_group:
                unowned_since = None
                continue
            try:
                unowned = await self._unowned_partitions()
            except (LabkitError, RedisError, OSError) as e:  # broker or Redis briefly away: look again later
                log.debug("%s: group check skipped: %s", self.worker_id, e)
                continue
            now = time.monotonic()
            if not unowned:
                unowned_since = None
                continue
            unowned_since = unowned_since or now
            if now - unowned_since < ORPHAN_GRACE_S or now - self.member.assignment_changed < SETTLED_S:
                continue
            token = self.backend.ledger.key("rebalance-token", self.backend.names.kafka_group)
            # One worker at a time: on the embedded broker, a group leader that leaves while another member's
            # leave is still being served leaves the group without a leader for good (see docs/drills.md).
            if not await self.backend.redis.set(token, self.worker_id, nx=True, ex=int(ORPHAN_GRACE_S)):
                continue
            unowned_since = None
            reason = f"partitions without a consumer: {', '.join(sorted(unowned))}"
            await asyncio.to_thread(self.backend.repairs.fired, "orphaned-partitions", f"{self.worker_id}: {reason}")
            self.member.events.emit("broker_repair", repair="orphaned-partitions", reason=reason)
            await self.member.rejoin(reason)

    async def _unowned_partitions(self) -> set[str]:
        """Partitions of the work and retry topics that no live worker reports as assigned; recreate missing topics."""
        topics = self.member.topics
        counts = await asyncio.to_thread(self.backend.admin.topic_partitions)
        if any(topic not in counts for topic in topics):
            gone = [t for t in topics if t not in counts]
            reason = f"topics {gone} are gone (broker restarted?); creating them again"
            await asyncio.to_thread(self.backend.repairs.fired, "topics-lost", f"{self.worker_id}: {reason}")
            await self.backend.setup()
            self.member.events.emit("topics_recreated", topics=gone)
            self.member.events.emit("broker_repair", repair="topics-lost", reason=reason)
            counts = await asyncio.to_thread(self.backend.admin.topic_partitions)
        expected = {f"{topic}/{p}" for topic in topics for p in range(counts.get(topic, 0))}
        redis = self.backend.redis
        owned: set[str] = set()
        async for key in redis.scan_iter(match=self.backend.ledger.key("inflight", "*"), count=100):
            assigned = await redis.hget(key, "assigned")
            if assigned is None:
                return set()  # a member that does not report its assignment: the watch cannot judge
            owned.update(json.loads(assigned))
        return expected - owned


def describe(name: str) -> dict[str, Any]:
    """One quirk as a plain dict (for tables in docs and notebooks)."""
    quirk = QUIRKS[name]
    return {
        "quirk": quirk.name,
        "embedded broker": quirk.broker,
        "labkit's answer": quirk.answer,
        "kind": "repair (counted)" if quirk.repair else "setting",
        "on Apache Kafka": quirk.on_apache,
    }
