"""``/api/stats`` and ``/api/health``: the counters of each backend, and whether each broker answers."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from labkit.config import BACKENDS
from labkit.service.bookings import LinksDep
from labkit.service.models import Counters, HealthAnswer, Unavailable
from labkit.stack import Stack

router = APIRouter(prefix="/api", tags=["queues"])


@router.get(
    "/stats",
    response_model=dict[str, Counters | Unavailable],
    responses={503: {"model": dict[str, Counters | Unavailable], "description": "some backend did not answer"}},
    summary="Each backend's counters, as `labkit stats` shows them",
)
async def stats(backends: LinksDep) -> Any:
    """200 with every backend's counters; 503 when a broker is down (its backend then holds ``error``)."""
    found, failed = await backends.each(lambda b: b.stats())
    answer: dict[str, Any] = {name: found[name] if name in found else {"error": failed[name]} for name in BACKENDS}
    return JSONResponse(answer, status_code=503) if failed else answer


@router.get(
    "/health",
    response_model=HealthAnswer,
    responses={503: {"model": HealthAnswer, "description": "a broker does not answer"}},
    summary="Each broker and each backend's live workers",
)
async def health(backends: LinksDep) -> Any:
    """200 when every broker answers, else 503; each backend's live workers as its broker sees them."""
    statuses = await asyncio.to_thread(Stack(backends.config).status)
    brokers = {s.service: {"address": s.address, "kind": s.kind, "healthy": s.healthy, "detail": s.detail}
               for s in statuses}  # fmt: skip
    workers, _ = await backends.each(lambda b: b.live_workers())
    healthy = all(s.healthy for s in statuses)
    answer = {"healthy": healthy, "brokers": brokers, "workers": {name: workers.get(name, []) for name in BACKENDS}}
    return answer if healthy else JSONResponse(answer, status_code=503)
