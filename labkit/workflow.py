"""The hotel-booking workflow every backend runs: validate → charge payment → write
confirmation → send email → update inventory.

The effects are real and checkable, so that a lesson can prove what a duplicate
delivery did:

- payment: a per-booking charge count in the Redis hash ``lab:<ns><backend>:payments``;
- confirmation: a small JSON file ``<run>/confirmations/<backend>/<booking_id>.json``;
- email: a message file in the local outbox ``<run>/outbox/<backend>/``;
- inventory: a per-hotel counter in the Redis hash ``lab:<ns><backend>:inventory``.

With idempotency on (the default) each effect is guarded by a per-booking marker and
happens once however often the message is delivered; with it off, every run applies
every effect again. Either way each workflow run of an already-completed booking is
counted as a duplicate.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from labkit.booking import Booking, booking_id_of, parse_booking
from labkit.config import Config
from labkit.errors import BadMessage
from labkit.events import EventLog

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from labkit.status import BookingRun, StatusRecorder


class Outcome(StrEnum):
    """What the backend must do with a message after one workflow run."""

    COMPLETED = "completed"  # ack / commit: never redelivered
    RETRY = "retry"  # transient failure, attempts left: deliver again after the backoff
    DEAD = "dead"  # bad message or attempts exhausted: dead-letter with the reason


class Delivery(msgspec.Struct, frozen=True):
    """One delivery of a message to a worker (a frozen msgspec Struct: a seventh of a frozen dataclass's cost,
    paid for every message).

    Args:
        payload: the message text exactly as it came off the wire.
        attempt: 1 for the first delivery; the backend's own delivery counter after that.
        source: where it came from, in the backend's words: ``job 17``, ``entry 1700000000000-0``,
            ``bookings/2/15`` (topic/partition/offset).
    """

    payload: bytes | str
    attempt: int
    source: str


class Result(msgspec.Struct, frozen=True):
    """The workflow's verdict on one delivery (a frozen msgspec Struct, as :class:`Delivery`)."""

    outcome: Outcome
    booking_id: str | None
    reason: str | None = None


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker processes bookings. Identical for every backend, so comparisons are fair.

    Args:
        concurrency: bookings processed at once inside one worker process; with no step or CPU time
            (:attr:`BookingHandler.batches`) the Streams and Kafka workers count fetched batches instead
            (Streams: at most two), since a batch's bookings share each round trip and write.
        max_attempts: deliveries of a failing booking before it is dead-lettered.
        backoff_ms: delay before the first retry; BullMQ and Kafka double it for each
            further retry, Redis Streams uses it as the XAUTOCLAIM min-idle time.
        idempotent: guard every effect with a per-booking marker.
        workflow: ``"booking"`` runs the five steps with their effects; ``"noop"`` only
            validates and records completion, for measuring the queue itself; ``"bench"``
            is the comparison harness's consumer (``labkit.bench``): no booking workflow,
            ``step_ms`` of I/O and ``cpu_ms`` of CPU per message, its latency noted.
        step_ms: simulated I/O time of each step (``asyncio.sleep``), for scaling lessons.
        cpu_ms: CPU-bound work per booking (a busy loop that holds the GIL).
        options: backend-specific tuning in the backend's own words, e.g.
            ``{"lock_duration_ms": "5000"}`` for BullMQ; each backend documents its keys.
        track_status: keep per-booking status for the booking service (``labkit.status``): workers
            record every transition and step, producers keep what the status API reads. Off, it costs nothing.
        handler: ``module:function`` or ``path/to/file.py:function``, a payment step of someone else's (an
            exercise's learner code) run in place of the built-in charge: see :func:`load_payment_step`.
    """

    concurrency: int = 1
    max_attempts: int = 3
    backoff_ms: int = 200
    idempotent: bool = True
    workflow: str = "booking"
    step_ms: float = 0.0
    cpu_ms: float = 0.0
    options: dict[str, str] = field(default_factory=dict)
    track_status: bool = False
    handler: str = ""

    def option(self, key: str, default: float) -> float:
        """A numeric backend option, or ``default`` when not given."""
        return float(self.options.get(key, default))

    def backoff_for(self, attempt: int) -> float:
        """Seconds to wait before delivery ``attempt + 1`` under exponential backoff."""
        return self.backoff_ms / 1000.0 * 2.0 ** (attempt - 1)


#: Effect files a batch writes before letting the event loop run its other tasks (about 10 ms of writes).
FILES_BETWEEN_YIELDS = 32


class PaymentFailed(Exception):
    """The payment step failed; transient unless the booking is poison."""


@dataclass
class PaymentContext:
    """What a payment step of someone else's (:attr:`WorkerSettings.handler`) gets besides the booking.

    Args:
        booking: the booking being processed.
        attempt: 1 for the first delivery.
        redis: this worker's Redis connection (redis-py asyncio), for a step's own guards.
        ledger: the bookkeeping, for :meth:`key` and :meth:`charge`.
    """

    booking: Booking
    attempt: int
    redis: Redis
    ledger: Ledger

    def key(self, *parts: str) -> str:
        """A Redis key in this backend's namespace (``lab:<ns><backend>:<parts>``), deleted by ``reset``."""
        return self.ledger.key("step", *parts)

    async def charge(self) -> None:
        """Charge the card once more: the real effect, counted per booking in ``lab:<ns><backend>:payments``."""
        await self.ledger.apply_effect("payments", self.booking.booking_id, self.booking.booking_id, 1, False)


