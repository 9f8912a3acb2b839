"""The door of the booking service: what is refused before any body is parsed.

An ASGI middleware in front of the app, because by the time a FastAPI endpoint or dependency runs,
the body has been read and parsed whole. For a request with a body (POST, PUT, PATCH):

- a content type other than ``application/json`` (charset, if given, ``utf-8``) → 415: a form on some
  other web page can post ``text/plain`` or ``application/x-www-form-urlencoded`` across sites without
  asking, but never ``application/json``;
- a body over the limit (by ``Content-Length``, or counted while it arrives) → 413, without reading more;
- a body that is not UTF-8, or JSON nested deeper than ``labkit.booking.MAX_NESTING`` → 422, before
  Python's parser could fail on it (FastAPI would answer 400 or recurse).

The body, once read, is handed to the app unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from labkit.booking import MAX_NESTING, nesting_depth

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def _answer(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _unparsable(send: Send, reason: str) -> None:
    """A 422 shaped like the app's own (labkit.service.app): the body as a whole is at fault."""
    await _answer(send, 422, {"error": reason, "detail": [{"loc": ["body"], "msg": reason, "type": "json_invalid"}]})


def content_type_problem(header: str | None) -> str | None:
    """Why a request's content type is refused, or None for ``application/json`` (``charset=utf-8`` allowed)."""
    if not header:
        return "no Content-Type: send the booking as application/json"
    media_type, *params = (part.strip().lower() for part in header.split(";"))
    if media_type != "application/json":
        return f"Content-Type {media_type!r} is not accepted: send application/json"
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') != "utf-8":
            return f"charset {value.strip()!r} is not accepted: JSON is UTF-8"
    return None


class BodyGuard:
    """Refuses what the contract refuses before the app sees it: 415, 413, and too deep JSON (422).

    Args:
        app: the ASGI app behind the door.
        max_bytes: the largest body accepted.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = content_type_problem(headers.get("content-type"))
        if problem is not None:
            await _answer(send, 415, {"error": problem})
            return
        too_large = {"error": f"the body is larger than {self.max_bytes} bytes"}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await _answer(send, 413, too_large)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _answer(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            await _unparsable(send, f"the body is not valid UTF-8 (byte {e.start})")
            return
        if nesting_depth(text) > MAX_NESTING:
            await _unparsable(send, f"JSON nests deeper than {MAX_NESTING} levels")
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: wait for the disconnect, as the server would
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
