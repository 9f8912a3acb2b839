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


def test_a_batch_write_is_one_line_per_row_read_back_like_single_emits(tmp_path: Path) -> None:
    log = EventLog(tmp_path, "w1", "kafka")
    log.emit("started", booking_id="bk-0", attempt=1, source="bookings/0/0")
    rows = [
        {"booking_id": "bk-1", "attempt": 1, "source": "bookings/0/1", "created_at": 1.5, "seq": None},
        {"booking_id": None, "error": 'quote " and\nnewline', "bad_message": True},
        {},
    ]
    log.emit_batch("completed", rows)
    log.emit_batch("completed", [])  # nothing to write: no line
    log.close()
    lines = (tmp_path / "events" / "w1.jsonl").read_text().splitlines()
    assert len(lines) == 4, "one line per event, never one per batch"
    frame = load_run(tmp_path)
    batch = frame[frame["event"] == "completed"]
    assert len(batch) == 3 and batch["mono"].nunique() == 1 and batch["ts"].nunique() == 1
    assert batch["booking_id"].iloc[0] == "bk-1" and batch["booking_id"].isna().iloc[1]
    assert batch["error"].iloc[1] == 'quote " and\nnewline'
    assert set(batch["worker"]) == {"w1"} and set(batch["backend"]) == {"kafka"}
    assert frame["event"].iloc[0] == "started"
