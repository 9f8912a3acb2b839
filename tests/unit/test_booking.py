"""The booking message rules of docs/contract.md, checked without any server."""

from __future__ import annotations

import json

import pytest
from support import VALID_BOOKING as VALID

from labkit.booking import MAX_MESSAGE_BYTES, BookingGenerator, booking_id_of, encode, parse_booking
from labkit.errors import BadMessage


def with_(**changes: object) -> str:
    return json.dumps({**VALID, **changes})


def test_valid_booking_parses_and_ignores_unknown_fields() -> None:
    booking = parse_booking(with_(extra="ignored", seq=3, created_at=1.5))
    assert booking.booking_id == "bk-1"
    assert booking.nights == 3
    assert booking.seq == 3
    assert booking.created_at == 1.5
    assert not hasattr(booking, "extra")
    assert booking.fault.fail_times == 0 and not booking.fault.poison


def test_bytes_and_text_parse_the_same() -> None:
    assert parse_booking(with_().encode()) == parse_booking(with_())


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (b"\xff\xfe", "not valid UTF-8"),
        (with_(booking_id="has space"), "A-Za-z0-9_-"),
        (with_(booking_id="x" * 65), "1-64 characters"),
        (with_(user_id=""), "1-64 characters"),
        (with_(hotel_id=7), "must be a string"),
        (with_(check_in="01/03/2027"), "ISO date"),
        (with_(check_in="2027-02-30"), "not a calendar date"),
        (with_(check_out="2027-03-01"), "must be later than check_in"),
        (with_(guests=0), "'guests' must be 1-10"),
        (with_(guests=11), "'guests' must be 1-10"),
        (with_(guests=True), "must be an integer"),
        (with_(guests=2.5), "must be an integer"),
        (with_(amount_cents=-1), "'amount_cents' must be >= 0"),
        (with_(seq="1"), "'seq' must be an integer"),
        (with_(created_at="now"), "'created_at' must be a number"),
        (with_(fault="boom"), "'fault' must be an object"),
        (with_(fault={"poison": "yes"}), "fault.poison"),
        ("[" * 100 + "]" * 100, "nests deeper"),
    ],
)
def test_bad_messages_name_the_rule(payload: str | bytes, reason: str) -> None:
    with pytest.raises(BadMessage) as caught:
        parse_booking(payload)
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    "missing", ["booking_id", "user_id", "hotel_id", "check_in", "check_out", "guests", "amount_cents"]
)
def test_every_required_field_is_required(missing: str) -> None:
    data = dict(VALID)
    del data[missing]
    with pytest.raises(BadMessage, match=f"missing field '{missing}'"):
        parse_booking(json.dumps(data))


def test_oversize_message_rejected_before_parsing() -> None:
    with pytest.raises(BadMessage, match="limit"):
        parse_booking(b" " * (MAX_MESSAGE_BYTES + 1))


def test_booking_id_of_is_best_effort() -> None:
    assert booking_id_of(with_(guests=0)) == "bk-1"
    assert booking_id_of("{oops") is None
    assert booking_id_of('{"booking_id": "bad id"}') is None


def test_generator_is_seeded_and_valid() -> None:
    gen = BookingGenerator(seed=7, fault_rate=0.3)
    first, again = gen.bookings(50, poison=2), gen.bookings(50, poison=2)
    assert first == again
    assert len(first) == 52
    assert len({b["booking_id"] for b in first}) == 52
    parsed = [parse_booking(encode(b)) for b in first]
    assert sum(b.fault.poison for b in parsed) == 2
    assert 5 <= sum(b.fault.fail_times == 2 for b in parsed) <= 25
    assert BookingGenerator(seed=8).bookings(5) != BookingGenerator(seed=7).bookings(5)


def test_generator_event_sequences_for_ordering_lessons() -> None:
    events = BookingGenerator(events_per_booking=3).bookings(4)
    assert len(events) == 12
    assert [e["seq"] for e in events[:3]] == [0, 1, 2]
    assert [e["event"] for e in events[:3]] == ["created", "modified", "cancelled"]
    assert len({e["booking_id"] for e in events}) == 4
