"""Kafka records as the lab handles them: where one is, its headers, one to send, a batch to fetch."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

from confluent_kafka import Consumer, Message

#: Records one poll of a group member takes at most.
POLL_BATCH = 500
#: One poll waits at most this long, which bounds how late a stop or a stored offset is seen.
POLL_WAIT_S = 0.1
#: A waiting poll looks this often whether the worker has calls for the consumer (a resume, a seek), which
#: can only be made between two polls: one that sat out the whole POLL_WAIT_S while every partition was
#: paused for a full buffer left a backlog's worker idle for a tenth of a second, a few times per 100,000.
POLL_SLICE_S = 0.005

#: Record headers as the producer takes them.
Headers = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True)
class Send:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers | None = None


def location(topic: str, partition: int, offset: int) -> str:
    """Where a record is, as the contract writes it: ``topic/partition/offset``."""
    return f"{topic}/{partition}/{offset}"


def coordinates(message: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a record librdkafka delivered or fetched (never None for those)."""
    return cast(str, message.topic()), cast(int, message.partition()), cast(int, message.offset())


def headers_of(message: Message) -> dict[str, bytes]:
    """A record's headers as a dict (the last value of a repeated name wins)."""
    headers = message.headers() or []
    pairs = headers.items() if isinstance(headers, dict) else headers
    return {name: value.encode() if isinstance(value, str) else value or b"" for name, value in pairs}


def header_int(headers: Mapping[str, bytes], name: str, default: int) -> int:
    try:
        return int(headers[name])
    except (KeyError, ValueError):
        return default


def fetch(consumer: Consumer, most: int = POLL_BATCH, interrupted: Callable[[], bool] = bool) -> list[Message]:
    """Wait for the first record (up to POLL_WAIT_S, or until ``interrupted()``), then take what else is ready.

    ``interrupted`` is asked every POLL_SLICE_S; the default, ``bool``, never answers yes.
    ``consume(n, timeout)`` would wait the whole timeout for ``n`` records, holding back
    records that are already there when traffic is light.
    """
    deadline = time.monotonic() + POLL_WAIT_S
    while (first := consumer.poll(POLL_SLICE_S)) is None:
        if interrupted() or time.monotonic() >= deadline:
            return []
    return [first, *consumer.consume(most - 1, 0)]
