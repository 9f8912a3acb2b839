"""Synchronous conveniences for notebooks and the CLI: one call per lesson step.

Every call here is synchronous: it runs the backends' coroutines on the one helper loop
of :class:`LoopThread`, so it works the same in a terminal, a test and a kernel.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from labkit.backends import Backend, get_backend
from labkit.backends.base import Message
from labkit.config import Config
from labkit.workflow import WorkerSettings

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")

_run_numbers = itertools.count(1)


class LoopThread:
    """A daemon thread running an asyncio loop for the whole interpreter's life.

    The backends are asyncio code, but the CLI and most lesson cells are simpler without
    ``await``, and a notebook already runs a loop in its main thread (``asyncio.run`` would
    refuse to start there). Running coroutines on a loop of our own works the same in a
    script, a test and a kernel.

    The WorkerPool also forks its workers from this thread, because PR_SET_PDEATHSIG is
    tied to the thread that forks: this thread ends only when the interpreter does.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="labkit-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the helper loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a plain function on the helper thread and wait for its result."""

        async def call() -> T:
            return fn(*args, **kwargs)

        return self.run(call())


_loop_thread: LoopThread | None = None
_loop_lock = threading.Lock()


def loop_thread() -> LoopThread:
    """The interpreter's one helper loop thread, started on first use."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is None or not _loop_thread.thread.is_alive():
            _loop_thread = LoopThread()
        return _loop_thread


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion and return its result, even inside a running event loop."""
    return loop_thread().run(coro)


def with_backend(
    backend: str,
    action: Callable[[Backend], Awaitable[T]],
    config: Config | None = None,
    settings: WorkerSettings | None = None,
) -> T:
    """Connect to ``backend``, run ``action`` on it, and close the connections again."""

    async def _go() -> T:
        async with get_backend(backend)(config or Config.from_env(), settings) as connected:
            return await action(connected)

    return run(_go())


def setup(start_stack: bool = True, namespace: str | None = None) -> Config:
    """The first cell of every lesson: make sure the stack runs and its destinations exist.

    Args:
        start_stack: start the local Redis and Kafka-protocol broker if they are not answering.
        namespace: prefix for every queue name, so lessons do not disturb each other's data.

    Returns:
        The lab's configuration, for passing to the other calls.
    """
    from labkit import stack

    config = Config.from_env() if namespace is None else Config.from_env(namespace=namespace)
    if start_stack:
        stack.Stack(config).up()
    for name in ("bullmq", "streams", "kafka"):
        with_backend(name, lambda b: b.setup(), config)
    return config


def produce(
    backend: str, messages: Iterable[Message], config: Config | None = None, delay_ms: int = 0, **settings: Any
) -> list[str]:
    """Send messages to ``backend``; returns where each landed. With ``delay_ms``, none starts before then."""
    batch = list(messages)
    return with_backend(backend, lambda b: b.produce(batch, delay_ms=delay_ms), config, WorkerSettings(**settings))


def stats(backend: str, config: Config | None = None) -> dict[str, Any]:
    """The contract's counters for ``backend`` (docs/contract.md).

    Returns ``completed``, ``dead_lettered``, ``retried``, ``duplicates``, ``in_flight`` and ``backlog``.
    """
    return with_backend(backend, lambda b: b.stats(), config)


def reset(backend: str, config: Config | None = None) -> None:
    """Empty ``backend``'s destinations, counters and effects (stop its workers first)."""
    with_backend(backend, lambda b: b.reset(), config)


def dead_letters(backend: str, config: Config | None = None) -> pd.DataFrame:
    """The dead-letter destination of ``backend`` as a DataFrame: booking_id, reason, attempts, source, booking."""
    import pandas as pd

    rows = with_backend(backend, lambda b: b.dead_letters(), config)
    return pd.DataFrame(rows, columns=["booking_id", "reason", "attempts", "source", "booking"])


def new_run(name: str, config: Config | None = None) -> Path:
    """A fresh run folder ``<home>/runs/<name>-<timestamp>`` for event logs and effects."""
    config = config or Config.from_env()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = config.runs_dir / f"{name}-{stamp}-{os.getpid()}-{next(_run_numbers)}"
    run_dir.mkdir(parents=True)
    return run_dir


def status_frame(config: Config | None = None) -> pd.DataFrame:
    """``labkit status`` as a DataFrame: service, address, kind, healthy, started_by."""
    import pandas as pd

    from labkit import stack

    rows = [s.to_dict() for s in stack.Stack(config or Config.from_env()).status()]
    return pd.DataFrame(rows).set_index("service")[["address", "kind", "healthy", "started_by"]]


STATS_COLUMNS = ["completed", "dead_lettered", "retried", "duplicates", "in_flight", "backlog"]


def stats_frame(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """docs/contract.md's counters of several backends side by side, one row per backend.

    Each backend's own detail (job states, pending per consumer, lag per partition) stays in
    the dicts that :func:`stats` returns.
    """
    import pandas as pd

    frame = pd.DataFrame.from_dict(results, orient="index")[STATS_COLUMNS]
    frame.index.name = "backend"
    return frame
