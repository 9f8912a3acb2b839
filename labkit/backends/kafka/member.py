"""One worker's membership of the consumer group: poll, hand records to the handler in order, commit after.

How a worker consumes (``KafkaBackend.consume``):

- One librdkafka consumer per worker. Its poll runs in a dedicated thread, one call at a
  time (confluent-kafka 2.16 serialises every call on a consumer: a call from another
  thread waits until a running poll returns). Offsets, pauses and seeks are applied
  between two polls, on the event loop, where they cost microseconds.
- Records go into one buffer per partition, and one task per partition hands them to
  the handler in offset order: per-key order is kept (a key always lands in the same
  partition) while different partitions run concurrently, at most
  ``settings.concurrency`` handler calls at once. A full buffer pauses its partition
  (backpressure) while the others keep flowing. When the handler takes batches
  (``BookingHandler.batches``: no step or CPU time), a partition's task hands over what is
  buffered, up to a poll's worth, as one batch, and its offset is stored once after it.
- At-least-once: ``enable.auto.commit`` with ``enable.auto.offset.store=false``; a
  record's offset is stored only after the handler finished with it (and after its retry
  or dead letter was written), and librdkafka commits stored offsets every
  ``auto.commit.interval.ms`` (500 ms), on rebalance and on close. A SIGKILL therefore
  redelivers what was running plus up to 500 ms of finished records: that is the
  duplicate window the idempotency lesson measures.
- ``max.poll.interval.ms`` (``options["max_poll_interval_ms"]``, default 30000): Kafka's
  liveness rule says a consumer that spends longer than this on what it polled has
  failed and must give its partitions to someone else. This worker keeps polling while
  handlers run, so librdkafka's own check would only fire if the event loop itself is
  blocked (``cpu_ms``); to keep the rule for slow handlers, the worker enforces it per
  record: when one handler has run longer than ``max.poll.interval.ms`` it leaves the
  group (event ``left_group``), its partitions are reassigned, the slow record will be
  delivered again elsewhere (a duplicate), and the worker rejoins (event ``rejoining``)
  once that handler returns. Set it above the slowest handler you expect, and at least to
  ``session.timeout.ms`` (6000).
- Retries never block a partition: a RETRY verdict is produced to the retry topic with
  headers ``attempts`` (the next attempt), ``not_before`` (epoch ms) and ``source`` (the
  original ``topic/partition/offset``), then the original offset is stored. A retry
  record read before its time pauses only its retry partition (event ``retry_wait``);
  when it is due the partition seeks back to it and resumes. Records of one retry partition wait in
  order, so a long backoff holds up shorter ones behind it (Kafka's usual answer: one
  retry topic per delay). Delayed bookings wait the same way in the delay topic (``not_before``,
  ``attempts`` 1), which the group reads beside the work and retry topics.
- Rebalances: revoked partitions finish their running record (up to
  ``max.poll.interval.ms``), store and commit its offset, and drop what was buffered.
  Events ``assigned``/``revoked`` carry the partitions, since the embedded broker's
  describe-group answer lists no members.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from redis.exceptions import RedisError

from labkit.backends.kafka.quirks import GroupWatch, repairs_enabled
from labkit.backends.kafka.records import (
    POLL_BATCH,
    Headers,
    Send,
    coordinates,
    fetch,
    header_int,
    headers_of,
)
from labkit.backends.kafka.settings import DEFAULT_MAX_POLL_INTERVAL_MS, SESSION_TIMEOUT_MS, group_consumer_config
from labkit.errors import BackendError, ConfigError
from labkit.workflow import BookingHandler, Delivery, Outcome, Result

if TYPE_CHECKING:
    from labkit.backends.kafka.backend import KafkaBackend

log = logging.getLogger(__name__)

#: Records buffered per partition before it is paused, and the level at which it resumes.
BUFFER_HIGH = 256
BUFFER_LOW = 64
#: The same for a handler that takes batches: room for several polls, since a pause drops librdkafka's
#: prefetched records and the seek on resume costs a fetch round trip. It resumes with four batches still
#: buffered, so that the refetch arrives before the partition's task runs dry (resumed with one batch left,
#: a backlog's partitions all ran dry together, 2 or 3 times in 100,000 bookings, up to 0.14 s each).
BATCH_BUFFER_HIGH = 8 * POLL_BATCH
BATCH_BUFFER_LOW = 4 * POLL_BATCH
#: A worker reports its in-flight counts (and assignment) in Redis this often; the report outlives it this long.
INFLIGHT_REFRESH_S = 1.0
INFLIGHT_TTL_S = 5
#: ``(key,)`` of the record being handled, so that its dead letter keeps exactly the original key (even none).
CURRENT_KEY: contextvars.ContextVar[tuple[bytes | None] | None] = contextvars.ContextVar("kafka_record_key")


async def _idle() -> None:
    """Stands in for the group watch when the repairs are off."""
    await asyncio.Event().wait()


class Record(Delivery, frozen=True):
    """A fetched record: the delivery the handler gets, plus where the record is, for its offset and its retry.

    The delivery's ``attempt`` is 1 on the work topic, the ``attempts`` header on the retry topic; its ``source``
    is the original work-topic record, carried through retries in the ``source`` header. One struct per record,
    built once: the handler takes the records themselves as its deliveries.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None


