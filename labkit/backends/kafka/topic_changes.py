"""Topic deletions and creations take turns with the lab's short-lived Kafka readers, on one machine.

librdkafka (2.x, here 2.16) crashes the process (a SIGSEGV in its main thread, in
``rd_kafka_metadata_cache_find`` from ``rd_kafka_metadata_update_op``) when one client sees a topic
deleted and created again under the same name with a new topic id during its life: its metadata
cache keeps a stale entry (librdkafka#4964; #4898: "it's still needed to restart the clients and
avoid relying on automatic handling of topic re-creation"). ``labkit reset`` does exactly that to the
work topics, and the readers of ``lag.py`` (a consumer per lag or dead-letter read, alive ~0.1 s)
ask for metadata twice in their life. So a reset while the dashboard sampled crashed the kernel
or the service (and a lesson cell waited until nbval gave up). Measured on the embedded broker
(``lk.reset("kafka")`` and 20 bookings produced, again and again, with a view sampling Kafka): before
this, 8 of 8 runs crashed, 5 of 5 at the first reset with 5 samples a second and 3 of 3 within 18
resets at one a second; after it, 280 resets in 7 runs and no crash.

The fix is the one the maintainers give (no client lives across a re-creation), enforced: a reader
holds a shared lock for its whole life, a topic change an exclusive one, on a lock file per broker
in the machine's temporary folder (``flock``), so that it holds across threads and processes: a
``labkit reset`` in a terminal waits for the service's sampler to finish its read, and the next read
starts after the topics exist again. A reader never sees more than one side of a change.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


def lock_path(bootstrap: str) -> Path:
    """The lock file of the broker at ``bootstrap`` (``host:port``)."""
    return Path(tempfile.gettempdir()) / f"labkit-kafka-topics-{re.sub(r'[^A-Za-z0-9.-]+', '_', bootstrap)}.lock"


@contextlib.contextmanager
def _held(bootstrap: str, how: int) -> Iterator[None]:
    with open(lock_path(bootstrap), "a+b") as lock:  # each open is its own lock holder, in any thread
        fcntl.flock(lock, how)
        yield  # released when the file closes


def reading(bootstrap: str) -> contextlib.AbstractContextManager[None]:
    """Hold for the whole life of a client that must not see a topic re-created (blocks while one is changed)."""
    return _held(bootstrap, fcntl.LOCK_SH)


def changing(bootstrap: str) -> contextlib.AbstractContextManager[None]:
    """Hold while deleting or creating topics (blocks until no reader is alive)."""
    return _held(bootstrap, fcntl.LOCK_EX)
