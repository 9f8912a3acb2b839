"""The booking service's requests and answers, one pydantic class per row of the contract (docs/service.md).

The request model states the booking message's rules (labkit.booking) as a schema, so that OpenAPI shows
them and a broken rule comes back as a 422 naming its field; ``labkit.booking.parse_booking`` then checks
the message the service will send, so the service accepts exactly what the workers accept.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import InitErrorDetails

from labkit.config import BACKENDS
from labkit.status import STATES, STEPS

BackendName = Literal["bullmq", "streams", "kafka"]
Target = Literal["bullmq", "streams", "kafka", "all"]
State = Literal["queued", "delayed", "active", "retrying", "completed", "dead_lettered"]
Step = Literal["validate", "charge_payment", "write_confirmation", "send_email", "update_inventory"]
assert set(State.__args__) == set(STATES) and set(Step.__args__) == set(STEPS)  # type: ignore[attr-defined]
assert set(BackendName.__args__) == set(BACKENDS)  # type: ignore[attr-defined]

#: What the service charges per night when a camelCase body leaves ``amountCents`` out.
NIGHTLY_RATE_CENTS = 10_000
#: The longest delay a booking may ask for: a day.
MAX_DELAY_MS = 24 * 3600 * 1000
#: camelCase names of the original system's body; one of them present makes it a camelCase body.
CAMEL_NAMES = {
    "bookingId": "booking_id",
    "userId": "user_id",
    "hotelId": "hotel_id",
    "checkIn": "check_in",
    "checkOut": "check_out",
    "amountCents": "amount_cents",
    "delayMs": "delay_ms",
    "createdAt": "created_at",
}
_ISO_DATE = r"^\d{4}-\d{2}-\d{2}$"
_DATE: dict[str, Any] = {"format": "date"}

Id64 = Annotated[StrictStr, Field(min_length=1, max_length=64)]


def _alias(name: str) -> AliasChoices:
    camel = next((c for c, snake in CAMEL_NAMES.items() if snake == name), None)
    return AliasChoices(name, camel) if camel else AliasChoices(name)


def _missing(name: str, data: Any) -> InitErrorDetails:
    return InitErrorDetails(type="missing", loc=(name,), input=data)


class FaultDirective(BaseModel):
    """Injected failures, as the booking message defines them; unknown keys are kept."""

    model_config = ConfigDict(extra="allow")

    fail_times: StrictInt | None = Field(None, ge=0, le=1000, description="the payment step fails this many attempts")
    poison: StrictBool | None = Field(None, description="the payment step fails every attempt")
    slow_ms: StrictInt | None = Field(None, ge=0, le=600_000, description="extra processing time, ms")


class BookingRequest(BaseModel):
    """``POST /api/bookings``: a booking message (``booking_id`` optional), plus ``backend`` and ``delay_ms``.

    The original system's camelCase body is accepted too (``userId``, ``hotelId``, ``checkIn``, ``checkOut``,
    optional ``guests``, default 1, and ``amountCents``, default: the nights priced at NIGHTLY_RATE_CENTS).
    In a snake_case body ``guests`` and ``amount_cents`` are required, as in the message. Unknown fields are
    kept and travel with the booking.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    booking_id: StrictStr | None = Field(
        None, validation_alias=_alias("booking_id"), pattern=r"^[A-Za-z0-9_-]{1,64}$", description="made if absent"
    )
    user_id: Id64 = Field(validation_alias=_alias("user_id"))
    hotel_id: Id64 = Field(validation_alias=_alias("hotel_id"))
    check_in: StrictStr = Field(
        validation_alias=_alias("check_in"), pattern=_ISO_DATE, description="YYYY-MM-DD", json_schema_extra=_DATE
    )
    check_out: StrictStr = Field(
        validation_alias=_alias("check_out"),
        pattern=_ISO_DATE,
        description="YYYY-MM-DD, later than check_in",
        json_schema_extra=_DATE,
    )
    guests: StrictInt | None = Field(None, ge=1, le=10, description="required unless the body is camelCase")
    amount_cents: StrictInt | None = Field(
        None, ge=0, validation_alias=_alias("amount_cents"), description="required unless the body is camelCase"
    )
    seq: StrictInt | None = Field(None, ge=0)
    created_at: float | None = Field(None, validation_alias=_alias("created_at"), allow_inf_nan=False, strict=True)
    fault: FaultDirective | None = None
    backend: Target = Field("all", description="which backend takes it; all: each of the three")
    delay_ms: StrictInt = Field(
        0, ge=0, le=MAX_DELAY_MS, validation_alias=_alias("delay_ms"), description="no worker starts it before then"
    )

    @model_validator(mode="before")
    @classmethod
    def _camel_defaults(cls, data: Any) -> Any:
        """A camelCase body gets the original system's defaults; a snake_case one must carry every field."""
        if not isinstance(data, dict):
            return data
        if any(name in data for name in CAMEL_NAMES):
            return {"guests": 1, **data}
        missing = [_missing(name, data) for name in ("guests", "amount_cents") if name not in data]
        if missing:
            raise PydanticValidationError.from_exception_data(cls.__name__, missing)
        return data

    @model_validator(mode="after")
    def _stay(self) -> BookingRequest:
        """Calendar dates, a stay of at least one night, and its price when a camelCase body gave none."""
        problems = []
        for name in ("check_in", "check_out"):
            try:
                date.fromisoformat(getattr(self, name))
            except ValueError:
                value = getattr(self, name)
                problems.append(
                    InitErrorDetails(
                        type="value_error", loc=(name,), input=value, ctx={"error": ValueError("not a calendar date")}
                    )
                )
        if problems:
            raise PydanticValidationError.from_exception_data(type(self).__name__, problems)
        if self.nights < 1:
            error = InitErrorDetails(
                type="greater_than", loc=("check_out",), input=self.check_out, ctx={"gt": self.check_in}
            )
            raise PydanticValidationError.from_exception_data(type(self).__name__, [error])
        if self.amount_cents is None:
            self.amount_cents = self.nights * NIGHTLY_RATE_CENTS
        return self

    @property
    def nights(self) -> int:
        return (date.fromisoformat(self.check_out) - date.fromisoformat(self.check_in)).days

    def message(self, booking_id: str) -> dict[str, Any]:
        """The booking message the service sends: snake_case, unknown fields kept, ``backend``/``delay_ms`` left out."""
        fields = self.model_dump(exclude={"backend", "delay_ms"}, exclude_none=True)
        extra = {k: v for k, v in (self.model_extra or {}).items() if k not in CAMEL_NAMES}
        return {**extra, **fields, "booking_id": booking_id}

    def targets(self) -> list[str]:
        return list(BACKENDS) if self.backend == "all" else [self.backend]


