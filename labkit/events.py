"""Worker event logs: one JSON-lines file per process, loaded back as one tidy DataFrame.

Workers write what happened to each message (received, started, completed, failed,
retried, dead_lettered) the moment it happens, flushed line by line (a batch's lines in
one write, before the batch is acknowledged) so that even a SIGKILLed worker leaves an
honest record. Notebooks chart these logs; tests reconcile them against the brokers'
own counts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import pandas as pd

#: The events a worker emits, in the order a message normally meets them.
EVENTS = ("ready", "received", "started", "completed", "failed", "retried", "dead_lettered", "stopped")


# One encoder for every line, msgspec's (in C: a tenth of the json module's time for a line); what it
# cannot encode is written as its str().
_encoder = msgspec.json.Encoder(enc_hook=str)
_encode = _encoder.encode


class EventLog:
    """Append-only JSON-lines log of one worker process.

    Args:
        run_dir: the run folder; the log goes to ``run_dir/events/<worker_id>.jsonl``.
        worker_id: a name unique within the run, e.g. ``kafka-w2``.
        backend: which backend the worker serves.
    """

    def __init__(self, run_dir: Path, worker_id: str, backend: str) -> None:
        self.path = Path(run_dir) / "events" / f"{worker_id}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.worker_id = worker_id
        self.backend = backend
        self._pid = os.getpid()
        # Unbuffered: each write reaches the OS as it happens, so SIGKILL loses nothing written.
        self._file: IO[bytes] = open(self.path, "ab", buffering=0)  # noqa: SIM115

    def emit(self, event: str, **fields: Any) -> None:
        """Record ``event`` with wall and monotonic timestamps (monotonic is comparable across processes)."""
        self._file.write(_encode({**self._header(event), **fields}) + b"\n")

    def emit_batch(self, event: str, rows: list[dict[str, Any]]) -> None:
        """Record ``event`` once per row, all in one write: a batch of bookings that happened together.

        Each row still gets its own line, so a lesson counts one line per event exactly as with
        :meth:`emit`; the lines share the batch's timestamps and reach the OS in one system call,
        before the batch is acknowledged, so a SIGKILL still leaves every acknowledged event logged.
        """
        if not rows:
            return
        # The shared fields without the closing brace, then each row's fields. The rows are encoded in one
        # call, one per line, and each line's opening brace becomes the header: JSON text never holds a raw
        # newline (it is escaped in strings), so every "\n{" starts a line.
        head = _encode(self._header(event))[:-1] + b","
        if all(rows):
            self._file.write(head + _encoder.encode_lines(rows)[1:].replace(b"\n{", b"\n" + head))
        else:  # an empty row would leave "{...,}": each line on its own
            self._file.write(b"".join(head + _encode(row)[1:] + b"\n" if row else head[:-1] + b"}\n" for row in rows))

    def _header(self, event: str) -> dict[str, Any]:
        """The fields every line starts with: what happened, when, and where."""
        return {
            "event": event,
            "ts": time.time(),
            "mono": time.monotonic(),
            "worker": self.worker_id,
            "backend": self.backend,
            "pid": self._pid,
        }

    def close(self) -> None:
        self._file.close()


def load_run(run_dir: Path | str) -> pd.DataFrame:
    """All events of a run as one DataFrame, sorted by monotonic time.

    Columns always include ``event, ts, mono, worker, backend, pid, booking_id, attempt,
    source``; a line cut short by a SIGKILL mid-write is skipped.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for path in sorted((Path(run_dir) / "events").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # torn last line of a killed worker
    columns = ["event", "ts", "mono", "worker", "backend", "pid", "booking_id", "attempt", "source"]
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame:
            frame[column] = None
    if frame.empty:
        return frame[columns]
    frame["time"] = pd.to_datetime(frame["ts"], unit="s")
    return frame.sort_values("mono", kind="stable").reset_index(drop=True)
