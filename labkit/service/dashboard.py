"""``/dashboard``: the three queues live in one page, pushed from the sampler's buffer with server-sent events.

The page (``static/dashboard.html`` and ``dashboard.js``, charts by the vendored uPlot) never asks a broker: the
service's one :class:`~labkit.sampler.Sampler` samples each backend about once a second, and every open page reads
that buffer, so the brokers' load does not grow with the number of viewers. ``/dashboard/events`` sends a ``hello``
(the words of each system and the buffer's charts so far), then each new sample as it arrives. The "+1 / −1
worker" buttons scale the service's own worker pools (``POST /dashboard/workers/{backend}``); the dead letters'
replay buttons use the API's ``POST /api/dead-letters/replay``.

These routes are the page's, not the booking API's: they stay out of the OpenAPI document (and so out of the
fuzzing of it, which must not scale the workers).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from labkit.config import BACKENDS
from labkit.errors import LabkitError
from labkit.pool import WorkerPool
from labkit.sampler import BOOKING_WORDS, BROKERS, STATES, TERMS, WORDS, Sampler
from labkit.status import STATES as BOOKING_STATES

STATIC = Path(__file__).parent / "static"
#: Most worker processes per backend the page may ask for.
MAX_WORKERS = 8
#: A stream sends a comment this often when nothing new arrives, so proxies and browsers keep it open.
KEEPALIVE_S = 15.0
#: How often a stream checks whether the server is stopping (it then ends, so that uvicorn can stop).
CHECK_EVERY_S = 1.0

router = APIRouter(include_in_schema=False)


def _encode(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _hello(sampler: Sampler, pools: dict[str, WorkerPool] | None) -> dict[str, Any]:
    """What the page needs once: names and words (states, bookings' states, what each broker holds), the sampling
    period, and the charts' points so far."""
    series = {
        name: [{"at": s.at, "throughput": s.throughput, "backlog": s.backlog} for s in sampler.history(name) if s.ok]
        for name in sampler.backends
    }
    return {
        "backends": list(sampler.backends),
        "states": list(STATES),
        "words": WORDS,
        "terms": TERMS,
        "booking_states": list(BOOKING_STATES),
        "booking_words": BOOKING_WORDS,
        "brokers": {name: dict(brokers) for name, brokers in BROKERS.items()},
        "every_s": sampler.every_s,
        "scalable": pools is not None,
        "max_workers": MAX_WORKERS,
        "series": series,
    }


@router.get("/dashboard")
async def page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html")


@router.get("/dashboard/events")
async def events(request: Request) -> StreamingResponse:
    """Server-sent events: ``hello`` once, then ``sample`` (one backend's newest sample) as each arrives."""
    sampler: Sampler = request.app.state.sampler
    exiting = request.app.state.exiting

    async def stream() -> AsyncIterator[str]:
        yield "retry: 1000\n\n"
        yield _encode("hello", _hello(sampler, request.app.state.pools))
        sent = {name: 0.0 for name in sampler.backends}
        seen = -1
        quiet = 0.0
        while not exiting() and not await request.is_disconnected():
            now_seen = await sampler.wait_for_new(seen, timeout=CHECK_EVERY_S)
            if now_seen == seen:
                quiet += CHECK_EVERY_S
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keepalive\n\n"
                continue
            seen, quiet = now_seen, 0.0
            for name in sampler.backends:
                sample = sampler.latest(name)
                if sample is not None and sample.at > sent[name]:
                    sent[name] = sample.at
                    yield _encode("sample", sample.to_dict())

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


class ScaleRequest(BaseModel):
    """``{"change": 1}`` starts one more worker of the backend, ``{"change": -1}`` warm-stops the newest."""

    change: Literal[-1, 1] = Field(description="+1 or -1 worker")


@router.post("/dashboard/workers/{backend}", status_code=202)
async def scale(backend: str, request: ScaleRequest, http: Request) -> Any:
    """Scale the service's own worker pool of ``backend`` by one; answers the workers alive afterwards."""
    pools: dict[str, WorkerPool] | None = http.app.state.pools
    if backend not in BACKENDS:
        return JSONResponse({"error": f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"}, 404)
    if pools is None:
        return JSONResponse({"error": "this service runs no worker pools of its own"}, 409)
    pool = pools[backend]
    lock: asyncio.Lock = http.app.state.scale_locks[backend]
    async with lock:
        alive = [w for w in pool.workers if w.alive]
        wanted = len(alive) + request.change
        if not 0 <= wanted <= MAX_WORKERS:
            return JSONResponse({"error": f"{backend} has {len(alive)} workers; allowed 0 to {MAX_WORKERS}"}, 409)
        try:
            await asyncio.to_thread(pool.scale, wanted)
        except LabkitError as e:
            return JSONResponse({"error": str(e)}, 503)
        return {"backend": backend, "workers": [w.worker_id for w in pool.workers if w.alive]}
