"""The booking service as an ASGI app: ``create_app(config)``, one router per area.

The app holds no global state: ``create_app`` makes the links to the three backends from the config
it is given, so that a test, a notebook and ``labkit serve`` each build their own on their own lab.
Every error answers JSON with one readable ``error`` line (docs/service.md); none answers 500 on
purpose, and the API is fuzzed against its own OpenAPI document to keep it so.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from labkit.booking import MAX_MESSAGE_BYTES
from labkit.config import BACKENDS, Config
from labkit.errors import LabkitError
from labkit.pool import WorkerPool
from labkit.sampler import Sampler
from labkit.service import bookings, dashboard, deadletters, stats
from labkit.service.guard import BodyGuard
from labkit.service.links import Links
from labkit.workflow import WorkerSettings

DESCRIPTION = """\
A hotel-booking API in front of the lab's three queues: a booking posted here is sent to BullMQ,
Redis Streams and Kafka (or one of them), and `GET /api/bookings/{id}` shows where it is on each:
queued, delayed, active at a step with its progress, retrying, completed or dead-lettered.
"""


def _field_error(error: dict[str, Any]) -> dict[str, Any]:
    """One field error as the answer shows it: where, what, and pydantic's error type (never the input echoed)."""
    loc = list(error.get("loc", ()))
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "json_invalid" and len(loc) == 2 and isinstance(loc[1], int):
        message = f"not valid JSON at character {loc[1]}: {error.get('ctx', {}).get('error', message)}"
        loc = ["body"]
    return {"loc": [str(part) if not isinstance(part, int) else part for part in loc], "msg": message,
            "type": str(error.get("type", "value_error"))}  # fmt: skip


def _one_line(errors: list[dict[str, Any]]) -> str:
    """``check_out: Input should be greater than 2024-01-15; guests: Field required``."""
    parts = []
    for error in errors[:5]:
        where = ".".join(str(part) for part in error["loc"] if part != "body")
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [_field_error(e) for e in exc.errors()]
    return JSONResponse({"error": _one_line(errors), "detail": errors}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=503)


def create_app(
    config: Config, settings: WorkerSettings | None = None, pools: Mapping[str, WorkerPool] | None = None
) -> FastAPI:
    """The booking service on the lab ``config``.

    Args:
        config: the lab's addresses and namespace.
        settings: the workers' settings, which producers share (retry policy); ``track_status`` is forced on.
        pools: the service's own worker pools by backend, which the dashboard's "+1 / -1 worker" scales
            (None: the dashboard cannot scale).
    """
    producer = dataclasses.replace(settings or WorkerSettings(), track_status=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.links = Links(config, producer)
        app.state.sampler = Sampler(config)
        app.state.scale_locks = {name: asyncio.Lock() for name in BACKENDS}
        await app.state.sampler.start()
        try:
            yield
        finally:
            await app.state.sampler.stop()
            await app.state.links.close()

    app = FastAPI(
        title="Booking Queue Lab: the booking service",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.pools = dict(pools) if pools is not None else None
    app.state.exiting = lambda: False  # `labkit serve` points it at uvicorn's, so that event streams end on a stop
    app.include_router(bookings.router)
    app.include_router(stats.router)
    app.include_router(deadletters.router)
    app.include_router(dashboard.router)
    app.mount("/dashboard/static", StaticFiles(directory=dashboard.STATIC), name="dashboard-static")
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(LabkitError, _unavailable)
    app.add_middleware(BodyGuard, max_bytes=MAX_MESSAGE_BYTES)
    return app
