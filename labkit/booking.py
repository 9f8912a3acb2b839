"""The booking message of docs/contract.md: validation and a seeded generator.

Every backend carries the same JSON text, so a message is checked once, here, the same
way for all three. A message that breaks a rule is a :class:`~labkit.errors.BadMessage`
whose reason names the rule: that reason is what a learner reads in the dead-letter queue.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Annotated, Any

import msgspec

from labkit.errors import BadMessage

#: Bytes above this are rejected before parsing: a queue message is not a file upload.
MAX_MESSAGE_BYTES = 64 * 1024
#: Nesting deeper than this is rejected before parsing, so no payload can exhaust the parser.
MAX_NESTING = 32

_BOOKING_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ISO_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


_Text64 = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Fault(msgspec.Struct, frozen=True):
    """A fault directive carried by the message, so a lesson can inject failures by data alone.

    Args:
        fail_times: the payment step fails this many attempts, then succeeds.
        poison: the payment step fails on every attempt.
        slow_ms: extra processing time, in milliseconds.
    """

    fail_times: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    poison: bool = False
    slow_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 0


#: The fault of every booking that carries none (most of them): one shared instance, not one per message.
NO_FAULT = Fault()


class Booking(msgspec.Struct, frozen=True):
    """A valid booking, decoded straight from the message text by msgspec in C, one pass, no copy.

    The annotations are docs/contract.md's field rules in msgspec's terms, and they are only a gate:
    whatever msgspec refuses is checked again by the rules below (``_string``, ``_integer``,
    ``_iso_date``, ``_fault``), which name the broken rule. The gate must never accept what they
    refuse: the same patterns and bounds, ints that are not bools, numbers for ``created_at``,
    unknown fields ignored; a ``null`` where the rules allow one (``fault``, ``fail_times``) goes
    the slow way (``tests/unit/test_fuzz_corpus.py`` compares the two at every bound). Unknown
    fields stay in the message, which a dead letter or a replay carries whole.
    """

    booking_id: Annotated[str, msgspec.Meta(pattern=_BOOKING_ID_RE.pattern)]
    user_id: _Text64
    hotel_id: _Text64
    check_in: date  # msgspec reads only YYYY-MM-DD in ASCII digits, a real calendar date: what _iso_date accepts
    check_out: date
    guests: Annotated[int, msgspec.Meta(ge=1, le=10)]
    amount_cents: Annotated[int, msgspec.Meta(ge=0)]
    seq: Annotated[int, msgspec.Meta(ge=0)] | None = None
    created_at: float | None = None
    fault: Fault = NO_FAULT

    def __post_init__(self) -> None:
        # The one rule across fields; raised while decoding, it is a msgspec ValidationError (the slow way).
        if self.check_out <= self.check_in:
            raise ValueError("check_out must be later than check_in")

    @property
    def nights(self) -> int:
        return (self.check_out - self.check_in).days


def nesting_depth(text: str) -> int:
    """Deepest bracket nesting outside strings, measured before ``json.loads`` sees the text."""
    if text.count("{") + text.count("[") <= MAX_NESTING:
        return 0  # too few brackets to nest too deep: skip the character walk (the common case)
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _string(obj: dict[str, Any], name: str, pattern: re.Pattern[str] | None = None) -> str:
    value = obj.get(name)
    if value is None:
        raise BadMessage(f"missing field {name!r}")
    if not isinstance(value, str):
        raise BadMessage(f"field {name!r} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= 64:
        raise BadMessage(f"field {name!r} must be 1-64 characters, got {len(value)}")
    if pattern is not None and not pattern.match(value):
        raise BadMessage(f"field {name!r} may only contain A-Za-z0-9_-")
    return value


def _integer(obj: dict[str, Any], name: str, low: int, high: int | None, required: bool = True) -> int | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise BadMessage(f"missing field {name!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadMessage(f"field {name!r} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        allowed = f"{low}-{high}" if high is not None else f">= {low}"
        raise BadMessage(f"field {name!r} must be {allowed}, got {value}")
    return value


def _iso_date(obj: dict[str, Any], name: str) -> date:
    value = obj.get(name)
    if value is None:
        raise BadMessage(f"missing field {name!r}")
    if not isinstance(value, str) or not _ISO_DATE_RE.match(value):
        raise BadMessage(f"field {name!r} must be an ISO date YYYY-MM-DD, got {value!r:.40}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadMessage(f"field {name!r} is not a calendar date: {value!r}") from None


def _fault(obj: dict[str, Any]) -> Fault:
    value = obj.get("fault")
    if value is None:
        return NO_FAULT
    if not isinstance(value, dict):
        raise BadMessage(f"field 'fault' must be an object, got {type(value).__name__}")
    poison = value.get("poison", False)
    if not isinstance(poison, bool):
        raise BadMessage("field 'fault.poison' must be true or false")
    return Fault(
        fail_times=_integer(value, "fail_times", 0, 1000, required=False) or 0,
        poison=poison,
        slow_ms=_integer(value, "slow_ms", 0, 600_000, required=False) or 0,
    )


def _not_json(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity``: Python's json module reads them, but they are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


#: msgspec's JSON decoder, in C: a fifth of ``json.loads``'s time for a booking.
_fast_decode = msgspec.json.Decoder().decode


def _decode_json(text: str) -> Any:
    """The decoded JSON of ``text``, or BadMessage with the json module's own words for what is wrong.

    msgspec decodes first. Where it accepts a text, it yields what ``json.loads`` yields; what it
    refuses (bad JSON, but also numbers out of float range and lone surrogate escapes, which the
    json module reads) goes to the json module, whose verdict and error text are the contract's.
    """
    try:
        return _fast_decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    try:
        # parse_constant costs a quarter of the parse; only a text that names a constant can need it.
        return json.loads(text, parse_constant=_not_json) if "NaN" in text or "Infinity" in text else json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BadMessage(f"message is not valid JSON: {e}") from None


#: The gate of :class:`Booking`: a valid message decoded and checked in one call.
_decode_booking = msgspec.json.Decoder(Booking).decode


def parse_booking(payload: bytes | str) -> Booking:
    """Decode and validate one message.

    Args:
        payload: the message text as it came off the wire.

    Returns:
        The booking.

    Raises:
        BadMessage: not UTF-8, not JSON, too large or too deep, or a docs/contract.md rule broken.
    """
    if isinstance(payload, bytes):
        if len(payload) > MAX_MESSAGE_BYTES:
            raise BadMessage(f"message is {len(payload)} bytes; the limit is {MAX_MESSAGE_BYTES}")
        shallow = payload.count(b"{") + payload.count(b"[") <= MAX_NESTING
    else:
        if len(payload) > MAX_MESSAGE_BYTES:
            raise BadMessage(f"message is {len(payload)} characters; the limit is {MAX_MESSAGE_BYTES} bytes")
        shallow = payload.count("{") + payload.count("[") <= MAX_NESTING
    if shallow:  # too few brackets to nest too deep: the gate may parse it (from bytes: no text is made)
        try:
            return _decode_booking(payload)
        except msgspec.DecodeError:
            pass
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
    except UnicodeDecodeError as e:
        raise BadMessage(f"message is not valid UTF-8 (byte {e.start})") from None
    if nesting_depth(text) > MAX_NESTING:
        raise BadMessage(f"message nests deeper than {MAX_NESTING} levels")
    # Some rule is broken: find the first one, in the contract's words.
    obj = _decode_json(text)
    if not isinstance(obj, dict):
        raise BadMessage(f"message must be a JSON object, got {type(obj).__name__}")
    check_in = _iso_date(obj, "check_in")
    check_out = _iso_date(obj, "check_out")
    if check_out <= check_in:
        raise BadMessage(f"check_out {check_out} must be later than check_in {check_in}")
    created_at = obj.get("created_at")
    if created_at is not None and (isinstance(created_at, bool) or not isinstance(created_at, int | float)):
        raise BadMessage("field 'created_at' must be a number (Unix seconds)")
    return Booking(
        booking_id=_string(obj, "booking_id", _BOOKING_ID_RE),
        user_id=_string(obj, "user_id"),
        hotel_id=_string(obj, "hotel_id"),
        check_in=check_in,
        check_out=check_out,
        guests=_integer(obj, "guests", 1, 10) or 0,
        amount_cents=_integer(obj, "amount_cents", 0, None) or 0,
        seq=_integer(obj, "seq", 0, None, required=False),
        created_at=float(created_at) if created_at is not None else None,
        fault=_fault(obj),
    )


def _event_kind(seq: int, events: int) -> str:
    """created → modified … → cancelled: the story an ordering lesson checks."""
    if seq == 0:
        return "created"
    return "cancelled" if seq == events - 1 and events >= 3 else "modified"


def booking_id_of(payload: bytes | str) -> str | None:
    """Best-effort ``booking_id`` of a message that may be invalid, for dead-letter bookkeeping.

    Bounded like :func:`parse_booking`: workers call this on every message before validating it
    (for the event log), so an oversized or deeply nested payload must not be parsed here either.
    """
    if len(payload) > MAX_MESSAGE_BYTES:
        return None
    try:
        if nesting_depth(payload if isinstance(payload, str) else payload.decode("utf-8")) > MAX_NESTING:
            return None
        obj = json.loads(payload)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    value = obj.get("booking_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) and _BOOKING_ID_RE.match(value) else None


# One encoder for every message: json.dumps with non-default options builds a new encoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode(booking: Mapping[str, Any]) -> str:
    """The wire form: compact JSON, UTF-8 safe."""
    return _encode(booking)


#: ``encode`` for a message of plain values only (str, int within 64 bits, finite float, bool, None, lists and
#: dicts of them), as UTF-8 bytes, in a seventh of the time (0.44 against 3.3 us for the comparison harness's
#: 256-byte message): what the harness's producer sends flat out. The same JSON values, the same bytes but for a
#: float's exponent (1e-7 where json writes 1e-07). Not for anything a learner or a test may send: it writes NaN
#: as null and refuses ints past 64 bits, where ``encode`` keeps json's rules.
encode_plain = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class BookingGenerator:
    """Seeded bookings, so that a lesson's run can be repeated exactly.

    Args:
        seed: the random seed; the same seed gives the same bookings.
        hotels: how many distinct hotels (the inventory counters).
        users: how many distinct users.
        fault_rate: share of valid bookings whose payment fails ``fail_times`` times first.
        fail_times: how many attempts a faulty booking fails before it succeeds.
        events_per_booking: 1 for plain bookings; 2-3 gives created → modified → cancelled
            sequences with ``seq`` numbers, for the ordering lesson.
        prefix: start of every ``booking_id``.
    """

    seed: int = 42
    hotels: int = 20
    users: int = 1000
    fault_rate: float = 0.0
    fail_times: int = 2
    events_per_booking: int = 1
    prefix: str = "bk"

    def bookings(self, count: int, poison: int = 0) -> list[dict[str, Any]]:
        """``count`` valid bookings (times ``events_per_booking`` events) plus ``poison`` poison ones."""
        return list(self.iter_bookings(count, poison))

    def iter_bookings(self, count: int, poison: int = 0) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.seed)
        start = date(2027, 1, 1)
        for i in range(count + poison):
            check_in = start + timedelta(days=rng.randrange(365))
            base: dict[str, Any] = {
                "booking_id": f"{self.prefix}-{self.seed}-{i:07d}",
                "user_id": f"user-{rng.randrange(self.users):05d}",
                "hotel_id": f"hotel-{rng.randrange(self.hotels):03d}",
                "check_in": check_in.isoformat(),
                "check_out": (check_in + timedelta(days=1 + rng.randrange(7))).isoformat(),
                "guests": 1 + rng.randrange(4),
                "amount_cents": 5_000 + rng.randrange(50_000),
            }
            if i >= count:
                base["fault"] = {"poison": True}
            elif self.fault_rate and rng.random() < self.fault_rate:
                base["fault"] = {"fail_times": self.fail_times}
            for seq in range(self.events_per_booking):
                event = dict(base)
                if self.events_per_booking > 1:
                    event["seq"] = seq
                    event["event"] = _event_kind(seq, self.events_per_booking)
                yield event
