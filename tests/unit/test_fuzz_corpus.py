"""The bad-input drill's corpus, and schema fuzzing of parse_booking with hypothesis.

parse_booking is the one gate every backend's messages pass through, so two promises are
checked on generated input: it never raises anything but BadMessage, and it never accepts a
message that breaks docs/contract.md. The contract is re-stated here independently of
labkit/booking.py, so a rule dropped there fails these tests. A third: its msgspec fast path
(one C pass for a valid message) gives every message the verdict, and every bad one the
reason, that the rules written out in Python give alone.
"""

from __future__ import annotations

import json
import re
import time
from datetime import date
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import VALID_BOOKING as VALID

from labkit import booking as booking_module
from labkit.booking import MAX_MESSAGE_BYTES, Booking, booking_id_of, parse_booking
from labkit.drills import fuzz_corpus
from labkit.errors import BadMessage

REQUIRED = tuple(VALID)
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def follows_contract(obj: Any) -> bool:
    """docs/contract.md's message rules, written out again without labkit's code."""
    if not isinstance(obj, dict) or any(name not in obj for name in REQUIRED):
        return False
    strings = [obj[name] for name in ("booking_id", "user_id", "hotel_id")]
    if not all(isinstance(s, str) and 1 <= len(s) <= 64 for s in strings):
        return False
    if not _ID.fullmatch(obj["booking_id"]):
        return False
    try:
        check_in = date.fromisoformat(obj["check_in"])
        check_out = date.fromisoformat(obj["check_out"])
    except (TypeError, ValueError):
        return False
    if not all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", obj[k]) for k in ("check_in", "check_out")):
        return False
    if check_out <= check_in:
        return False

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not (integer(obj["guests"]) and 1 <= obj["guests"] <= 10):
        return False
    if not (integer(obj["amount_cents"]) and obj["amount_cents"] >= 0):
        return False
    if obj.get("seq") is not None and not (integer(obj["seq"]) and obj["seq"] >= 0):
        return False
    created_at = obj.get("created_at")
    if created_at is not None and (isinstance(created_at, bool) or not isinstance(created_at, int | float)):
        return False
    fault = obj.get("fault")
    if fault is not None:
        if not isinstance(fault, dict):
            return False
        if not isinstance(fault.get("poison", False), bool):
            return False
        for key, high in (("fail_times", 1000), ("slow_ms", 600_000)):
            value = fault.get(key)
            if value is not None and not (integer(value) and 0 <= value <= high):
                return False
    return True


def fields_of(booking: Booking) -> dict[str, Any]:
    """The booking's fields but its fault, as the message writes them (dates as text)."""
    fields = {name: getattr(booking, name) for name in booking.__struct_fields__ if name != "fault"}
    fields.update(check_in=booking.check_in.isoformat(), check_out=booking.check_out.isoformat())
    return fields


def verdict(payload: bytes | str) -> Booking | None:
    """The parsed booking, or None for a BadMessage; any other exception fails the test."""
    try:
        return parse_booking(payload)
    except BadMessage as bad:
        assert bad.reason, "a BadMessage must say which rule was broken"
        return None


def outcome(payload: bytes | str) -> Booking | str:
    """The parsed booking, or the reason of the BadMessage."""
    try:
        return parse_booking(payload)
    except BadMessage as bad:
        return bad.reason


def outcome_of_the_rules_alone(payload: bytes | str) -> Booking | str:
    """:func:`outcome` with msgspec switched off: the json module and the rules written out in Python."""
    off = msgspec.DecodeError("msgspec switched off")
    with (
        mock.patch.object(booking_module, "_fast_decode", side_effect=off),
        mock.patch.object(booking_module, "_decode_booking", side_effect=off),
    ):
        return outcome(payload)


# -- the corpus -------------------------------------------------------------------------------------------------


def test_the_corpus_has_200_bad_messages_of_every_kind_the_issue_names() -> None:
    corpus = fuzz_corpus()
    assert len(corpus) >= 200
    categories = {category for category, _ in corpus}
    assert categories >= {
        "invalid-utf8", "truncated-json", "wrong-type", "missing-field", "huge", "deep-nesting", "dates",
        "out-of-range", "injection",
    }  # fmt: skip
    assert corpus == fuzz_corpus()  # deterministic: a failing message can be named
    assert any(len(message) > MAX_MESSAGE_BYTES for _, message in corpus)


