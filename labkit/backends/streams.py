"""Redis Streams: an append-only log read by a consumer group, with a pending list per consumer.

How the booking job maps onto Streams (names from docs/contract.md, namespace applied):

- Work is the stream ``bookings``; each entry has one field, ``booking``, holding the JSON
  text exactly as sent (malformed text too: lessons send it on purpose).
- Workers are consumers of the group ``booking-workers``, created at id ``0`` with
  ``MKSTREAM`` so that entries added before any worker started are still delivered. Each
  worker's consumer name is its worker id, so ``XPENDING`` shows who holds what.
- ``XREADGROUP ... >`` hands an entry to one consumer and puts it in that consumer's
  pending entries list (PEL) with a delivery count of 1. ``XACK`` removes it: done.

Retries and crash recovery are ONE mechanism, and it is the main teaching point:
Streams has no retry queue and no backoff. An entry whose handler asked for a retry is
simply not acknowledged; it stays in the PEL. Every consumer runs a reclaimer that calls
``XAUTOCLAIM <stream> <group> <me> <min-idle> <cursor>`` and takes over every pending entry
nobody has touched for ``min-idle`` ms, walking the cursor until it comes back ``0-0``.
``min-idle`` is ``settings.backoff_ms`` (at least 100 ms), so the retry delay IS the claim
idle time, the same for every attempt (BullMQ and Kafka double it per attempt). The
entries stranded in the PEL of a worker that was SIGKILLed are found the very same way:
they go idle, and after ``backoff_ms`` a live consumer claims them. ``XAUTOCLAIM``
increments the delivery count, which is the ``attempt`` a handler sees; an entry claimed
with a count already above ``max_attempts`` (a booking that killed its worker every time)
is dead-lettered without running again.

Because idle time is all the reclaimer looks at, a live consumer whose handler is slower
than ``min-idle`` would lose its entry to another consumer and the booking would run twice.
The heartbeat prevents that: it re-claims the consumer's own long-running entries with
``XCLAIM ... 0 <id> JUSTID``, which resets their idle time without counting a delivery.

(Redis 8.4 folds the reclaimer into the read: ``XREADGROUP ... CLAIM <min-idle>``. Valkey 9
has no such option, so the lab uses the portable XAUTOCLAIM loop, which also shows the cursor.)

Delayed bookings (``produce(..., delay_ms=...)``) are the lab's pattern, not a Streams feature:
Streams delivers an entry as soon as it is added. A delayed booking waits in the sorted set
``bookings:delayed`` with its due time (Redis's clock, in ms) as the score; every consumer runs a
mover that, every :data:`MOVE_EVERY_S`, calls one Lua script that XADDs the due ones to the stream
and removes them from the set, atomically, so each moves once however many consumers run it.

A handler that takes batches (``BookingHandler.batches``: no step or CPU time) gets each
``XREADGROUP COUNT n`` reply, and each page of reclaimed entries, as one batch, and the finished
ones are acknowledged with one ``XACK``. A batch holds its entries only while their idle time stays
under min-idle, so its size follows what the consumer can finish in a quarter of it
(:class:`BatchSize`): up to 500 entries on a quiet machine, a few dozen on a loaded one.

Options (``WorkerSettings.options``):

- ``heartbeat``: ``1`` (default) or ``0``. ``0`` turns the heartbeat off, so a drill can
  show slow bookings being processed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from labkit.backends.base import BATCH_FETCH, Backend, BatchSink, Message, dead_letter_record, wire_text
from labkit.booking import booking_id_of, encode
from labkit.errors import BrokerUnavailable, ConfigError
from labkit.workflow import BookingHandler, Delivery, Outcome, Result

log = logging.getLogger(__name__)

#: XADDs per pipeline round trip in produce(): 20k bookings in 20 round trips, each reply list small.
PRODUCE_CHUNK = 1000
#: How long one XREADGROUP waits for new entries. Short, so that a stop request is noticed within
#: 0.1 s; the client has no socket timeout, so a BLOCK of any length is safe on the wire.
READ_BLOCK_MS = 100
#: Lower bound of the XAUTOCLAIM min-idle time. A min-idle of 0 (backoff_ms=0) would let any
#: consumer claim entries another consumer started a millisecond ago, so every entry would run twice.
MIN_CLAIM_IDLE_MS = 100
#: The reclaimer runs every min(min-idle / 2, this) seconds: a retry waits at most half a min-idle extra.
MAX_RECLAIM_EVERY_S = 0.5
#: Upper bound of XAUTOCLAIM COUNT (Redis scans at most 10 x COUNT pending entries per call).
CLAIM_PAGE = 100
#: A consumer that lost Redis after working with it keeps trying this long before giving up (BrokerUnavailable):
#: a restarted Redis reloads its AOF and answers again within a second or two, and the entries and pending
#: lists survive it, so waiting is all a worker has to do. redis-py alone does not bridge it: a command that
#: needs a new connection while the server is down fails at once, without its retries.
RECONNECT_GRACE_S = 30.0
#: Pause between two attempts while Redis is away.
RECONNECT_PAUSE_S = 0.2

#: How often a consumer's mover looks for delayed bookings that are due: a due booking waits at most this long.
MOVE_EVERY_S = 0.05
#: Most delayed bookings one mover call moves into the stream.
MOVE_BATCH = 500
#: A consumer idle longer than this (no read at all) is not counted as a live worker.
LIVE_IDLE_MS = 10_000

#: Batches one consumer holds at once when its handler takes batches (each up to BATCH_FETCH entries).
BATCHES_AT_ONCE = 2
#: The share of min-idle one batch may take, from its fetch to its verdicts: the batch queued behind it
#: waits about as long, and the heartbeat needs the rest to keep the entries of both idle below min-idle.
BATCH_TIME_SHARE = 0.25
#: A consumer's first batch, before it has measured what an entry costs.
FIRST_BATCH = 50


class BatchSize:
    """How many entries a consumer's next batch takes: as many as it finished in a quarter of min-idle lately.

    A Streams consumer keeps an entry only while the entry's idle time stays under min-idle, the lease
    every other consumer's XAUTOCLAIM respects. The heartbeat resets it, but runs on the event loop the
    batch keeps busy, and its XCLAIM of every held entry slows with their number: on a loaded 2-core
    machine, batches of 500 took 0.4-2.5 s against the contract tests' 200 ms min-idle, the heartbeat
    fell 0.2-0.7 s behind, and the other consumer claimed and ran 100-1,300 entries a second time.
    Sizing each batch by the time its entries took (fetch to verdicts, queueing behind the other batch
    included) keeps that hold inside the lease on any machine, and costs nothing where entries are
    cheap: at 30 us an entry, a quarter of a 200 ms min-idle is 1,600 entries, above the 500 cap.
    """

    def __init__(self, min_idle_ms: float) -> None:
        self.budget_s = min_idle_ms / 1000 * BATCH_TIME_SHARE
        self.entries = FIRST_BATCH
        self.entry_s: float | None = None

    def record(self, entries: int, held_s: float) -> None:
        """One batch of ``entries`` was held ``held_s`` seconds, from its fetch to its last verdict."""
        if entries == 0:
            return
        cost = held_s / entries
        # Half the old estimate and half the new, and never below half the last size: one slow batch (a GC
        # pause, a busy disk) halves the next one at most, and a machine that got busy is followed within a few.
        self.entry_s = cost if self.entry_s is None else (self.entry_s + cost) / 2
        fits = int(self.budget_s / max(self.entry_s, 1e-9))
        self.entries = max(1, self.entries // 2, min(BATCH_FETCH, fits))

Fields = dict[bytes, bytes]

# Write a dead letter once per work entry: the set remembers which entries were dead-lettered, so
# a redelivery of the same entry (worker killed between XADD and XACK) adds nothing. A script,
# not MULTI, because the XADD depends on the SADD's answer.
_WRITE_DEAD_LETTER = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], '*',
  'booking', ARGV[2], 'reason', ARGV[3], 'attempts', ARGV[4], 'source_id', ARGV[1])
"""


