"""The service's link to each backend: one connection, bookings sent in shared batches, a broker that is down
answered at once.

- **Batches.** A request does not send its booking alone: whoever arrives while a send to that backend
  is on the wire joins the next one (group commit), so under load one XADD pipeline, one ``addBulk``
  or one Kafka flush carries many bookings, and at low load nothing waits. Each request still waits
  until its own booking is acknowledged by the broker before it answers 202.
- **A broker that is down** costs one request its timeout, not every request: after a failure the link
  answers "unavailable" at once for :data:`RETRY_AFTER_S`, then lets the next request try again; and a
  TCP probe (at most one a second) notices a broker whose port refuses connections before anything is
  sent to it. Only the backends on that broker answer 503; the others keep accepting.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from redis.exceptions import RedisError

from labkit.backends import Backend, get_backend
from labkit.config import BACKENDS, Config
from labkit.errors import BrokerUnavailable, LabkitError
from labkit.status import Accepted
from labkit.workflow import WorkerSettings

T = TypeVar("T")
R = TypeVar("R")

#: After a broker failed a request, the link answers "unavailable" at once for this long before trying again.
RETRY_AFTER_S = 1.0
#: A TCP probe's result is trusted this long.
PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 0.5
#: Most bookings one send carries.
MAX_BATCH = 500


class GroupSender(Generic[T, R]):
    """Sends items in shared batches: whoever submits while a send is in flight joins the next one.

    Args:
        send: sends one batch and returns one result per item, in order; an exception fails the whole batch.
        max_batch: most items one send carries.
    """

    def __init__(self, send: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = MAX_BATCH) -> None:
        self._send = send
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Send ``item`` with whatever else is waiting, and return its result once its batch is sent."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
            try:
                results = await self._send([item for item, _ in batch])
            except Exception as error:  # noqa: BLE001 - handed to every waiter, who re-raises it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


@dataclass(frozen=True)
class Outgoing:
    """One booking a request hands to a backend."""

    message: dict[str, Any]
    delay_ms: int
    accepted_at: float
    due_at: float | None
    replayed_from: str | None = None


def _probe(address: tuple[str, int]) -> str | None:
    """None if something accepts TCP connections at ``address``, else why not."""
    try:
        with socket.create_connection(address, timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return e.strerror or str(e)


class BackendLink:
    """One backend as the service uses it: connected on first use, sending in batches, failing fast while down.

    Args:
        name: the backend.
        config: the lab (its namespace and addresses).
        settings: the producer's settings; ``track_status`` keeps what the status API reads.
    """

    def __init__(self, name: str, config: Config, settings: WorkerSettings) -> None:
        self.name = name
        self.config = config
        self.backend: Backend = get_backend(name)(config, settings)
        self.sender: GroupSender[Outgoing, str] = GroupSender(self._send)
        self._connect_lock = asyncio.Lock()
        self._connected = False
        self._down: tuple[str, float] | None = None
        self._probed: dict[tuple[str, int], tuple[str | None, float]] = {}

    @property
    def brokers(self) -> list[tuple[str, str, tuple[str, int]]]:
        """``(service, name, address)`` of each broker this backend needs: Redis always, Kafka for Kafka."""
        host, port, _ = self.config.redis_address
        needed = [("Redis", self.config.redis_url, (host, port))]
        if self.name == "kafka":
            needed.append(("Kafka", self.config.kafka_bootstrap, self.config.kafka_address))
        return needed

    async def _check_brokers(self) -> None:
        """Raise at once while the last failure is recent, or while a broker's port refuses connections."""
        now = time.monotonic()
        if self._down is not None and now < self._down[1]:
            raise BrokerUnavailable(self._down[0])
        for service, name, address in self.brokers:
            reason, checked = self._probed.get(address, (None, 0.0))
            if now - checked > PROBE_EVERY_S:
                self._probed[address] = (reason, now)  # one probe at a time: the others use the last answer
                reason = await asyncio.to_thread(_probe, address)
                self._probed[address] = (reason, time.monotonic())
            if reason is not None:
                raise BrokerUnavailable(
                    f"{service} is not answering at {name} ({reason}); start the lab with `labkit up`"
                )

    async def call(self, action: Callable[[Backend], Awaitable[T]]) -> T:
        """Run ``action`` on the connected backend.

        Raises:
            BrokerUnavailable: a broker it needs does not answer (now, or within the last RETRY_AFTER_S).
            BackendError: the broker refused.
        """
        await self._check_brokers()
        try:
            if not self._connected:
                async with self._connect_lock:
                    if not self._connected:
                        await self.backend.connect()
                        self._connected = True
            result = await action(self.backend)
        except BrokerUnavailable as e:
            self._down = (str(e), time.monotonic() + RETRY_AFTER_S)
            raise
        except (OSError, RedisError) as e:  # a client error no backend turned into a BrokerUnavailable
            reason = f"{self.name}: the broker connection failed ({e})"
            self._down = (reason, time.monotonic() + RETRY_AFTER_S)
            raise BrokerUnavailable(reason) from None
        self._down = None
        return result

    async def publish(self, outgoing: Outgoing) -> str:
        """Send one booking (in a shared batch) and start its status; returns where it landed."""
        await self._check_brokers()
        return await self.sender.submit(outgoing)

    async def _send(self, batch: list[Outgoing]) -> list[str]:
        """One batch: produced per delay (one produce call for each distinct delay), then tracked."""
        where: dict[int, str] = {}
        by_delay: dict[int, list[int]] = {}
        for i, item in enumerate(batch):
            by_delay.setdefault(item.delay_ms, []).append(i)

        async def produce(backend: Backend) -> None:
            for delay_ms, indexes in by_delay.items():
                landed = await backend.produce([batch[i].message for i in indexes], delay_ms=delay_ms)
                where.update(zip(indexes, landed, strict=True))
            accepted = [_accepted(item, where[i]) for i, item in enumerate(batch)]
            await backend.track_accepted(accepted)

        await self.call(produce)
        return [where[i] for i in range(len(batch))]

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            with contextlib.suppress(LabkitError, OSError):
                await self.backend.close()


