"""Deadlines and size limits on request bodies.

uvicorn does not bound the time a body may take to trickle in, so a slow client could hold a
connection and a request task forever (the request headers are bounded by
:mod:`app.http_protocol`). :func:`read_body` reads a body within ``CLIENT_BODY_TIMEOUT``
seconds (else 408 ``timeout_error``, ``x-should-retry: true``, and the connection is closed)
and at most ``limit`` bytes.

A body over the limit gets 413 ``request_too_large`` — but only once the rest of it has been
read and dropped (:func:`discard_body`, at most :func:`discard_allowance` more bytes, within
the body's deadline): a server that answers and closes while the client is still sending
resets the connection, and the client never reads the answer. Beyond that bound the 413 goes
out at once and the connection is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from starlette.types import Receive

from app import errors
from app.errors import ApiError

DISCARD_MAX_BYTES = 256 * 1024 * 1024
"""The most bytes of an oversized body the relay reads (and drops) to answer it readably."""


def discard_allowance(limit: int) -> int:
    """Bytes beyond ``limit`` that an oversized body may still send to get a readable 413:
    three times the limit (a body of up to 4 × the limit), at most ``DISCARD_MAX_BYTES``."""
    return min(3 * limit, DISCARD_MAX_BYTES)


def body_timeout_error(seconds: float) -> ApiError:
    """408 for a body that did not arrive in time (Anthropic has no 408 type: ``timeout_error``,
    which the SDKs retry); the connection is closed after it."""
    return ApiError(
        408,
        "timeout_error",
        f"The request body was not received within {seconds:g} seconds.",
        {"x-should-retry": "true", "connection": "close"},
    )


def client_left_error() -> ApiError:
    """The client went away while sending its body (nobody reads this answer; the request
    log does)."""
    return ApiError(
        499, "invalid_request_error", "The client closed the connection before its body ended."
    )


def declared_length(headers: Mapping[str, str]) -> int | None:
    """The ``content-length`` header as a number (None without one; 400 when invalid)."""
    declared = headers.get("content-length")
    if declared is None:
        return None
    try:
        value = int(declared)
    except ValueError:
        raise errors.invalid_request("invalid content-length header") from None
    if value < 0:
        raise errors.invalid_request("invalid content-length header")
    return value


DISCARD_IDLE_SECONDS = 1.0
"""While dropping an oversized body: a pause this long ends the wait for the rest of it."""


async def discard_body(receive: Receive, allowance: int, deadline: float | None) -> bool:
    """Read and drop the rest of a request body: True when it ended within ``allowance``
    bytes and by ``deadline`` (event-loop time), else False (the connection must close)."""
    seen = 0
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                # a client that pauses is not sending its body (it waits for the answer
                # first): answer now and close, rather than wait for the body deadline
                try:
                    message = await asyncio.wait_for(receive(), DISCARD_IDLE_SECONDS)
                except TimeoutError:
                    return False
                if message["type"] != "http.request":
                    return False
                seen += len(message.get("body", b""))
                if seen > allowance:
                    return False
                if not message.get("more_body", False):
                    return True
    except TimeoutError:
        return False


async def too_large(
    receive: Receive,
    limit: int,
    headers: Mapping[str, str],
    *,
    declared: int | None,
    received: int,
    deadline: float | None,
) -> ApiError:
    """The 413 for a body over ``limit``, after dropping the rest of it when that is bounded
    (``received`` bytes of it are read already; ``declared``: its content-length, if any).
    When the rest is not read — too much, too slow, or the client waits for
    ``100 Continue`` before sending any — the answer closes the connection."""
    err = errors.too_large(limit)
    allowance = discard_allowance(limit)
    if declared is not None:
        allowance = declared - received if declared - limit <= allowance else -1
    waits_for_continue = (
        received == 0 and headers.get("expect", "").lower().strip() == "100-continue"
    )
    if waits_for_continue or allowance < 0 or not await discard_body(receive, allowance, deadline):
        err.headers["connection"] = "close"
    return err


async def read_body(
    receive: Receive,
    headers: Mapping[str, str],
    limit: int,
    seconds: float | None = None,
) -> bytes:
    """A request body of at most ``limit`` bytes, all of it within ``seconds``.

    Raises 413 (:func:`too_large`), 408 (:func:`body_timeout_error`), or 400 for an invalid
    ``content-length``."""
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    declared = declared_length(headers)
    if declared is not None and declared > limit:
        raise await too_large(
            receive, limit, headers, declared=declared, received=0, deadline=deadline
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise client_left_error()
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        break
                    chunks.append(chunk)
                if not more:
                    return b"".join(chunks)
    except TimeoutError:
        raise body_timeout_error(seconds or 0.0) from None
    if not more:  # the whole body is in, only too large
        raise errors.too_large(limit)
    raise await too_large(
        receive, limit, headers, declared=declared, received=size, deadline=deadline
    )
