"""``/api/dead-letters``: what each backend gave up on, and sending it again once the cause is fixed."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from labkit.backends import Backend
from labkit.config import BACKENDS
from labkit.lessons.deadletters import fix_booking
from labkit.service.bookings import LinksDep
from labkit.service.links import Outgoing
from labkit.service.models import DeadLetterModel, ErrorAnswer, ReplayAnswer, ReplayRequest, Skipped

router = APIRouter(prefix="/api/dead-letters", tags=["dead letters"])
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"model": ErrorAnswer, "description": "a broker is down"}}


def _unavailable(failed: dict[str, str]) -> JSONResponse:
    return JSONResponse({"error": "; ".join(f"{name}: {why}" for name, why in failed.items())}, status_code=503)


@router.get("", response_model=list[DeadLetterModel], responses=_UNAVAILABLE, summary="The dead letters")
async def list_dead_letters(
    backends: LinksDep,
    backend: Literal["bullmq", "streams", "kafka"] | None = Query(None, description="one backend [default: all]"),
) -> Any:
    """Every dead letter of one backend (or of all three), oldest first, with its reason and attempts."""
    names = [backend] if backend else list(BACKENDS)
    found, failed = await backends.each(lambda b: b.dead_letters(), names)
    if failed:
        return _unavailable(failed)
    return [{"backend": name, **letter} for name in names for letter in found[name]]


@router.post(
    "/replay",
    status_code=202,
    response_model=ReplayAnswer,
    responses={**_UNAVAILABLE, 413: {"model": ErrorAnswer}, 415: {"model": ErrorAnswer}, 422: {"model": ErrorAnswer}},
    summary="Send dead letters to their backend again",
)
async def replay(request: ReplayRequest, backends: LinksDep) -> Any:
    """Send the chosen dead letters (all when ``booking_ids`` is absent) to the backend's work destination again.

    Each goes back with lesson 04's safe fixes (its injected ``fault`` removed: the lab's stand-in for
    "the cause is fixed") and a ``replayed_from`` field naming its dead letter. Skipped, with the reason:
    a dead letter that is not a booking even after those fixes, one whose booking has completed since
    (replayed before), a second dead letter of the same booking, and a requested id with no dead letter.
    """
    link = backends[request.backend]

    async def letters_and_completed(backend: Backend) -> tuple[list[dict[str, Any]], set[str]]:
        letters = await backend.dead_letters()
        ids = sorted({letter["booking_id"] for letter in letters if letter["booking_id"]})
        flags = await backend.redis.smismember(backend.ledger.key("completed"), ids) if ids else []
        return letters, {booking_id for booking_id, done in zip(ids, flags, strict=True) if done}

    found, failed = await backends.each(letters_and_completed, [request.backend])
    if failed:
        return _unavailable(failed)
    letters, completed = found[request.backend]
    wanted = set(request.booking_ids) if request.booking_ids is not None else None
    skipped: list[Skipped] = []
    chosen: dict[str, Outgoing] = {}
    now = time.time()
    for letter in letters:
        booking_id, source = letter["booking_id"], letter["source"]
        if wanted is not None and booking_id not in wanted:
            continue
        fixed, change = fix_booking(letter["booking"])
        if fixed is None:
            skipped.append(Skipped(booking_id=booking_id, source=source, reason=change))
        elif fixed["booking_id"] in completed:
            skipped.append(Skipped(booking_id=booking_id, source=source, reason="completed since (replayed before)"))
        elif fixed["booking_id"] in chosen:
            skipped.append(Skipped(booking_id=booking_id, source=source, reason="another dead letter of it is sent"))
        else:
            message = {**fixed, "replayed_from": source}
            chosen[fixed["booking_id"]] = Outgoing(message, 0, now, None, replayed_from=source)
    for booking_id in sorted((wanted or set()) - {letter["booking_id"] for letter in letters}):
        skipped.append(Skipped(booking_id=booking_id, source=None, reason=f"no dead letter on {request.backend}"))
    results = await asyncio.gather(*(link.publish(item) for item in chosen.values()), return_exceptions=True)
    errors = [str(r) for r in results if isinstance(r, BaseException)]
    if errors and len(errors) == len(results):
        return _unavailable({request.backend: errors[0]})
    for (booking_id, item), result in zip(chosen.items(), results, strict=True):
        if isinstance(result, BaseException):
            skipped.append(Skipped(booking_id=booking_id, source=item.replayed_from, reason=str(result)))
    return ReplayAnswer(replayed=len(results) - len(errors), skipped=skipped)
