"""BullMQ: a job queue on Redis, through the official Python ``bullmq`` client.

Each booking is a job named ``booking`` in queue ``bookings`` whose data is the booking
object (docs/contract.md). BullMQ itself keeps the per-job bookkeeping the other backends
build by hand: a lock per active job, an attempts counter, exponential backoff through
its ``delayed`` set, and the ``failed`` set. Dead letters are jobs in a second queue,
``bookings-dlq``, that nothing consumes, so a learner can inspect (or reprocess) them
with any BullMQ client.

The Python client has sharp edges, measured and worked around here:

1. redis-py 8 gives every socket a 5 s read timeout, which cuts BullMQ's blocking
   ``BZPOPMIN`` (up to 5 s) short; the worker then treats it as a lost connection and
   sleeps ``runRetryDelay`` before asking again, so an idle worker picked up new jobs
   up to 15 s late. Our clients have no socket timeout.
2. The worker rounds every blocking wait up to whole seconds unless its blocking
   connection has read the server version, so a 300 ms backoff took a second. We read
   it before the worker starts.
3. A job whose worker died is noticed only after its lock expires and two stalled
   checks ran: lockDuration + 2 x stalledInterval, about a minute with the defaults.
   The lab's defaults make that a few seconds (see :class:`BullMQBackend`).
4. Its ``limiter`` option and sandboxed processors do not work in 3.4; neither is used.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from bullmq import Job, Queue, UnrecoverableError, Worker
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from labkit.backends.base import Backend, BatchSink, Message, connected, dead_letter_record
from labkit.booking import Booking, booking_id_of, encode
from labkit.errors import BadMessage, BrokerUnavailable
from labkit.status import STATUS_TTL_S, Accepted, BookingStatus, StatusRecorder, Transition, summarize
from labkit.workflow import BookingHandler, Delivery, Outcome, Result

log = logging.getLogger(__name__)

JOB_NAME = "booking"
DEAD_LETTER_JOB_NAME = "dead-letter"

#: Jobs sent to Redis per MULTI/EXEC round trip by :meth:`BullMQBackend.produce`.
BULK_CHUNK = 1000

# Lock and stalled-job detection. A SIGKILLed worker's job is back in `wait` at most
# lockDuration + 2 x stalledInterval = 5 + 2 x 2 = 9 s later (measured: 5.3-5.4 s; BullMQ's
# defaults, 30 s and 30 s, take up to 90 s: too long to watch in a lesson). The worker
# renews a lock every lockDuration / 4 to / 2, so a handler that blocks the event loop
# (cpu_ms) for more than about 2.5 s can lose its lock, and its booking is delivered a
# second time: raise `lock_duration_ms` for CPU-bound lessons.
LOCK_DURATION_MS = 5000
STALLED_INTERVAL_MS = 2000
# BullMQ's default: a job may be recovered from one dead worker; the second time it
# stalls BullMQ fails it ("job stalled more than allowable limit") without calling the
# processor, and consume() dead-letters it, so a booking that keeps killing its workers
# cannot loop forever and still ends in the DLQ with a reason.
MAX_STALLED_COUNT = 1

# Finished jobs kept for inspection (`HGETALL bull:bookings:<id>`). The lab's counters
# live in the ledger, not in these sets, so capping them loses nothing: the `completed`
# and `failed` state counts stop growing at these numbers. Failed jobs are all in the
# DLQ as well; more of them are kept because there are far fewer.
KEEP_COMPLETED = 1000
KEEP_FAILED = 5000

# After a lost connection the worker waits this long before asking Redis again
# (BullMQ's default, 15 s, makes a restarted Redis look like a hung lab).
RUN_RETRY_DELAY_MS = 1000

#: The job the processor is running, so that the status recorder reports on the job object itself.
CURRENT_JOB: contextvars.ContextVar[Job] = contextvars.ContextVar("bullmq_job")
#: BullMQ's job states in the status API's words; a job that already failed an attempt is retrying, not queued.
_STATUS_OF_STATE = {
    "waiting": "queued",
    "prioritized": "queued",
    "waiting-children": "queued",
    "delayed": "delayed",
    "active": "active",
    "completed": "completed",
    "failed": "dead_lettered",  # the lab fails a job only once it is dead-lettered
}

#: Job states reported by :meth:`BullMQBackend.queue_depths`; the first three are the backlog.
BACKLOG_STATES = ("waiting", "prioritized", "delayed")
STATES = (*BACKLOG_STATES, "active", "completed", "failed")

# Connection errors that mean "Redis is not there", whichever layer raised them.
_DOWN = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)


class _RetryLater(Exception):
    """Raised to BullMQ for a RETRY verdict: BullMQ moves the job to ``delayed`` for the backoff."""


class _DeadLettered(UnrecoverableError):  # type: ignore[misc]  # bullmq ships no type hints
    """Raised to BullMQ for a DEAD verdict, after the dead letter is written: failed, never retried."""


def job_data(message: Message) -> Any:
    """The job data that carries ``message``: the booking object, or the raw text of anything else.

    docs/contract.md makes job data the booking object, so JSON-object text is decoded. A
    malformed message (not JSON, not an object) travels as its own text so the worker can
    dead-letter it with the same reason the other backends give; bytes that are not UTF-8
    are kept byte-exact as surrogate escapes (``\\udcff`` in the job's JSON).
    """
    if isinstance(message, Mapping):
        booking = dict(message)
        booking.setdefault("created_at", time.time())
        return booking
    if isinstance(message, bytes):
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            return message.decode("utf-8", "surrogateescape")
    else:
        text = message
    try:
        # NaN, Infinity and 1e999 are Python JSON but not JSON: BullMQ's strict json.dumps of the
        # job data would raise on them, so such a message travels as its own text, to be dead-lettered.
        decoded = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return text
    return decoded if isinstance(decoded, dict) else text


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def wire_payload(data: Any) -> str | bytes:
    """The message text a job's data stands for: the inverse of :func:`job_data`.

    A booking object is encoded as compact JSON; raw text comes back as it was sent (as the
    original bytes when it was not UTF-8); any other JSON value a foreign producer put in
    the data is encoded, so the handler rejects it as "not a JSON object".
    """
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return data.encode("utf-8", "surrogateescape")
        return data
    if isinstance(data, dict):
        return encode(data)
    return json.dumps(data, separators=(",", ":"))


def _dead_letter_job_id(source: str) -> str | None:
    """``job 17`` → ``dead-17``: one dead letter per source job, however often it is redelivered.

    BullMQ ignores an add whose jobId exists, and nothing consumes the DLQ, so the guard
    lasts until the DLQ is purged. Custom ids must not look like integers (BullMQ's own
    ids), hence the prefix.
    """
    return f"dead-{source[4:]}" if source.startswith("job ") else None


def _source_of(dead_letter_job_id: str) -> str:
    """``dead-17`` → ``job 17``, the inverse of :func:`_dead_letter_job_id`."""
    if dead_letter_job_id.startswith("dead-"):
        return f"job {dead_letter_job_id[5:]}"
    return f"dlq job {dead_letter_job_id}"


class BullMQBackend(Backend):
    """Bookings as BullMQ jobs.

    Job ids are BullMQ's own increasing integers, not the ``booking_id``: BullMQ silently
    drops an add whose jobId exists only while the old job is still kept (see
    ``KEEP_COMPLETED``), which would make "send the same booking twice" behave differently
    from Streams and Kafka depending on retention, and would drop the ordering lesson's
    several events per booking. Every produce is a new job, and duplicates are the
    workflow's idempotency to absorb, as on the other backends.

    ``settings.options`` keys (milliseconds unless noted):

    - ``lock_duration_ms`` (5000): how long a job's lock lives without renewal. A killed
      worker's job is recovered about lockDuration + 2 x stalledInterval later; a handler
      blocking the event loop for more than about lockDuration / 2 loses its lock.
    - ``stalled_interval_ms`` (2000): how often workers look for jobs whose lock expired.
    - ``max_stalled_count`` (1, a count): how often a job may be recovered from a dead
      worker; one more stall and it is failed by BullMQ and dead-lettered here.

    The retry policy is the worker's, as for Streams and Kafka: jobs are sent with
    ``attempts`` and exponential ``backoff`` from the producer's settings (so other BullMQ
    clients see them), and a worker applies its own ``max_attempts`` and ``backoff_ms`` to
    each job it takes.
    """

    name = "bullmq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: Any = None
        self._queue: Any = None
        self._dlq: Any = None

    # -- connection ---------------------------------------------------------------------

    def _new_client(self) -> aioredis.Redis:
        """A redis-py client the way BullMQ needs it.

        ``decode_responses``: BullMQ parses job hashes as text. No socket timeout: the
        worker's blocking wait must not be cut short (trap 1 in the module docstring). A few
        quick retries instead of BullMQ's default 20 with up to 20 s between them, so a
        stopped Redis is reported in about a second.
        """
        return aioredis.Redis.from_url(
            self.config.redis_url,
            decode_responses=True,
            socket_timeout=None,
            socket_connect_timeout=3,
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=[BusyLoadingError, RedisConnectionError, RedisTimeoutError],
        )

    async def connect(self) -> None:
        """Open the ledger connection and the two queues (they share one connection pool)."""
        await super().connect()
        if self._client is None:
            self._client = self._new_client()
            self._queue = Queue(self.names.bullmq_queue, {"connection": self._client})
            self._dlq = Queue(self.names.bullmq_dlq, {"connection": self._client})

    async def close(self) -> None:
        if self._client is not None:
            # Both queues wrap the same client; closing it twice is harmless.
            await self._queue.close()
            await self._dlq.close()
            self._client = self._queue = self._dlq = None
        await super().close()

    @property
    def queue(self) -> Any:
        """The ``bullmq.Queue`` of bookings (connect first)."""
        return connected(self._queue)

    @property
    def dlq(self) -> Any:
        """The ``bullmq.Queue`` of dead letters (connect first)."""
        return connected(self._dlq)

    @contextmanager
    def _broker_errors(self) -> Iterator[None]:
        """Turn a lost Redis connection into a one-line BrokerUnavailable."""
        try:
            yield
        except _DOWN:
            raise BrokerUnavailable(
                f"Redis is not answering at {self.config.redis_url}; start the lab with `labkit up`"
            ) from None

    # -- the queue contract -------------------------------------------------------------

    async def setup(self) -> None:
        """Nothing to create: BullMQ queues come to life with their first job.

        Reads the server's INFO once (BullMQ warns there when the eviction policy is not
        ``noeviction``, under which Redis may drop jobs) and warns when the work queue is
        paused, which an interrupted purge leaves behind and which would idle every worker.
        """
        with self._broker_errors():
            await self.queue.redisConnection.getRedisVersion()
            if await self.queue.isPaused():
                log.warning(
                    "BullMQ queue %r is paused, so workers take no jobs; `labkit reset --backend bullmq` clears it",
                    self.names.bullmq_queue,
                )

    def _retry_policy(self) -> dict[str, Any]:
        """``settings.max_attempts`` and ``backoff_ms`` in BullMQ's words."""
        return {
            "attempts": self.settings.max_attempts,
            "backoff": {"type": "exponential", "delay": self.settings.backoff_ms},
        }

    def _job_options(self, delay_ms: int = 0) -> dict[str, Any]:
        """Options every booking job carries; jobs tracked for the status API are kept as long as its records."""
        keep: dict[str, Any] = {"age": STATUS_TTL_S} if self.settings.track_status else {}
        options = {
            **self._retry_policy(),
            "removeOnComplete": keep or {"count": KEEP_COMPLETED},
            "removeOnFail": keep or {"count": KEEP_FAILED},
        }
        if delay_ms:
            # BullMQ's own delayed job: due at timestamp + delay, moved to `wait` by a worker once due.
            options.update(delay=delay_ms, timestamp=int(time.time() * 1000))
        return options

    async def produce(self, messages: Iterable[Message], *, delay_ms: int = 0) -> list[str]:
        """Add one job per message, ``BULK_CHUNK`` at a time in one MULTI/EXEC each; returns job ids.

        With ``delay_ms``, BullMQ's own delayed jobs: they wait in the queue's ``delayed`` set.
        """
        options = self._job_options(delay_ms)
        ids: list[str] = []
        chunk: list[dict[str, Any]] = []
        with self._broker_errors():
            for message in messages:
                chunk.append({"name": JOB_NAME, "data": job_data(message), "opts": options})
                if len(chunk) == BULK_CHUNK:
                    ids.extend(job.id for job in await self.queue.addBulk(chunk))
                    chunk = []
            if chunk:
                ids.extend(job.id for job in await self.queue.addBulk(chunk))
        return ids

    def _worker_options(self, worker_name: str) -> dict[str, Any]:
        settings = self.settings
        return {
            # Its own client: Worker.close() closes it, and the queues stay usable.
            "connection": self._new_client(),
            "autorun": False,  # run() only after the version is read: trap 2
            "concurrency": settings.concurrency,
            "lockDuration": int(settings.option("lock_duration_ms", LOCK_DURATION_MS)),
            "stalledInterval": int(settings.option("stalled_interval_ms", STALLED_INTERVAL_MS)),
            "maxStalledCount": int(settings.option("max_stalled_count", MAX_STALLED_COUNT)),
            "runRetryDelay": RUN_RETRY_DELAY_MS,
            # For jobs a producer sent without retention options.
            "removeOnComplete": {"count": KEEP_COMPLETED},
            "removeOnFail": {"count": KEEP_FAILED},
            # Shows in CLIENT LIST, Queue.get_workers() and each job's `pb` (processed by).
            "name": worker_name,
        }

    async def consume(self, handler: BookingHandler, stop: asyncio.Event) -> None:
        """Run a ``bullmq.Worker`` until ``stop`` is set, then close it gracefully.

        The processor turns the handler's verdict into BullMQ's vocabulary: return (job
        completed), raise (job delayed for the backoff, or failed after its last attempt),
        raise ``UnrecoverableError`` after writing the dead letter (failed, never retried).
        ``Worker.close()`` waits for the jobs in flight to finish and be acknowledged.

        Raises:
            BrokerUnavailable: Redis does not answer when the worker starts.
        """
        settings = self.settings
        retry_policy = self._retry_policy()
        events = handler.events
        followups: set[asyncio.Task[None]] = set()

        together = _JobBatches(handler) if handler.batches else None

        async def process(job: Job, token: str) -> None:
            # The worker's retry policy wins over whatever the producer put in the job:
            # BullMQ decides "retry or fail" from these in-memory options, and the handler
            # only asks for a retry while attempt < settings.max_attempts.
            job.opts.update(retry_policy)
            job.attempts = settings.max_attempts
            CURRENT_JOB.set(job)
            payload = wire_payload(job.data)
            delivery = Delivery(payload, attempt=job.attemptsMade + 1, source=f"job {job.id}")
            if together is not None:
                result = await together.run(delivery)
            else:
                events.emit(
                    "received", booking_id=booking_id_of(payload), attempt=delivery.attempt, source=delivery.source
                )
                result = await handler(delivery)
            if result.outcome is Outcome.COMPLETED:
                return
            if result.outcome is Outcome.RETRY:
                raise _RetryLater(result.reason or "retry")
            await self.dead_letter(handler, delivery, result)
            raise _DeadLettered(result.reason or "dead")

        async def dead_letter_stalled(job: Job) -> None:
            """BullMQ failed a job that stalled too often without asking the processor: dead-letter it."""
            payload = wire_payload(job.data)
            # attemptsStarted counts this last fetch, which never ran the workflow.
            delivery = Delivery(payload, attempt=max(job.attemptsStarted - 1, 1), source=f"job {job.id}")
            reason = (
                f"worker lost the job {job.stalledCounter} times (killed, or its event loop blocked past "
                f"the lock): {job.deferredFailure}"
            )
            try:
                await self.dead_letter(handler, delivery, Result(Outcome.DEAD, booking_id_of(payload), reason))
            except Exception:
                log.exception("could not dead-letter stalled job %s", job.id)

        def on_failed(job: Job, error: Exception) -> None:
            """BullMQ's "failed" event: after a job went to ``delayed`` (retry) or ``failed``."""
            if isinstance(error, _RetryLater):
                events.emit(
                    "retried",
                    booking_id=booking_id_of(wire_payload(job.data)),
                    attempt=job.attemptsMade,
                    source=f"job {job.id}",
                    delay_ms=job.delay,
                    reason=str(error),
                )
            elif job.deferredFailure:
                task = asyncio.ensure_future(dead_letter_stalled(job))
                followups.add(task)
                task.add_done_callback(followups.discard)
            elif not isinstance(error, _DeadLettered):
                log.warning("job %s failed outside the workflow: %s", job.id, error)

        worker = Worker(self.names.bullmq_queue, process, self._worker_options(events.worker_id))
        worker.on("failed", on_failed)
        try:
            await self._run_worker(worker, stop)
        finally:
            if followups:
                await asyncio.gather(*followups)

    async def consume_batches(self, sink: BatchSink, stop: asyncio.Event, consumer: str) -> None:
        """A ``bullmq.Worker`` with the lab's options whose processor hands each job's data to ``sink``.

        BullMQ delivers one job per processor call (``concurrency`` at once), so each batch holds one payload.
        """

        async def process(job: Job, token: str) -> None:
            await sink([job.data])

        await self._run_worker(Worker(self.names.bullmq_queue, process, self._worker_options(consumer)), stop)

    async def _run_worker(self, worker: Any, stop: asyncio.Event) -> None:
        """Run ``worker`` until ``stop`` is set, then close it gracefully (jobs in flight finish and are acked)."""
        worker.on("error", lambda error, *job: log.warning("bullmq worker: %s", error))
        try:
            with self._broker_errors():
                # Without a known server version the worker rounds every blocking wait up
                # to whole seconds (trap 2): a 300 ms backoff would take a second.
                await worker.blockingRedisConnection.getRedisVersion()
                await worker.redisConnection.getRedisVersion()
        except BrokerUnavailable:
            await worker.close(force=True)
            raise
        running = asyncio.ensure_future(worker.run())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await worker.close()
            await running

    async def write_dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Add ``{"booking", "reason", "attempts"}`` to the DLQ queue, once per source job."""
        data = {"booking": job_data(delivery.payload), "reason": reason, "attempts": delivery.attempt}
        job_id = _dead_letter_job_id(delivery.source)
        with self._broker_errors():
            await self.dlq.add(DEAD_LETTER_JOB_NAME, data, {"jobId": job_id} if job_id else {})

    async def dead_letters(self) -> list[dict[str, Any]]:
        """Every job of the DLQ queue, oldest first, whatever state a learner's worker left it in."""
        with self._broker_errors():
            jobs = await self.dlq.getJobs(list(STATES))
        letters = []
        for job in sorted(jobs, key=lambda j: (j.timestamp, j.id)):
            data = job.data if isinstance(job.data, dict) else {"booking": job.data}
            letters.append(
                dead_letter_record(
                    wire_payload(data.get("booking")),
                    str(data.get("reason", "")),
                    int(data.get("attempts") or 0),
                    _source_of(job.id),
                )
            )
        return letters

    async def queue_depths(self) -> dict[str, Any]:
        """``backlog`` (waiting, prioritized and delayed for a backoff), ``in_flight`` (active) and ``states``.

        ``states`` are BullMQ's job counts; ``completed`` and ``failed`` stop at
        ``KEEP_COMPLETED`` and ``KEEP_FAILED`` because old finished jobs are removed.
        """
        with self._broker_errors():
            counts = await self.queue.getJobCounts(*STATES)
        states = {state: int(counts.get(state, 0)) for state in STATES}
        return {
            "backlog": sum(states[state] for state in BACKLOG_STATES),
            "in_flight": states["active"],
            "states": states,
        }

    async def purge(self) -> None:
        """Obliterate both queues: every job in every state, locks, counters and events.

        ``force``: active jobs go too; a worker still processing one gets an error when it
        finishes, and the booking is not retried.
        """
        with self._broker_errors():
            for queue in (self.queue, self.dlq):
                await queue.obliterate(force=True)

    # -- per-booking status: BullMQ's own job state, progress and logs ---------------------

    def _jobs_key(self, booking_id: str) -> str:
        """The application's index of a booking's jobs (job ids are BullMQ's, not the booking id)."""
        return self.ledger.key("jobs", booking_id)

    def status_recorder(self, worker: str) -> StatusRecorder:
        return JobProgressRecorder(self.queue, worker, self.retry_delay_s)

    async def track_accepted(self, accepted: Sequence[Accepted]) -> None:
        """Remember each booking's job id, as an application stores the id ``queue.add`` returned (and put the
        bookings in the index of recent ones).

        Everything else about the job (waiting or delayed, its due time) BullMQ keeps itself.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            for item in accepted:
                pipe.rpush(self._jobs_key(item.booking_id), item.where)
                pipe.expire(self._jobs_key(item.booking_id), STATUS_TTL_S)
            self.recent_bookings.queue(pipe, accepted)
            await pipe.execute()

    async def booking_status(self, booking_id: str) -> BookingStatus | None:
        """The booking's jobs as BullMQ sees them: state from ``getState``, progress from ``job.progress``,
        history from the job logs the workers wrote (plus the job's own creation time and delay).

        Raises:
            BrokerUnavailable: Redis does not answer.
        """
        with self._broker_errors():
            job_ids = [_text(j) for j in await self.redis.lrange(self._jobs_key(booking_id), 0, -1)]
            history: list[Transition] = []
            latest: tuple[Job, str] | None = None
            for job_id in job_ids:
                job = await Job.fromId(self.queue, job_id)
                if job is None:
                    continue  # removed by retention: the status records expired with it
                history.append(_accepted_transition(job))
                logs = await self.queue.getJobLogs(job_id)
                history += [Transition.from_dict(json.loads(row)) for row in logs["logs"]]
                latest = (job, str(await self.queue.getJobState(job_id)))
        if latest is None:
            return None
        job, state = latest
        current = _STATUS_OF_STATE.get(state)
        if current in ("queued", "delayed") and job.attemptsMade > 0:
            current = "retrying"  # waiting for its backoff, or due and waiting for a worker
        status = summarize(history, current)
        if status is None:
            return None
        progress = job.progress if isinstance(job.progress, dict) else {}
        changes: dict[str, Any] = {"attempts": max(status.attempts, job.attemptsMade)}
        if current == "active" and progress:
            changes.update(step=progress.get("step"), progress=int(progress.get("progress") or 0))
        if current == "delayed":
            changes["due_at"] = (job.timestamp + job.delay) / 1000
        if current == "dead_lettered" and status.reason is None:
            changes["reason"] = job.failedReason
        return dataclasses.replace(status, **changes)

    async def live_workers(self) -> list[str]:
        """Workers with a connection to this queue: BullMQ names each worker's connections (``CLIENT LIST``)."""
        with self._broker_errors():
            clients = await self.queue.get_workers()
        names = {str(c.get("rawname", "")).partition(":w:")[2] for c in clients}
        return sorted(name for name in names if name)


class _JobBatches:
    """Jobs whose processors start while the worker's previous batch is being handled, run as the next batch
    (``BookingHandler.run_batch``).

    BullMQ's Python worker hands over one job per processor call, but a worker with ``concurrency``
    slots has several processors running at once. A job that arrives while no batch is in flight starts
    one at the end of the event-loop tick, with the jobs that arrived in the same tick; the jobs that
    arrive while it runs wait and form the next batch (a group commit: no added wait when the worker is
    idle, bigger batches when it is busy). Each batch gets one ``received``, ``started`` and
    ``completed`` write and one completion record, instead of three writes and a round trip per job.
    Each processor still waits for its own verdict, so BullMQ completes (acknowledges) a job only after
    its batch was handled, and retries and dead letters stay per job. A booking with a ``slow_ms`` fault
    runs on its own, not holding up the others.

    One batch at a time, because that measured best: batches of a tick alone, several in flight, were half
    as big and cost more CPU per job (docs/benchmarks.md, "Fourth pass").
    """

    def __init__(self, handler: BookingHandler) -> None:
        self.handler = handler
        self._waiting: list[tuple[Delivery, Booking | BadMessage, asyncio.Future[Result]]] = []
        self._running: asyncio.Task[None] | None = None

    async def run(self, delivery: Delivery) -> Result:
        """The handler's verdict on ``delivery``, reached in a batch with the jobs that came with it."""
        [parsed] = self.handler.validate_batch([delivery])
        if isinstance(parsed, Booking) and parsed.fault.slow_ms:
            self.handler.log_received([delivery], [parsed])
            return await self.handler(delivery)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((delivery, parsed, future))
        if self._running is None and len(self._waiting) == 1:  # the tick's first job: none is scheduled yet
            loop.call_soon(self._start)
        return await future

    def _start(self) -> None:
        """Start the next batch with every job waiting: at the end of a tick, or as the batch before finishes."""
        self._running = None
        if self._waiting:
            batch, self._waiting = self._waiting, []
            self._running = asyncio.ensure_future(self._run(batch))
            self._running.add_done_callback(lambda _: self._start())

    async def _run(self, batch: list[tuple[Delivery, Booking | BadMessage, asyncio.Future[Result]]]) -> None:
        deliveries = [delivery for delivery, _, _ in batch]
        validated = [parsed for _, parsed, _ in batch]
        try:
            self.handler.log_received(deliveries, validated)
            results = await self.handler.run_batch(deliveries, validated)
        except BaseException as error:  # handed to every job's processor: BullMQ fails or retries each
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _accepted_transition(job: Job) -> Transition:
    """The first entry of a job's history: added to ``wait``, or to ``delayed`` until its due time."""
    at = job.timestamp / 1000
    replayed_from = job.data.get("replayed_from") if isinstance(job.data, dict) else None
    source = f"job {job.id}"
    if job.opts.get("delay"):
        due = (job.timestamp + int(job.opts["delay"])) / 1000
        return Transition("delayed", at, due_at=due, source=source, replayed_from=replayed_from)
    return Transition("queued", at, source=source, replayed_from=replayed_from)


class JobProgressRecorder(StatusRecorder):
    """BullMQ's own per-job status, as a BullMQ user keeps it: ``job.updateProgress()`` at every step,
    ``job.log()`` for every transition (``bull:<queue>:<id>:logs``, read back by any BullMQ client)."""

    def __init__(self, queue: Queue, worker: str, retry_delay_s: Callable[[int], float]) -> None:
        super().__init__(worker, retry_delay_s)
        self.queue = queue

    async def write(self, booking_id: str, transition: Transition, progress: bool) -> None:
        row = json.dumps(transition.to_dict(), separators=(",", ":"))
        job = CURRENT_JOB.get(None)
        job_id = (transition.source or "").removeprefix("job ")
        if job is None or job.id != job_id:
            # Not inside this job's processor: a stalled job BullMQ failed, dead-lettered afterwards.
            await Job.addJobLog(self.queue, job_id, row)
            return
        if progress:
            await asyncio.gather(
                job.updateProgress({"step": transition.step, "progress": transition.progress}), job.log(row)
            )
        else:
            await job.log(row)
