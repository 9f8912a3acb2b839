"""Helpers shared by test modules (on the test path through ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from labkit.backends import Backend
from labkit.events import EventLog
from labkit.workflow import BookingHandler

ROOT = Path(__file__).resolve().parents[1]

#: A booking that keeps every rule of docs/contract.md; tests change one field at a time.
VALID_BOOKING = {
    "booking_id": "bk-1",
    "user_id": "user-1",
    "hotel_id": "hotel-1",
    "check_in": "2027-03-01",
    "check_out": "2027-03-04",
    "guests": 2,
    "amount_cents": 12_000,
}


def run_labkit(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m labkit`` with the session's environment (which points at the test stack) plus ``env``."""
    child_env = {**os.environ, **env}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "labkit", *args], capture_output=True, text=True, env=child_env, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with exit ``code`` and said why in exactly one ``Error:`` line, with no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``check`` every 20 ms until it is true; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def consuming(backend: Backend, run_dir: Path, worker_id: str = "w1") -> AsyncIterator[asyncio.Task[None]]:
    """``backend.consume()`` in this process as consumer ``worker_id``, stopped warmly (and awaited) on exit."""
    events = EventLog(run_dir, worker_id, backend.name)
    handler = BookingHandler(backend.ledger, events, backend.settings, run_dir)
    stop = asyncio.Event()
    task = asyncio.create_task(backend.consume(handler, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        events.close()
