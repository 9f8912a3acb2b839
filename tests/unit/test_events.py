"""Event logs load into one tidy DataFrame, even after a worker was killed mid-line."""

from __future__ import annotations

from pathlib import Path

from labkit.events import EventLog, load_run


def test_events_of_several_workers_load_sorted(tmp_path: Path) -> None:
    a, b = EventLog(tmp_path, "w1", "streams"), EventLog(tmp_path, "w2", "streams")
    a.emit("started", booking_id="bk-1", attempt=1, source="entry 1-0")
    b.emit("started", booking_id="bk-2", attempt=1, source="entry 2-0")
    a.emit("completed", booking_id="bk-1", attempt=1, source="entry 1-0")
    a.close()
    b.close()
    with open(tmp_path / "events" / "w2.jsonl", "a") as f:
        f.write('{"event": "comple')  # torn line of a SIGKILLed worker
    frame = load_run(tmp_path)
    assert list(frame["event"]) == ["started", "started", "completed"]
    assert list(frame["worker"]) == ["w1", "w2", "w1"]
    assert frame["mono"].is_monotonic_increasing
    assert set(frame.columns) >= {"ts", "pid", "booking_id", "attempt", "source", "time"}


def test_empty_run_has_the_columns(tmp_path: Path) -> None:
    frame = load_run(tmp_path)
    assert frame.empty
    assert {"event", "booking_id", "attempt", "source"} <= set(frame.columns)