# Delayed bookings: score = due time (Redis's clock, ms); member = "<unique id>|<booking text>".
_DELAY = """
local t = redis.call('TIME')
local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], due, ARGV[i]) end
return due
"""
# Move every due booking into the stream and drop it from the set; answer how many moved, and how many
# ms until the next one is due (-1: none waiting).
_MOVE_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local sep = string.find(member, '|', 1, true)
  redis.call('XADD', KEYS[2], '*', 'booking', string.sub(member, sep + 1))
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nxt[2] then return {#due, tonumber(nxt[2]) - now} end
return {#due, -1}
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _flag(name: str, value: str) -> bool:
    if value.lower() in ("1", "true", "on", "yes"):
        return True
    if value.lower() in ("0", "false", "off", "no"):
        return False
    raise ConfigError(f"option {name}={value!r} is not a switch; use {name}=1 or {name}=0")


def _entry_id(source: str) -> str:
    """The stream entry id inside a Delivery ``source`` (``entry 1700000000000-0``)."""
    return source.removeprefix("entry ")


@contextlib.contextmanager
def _broker_errors(url: str) -> Iterator[None]:
    """Turn a lost connection into the one-line BrokerUnavailable a learner can act on."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, ConnectionError) as e:
        raise BrokerUnavailable(f"Redis stopped answering at {url} ({e}); start the lab with `labkit up`") from None


class StreamsBackend(Backend):
    """The booking job on a Redis stream with a consumer group; see the module docstring."""

    name: ClassVar[str] = "streams"

    _dead_letter_script: Any = None
    _delay_script: Any = None
    _move_due_script: Any = None

    async def connect(self) -> None:
        """Connect, and register the dead-letter and delay scripts with this connection's client."""
        await super().connect()
        self._dead_letter_script = self.redis.register_script(_WRITE_DEAD_LETTER)
        self._delay_script = self.redis.register_script(_DELAY)
        self._move_due_script = self.redis.register_script(_MOVE_DUE)

    @property
    def _dlq_written(self) -> str:
        """The set of work entry ids already dead-lettered (makes write_dead_letter idempotent)."""
        return self.ledger.key("dlq-written")

    async def setup(self) -> None:
        """Create the stream and the group at id 0, so entries sent before any worker started are delivered.

        The dead-letter stream appears with its first entry (reading a missing stream gives nothing).
        """
        with _broker_errors(self.config.redis_url):
            try:
                await self.redis.xgroup_create(self.names.stream, self.names.stream_group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):  # BUSYGROUP: the group exists already, which is what we want
                    raise

    async def produce(self, messages: Iterable[Message], *, delay_ms: int = 0) -> list[str]:
        """XADD each message as field ``booking``, pipelined in chunks; returns the entry ids.

        With ``delay_ms`` each message goes to the delayed set instead, due ``delay_ms`` after now by
        Redis's clock; it is named there as ``bookings:delayed/<member id>``.
        """
        ids: list[str] = []
        chunk: list[str | bytes] = []
        send = self._xadd if not delay_ms else lambda texts: self._delay(texts, delay_ms)
        with _broker_errors(self.config.redis_url):
            for message in messages:
                chunk.append(wire_text(message))
                if len(chunk) == PRODUCE_CHUNK:
                    ids += await send(chunk)
                    chunk = []
            if chunk:
                ids += await send(chunk)
        return ids

    async def _delay(self, texts: list[str | bytes], delay_ms: int) -> list[str]:
        """ZADD the texts to the delayed set in one script, each under a member id of its own."""
        token = uuid.uuid4().hex[:12]
        members = [f"{token}-{i}" for i in range(len(texts))]
        args = [
            f"{member}|".encode() + (t if isinstance(t, bytes) else t.encode())
            for member, t in zip(members, texts, strict=True)
        ]
        await self._delay_script(keys=[self.names.stream_delayed], args=[delay_ms, *args])
        return [f"{self.names.stream_delayed}/{member}" for member in members]

    async def move_due(self) -> tuple[int, float | None]:
        """Move the delayed bookings that are due into the stream (once each, whoever calls it).

        Returns:
            how many moved, and the seconds until the next one is due (None when none waits).
        """
        moved, until_next = await self._move_due_script(
            keys=[self.names.stream_delayed, self.names.stream], args=[MOVE_BATCH]
        )
        return int(moved), (int(until_next) / 1000 if int(until_next) >= 0 else None)

    async def _move_due_bookings(self) -> None:
        """The consumer's mover: delayed bookings into the stream when due, every MOVE_EVERY_S or sooner."""
        while True:
            try:
                moved, until_next = await self.move_due()
            except (RedisConnectionError, RedisTimeoutError, ConnectionError, ResponseError) as e:
                log.debug("moving due bookings failed (Redis away?): %s", e)
                moved, until_next = 0, None
            if moved == MOVE_BATCH:
                continue  # more are due already
            wait = MOVE_EVERY_S if until_next is None else min(MOVE_EVERY_S, until_next)
            await asyncio.sleep(max(wait, 0.001))

    async def _xadd(self, texts: list[str | bytes]) -> list[str]:
        # Not a transaction: one round trip for the chunk, and each reply is that entry's id.
        async with self.redis.pipeline(transaction=False) as pipe:
            for text in texts:
                pipe.xadd(self.names.stream, {"booking": text})
            return [_text(entry_id) for entry_id in await pipe.execute()]

    async def consume(self, handler: BookingHandler, stop: asyncio.Event) -> None:
        """Read, reclaim and process entries as consumer ``handler.events.worker_id`` until ``stop`` is set.

        On stop: no more reads or claims, the handler calls in flight finish and are
        acknowledged, then this returns. Entries left pending (retries waiting for their
        idle time) stay in this consumer's PEL for any consumer to claim.

        A Redis that goes away after the consumer started (a restart) is waited for, up to
        ``RECONNECT_GRACE_S``: unacknowledged entries stay pending in Redis and are claimed again.

        Raises:
            BrokerUnavailable: Redis does not answer at start, or stopped answering for ``RECONNECT_GRACE_S``.
            ConfigError: a bad ``heartbeat`` option.
        """
        run = _ConsumerRun(self, handler, stop)
        mover = asyncio.create_task(self._move_due_bookings())
        try:
            with _broker_errors(self.config.redis_url):
                await run.run()
        finally:
            mover.cancel()

    async def consume_batches(self, sink: BatchSink, stop: asyncio.Event, consumer: str) -> None:
        """XREADGROUP up to BATCH_FETCH new entries, hand their ``booking`` fields to ``sink``, XACK them together.

        No reclaimer: the harness's consumers are stopped warm and never fail a message.
        """
        with _broker_errors(self.config.redis_url):
            while not stop.is_set():
                reply = await self.redis.xreadgroup(
                    self.names.stream_group, consumer, {self.names.stream: ">"}, count=BATCH_FETCH, block=READ_BLOCK_MS
                )
                entries = reply[0][1] if reply else []
                if not entries:
                    continue
                await sink([fields[b"booking"] for _, fields in entries])
                entry_ids = [entry_id for entry_id, _ in entries]
                await self.redis.xack(self.names.stream, self.names.stream_group, *entry_ids)

    async def write_dead_letter(self, delivery: Delivery, reason: str) -> None:
        """XADD to the dead-letter stream: ``booking``, ``reason``, ``attempts``, ``source_id``; once per entry."""
        with _broker_errors(self.config.redis_url):
            await self._dead_letter_script(
                keys=[self._dlq_written, self.names.stream_dlq],
                args=[_entry_id(delivery.source), delivery.payload, reason, delivery.attempt],
            )

    async def dead_letters(self) -> list[dict[str, Any]]:
        """The dead-letter stream, oldest first; ``source`` is the work entry id."""
        with _broker_errors(self.config.redis_url):
            entries = await self.redis.xrange(self.names.stream_dlq)
        return [
            dead_letter_record(
                fields.get(b"booking", b""),
                _text(fields.get(b"reason", b"")),
                int(fields.get(b"attempts", 0)),
                _text(fields.get(b"source_id", b"")),
            )
            for _, fields in entries
        ]

    async def queue_depths(self) -> dict[str, Any]:
        """The group's view: ``backlog`` (lag: entries never delivered), ``in_flight`` (pending: delivered,
        not acked, retries included), plus ``pending_per_consumer``, ``last_delivered_id``,
        ``stream_length`` and ``dlq_length``.
        """
        stream, group = self.names.stream, self.names.stream_group
        with _broker_errors(self.config.redis_url):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(stream)
                pipe.xlen(self.names.stream_dlq)
                pipe.zcard(self.names.stream_delayed)
                stream_length, dlq_length, delayed = await pipe.execute()
            depths: dict[str, Any] = {
                "backlog": stream_length + delayed,
                "delayed": delayed,
                "in_flight": 0,
                "pending_per_consumer": {},
                "last_delivered_id": None,
                "stream_length": stream_length,
                "dlq_length": dlq_length,
            }
            if not stream_length and not await self.redis.exists(stream):
                return depths
            info = next((g for g in await self.redis.xinfo_groups(stream) if _text(g["name"]) == group), None)
            if info is None:  # entries produced before any worker or `labkit up` created the group
                return depths
            last_id = _text(info["last-delivered-id"])
            pending = await self.redis.xpending(stream, group)
            lag = info.get("lag")
            depths.update(
                backlog=None if lag is None else lag + delayed,
                in_flight=int(info["pending"]),
                pending_per_consumer={_text(c["name"]): c["pending"] for c in pending["consumers"]},
                last_delivered_id=last_id,
            )
            if depths["backlog"] is None:
                depths["backlog"] = await self._count_after(last_id) + delayed
        return depths

    async def _count_after(self, last_id: str) -> int:
        """Entries after ``last_id``, counted with XRANGE.

        Needed when XINFO GROUPS reports ``lag`` as null, which Redis does when entries were
        deleted (XDEL) between the group's position and the stream's end: it cannot tell
        from its counters alone how many are left (and Redis < 7 has no ``lag`` at all).
        """
        count, start = 0, f"({last_id}"
        while entries := await self.redis.xrange(self.names.stream, min=start, count=1000):
            count += len(entries)
            start = f"({_text(entries[-1][0])}"
        return count

    async def purge(self) -> None:
        """Delete the work and dead-letter streams (the group goes with its stream), the delayed set and the
        dead-letter markers."""
        with _broker_errors(self.config.redis_url):
            names = self.names
            await self.redis.delete(names.stream, names.stream_dlq, names.stream_delayed, self._dlq_written)

    def retry_delay_s(self, attempt: int) -> float:
        """The claim idle time, the same for every attempt: a retry is an entry left pending that long."""
        return max(self.settings.backoff_ms, MIN_CLAIM_IDLE_MS) / 1000

    async def live_workers(self) -> list[str]:
        """Consumers of the group that read within LIVE_IDLE_MS (XINFO CONSUMERS; a killed one lingers, idle)."""
        with _broker_errors(self.config.redis_url):
            try:
                consumers = await self.redis.xinfo_consumers(self.names.stream, self.names.stream_group)
            except ResponseError:  # no stream or group yet
                return []
        return sorted(_text(c["name"]) for c in consumers if int(c["idle"]) < LIVE_IDLE_MS)


class _ConsumerRun:
    """One consume() call: a fetch loop (reads and claims), a task per entry, an acker and a heartbeat.

    Fetching is one loop rather than a reader and a reclaimer racing each other, so the
    two never take more entries between them than there are free handler slots; entries
    are only ever taken when a slot is free, so none waits in a local buffer going idle.
    """

    def __init__(self, backend: StreamsBackend, handler: BookingHandler, stop: asyncio.Event) -> None:
        settings = backend.settings
        self.backend = backend
        self.redis = backend.redis
        self.stream = backend.names.stream
        self.group = backend.names.stream_group
        self.handler = handler
        self.stop = stop
        self.me = handler.events.worker_id
        self.max_attempts = settings.max_attempts
        self.min_idle_ms = max(settings.backoff_ms, MIN_CLAIM_IDLE_MS)
        self.reclaim_every = min(self.min_idle_ms / 2000, MAX_RECLAIM_EVERY_S)
        self.heartbeat = _flag("heartbeat", settings.options.get("heartbeat", "1"))
        # Touch entries idle for a third of min-idle, checking every sixth: an entry of ours is
        # never seen idle for more than about half of min-idle, leaving half as margin for a busy loop.
        self.touch_after = self.min_idle_ms / 3000
        self.heartbeat_every = self.min_idle_ms / 6000
        # Batches (a cheap workflow: BookingHandler.batches) are handled one after another on the event loop,
        # so more than two at once would only leave entries waiting, idle in Redis, for another consumer's
        # XAUTOCLAIM; two let the next batch's reply travel while one is handled.
        self.free = min(settings.concurrency, BATCHES_AT_ONCE) if handler.batches else settings.concurrency
        self.batch_size = BatchSize(self.min_idle_ms)
        self.slot_freed = asyncio.Event()
        # Entries this consumer is working on -> monotonic time of their delivery or last heartbeat.
        self.held: dict[str, float] = {}
        self.to_ack: list[str] = []
        self.ack_wanted = asyncio.Event()
        self.closing = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.cursor = "0-0"
        self.failure: BaseException | None = None
        self.counts = {"completed": 0, "retried": 0, "dead_lettered": 0, "claimed": 0}
        #: Redis answered this consumer at least once (only then is a lost connection worth waiting out).
        self.seen_redis = False
        #: Monotonic time Redis stopped answering, None while it answers.
        self.down_since: float | None = None

    async def run(self) -> None:
        acker = asyncio.create_task(self._acker())
        heartbeat = asyncio.create_task(self._heartbeat()) if self.heartbeat else None
        try:
            await self._fetch()
            # Warm stop: let the handler calls in flight finish, then flush their acks.
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.closing = True
            self.ack_wanted.set()
            await acker
        except BaseException:
            for task in (*self.tasks, acker):
                task.cancel()
            raise
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
        if self.failure is not None:
            raise self.failure
        await self._forget_me_if_idle()
        log.info(
            "%s stopped: %d completed, %d retried, %d dead-lettered, %d claimed from idle pending lists",
            self.me,
            *self.counts.values(),
        )

    # -- fetching ---------------------------------------------------------------------------

    async def _fetch(self) -> None:
        next_claim = 0.0  # claim first: entries a crashed predecessor left behind are oldest
        while not self.stop.is_set() and self.failure is None:
            if self.free == 0:
                self.slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.slot_freed.wait(), READ_BLOCK_MS / 1000)
                continue
            try:
                now = time.monotonic()
                if now >= next_claim:
                    walked = await self._reclaim()
                    # A walk cut short by full slots goes on at the next free slot, before any new
                    # read: retries and a dead worker's entries are older than anything unread, and
                    # a walk at one page per reclaim_every would leave them waiting for seconds.
                    next_claim = time.monotonic() + self.reclaim_every if walked else 0.0
                else:
                    await self._read(block_ms=max(1, min(READ_BLOCK_MS, int((next_claim - now) * 1000))))
                self._redis_answered()
            except (RedisConnectionError, RedisTimeoutError, ConnectionError) as e:
                if not self._redis_lost(e):
                    raise
                await asyncio.sleep(RECONNECT_PAUSE_S)
            except ResponseError as e:
                # NOGROUP: the stream or group was deleted (purge, `labkit reset`); Redis 7 answers a
                # read that was blocked at that moment with UNBLOCKED, Valkey with NOGROUP.
                if not str(e).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                log.warning(
                    "%s: stream %s or group %s is gone (purged?); creating them again", self.me, self.stream, self.group
                )
                await self.backend.setup()

    async def _read(self, block_ms: int) -> None:
        """New entries, never delivered before: delivery count 1. BLOCK 0 would wait forever, hence >= 1."""
        batches = self.handler.batches
        count = self.batch_size.entries if batches else self.free
        reply = await self.redis.xreadgroup(self.group, self.me, {self.stream: ">"}, count=count, block=block_ms)
        for _, entries in reply:
            if batches:
                self._start_batch([(_text(entry_id), fields, 1) for entry_id, fields in entries])
                continue
            for entry_id, fields in entries:
                self._start(_text(entry_id), fields, attempt=1)

    async def _reclaim(self) -> bool:
        """XAUTOCLAIM entries idle for min-idle ms (retries due, and a dead consumer's leftovers).

        The cursor walks the group's whole pending list in pages; it is kept between passes
        when the handler slots fill up half way, and starts over from ``0-0`` once a walk ends.

        Returns:
            True when the walk reached the end of the pending list (cursor ``0-0``).
        """
        batches = self.handler.batches
        while self.free > 0:
            start = self.cursor
            page = min(self.batch_size.entries if batches else self.free, CLAIM_PAGE)
            cursor, claimed, deleted = await self.redis.xautoclaim(
                self.stream, self.group, self.me, self.min_idle_ms, start_id=start, count=page
            )
            self.cursor = _text(cursor)
            log.debug("%s: XAUTOCLAIM from %s claimed %d, next cursor %s", self.me, start, len(claimed), self.cursor)
            if deleted:
                # Entries deleted from the stream (XDEL, trimming) while pending: XAUTOCLAIM has
                # already dropped them from the PEL (Redis >= 7), so they only need reporting.
                log.warning(
                    "%s: pending entries no longer in the stream, dropped: %s",
                    self.me,
                    ", ".join(_text(d) for d in deleted),
                )
            claimed = [(_text(entry_id), fields) for entry_id, fields in claimed if entry_id is not None]
            counts = await self._delivery_counts([entry_id for entry_id, _ in claimed])
            taken = []
            for entry_id, fields in claimed:
                if self.heartbeat and entry_id in self.held:
                    # Our own entry, claimed back because the loop was too busy to heartbeat it in time:
                    # it is running here already, so don't start it twice.
                    self.held[entry_id] = time.monotonic()
                    continue
                if entry_id in counts:
                    self.counts["claimed"] += 1
                    taken.append((entry_id, fields, counts[entry_id]))
            if batches and taken:
                self._start_batch(taken)
            for entry_id, fields, attempt in [] if batches else taken:
                self._start(entry_id, fields, attempt=attempt)
            if self.cursor == "0-0":
                return True
        return False

    async def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        """Each entry's delivery count, which XAUTOCLAIM has just incremented but does not return.

        An entry missing from the answer was acknowledged in between and is skipped.
        """
        if not entry_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
            replies = await pipe.execute()
        return {_text(r[0]["message_id"]): int(r[0]["times_delivered"]) for r in replies if r}

    # -- processing -------------------------------------------------------------------------

    def _start(self, entry_id: str, fields: Fields, attempt: int) -> None:
        self.free -= 1
        self.held[entry_id] = time.monotonic()
        task = asyncio.create_task(self._process(entry_id, fields, attempt))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _start_batch(self, entries: list[tuple[str, Fields, int]]) -> None:
        """Entries (id, fields, attempt) as one batch, in one handler slot (``BookingHandler.run_batch``)."""
        self.free -= 1
        now = time.monotonic()
        for entry_id, _, _ in entries:
            self.held[entry_id] = now
        task = asyncio.create_task(self._process_batch(entries, fetched=now))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @staticmethod
    def _delivery(entry_id: str, fields: Fields, attempt: int) -> Delivery:
        payload: bytes | str | None = fields.get(b"booking")
        if payload is None:  # e.g. an entry a learner added by hand with another field name
            payload = encode({_text(k): v.decode("utf-8", "replace") for k, v in fields.items()})
        return Delivery(payload, attempt, f"entry {entry_id}")

    async def _process(self, entry_id: str, fields: Fields, attempt: int) -> None:
        handler = self.handler
        delivery = self._delivery(entry_id, fields, attempt)
        try:
            handler.events.emit(
                "received", booking_id=booking_id_of(delivery.payload), attempt=attempt, source=delivery.source
            )
            result = await self._verdict(delivery, has_booking=b"booking" in fields)
            await self._settle(entry_id, delivery, result)
            self.ack_wanted.set()
        except (RedisConnectionError, RedisTimeoutError, ConnectionError) as e:
            # Not acknowledged, so still pending in Redis: claimed again (here or elsewhere) once it is back.
            log.warning("%s: lost Redis while on entry %s (%s); it stays pending", self.me, entry_id, e)
            self.held.pop(entry_id, None)
        except Exception:
            # A bug, not a verdict: leave the entry pending so it is claimed and tried again.
            log.exception("%s: entry %s failed unexpectedly; it stays pending", self.me, entry_id)
            self.held.pop(entry_id, None)
        finally:
            self.free += 1
            self.slot_freed.set()

    async def _process_batch(self, entries: list[tuple[str, Fields, int]], fetched: float) -> None:
        """One fetched batch: the handler's verdicts for all of it, then each entry settled, acked together.

        An entry without a ``booking`` field, or delivered more often than ``max_attempts``, gets its
        verdict alone (:meth:`_verdict`); the others go to the handler as one batch, in stream order.
        """
        handler = self.handler
        deliveries = [self._delivery(entry_id, fields, attempt) for entry_id, fields, attempt in entries]
        together = [b"booking" in fields and attempt <= self.max_attempts for _, fields, attempt in entries]
        try:
            validated = handler.validate_batch(deliveries)
            handler.log_received(deliveries, validated)
            runnable = [d for d, alone in zip(deliveries, together, strict=True) if alone]
            in_batch = [parsed for parsed, alone in zip(validated, together, strict=True) if alone]
            verdicts = iter(await handler.run_batch(runnable, in_batch))
            for (entry_id, fields, _), delivery, with_batch in zip(entries, deliveries, together, strict=True):
                has_booking = b"booking" in fields
                result = next(verdicts) if with_batch else await self._verdict(delivery, has_booking=has_booking)
                await self._settle(entry_id, delivery, result)
            self.ack_wanted.set()
            self.batch_size.record(len(entries), time.monotonic() - fetched)
        except (RedisConnectionError, RedisTimeoutError, ConnectionError) as e:
            log.warning("%s: lost Redis on a batch of %d entries (%s); they stay pending", self.me, len(entries), e)
            self._let_go(entries)
        except Exception:
            log.exception("%s: a batch of %d entries failed unexpectedly; they stay pending", self.me, len(entries))
            self._let_go(entries)
        finally:
            self.free += 1
            self.slot_freed.set()

    def _let_go(self, entries: list[tuple[str, Fields, int]]) -> None:
        """Stop heartbeating entries left pending (not acknowledged), so the reclaimer can hand them out again."""
        acked = set(self.to_ack)
        for entry_id, _, _ in entries:
            if entry_id not in acked:
                self.held.pop(entry_id, None)

    async def _settle(self, entry_id: str, delivery: Delivery, result: Result) -> None:
        """Act on one verdict: leave a retry pending, dead-letter, or queue the entry for the acker."""
        if result.outcome is Outcome.RETRY:
            # No ack: the entry stays pending. Reset its idle time so the retry delay
            # (min-idle) counts from this failure rather than from the delivery.
            await self._touch([entry_id])
            self.held.pop(entry_id, None)
            self.counts["retried"] += 1
            self.handler.events.emit(
                "retried",
                booking_id=result.booking_id,
                attempt=delivery.attempt,
                source=delivery.source,
                delay_ms=self.min_idle_ms,
                reason=result.reason,
            )
            return
        if result.outcome is Outcome.DEAD:
            await self.backend.dead_letter(self.handler, delivery, result)
            self.counts["dead_lettered"] += 1
        else:
            self.counts["completed"] += 1
        self.to_ack.append(entry_id)

    async def _verdict(self, delivery: Delivery, has_booking: bool) -> Result:
        if not has_booking:
            return Result(Outcome.DEAD, None, "bad message: stream entry has no 'booking' field")
        if delivery.attempt > self.max_attempts:
            # Delivered this often without ever reaching a verdict: its worker died each time
            # (a booking that crashes workers). Running it again would only kill another one.
            return Result(
                Outcome.DEAD,
                booking_id_of(delivery.payload),
                f"delivered {delivery.attempt} times without a verdict (max_attempts {self.max_attempts}); "
                "its workers died or hung each time",
            )
        return await self.handler(delivery)

    async def _acker(self) -> None:
        """XACK finished entries in batches: whatever finished while the previous XACK was on the wire."""
        while True:
            await self.ack_wanted.wait()
            self.ack_wanted.clear()
            if self.to_ack:
                ids, self.to_ack = self.to_ack, []
                try:
                    await self.redis.xack(self.stream, self.group, *ids)
                except (RedisConnectionError, RedisTimeoutError, ConnectionError) as e:
                    self.to_ack[:0] = ids  # acknowledge them once Redis is back
                    if not self._redis_lost(e):
                        self.failure = e
                        return
                    await asyncio.sleep(RECONNECT_PAUSE_S)
                    self.ack_wanted.set()
                    continue
                for entry_id in ids:
                    self.held.pop(entry_id, None)
            if self.closing and not self.to_ack:
                return

    async def _heartbeat(self) -> None:
        """Keep our slow entries ours: XCLAIM them to ourselves with min-idle 0 to reset their idle time.

        Without this, another consumer's XAUTOCLAIM would take an entry whose handler runs
        longer than min-idle and process it a second time while we are still on it.
        """
        while True:
            await asyncio.sleep(self.heartbeat_every)
            now = time.monotonic()
            stale = [entry_id for entry_id, touched in self.held.items() if now - touched >= self.touch_after]
            if stale:
                await self._touch(stale)

    async def _touch(self, entry_ids: list[str]) -> None:
        """``XCLAIM <stream> <group> <me> 0 <ids> JUSTID``: idle time back to 0, delivery count unchanged."""
        try:
            await self.redis.xclaim(self.stream, self.group, self.me, 0, entry_ids, justid=True)
        except ResponseError as e:  # NOGROUP: purged under our feet; the fetch loop recreates it
            log.debug("%s: heartbeat of %s failed: %s", self.me, entry_ids, e)
            return
        except (RedisConnectionError, RedisTimeoutError, ConnectionError) as e:
            # The fetch loop and the acker wait for Redis; a touch that missed only risks a duplicate.
            log.debug("%s: heartbeat of %s failed: %s", self.me, entry_ids, e)
            return
        now = time.monotonic()
        for entry_id in entry_ids:
            if entry_id in self.held:
                self.held[entry_id] = now

    def _redis_lost(self, error: Exception) -> bool:
        """Note a lost connection; True while it is worth waiting for Redis to come back.

        Only a consumer that has worked with this Redis waits (a restart), and for at most
        ``RECONNECT_GRACE_S``; one that never reached it fails at once, as at start-up.
        """
        if not self.seen_redis:
            return False
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning("%s: lost Redis (%s); trying again for up to %g s", self.me, error, RECONNECT_GRACE_S)
            self.handler.events.emit("broker_lost", error=str(error))
        return now - self.down_since < RECONNECT_GRACE_S

    def _redis_answered(self) -> None:
        self.seen_redis = True
        if self.down_since is not None:
            down = time.monotonic() - self.down_since
            self.down_since = None
            log.warning("%s: Redis is back after %.1f s", self.me, down)
            self.handler.events.emit("broker_back", down_s=round(down, 3))

    async def _forget_me_if_idle(self) -> None:
        """Remove this consumer from the group if it holds nothing, so XINFO CONSUMERS lists only useful names.

        A consumer that still has pending entries (retries waiting) is kept: deleting it would
        delete those entries from the PEL and lose them. Nothing else adds to our PEL now.
        """
        with contextlib.suppress(ResponseError):
            if not await self.redis.xpending_range(self.stream, self.group, "-", "+", 1, consumername=self.me):
                await self.redis.xgroup_delconsumer(self.stream, self.group, self.me)