class AcceptedAnswer(BaseModel):
    """``202``: where the booking landed on each backend that took it, and where to follow it."""

    booking_id: str
    accepted: dict[BackendName, str] = Field(
        description="backend -> where it landed: job id, entry id, topic/partition/offset"
    )
    status_url: str
    due_at: float | None = Field(None, description="Unix time before which no worker starts it (delay_ms)")
    failed: dict[BackendName, str] | None = Field(None, description="backends that did not take it, each with why")


class ErrorAnswer(BaseModel):
    """Every error: one readable line (415, 413, 404, 503), with the field errors for a 422."""

    error: str
    detail: list[dict[str, Any]] | None = Field(None, description="422: one entry per field at fault (loc, msg, type)")
    failed: dict[BackendName, str] | None = Field(
        None, description="503 for a booking no backend took: why, per backend"
    )


class TransitionModel(BaseModel):
    """One entry of a booking's history on one backend."""

    state: State
    at: float
    step: Step | None = None
    progress: int = Field(0, ge=0, le=100)
    attempt: int = 0
    worker: str | None = None
    reason: str | None = None
    due_at: float | None = None
    duration_ms: float | None = None
    source: str | None = None
    replayed_from: str | None = None


class BackendStatusModel(BaseModel):
    """Where the booking is on one backend."""

    state: State
    step: Step | None = Field(description="the step in progress, while active")
    progress: int = Field(ge=0, le=100, description="percent of the workflow done")
    attempts: int = Field(description="deliveries so far")
    reason: str | None = Field(description="why it is retrying or dead-lettered")
    updated_at: float
    history: list[TransitionModel]
    worker: str | None = Field(None, description="the worker running it, or that ran it")
    duration_ms: float | None = Field(None, description="completed: its run's time from start to completion")
    due_at: float | None = Field(None, description="delayed: when it may start")
    next_try_at: float | None = Field(None, description="retrying: when its next attempt is due")


class StatusAnswer(BaseModel):
    """``GET /api/bookings/{booking_id}``."""

    booking_id: str
    backends: dict[BackendName, BackendStatusModel]
    unavailable: dict[BackendName, str] | None = Field(None, description="backends that could not be asked, and why")


class Counters(BaseModel):
    """One backend's counters, as ``labkit stats`` shows them (plus the backend's own detail)."""

    model_config = ConfigDict(extra="allow")

    completed: int
    dead_lettered: int
    retried: int
    duplicates: int
    in_flight: int
    backlog: int


class Unavailable(BaseModel):
    """A backend whose broker did not answer."""

    error: str


class BrokerHealth(BaseModel):
    address: str
    kind: str
    healthy: bool
    detail: str = ""


class HealthAnswer(BaseModel):
    """``GET /api/health``: 200 when every broker answers, else 503."""

    healthy: bool
    brokers: dict[Literal["redis", "kafka"], BrokerHealth]
    workers: dict[BackendName, list[str]] = Field(description="live workers per backend, in each broker's own view")


class DeadLetterModel(BaseModel):
    """One dead letter, as the backend's dead-letter destination holds it."""

    backend: BackendName
    booking_id: str | None
    reason: str
    attempts: int
    source: str
    booking: str = Field(description="the original message text")


class ReplayRequest(BaseModel):
    """``POST /api/dead-letters/replay``: which backend, and which of its dead letters (all when absent)."""

    backend: BackendName
    booking_ids: list[Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]] | None = Field(
        None, max_length=500, description="at most 500 per request"
    )


class Skipped(BaseModel):
    booking_id: str | None
    source: str | None
    reason: str


class ReplayAnswer(BaseModel):
    """``202``: how many dead letters were sent again, and which were not, with why."""

    replayed: int
    skipped: list[Skipped] = Field(default_factory=list)