def _accepted(item: Outgoing, where: str) -> Accepted:
    booking_id = str(item.message["booking_id"])
    return Accepted(booking_id, where, item.accepted_at, item.due_at, item.replayed_from)


async def gather_per_backend(calls: dict[str, Awaitable[T]]) -> tuple[dict[str, T], dict[str, str]]:
    """Await one call per backend at once: the answers, and the one-line reason of each that failed."""
    results = await asyncio.gather(*calls.values(), return_exceptions=True)
    answers: dict[str, T] = {}
    failed: dict[str, str] = {}
    for name, result in zip(calls, results, strict=True):
        if isinstance(result, LabkitError):
            failed[name] = str(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            answers[name] = result
    return answers, failed


class Links:
    """The service's link to each of the three backends."""

    def __init__(self, config: Config, settings: WorkerSettings) -> None:
        self.config = config
        self.by_name = {name: BackendLink(name, config, settings) for name in BACKENDS}

    def __getitem__(self, name: str) -> BackendLink:
        return self.by_name[name]

    async def each(
        self, action: Callable[[Backend], Awaitable[T]], names: Sequence[str] = BACKENDS
    ) -> tuple[dict[str, T], dict[str, str]]:
        """Run ``action`` on several backends at once: the answers, and the reason for each that failed."""
        return await gather_per_backend({name: self[name].call(action) for name in names})

    async def publish(self, outgoing: Outgoing, names: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
        """Send one booking to several backends at once: where it landed on each, and why it did not elsewhere."""
        return await gather_per_backend({name: self[name].publish(outgoing) for name in names})

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.by_name.values()))
