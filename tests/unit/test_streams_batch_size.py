"""The Streams consumer's batch size: what it can finish inside a quarter of min-idle, capped at BATCH_FETCH."""

from __future__ import annotations

from labkit.backends.base import BATCH_FETCH
from labkit.backends.streams import BATCH_TIME_SHARE, FIRST_BATCH, BatchSize


def test_the_first_batch_is_small_until_an_entry_has_been_timed() -> None:
    assert BatchSize(200).entries == FIRST_BATCH < BATCH_FETCH


def test_cheap_entries_reach_the_cap() -> None:
    size = BatchSize(200)
    size.record(FIRST_BATCH, FIRST_BATCH * 30e-6)  # 30 us an entry: 1,666 fit in 50 ms
    assert size.entries == BATCH_FETCH


def test_slow_entries_shrink_the_batch_to_its_share_of_min_idle() -> None:
    size = BatchSize(200)
    for _ in range(12):
        size.record(size.entries, size.entries * 2e-3)  # 2 ms an entry, as a loaded machine ran the booking workflow
    assert size.entries == int(0.2 * BATCH_TIME_SHARE / 2e-3) == 25


def test_one_slow_batch_halves_the_next_at_most_and_the_size_recovers() -> None:
    size = BatchSize(500)
    for _ in range(5):
        size.record(size.entries, size.entries * 100e-6)
    steady = size.entries
    size.record(steady, 5.0)  # a GC pause or a busy disk
    assert size.entries == steady // 2
    for _ in range(20):
        size.record(size.entries, size.entries * 100e-6)
    assert size.entries == steady


def test_an_empty_batch_changes_nothing() -> None:
    size = BatchSize(200)
    size.record(0, 1.0)
    assert size.entries == FIRST_BATCH