@pytest.mark.parametrize(("category", "message"), fuzz_corpus(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_corpus_message_is_rejected_with_a_reason(category: str, message: bytes) -> None:
    assert verdict(message) is None, f"{category} message accepted: {message[:120]!r}"


@pytest.mark.parametrize(("category", "message"), fuzz_corpus(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_corpus_message_gets_the_reason_the_rules_alone_give(category: str, message: bytes) -> None:
    assert outcome(message) == outcome_of_the_rules_alone(message)


def test_oversized_and_deep_messages_are_rejected_before_parsing() -> None:
    # A 60 MB payload is refused on its length alone: far faster than json.loads could read it.
    huge = b'{"booking_id":"' + b"x" * 60_000_000 + b'"}'
    started = time.perf_counter()
    with pytest.raises(BadMessage, match="limit is"):
        parse_booking(huge)
    assert booking_id_of(huge) is None
    deep = "[" * 30_000 + "]" * 30_000  # under the size limit: the nesting check must catch it
    with pytest.raises(BadMessage, match="nests deeper"):
        parse_booking(deep)
    assert booking_id_of(deep) is None
    assert time.perf_counter() - started < 0.5


# -- hypothesis -------------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
field_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats()
    | st.text(max_size=70)
    | st.dates().map(date.isoformat)
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.sampled_from(["poison", "fail_times", "slow_ms"]), json_scalars, max_size=3)
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_nothing_but_bad_message(payload: bytes) -> None:
    booking = verdict(payload)
    if booking is not None:
        assert follows_contract(json.loads(payload))


@FUZZ
@given(json_values)
def test_arbitrary_json_is_accepted_only_when_it_follows_the_contract(value: Any) -> None:
    text = json.dumps(value)
    assert (verdict(text) is not None) == follows_contract(value)


@FUZZ
@given(st.dictionaries(st.sampled_from([*REQUIRED, "seq", "created_at", "fault"]), field_values))
def test_booking_shaped_objects_are_accepted_exactly_when_valid(changes: dict[str, Any]) -> None:
    """A valid booking with some fields replaced (or removed, as None) by anything at all."""
    obj = {**VALID, **changes}
    obj = {k: v for k, v in obj.items() if not (k in REQUIRED and v is None)}
    text = json.dumps(obj)  # inf and nan are written as Python writes them, Infinity and NaN: not JSON
    try:
        json.dumps(obj, allow_nan=False)
        strict_json = True
    except ValueError:
        strict_json = False
    booking = verdict(text)
    assert (booking is not None) == (follows_contract(obj) and strict_json)
    if booking is not None:
        fields = fields_of(booking)
        assert {k: fields[k] for k in obj if k in fields} == {k: v for k, v in obj.items() if k in fields}
        assert booking.nights == (booking.check_out - booking.check_in).days >= 1


@FUZZ
@given(st.sampled_from(REQUIRED), field_values)
def test_one_broken_field_is_always_refused(name: str, value: Any) -> None:
    obj = {**VALID, name: value}
    if follows_contract(obj):
        return  # the drawn value happens to be valid for that field
    assert verdict(json.dumps(obj)) is None


@FUZZ
@given(st.dictionaries(st.sampled_from([*REQUIRED, "seq", "created_at", "fault", "extra"]), field_values))
def test_the_fast_path_gives_the_verdict_and_reason_of_the_rules_alone(changes: dict[str, Any]) -> None:
    obj = {**VALID, **changes}
    for text in (json.dumps(obj), json.dumps(obj, ensure_ascii=False)):
        assert outcome(text) == outcome_of_the_rules_alone(text)


@FUZZ
@given(st.binary(max_size=300) | json_values.map(json.dumps))
def test_the_fast_path_agrees_with_the_rules_alone_on_anything(payload: bytes | str) -> None:
    assert outcome(payload) == outcome_of_the_rules_alone(payload)


BOUNDARIES = [
    *({"guests": n} for n in (0, 1, 10, 11, True, 2.0)),
    *({"amount_cents": n} for n in (-1, 0, 2**63, 2**64, 10**30)),
    *({"seq": n} for n in (-1, 0, None, 2**70)),
    *({"created_at": v} for v in (True, 1, 1.5, "1", None, 2**64, -1e308)),
    *({name: v} for name in ("user_id", "hotel_id") for v in ("", "x" * 64, "x" * 65, "😀" * 64, "😀" * 65, 7)),
    *({"booking_id": v} for v in ("a", "a\n", "a b", "é", "x" * 64, "x" * 65, "-_")),
    *({"check_in": v} for v in ("2027-02-30", "２０２７-01-01", "2027-01-01\n", "2027-1-01", "0001-01-01", "9999-12-31")),
    *({"check_out": v} for v in ("2027-01-01", "2027-01-02", "2026-12-31")),
    *({"fault": v} for v in ({}, None, [], {"poison": None}, {"poison": 1}, {"poison": True, "x": 1})),
    *({"fault": {key: v}} for key, high in (("fail_times", 1000), ("slow_ms", 600_000)) for v in (-1, 0, high, high + 1, None, False)),
]


@pytest.mark.parametrize("changes", BOUNDARIES, ids=repr)
def test_the_fast_path_agrees_with_the_rules_alone_at_every_bound(changes: dict[str, Any]) -> None:
    text = json.dumps({**VALID, "check_in": "2027-01-01", "check_out": "2027-01-03", **changes})
    assert outcome(text) == outcome_of_the_rules_alone(text)