@dataclass(eq=False)
class Partition:
    """One assigned partition inside a worker: its buffer, its in-order task and its pause reasons."""

    topic: str
    partition: int
    pending: deque[Record] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    #: Monotonic start of the record being handled, None when idle.
    started: float | None = None
    #: The running record was given up (max.poll.interval.ms exceeded): its offset must not be stored.
    abandoned: bool = False
    revoked: bool = False
    #: Why it is paused: "full" (buffer) and/or "wait" (a retry record not yet due).
    paused_for: set[str] = field(default_factory=set)
    #: The offset the next dispatched record must have; older ones are refetches after a seek.
    next_offset: int | None = None
    #: Offset to store (last finished + 1), not yet handed to librdkafka.
    done_offset: int | None = None
    wait_timer: asyncio.TimerHandle | None = None

    #: Its records wait for their ``not_before`` header: a retry or delay topic's partition.
    waits: bool = False
    #: ``topic/partition``, which every record's location starts with.
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.idle.set()
        self.name = f"{self.topic}/{self.partition}"

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


class GroupMember:
    """One consume() call: a librdkafka group consumer plus its per-partition tasks.

    Every call on the consumer happens either in ``self._thread`` (poll, subscribe,
    commit, close: the calls that may run rebalance callbacks) or on the event loop while
    no poll is running (store_offsets, pause, resume, seek). Rebalance callbacks run in
    the poll thread and hand the bookkeeping to the event loop, which is free meanwhile.
    """

    def __init__(self, backend: KafkaBackend, handler: BookingHandler, stop: asyncio.Event) -> None:
        self.backend = backend
        self.handler = handler
        self.events = handler.events
        self.stop = stop
        self.names = backend.names
        settings = backend.settings
        max_poll_ms = int(settings.option("max_poll_interval_ms", DEFAULT_MAX_POLL_INTERVAL_MS))
        if max_poll_ms < SESSION_TIMEOUT_MS:
            raise ConfigError(
                f"max_poll_interval_ms={max_poll_ms} is too small; use at least {SESSION_TIMEOUT_MS} "
                "(the session timeout) and more than the slowest booking takes"
            )
        self.max_poll_s = max_poll_ms / 1000
        #: Bound on a rebalance callback waiting for the event loop, so a dead loop cannot hang the poll thread.
        self.callback_timeout_s = self.max_poll_s + 10
        self.topics = [self.names.topic, self.names.topic_retry, self.names.topic_delay]
        #: Topics whose records wait for their ``not_before`` header: retries and delayed bookings.
        self.waiting_topics = {self.names.topic_retry, self.names.topic_delay}
        self.slots = asyncio.Semaphore(settings.concurrency)
        batched = handler.batches
        self.buffer_high = BATCH_BUFFER_HIGH if batched else BUFFER_HIGH
        self.buffer_low = BATCH_BUFFER_LOW if batched else BUFFER_LOW
        self.parts: dict[tuple[str, int], Partition] = {}
        #: Tasks still running a record of a partition given up after max.poll.interval.ms.
        self.orphans: set[asyncio.Task[None]] = set()
        #: pause/resume/seek calls queued for the next gap between polls, with the partition they are for.
        self.ops: list[tuple[Partition, Callable[[Consumer], None]]] = []
        self.left_group = False
        #: Set when the poll loop ends: the group watch stops on it (see ``run``).
        self.closing = asyncio.Event()
        #: Monotonic time of this worker's last assign or revoke: a group in the middle of a rebalance is not stuck.
        self.assignment_changed = time.monotonic()
        self.failure: BaseException | None = None
        self.loop = asyncio.get_running_loop()
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-poll")
        config = group_consumer_config(self.names, backend.config.kafka_bootstrap, self.events.worker_id, max_poll_ms)
        self.consumer = Consumer({**config, "error_cb": self._on_client_error})

    # -- the poll loop ------------------------------------------------------------------

    async def run(self) -> None:
        reporter = asyncio.create_task(self._report_in_flight())
        # The embedded broker's repairs (quirks.GroupWatch); off, the group is left to the broker alone.
        watcher = asyncio.create_task(GroupWatch(self).run() if repairs_enabled(self.backend.settings) else _idle())
        try:
            await self._in_thread(self._subscribe)
            while not self.stop.is_set() and self.failure is None:
                await self._enforce_max_poll()
                self._apply_ops()
                # A poll ends early when a pause, resume or seek is queued: they wait for the gap between polls.
                self._dispatch(await self._in_thread(fetch, self.consumer, POLL_BATCH, lambda: bool(self.ops)))
        finally:
            # The watch must end before the shutdown (it must not resubscribe a closing consumer). A cancel alone
            # was not enough: one that lands as the watch's Redis or admin call completes was seen lost (the watch
            # went on to its next sleep, and the worker did not stop until SIGKILL), so it also stops on `closing`.
            self.closing.set()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            try:
                await self._shutdown()
            finally:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
                with contextlib.suppress(RedisError, OSError):
                    await self.backend.redis.delete(self.backend.ledger.key("inflight", self.events.worker_id))
        if self.failure is not None:
            raise self.failure

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.loop.run_in_executor(self.thread, fn, *args)

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def _apply_ops(self) -> None:
        """Hand finished offsets and queued pause/resume/seek calls to librdkafka (no poll is running)."""
        offsets = []
        for part in self.parts.values():
            if part.done_offset is not None:
                offsets.append(TopicPartition(part.topic, part.partition, part.done_offset))
                part.done_offset = None
        if offsets:
            try:
                self.consumer.store_offsets(offsets=offsets)
            except KafkaException as e:  # the partition left us in a rebalance: its next owner redoes it
                log.debug("store_offsets: %s", e)
        ops, self.ops = self.ops, []
        for part, op in ops:
            if part.revoked:
                continue  # revoked by the last poll's rebalance: librdkafka refuses calls on it
            try:
                op(self.consumer)
            except KafkaException as e:
                log.debug("pause/resume/seek on %s: %s", part.name, e)

    def _dispatch(self, messages: list[Message]) -> None:
        """Route fetched records to their partition buffers, holding back retries that are not due."""
        now_ms = time.time() * 1000
        received = []
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_poll_error(error)
                continue
            topic, partition, offset = coordinates(message)
            part = self.parts.get((topic, partition))
            if part is None or part.revoked or "wait" in part.paused_for:
                continue  # fetched before a rebalance or a seek back: not ours to handle now
            if part.next_offset is not None and offset < part.next_offset:
                continue  # fetched again after a seek: already buffered
            where = f"{part.name}/{offset}"  # records.location, from the partition's own topic/partition
            if part.waits:
                headers = headers_of(message)
                not_before = header_int(headers, "not_before", 0)
                if not_before > now_ms:
                    self._wait_for_retry(part, offset, (not_before - now_ms) / 1000)
                    continue
                attempt = header_int(headers, "attempts", 2)
                source = headers.get("source", b"").decode("utf-8", "replace") or where
            else:
                attempt, source = 1, where
            key = message.key()
            part.next_offset = offset + 1
            part.pending.append(Record(message.value() or b"", attempt, source, topic, partition, offset, key))
            received.append(
                {
                    "booking_id": key.decode("utf-8", "replace") if key else None,
                    "attempt": attempt,
                    "source": source,
                    "record": where,
                }
            )
            part.wakeup.set()
            if len(part.pending) >= self.buffer_high and "full" not in part.paused_for:
                self._pause(part, "full")
        self.events.emit_batch("received", received)  # one write for the poll, before any of it is handled

    def _pause(self, part: Partition, reason: str) -> None:
        if not part.paused_for:
            tp = part.tp
            self.ops.append((part, lambda c: c.pause([tp])))
        part.paused_for.add(reason)

    def _unpause(self, part: Partition, reason: str) -> None:
        part.paused_for.discard(reason)
        if part.paused_for or part.revoked:
            return
        # Resume where this worker stopped taking records; librdkafka dropped its prefetch on pause.
        if part.next_offset is not None:
            seek_to = TopicPartition(part.topic, part.partition, part.next_offset)
            self.ops.append((part, lambda c: c.seek(seek_to)))
        tp = part.tp
        self.ops.append((part, lambda c: c.resume([tp])))

    def _wait_for_retry(self, part: Partition, offset: int, delay_s: float) -> None:
        """Pause this retry partition at ``offset`` until it is due; the other partitions keep flowing."""
        self._pause(part, "wait")
        part.next_offset = offset  # refetched from here on resume
        part.wait_timer = self.loop.call_later(delay_s, self._unpause, part, "wait")
        self.events.emit("retry_wait", partition=part.name, offset=offset, wait_s=round(delay_s, 3))

    def _on_poll_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._MAX_POLL_EXCEEDED:
            # The event loop did not poll in time (a CPU-bound handler?): librdkafka left the group and rejoins.
            log.warning("%s: %s", self.events.worker_id, error.str())
            self.events.emit("left_group", reason=error.str())
        elif error.fatal():
            self.failure = BackendError(f"Kafka consumer failed: {error.str()}")
        else:
            log.warning("%s: Kafka consumer error: %s", self.events.worker_id, error.str())

    def _on_client_error(self, error: KafkaError) -> None:
        """librdkafka's client-level errors (broker down, reconnecting); runs in the poll thread."""
        log.warning("Kafka client error: %s", error.str())

    async def _enforce_max_poll(self) -> None:
        """Kafka's liveness rule per record: leave the group while a handler runs past max.poll.interval.ms."""
        now = time.monotonic()
        if not self.left_group:
            late = [p for p in self.parts.values() if p.started is not None and now - p.started > self.max_poll_s]
            if not late:
                return
            for part in late:
                part.abandoned = True
                if part.task is not None:
                    self.orphans.add(part.task)  # rejoin only once it returns, whenever the revoke is served
            names = ", ".join(p.name for p in late)
            reason = f"a handler on {names} ran longer than max.poll.interval.ms={self.max_poll_s * 1000:.0f}"
            log.warning("%s: %s; leaving the consumer group", self.events.worker_id, reason)
            self.events.emit("left_group", reason=reason, partitions=[p.name for p in late])
            self.left_group = True
            await self._in_thread(self.consumer.unsubscribe)
        elif not any(not task.done() for task in self.orphans):
            self.orphans.clear()
            self.left_group = False
            self.events.emit("rejoining")
            await self._in_thread(self._subscribe)

    async def rejoin(self, reason: str) -> None:
        """Leave the group and join it again as a new member: the coordinator must then rebalance.

        Subscribing again without leaving is not enough: a member that rejoins with unchanged metadata
        gets its old assignment back, without a rebalance, on Kafka and on the embedded broker alike.
        """
        log.warning("%s: %s; leaving and rejoining the consumer group", self.events.worker_id, reason)
        self.events.emit("rejoining", reason=reason)
        await self._in_thread(self.consumer.unsubscribe)
        # Let the poll loop serve the revoke, so that librdkafka sends LeaveGroup before the new JoinGroup.
        deadline = time.monotonic() + 5
        while self.parts and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        await self._in_thread(self._subscribe)

    # -- rebalance callbacks: run in the poll thread ------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(partitions)
        # A partition paused before a rebalance stays paused when it comes back: start it clean.
        consumer.resume(partitions)
        asyncio.run_coroutine_threadsafe(self._assigned(partitions), self.loop).result(self.callback_timeout_s)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        future = asyncio.run_coroutine_threadsafe(self._release(partitions, lost=False), self.loop)
        offsets = future.result(self.callback_timeout_s)
        if offsets:
            try:
                consumer.store_offsets(offsets=offsets)
                # Commit now: the next owner starts right after what this worker finished.
                consumer.commit(asynchronous=False)
            except KafkaException as e:
                if e.args[0].code() != KafkaError._NO_OFFSET:
                    log.warning("%s: commit on revoke failed: %s", self.events.worker_id, e.args[0].str())

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a clean handover (this member was thrown out): nothing can be committed."""
        future = asyncio.run_coroutine_threadsafe(self._release(partitions, lost=True), self.loop)
        future.result(self.callback_timeout_s)

    # -- bookkeeping on the event loop --------------------------------------------------

    async def _assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            part = Partition(tp.topic, tp.partition, waits=tp.topic in self.waiting_topics)
            part.task = asyncio.create_task(self._work(part), name=f"kafka {part.name}")
            part.task.add_done_callback(self._task_done)
            self.parts[(tp.topic, tp.partition)] = part
        self.assignment_changed = time.monotonic()
        self.events.emit("assigned", partitions=[f"{tp.topic}/{tp.partition}" for tp in partitions])

    async def _release(self, partitions: list[TopicPartition], lost: bool) -> list[TopicPartition]:
        """Drop revoked partitions: finish their running records and return the offsets to commit."""
        parts = [p for tp in partitions if (p := self.parts.pop((tp.topic, tp.partition), None)) is not None]
        self.assignment_changed = time.monotonic()
        for part in parts:
            part.revoked = True
            part.pending.clear()
            if part.wait_timer is not None:
                part.wait_timer.cancel()
        finishing = [asyncio.create_task(p.idle.wait()) for p in parts if p.started is not None and not p.abandoned]
        if finishing:
            _, late = await asyncio.wait(finishing, timeout=self.max_poll_s)
            for waiter in late:
                waiter.cancel()
        for part in parts:
            assert part.task is not None
            if part.started is not None:
                # Still running after max.poll.interval.ms: given up, its offset is not stored, and it
                # must end before this worker rejoins or stops. Handlers are never cancelled.
                part.abandoned = True
                self.orphans.add(part.task)
            else:
                part.task.cancel()
        self.events.emit("revoked", partitions=[f"{tp.topic}/{tp.partition}" for tp in partitions], lost=lost)
        return [TopicPartition(p.topic, p.partition, p.done_offset) for p in parts if p.done_offset is not None]

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()

    async def _work(self, part: Partition) -> None:
        """Hand this partition's records to the handler in offset order: one at a time, or as batches.

        With a handler that takes batches (``BookingHandler.batches``: no step or CPU time), what is
        buffered for the partition, up to a poll's worth, is one batch; its offset is stored once, after it.
        """
        batches = self.handler.batches
        while not part.revoked:
            if not part.pending:
                part.wakeup.clear()
                await part.wakeup.wait()
                continue
            records = [part.pending.popleft() for _ in range(min(len(part.pending), POLL_BATCH if batches else 1))]
            if "full" in part.paused_for and len(part.pending) <= self.buffer_low:
                self._unpause(part, "full")
            # Waiting for a free slot is not handling: the max.poll.interval.ms clock starts inside.
            async with self.slots:
                part.started = time.monotonic()
                part.idle.clear()
                try:
                    await self._process(records)
                    if not part.abandoned:
                        part.done_offset = records[-1].offset + 1  # store offset after processing: at-least-once
                finally:
                    part.started = None
                    part.idle.set()

    async def _process(self, records: list[Record]) -> None:
        """Run the handler, then act on each verdict in offset order: nothing, a retry record, or a dead letter."""
        if len(records) == 1 and not self.handler.batches:
            results = [await self.handler(records[0])]
        else:
            results = await self.handler.run_batch(records)
        for record, result in zip(records, results, strict=True):
            if result.outcome is Outcome.COMPLETED:
                continue
            CURRENT_KEY.set((record.key,))
            if result.outcome is Outcome.RETRY:
                await self._retry(record, result)
            else:
                await self.backend.dead_letter(self.handler, record, result)

    async def _retry(self, record: Record, result: Result) -> None:
        """Park the record in the retry topic with its due time; the original offset is stored afterwards."""
        delay = self.backend.settings.backoff_for(record.attempt)
        not_before = int((time.time() + delay) * 1000)
        headers: Headers = [
            ("attempts", str(record.attempt + 1).encode()),
            ("not_before", str(not_before).encode()),
            ("source", record.source.encode("utf-8")),
        ]
        send = Send(self.names.topic_retry, record.key, record.payload, headers)
        [where] = await asyncio.to_thread(self.backend.producer.send, [send])
        self.events.emit(
            "retried",
            booking_id=result.booking_id,
            attempt=record.attempt,
            next_attempt=record.attempt + 1,
            delay_s=delay,
            source=record.source,
            record=where,
            reason=result.reason,
        )

    async def _report_in_flight(self) -> None:
        """Publish this worker's in-flight counts in Redis: the broker cannot see them."""
        redis = self.backend.redis
        key = self.backend.ledger.key("inflight", self.events.worker_id)
        while True:
            running = sum(1 for p in self.parts.values() if p.started is not None)
            running += sum(1 for task in self.orphans if not task.done())
            buffered = sum(len(p.pending) for p in self.parts.values())
            try:
                async with redis.pipeline(transaction=True) as pipe:
                    # The assignment too: the group watch of every worker compares the union with the topics.
                    assigned = json.dumps(sorted(p.name for p in self.parts.values()))
                    pipe.hset(key, mapping={"running": running, "buffered": buffered, "assigned": assigned})
                    pipe.expire(key, INFLIGHT_TTL_S)
                    await pipe.execute()
            except (RedisError, OSError) as e:
                log.warning("could not report in-flight counts to Redis: %s", e)
            await asyncio.sleep(INFLIGHT_REFRESH_S)

    # -- stopping -----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Finish running records, commit their offsets, then leave the group.

        Each phase is timed in the ``leaving`` event, since a warm stop that takes long is worth
        seeing: a handler still running, a commit or a LeaveGroup the broker is slow to answer.
        """
        try:
            started = time.monotonic()
            for part in self.parts.values():
                part.pending.clear()  # not started: the next owner gets them
            # A failed task already set self.failure; run() raises it once the consumer is closed.
            await asyncio.gather(*(p.idle.wait() for p in self.parts.values()), *self.orphans, return_exceptions=True)
            finished = time.monotonic()
            self._apply_ops()
            await self._in_thread(self._commit)
            committed = time.monotonic()
            # close() revokes the partitions (callbacks run), commits and sends LeaveGroup.
            await self._in_thread(self.consumer.close)
            self.events.emit(
                "leaving",
                finish_s=round(finished - started, 3),
                commit_s=round(committed - finished, 3),
                close_s=round(time.monotonic() - committed, 3),
            )
        finally:
            for part in self.parts.values():
                if part.task is not None:
                    part.task.cancel()
            self.thread.shutdown(wait=False)

    def _commit(self) -> None:
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("%s: final commit failed: %s", self.events.worker_id, e.args[0].str())
