"""``/api/bookings``: take a booking the way an application does, and say where it is now."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse

from labkit.booking import encode, parse_booking
from labkit.errors import BadMessage
from labkit.service.links import Links, Outgoing
from labkit.service.models import AcceptedAnswer, BookingRequest, ErrorAnswer, StatusAnswer

router = APIRouter(prefix="/api/bookings", tags=["bookings"])

BookingId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the booking's id")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorAnswer, "description": "the body is over 64 KiB"},
    415: {"model": ErrorAnswer, "description": "the content type is not application/json"},
    422: {"model": ErrorAnswer, "description": "not JSON, or a field breaks the booking's rules"},
    503: {"model": ErrorAnswer, "description": "no backend took it: each one's broker is down"},
}


async def links(request: Request) -> Links:
    """The app's links to the backends (made by create_app); async, or FastAPI would run it in a thread."""
    found: Links = request.app.state.links
    return found


LinksDep = Annotated[Links, Depends(links)]


def validation_error(reason: str) -> JSONResponse:
    """A 422 for a message the workers would dead-letter although the schema let it through."""
    detail = [{"loc": ["body"], "msg": reason, "type": "value_error"}]
    return JSONResponse({"error": reason, "detail": detail}, status_code=422)


@router.post(
    "",
    status_code=202,
    response_model=AcceptedAnswer,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="Take a booking and send it to one backend or all three",
)
async def post_booking(booking: BookingRequest, backends: LinksDep) -> Any:
    """Answers 202 once every backend that took it has acknowledged it; 503 when none could."""
    booking_id = booking.booking_id or f"bk-{uuid.uuid4().hex}"
    message = booking.message(booking_id)
    try:
        parse_booking(encode(message))  # exactly what a worker will check
    except BadMessage as bad:
        return validation_error(bad.reason)
    accepted_at = time.time()
    due_at = accepted_at + booking.delay_ms / 1000 if booking.delay_ms else None
    outgoing = Outgoing(message, booking.delay_ms, accepted_at, due_at)
    accepted, failed = await backends.publish(outgoing, booking.targets())
    if not accepted:
        error = next(iter(failed.values())) if len(failed) == 1 else f"no backend took booking {booking_id}"
        return JSONResponse({"error": error, "failed": failed}, status_code=503)
    # Answered as built: the hot path skips FastAPI's second validation of a response it made itself.
    status_url = f"/api/bookings/{booking_id}"
    answer: dict[str, Any] = {"booking_id": booking_id, "accepted": accepted, "status_url": status_url}
    if due_at is not None:
        answer["due_at"] = due_at
    if failed:
        answer["failed"] = failed
    return JSONResponse(answer, status_code=202)


@router.get(
    "/{booking_id}",
    response_model=StatusAnswer,
    responses={
        404: {"model": ErrorAnswer, "description": "no backend knows this booking"},
        503: {"model": ErrorAnswer, "description": "no backend that answered knows it, and some did not answer"},
    },
    summary="Where a booking is on each backend, with its history",
)
async def get_booking(booking_id: BookingId, backends: LinksDep) -> Any:
    found, failed = await backends.each(lambda b: b.booking_status(booking_id))
    known = {name: status.to_dict() for name, status in found.items() if status is not None}
    if not known:
        if failed:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
            return JSONResponse({"error": f"booking {booking_id} not found where asked ({reasons})"}, 503)
        return JSONResponse({"error": f"no backend knows booking {booking_id}"}, status_code=404)
    return {"booking_id": booking_id, "backends": known, "unavailable": failed or None}