PaymentStep = Callable[[PaymentContext], object]


def load_payment_step(spec: str) -> PaymentStep:
    """Import ``module:function`` (or ``file.py:function``): the payment step a worker runs instead of its own.

    The function takes a :class:`PaymentContext` and may be a coroutine function or a plain one; a plain one
    runs on the worker's event loop, so a ``time.sleep`` in it blocks the worker exactly as it would in
    production code. Raises ValueError with a readable reason when the spec does not name a function.
    """
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"handler {spec!r} is not module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader_spec = importlib.util.spec_from_file_location(f"labkit_step_{path.stem}", path)
            if loader_spec is None or loader_spec.loader is None or not path.is_file():
                raise ValueError(f"handler file {module_name} not found")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[loader_spec.name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure of foreign code is a bad argument
        raise ValueError(f"handler {spec!r} could not be loaded: {type(e).__name__}: {e}") from None
    step = getattr(module, attribute, None)
    if not callable(step):
        raise ValueError(f"handler {spec!r}: {module_name} has no function {attribute!r}")
    return step  # type: ignore[no-any-return]


# Apply an effect once per booking (idempotent) or every time; count every application. ARGV: the
# idempotency flag, the amount, then one (marker, field) pair per booking, in order; answers 1/0 per pair.
_APPLY_EFFECTS = """
local applied = {}
for i = 3, #ARGV, 2 do
  if ARGV[1] == '1' and redis.call('SADD', KEYS[1], ARGV[i]) == 0 then
    applied[#applied + 1] = 0
  else
    redis.call('HINCRBY', KEYS[2], ARGV[i + 1], ARGV[2])
    applied[#applied + 1] = 1
  end
end
return applied
"""
# Record finished workflow runs, one per booking id in ARGV[1] (separated by spaces, which a valid booking id
# never holds: one argument for a whole batch costs redis-py a fraction of one per id); a run for an
# already-completed booking is a duplicate. One SMISMEMBER and one SADD per thousand ids (Lua's unpack has a
# bound), not a call per id; the answer is the positions (from 1) of the duplicates, usually none, so that a
# batch's reply is not an array of one number per booking to parse.
_RECORD_COMPLETIONS = """
local ids = {}
for booking_id in string.gmatch(ARGV[1], '[^ ]+') do ids[#ids + 1] = booking_id end
local repeats, seen = {}, {}
for first = 1, #ids, 1000 do
  local chunk = {unpack(ids, first, math.min(first + 999, #ids))}
  local known = redis.call('SMISMEMBER', KEYS[1], unpack(chunk))
  for j, booking_id in ipairs(chunk) do
    if known[j] == 1 or seen[booking_id] then repeats[#repeats + 1] = first + j - 1 else seen[booking_id] = true end
  end
  redis.call('SADD', KEYS[1], unpack(chunk))
end
redis.call('HINCRBY', KEYS[2], 'runs', #ids)
if #repeats > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', #repeats) end
return repeats
"""


class _GroupCommit:
    """Writes completions in batches: whoever arrives while a write is in flight joins the next one.

    At low load every completion is written at once (no added latency); under load, the
    completions of all concurrent handlers (single bookings or whole batches) share one round
    trip to Redis, in the order they arrived. Each caller still waits until its own completions
    are stored, so a message is never acknowledged before its completion is recorded.
    """

    def __init__(self, write: Callable[[list[str]], Awaitable[list[bool]]]) -> None:
        self._write = write
        self._waiting: list[tuple[list[str], asyncio.Future[list[bool]]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, booking_ids: list[str]) -> list[bool]:
        """Record ``booking_ids`` (in order); each answer says whether it was the booking's first completion."""
        future: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self._waiting.append((booking_ids, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                firsts = await self._write([booking_id for booking_ids, _ in batch for booking_id in booking_ids])
            except Exception as error:  # noqa: BLE001 - handed to every waiter, who re-raises it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for booking_ids, future in batch:
                end = start + len(booking_ids)
                if not future.done():
                    future.set_result(firsts[start:end])
                start = end


class Ledger:
    """labkit's own bookkeeping in Redis: effects and the counters behind ``stats``.

    All keys of one backend share the prefix ``lab:<namespace><backend>:`` so that ``reset``
    can find them and a learner can read them with ``redis-cli``.
    """

    def __init__(self, redis: Redis, config: Config, backend: str) -> None:
        self.redis = redis
        self.names = config.names
        self.backend = backend
        self._apply = redis.register_script(_APPLY_EFFECTS)
        self._complete = redis.register_script(_RECORD_COMPLETIONS)
        self._completions = _GroupCommit(self._write_completions)

    def key(self, *parts: str) -> str:
        return self.names.key(self.backend, *parts)

    async def apply_effect(self, kind: str, booking_id: str, field_name: str, amount: int, idempotent: bool) -> bool:
        """Add ``amount`` to ``field_name`` of hash ``kind``; once per booking when idempotent."""
        [applied] = await self.apply_effects(kind, [(booking_id, field_name)], amount, idempotent)
        return applied

    async def apply_effects(
        self, kind: str, targets: Sequence[tuple[str, str]], amount: int, idempotent: bool
    ) -> list[bool]:
        """:meth:`apply_effect` for many ``(booking_id, field_name)`` pairs, in order, in one round trip."""
        if not targets:
            return []
        args: list[str | int] = ["1" if idempotent else "0", amount]
        for booking_id, field_name in targets:
            args += (f"{kind}:{booking_id}", field_name)
        applied = await self._apply(keys=[self.key("effects"), self.key(kind)], args=args)
        return [bool(a) for a in applied]

    async def record_completion(self, booking_id: str) -> bool:
        """Mark the booking completed; False (and a duplicate counted) if it already was."""
        [first] = await self._completions.submit([booking_id])
        return first

    async def record_completions(self, booking_ids: Sequence[str]) -> list[bool]:
        """:meth:`record_completion` for a batch, in order, in one round trip (shared with concurrent callers)."""
        if not booking_ids:
            return []
        return await self._completions.submit(list(booking_ids))

    async def _write_completions(self, booking_ids: list[str]) -> list[bool]:
        keys = [self.key("completed"), self.key("counters")]
        repeats: list[int] = await self._complete(keys=keys, args=[" ".join(booking_ids)])
        firsts = [True] * len(booking_ids)
        for position in repeats:
            firsts[position - 1] = False
        return firsts

    async def record_retry(self, count: int = 1) -> None:
        """Count ``count`` deliveries that were retries (attempt 2 or later)."""
        await self.redis.hincrby(self.key("counters"), "retried", count)

    async def record_dead_letter(self, booking_id: str | None, source: str) -> None:
        """Count a dead letter, distinct per booking (per source when the message had no usable id)."""
        await self.redis.sadd(self.key("dead"), booking_id or f"source:{source}")

    async def counts(self) -> dict[str, int]:
        """``completed``, ``dead_lettered``, ``retried``, ``duplicates`` and ``runs``."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.scard(self.key("completed"))
            pipe.scard(self.key("dead"))
            pipe.hgetall(self.key("counters"))
            completed, dead, counters = await pipe.execute()
        counters = {_text(k): int(v) for k, v in counters.items()}
        return {
            "completed": int(completed),
            "dead_lettered": int(dead),
            "retried": counters.get("retried", 0),
            "duplicates": counters.get("duplicates", 0),
            "runs": counters.get("runs", 0),
        }

    async def effects(self) -> dict[str, dict[str, int]]:
        """The applied effects: ``payments`` (charges per booking) and ``inventory`` (rooms per hotel)."""
        payments = await self.redis.hgetall(self.key("payments"))
        inventory = await self.redis.hgetall(self.key("inventory"))
        return {
            "payments": {_text(k): int(v) for k, v in payments.items()},
            "inventory": {_text(k): int(v) for k, v in inventory.items()},
        }

    async def reset(self) -> int:
        """Delete every bookkeeping key of this backend; returns how many were deleted."""
        deleted = 0
        async for key in self.redis.scan_iter(match=self.key("*"), count=500):
            deleted += int(await self.redis.delete(key))
        return deleted


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class BookingHandler:
    """Runs the workflow for one delivery and says what the backend should do next.

    The handler never raises for a bad or failing message (only for cancellation): the
    backend turns the :class:`Result` into an ack, a scheduled retry or a dead letter.

    Args:
        ledger: the Redis bookkeeping of this backend.
        events: this worker's event log.
        settings: the worker settings.
        run_dir: the run folder, for confirmation files and the outbox.
        status: records each booking's transitions for the booking service; None (the default) records nothing.
        payment_step: charges the card instead of the built-in charge (:func:`load_payment_step`); an exception
            it raises is a failed payment, logged with ``handler_error``.
    """

    ledger: Ledger
    events: EventLog
    settings: WorkerSettings
    run_dir: Path
    status: StatusRecorder | None = None
    payment_step: PaymentStep | None = None
    in_flight: int = 0
    _dirs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in ("confirmations", "outbox"):
            folder = self.run_dir / kind / self.ledger.backend
            folder.mkdir(parents=True, exist_ok=True)
            self._dirs[kind] = folder

    async def __call__(self, delivery: Delivery) -> Result:
        """Validate and run the workflow once; the verdict is also written to the event log."""
        self.in_flight += 1
        try:
            return await self._run(delivery)
        finally:
            self.in_flight -= 1

    async def _run(self, delivery: Delivery) -> Result:
        where = {"attempt": delivery.attempt, "source": delivery.source}
        try:
            booking = parse_booking(delivery.payload)
        except BadMessage as bad:
            booking_id = booking_id_of(delivery.payload)
            self.events.emit("failed", booking_id=booking_id, error=bad.reason, bad_message=True, **where)
            return Result(Outcome.DEAD, booking_id, f"bad message: {bad.reason}")

        booking_id = booking.booking_id
        latency = {"created_at": booking.created_at, "seq": booking.seq}
        self.events.emit("started", booking_id=booking_id, **where, **latency)
        run = None if self.status is None else await self.status.start(booking_id, delivery.attempt, delivery.source)
        if delivery.attempt > 1:
            await self.ledger.record_retry()
        try:
            await self._workflow(booking, delivery.attempt, run)
        except PaymentFailed as failure:
            self.events.emit("failed", booking_id=booking_id, error=str(failure), **where)
            result = self._failed(booking, delivery.attempt, failure)
            if run is not None and result.outcome is Outcome.RETRY:
                await run.retrying(str(failure))
            return result
        first = await self.ledger.record_completion(booking_id)
        self.events.emit("completed", booking_id=booking_id, duplicate=not first, **where, **latency)
        if run is not None:
            await run.completed()
        return Result(Outcome.COMPLETED, booking_id)

    def _failed(self, booking: Booking, attempt: int, failure: PaymentFailed) -> Result:
        """The verdict on a failed payment: a retry while attempts are left, else a dead letter."""
        if booking.fault.poison and attempt >= self.settings.max_attempts:
            return Result(Outcome.DEAD, booking.booking_id, f"poison: {failure} (after {attempt} attempts)")
        if attempt >= self.settings.max_attempts:
            return Result(Outcome.DEAD, booking.booking_id, f"attempts exhausted: {failure}")
        return Result(Outcome.RETRY, booking.booking_id, str(failure))

    @property
    def batches(self) -> bool:
        """Whether a backend may hand this handler whole fetched batches (:meth:`run_batch`).

        Only when a booking's work is the lab's own effects alone: with step or CPU time the lessons measure
        how concurrency overlaps bookings, the status records follow one booking at a time, and a learner's
        payment step (``settings.handler``) runs once per booking, as its exercise's faults expect.
        """
        settings = self.settings
        return (
            settings.workflow in ("booking", "noop")
            and not settings.step_ms
            and not settings.cpu_ms
            and not settings.handler
            and (self.status is None)
        )

    @staticmethod
    def validate_batch(deliveries: Sequence[Delivery]) -> list[Booking | BadMessage]:
        """Each delivery's booking, or the rule it breaks: one pass a backend may log from before :meth:`run_batch`."""
        parsed: list[Booking | BadMessage] = []
        for delivery in deliveries:
            try:
                parsed.append(parse_booking(delivery.payload))
            except BadMessage as bad:
                parsed.append(bad)
        return parsed

    def log_received(self, deliveries: Sequence[Delivery], validated: Sequence[Booking | BadMessage]) -> None:
        """One ``received`` line per delivery, in one write; the booking id is the validated one where there is one."""
        rows = []
        for delivery, parsed in zip(deliveries, validated, strict=True):
            booking_id = parsed.booking_id if isinstance(parsed, Booking) else booking_id_of(delivery.payload)
            rows.append({"booking_id": booking_id, "attempt": delivery.attempt, "source": delivery.source})
        self.events.emit_batch("received", rows)

    async def run_batch(
        self, deliveries: Sequence[Delivery], validated: Sequence[Booking | BadMessage] | None = None
    ) -> list[Result]:
        """Run the workflow for a batch, in order, with the same verdicts and event lines as one call each.

        What one delivery does a round trip or a write for is done once per batch: the bookings
        are validated in one pass, each kind of event line is written in one write, the effects
        of one kind go to Redis in one script call (booking by booking, in the batch's order, so a
        booking's effects keep their per-key order), and the completions in one more. A booking
        with a ``slow_ms`` fault runs alone, in its place, through :meth:`__call__`. The caller
        acknowledges after this returns: a worker killed in the middle leaves the whole batch
        to be delivered again, and the idempotency markers and the ledger count the repeats.

        Args:
            deliveries: the batch, in the order the client fetched it.
            validated: :meth:`validate_batch` of ``deliveries``, when the backend already has it.
        """
        self.in_flight += len(deliveries)
        try:
            results: list[Result] = []
            run: list[tuple[Delivery, Booking | BadMessage]] = []
            if validated is None:
                validated = self.validate_batch(deliveries)
            for delivery, parsed in zip(deliveries, validated, strict=True):
                if isinstance(parsed, Booking) and parsed.fault.slow_ms:
                    results += await self._run_together(run)
                    run = []
                    results.append(await self._run(delivery))
                else:
                    run.append((delivery, parsed))
            results += await self._run_together(run)
            return results
        finally:
            self.in_flight -= len(deliveries)

    async def _run_together(self, items: list[tuple[Delivery, Booking | BadMessage]]) -> list[Result]:
        """:meth:`run_batch` for bookings that need no time of their own: each step once for all of them."""
        results: list[Result | None] = [None] * len(items)
        started: list[dict[str, object]] = []
        failed: list[dict[str, object]] = []
        running: list[tuple[int, Booking, dict[str, object]]] = []
        retries = 0
        for i, (delivery, parsed) in enumerate(items):
            if isinstance(parsed, BadMessage):
                booking_id = booking_id_of(delivery.payload)
                failed.append(
                    {
                        "booking_id": booking_id,
                        "error": parsed.reason,
                        "bad_message": True,
                        "attempt": delivery.attempt,
                        "source": delivery.source,
                    }
                )
                results[i] = Result(Outcome.DEAD, booking_id, f"bad message: {parsed.reason}")
                continue
            row: dict[str, object] = {
                "booking_id": parsed.booking_id,
                "attempt": delivery.attempt,
                "source": delivery.source,
                "created_at": parsed.created_at,
                "seq": parsed.seq,
            }
            started.append(row)
            retries += delivery.attempt > 1
            running.append((i, parsed, row))
        self.events.emit_batch("started", started)
        if retries:
            await self.ledger.record_retry(retries)
        if self.settings.workflow != "noop":
            paid = []
            for i, booking, row in running:
                attempt = items[i][0].attempt
                failure = _payment_failure(booking, attempt)
                if failure is None:
                    paid.append((i, booking, row))
                else:
                    where = {"attempt": attempt, "source": row["source"]}
                    failed.append({"booking_id": booking.booking_id, "error": str(failure), **where})
                    results[i] = self._failed(booking, attempt, failure)
            running = paid
            await self._effects([booking for _, booking, _ in running])
        firsts = await self.ledger.record_completions([booking.booking_id for _, booking, _ in running])
        completed = []
        for (i, booking, row), first in zip(running, firsts, strict=True):
            row["duplicate"] = not first  # the started line is written: its fields are the completed line's too
            completed.append(row)
            results[i] = Result(Outcome.COMPLETED, booking.booking_id)
        self.events.emit_batch("failed", failed)
        self.events.emit_batch("completed", completed)
        return [result for result in results if result is not None]

    async def _effects(self, bookings: list[Booking]) -> None:
        """The effects of paid bookings, step by step for all of them, each step in the bookings' order."""
        idempotent = self.settings.idempotent
        await self.ledger.apply_effects("payments", [(b.booking_id, b.booking_id) for b in bookings], 1, idempotent)
        for write in (self._write_confirmation, self._send_email):
            for n, booking in enumerate(bookings, 1):
                write(booking)
                if n % FILES_BETWEEN_YIELDS == 0:
                    await asyncio.sleep(0)  # let heartbeats and lock renewals run between the file writes
        await self.ledger.apply_effects("inventory", [(b.booking_id, b.hotel_id) for b in bookings], 1, idempotent)

    async def _workflow(self, booking: Booking, attempt: int, run: BookingRun | None = None) -> None:
        """The five steps. Each awaits ``step_ms`` of simulated I/O, so concurrency has something to overlap."""
        settings = self.settings
        if booking.fault.slow_ms:
            await asyncio.sleep(booking.fault.slow_ms / 1000.0)
        if settings.cpu_ms:
            burn_cpu(settings.cpu_ms)
        if settings.workflow == "noop":
            return
        await self._step()  # validate: parse_booking already checked the schema
        if run is not None:
            await run.step("charge_payment")
        await self._step()
        failure = _payment_failure(booking, attempt)
        if failure is not None:
            raise failure
        await self._charge(booking, attempt)
        if run is not None:
            await run.step("write_confirmation")
        await self._step()
        self._write_confirmation(booking)
        if run is not None:
            await run.step("send_email")
        await self._step()
        self._send_email(booking)
        if run is not None:
            await run.step("update_inventory")
        await self._step()
        await self.ledger.apply_effect("inventory", booking.booking_id, booking.hotel_id, 1, settings.idempotent)

    async def _charge(self, booking: Booking, attempt: int) -> None:
        if self.payment_step is None:
            idempotent = self.settings.idempotent
            await self.ledger.apply_effect("payments", booking.booking_id, booking.booking_id, 1, idempotent)
            return
        try:
            result = self.payment_step(PaymentContext(booking, attempt, self.ledger.redis, self.ledger))
            if inspect.isawaitable(result):
                await result
        except Exception as e:  # noqa: BLE001 - foreign code: its error is this booking's failure, not the worker's
            error = f"{type(e).__name__}: {e}"
            self.events.emit("handler_error", booking_id=booking.booking_id, error=error, attempt=attempt)
            raise PaymentFailed(f"payment step raised {error}") from e

    async def _step(self) -> None:
        if self.settings.step_ms:
            await asyncio.sleep(self.settings.step_ms / 1000.0)

    def _write_confirmation(self, booking: Booking) -> None:
        """One file per booking; with idempotency off a repeat run writes another copy, numbered."""
        document = json.dumps(
            {
                "booking_id": booking.booking_id,
                "hotel_id": booking.hotel_id,
                "check_in": booking.check_in.isoformat(),
                "check_out": booking.check_out.isoformat(),
                "nights": booking.nights,
                "amount_cents": booking.amount_cents,
                "confirmed_at": time.time(),
            }
        )
        _write_new(self._dirs["confirmations"], booking.booking_id, ".json", document, self.settings.idempotent)

    def _send_email(self, booking: Booking) -> None:
        message = (
            f"To: {booking.user_id}@guests.example\nSubject: Booking {booking.booking_id} confirmed\n\n"
            f"Your stay at {booking.hotel_id} from {booking.check_in} to {booking.check_out} is confirmed.\n"
        )
        _write_new(self._dirs["outbox"], booking.booking_id, ".eml", message, self.settings.idempotent)


def _payment_failure(booking: Booking, attempt: int) -> PaymentFailed | None:
    """The failure the booking's fault directive injects into this attempt's payment, if any."""
    if booking.fault.poison:
        return PaymentFailed("card declined: poison booking fails every attempt")
    if attempt <= booking.fault.fail_times:
        return PaymentFailed(f"payment gateway timeout (injected: attempt {attempt} of {booking.fault.fail_times})")
    return None


def _write_new(folder: Path, booking_id: str, suffix: str, text: str, idempotent: bool) -> None:
    """Create ``<booking_id><suffix>`` exclusively; a repeat is skipped, or kept as a numbered copy."""
    try:
        with open(folder / f"{booking_id}{suffix}", "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        if not idempotent:
            (folder / f"{booking_id}.{uuid.uuid4().hex[:8]}{suffix}").write_text(text, encoding="utf-8")


def burn_cpu(ms: float) -> None:
    """Keep one core busy for ``ms`` of this thread's CPU time.

    CPU time, not wall time: with more busy processes than cores each one gets a share of a
    core, and its booking must take longer, as real CPU-bound work does. A wall-clock loop
    would finish on time however little CPU it got, and scale like a sleep.
    """
    deadline = time.thread_time() + ms / 1000.0
    while time.thread_time() < deadline:
        pass


def count_effects(run_dir: Path, backend: str) -> dict[str, dict[str, int]]:
    """Confirmation files and outbox emails per booking, read back from the run folder."""
    counts: dict[str, dict[str, int]] = {}
    for kind in ("confirmations", "outbox"):
        per_booking: dict[str, int] = {}
        for path in (run_dir / kind / backend).glob("*"):
            booking_id = path.name.split(".")[0]
            per_booking[booking_id] = per_booking.get(booking_id, 0) + 1
        counts[kind] = per_booking
    return counts
