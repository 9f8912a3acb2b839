"""The pure parts of lesson 01's message anatomy (labkit/lessons/anatomy.py): ids, partitions, send order, speedups."""

from __future__ import annotations

import pandas as pd
import pytest

from labkit.lessons import anatomy


def test_entry_ids_split_into_milliseconds_and_sequence() -> None:
    assert anatomy.parse_entry_id("1700000000000-12") == (1_700_000_000_000, 12)
    for bad in ("1700000000000", "abc-1", "1-", "-1", "1-2-3"):
        with pytest.raises(ValueError, match="not a stream entry id"):
            anatomy.parse_entry_id(bad)


def test_ids_increase_compares_numbers_not_text() -> None:
    assert anatomy.ids_increase(["5-9", "5-10", "6-0", "10-0"])  # as text, "5-10" < "5-9" and "10-0" < "6-0"
    assert not anatomy.ids_increase(["5-1", "5-1"]), "an id repeated is not an increase"
    assert not anatomy.ids_increase(["6-0", "5-3"])
    assert anatomy.ids_increase([]) and anatomy.ids_increase(["1-1"])


def test_same_key_same_partition() -> None:
    records = pd.DataFrame({"key": ["a", "a", "b", None, None], "partition": [0, 0, 2, 1, 2]})
    assert anatomy.same_key_same_partition(records), "keyless records may go anywhere"
    records.loc[1, "partition"] = 1
    assert not anatomy.same_key_same_partition(records)


def test_offsets_follow_send_order_per_partition() -> None:
    reports = pd.DataFrame({"i": [0, 1, 2, 3], "partition": [0, 1, 0, 1], "offset": [10, 4, 11, 5]})
    assert anatomy.offsets_follow_send_order(reports) is True
    swapped = reports.assign(offset=[11, 4, 10, 5])  # the second record of partition 0 was stored first
    assert anatomy.offsets_follow_send_order(swapped) is False
    unknown = reports.assign(offset=[None, 4, 11, 5])  # acks=0: no offset to judge by
    assert anatomy.offsets_follow_send_order(unknown) is None


def test_speedup_is_largest_batch_over_smallest() -> None:
    results = pd.DataFrame(
        {
            "backend": ["kafka", "kafka", "kafka", "streams", "streams"],
            "batch_size": [1000, 1, 10, 1, 100],
            "bookings_per_s": [50_000.0, 2_000.0, 9_000.0, 3_000.0, 6_000.0],
        }
    )
    assert anatomy.speedup(results, "kafka") == 25
    assert anatomy.speedup(results, "streams") == 2


def test_where_landed_lines_up_each_backends_answer_with_its_message() -> None:
    messages = [{"booking_id": "bk-1", "event": "created"}, {"booking_id": "bk-1", "event": "modified"}]
    table = anatomy.where_landed(messages, {"bullmq": ["1", "2"], "kafka": ["bookings/0/0", "bookings/0/1"]})
    assert table.to_dict("records") == [
        {"booking_id": "bk-1", "event": "created", "bullmq": "1", "kafka": "bookings/0/0"},
        {"booking_id": "bk-1", "event": "modified", "bullmq": "2", "kafka": "bookings/0/1"},
    ]
