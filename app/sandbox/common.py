"""Small pieces every sandbox module shares: ids, times, raw responses and error bodies."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any, Final

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

MAX_BODY_BYTES: Final = 32 * 1024 * 1024  # Messages and count_tokens (spec §4, 413)
JSON_CT: Final = (b"content-type", b"application/json")
SSE_CT: Final = b"text/event-stream; charset=utf-8"

Header = tuple[bytes, bytes]
# (status, error type, message): a refusal before any work is done.
Problem = tuple[int, str, str]

_ID_TABLE: Final = bytes.maketrans(b"+/", b"xQ")


def new_id(prefix: str, n: int = 22) -> str:
    """``prefix`` + ``n`` random alphanumeric characters (fast; not a secret)."""
    return prefix + base64.b64encode(os.urandom(n))[:n].translate(_ID_TABLE).decode()


def new_request_id() -> str:
    return new_id("req_011C", 20)


def tokens(chars: int) -> int:
    """The sandbox's token estimate: one token per 4 characters, rounded up."""
    return (chars + 3) // 4


def next_minute(now: float) -> int:
    return (int(now) // 60 + 1) * 60


_RFC3339_CACHE: dict[int, bytes] = {}


def rfc3339(ts: int) -> bytes:
    value = _RFC3339_CACHE.get(ts)
    if value is None:
        if len(_RFC3339_CACHE) > 256:
            _RFC3339_CACHE.clear()
        value = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)).encode()
        _RFC3339_CACHE[ts] = value
    return value


def should_retry(status: int) -> bool:
    """Anthropic's ``x-should-retry``: true on 408, 409, 429 and 5xx (529 included)."""
    return status in (408, 409, 429) or status >= 500


def error_body(request_id: str, error_type: str, message: str) -> bytes:
    return orjson.dumps(
        {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": request_id,
        }
    )


def error_headers(request_id: str, status: int) -> list[Header]:
    """``request-id`` and ``x-should-retry``, the headers of every Anthropic error."""
    return [
        (b"request-id", request_id.encode()),
        (b"x-should-retry", b"true" if should_retry(status) else b"false"),
    ]


class RawResponse(Response):
    """A JSON response with pre-encoded headers (skips Starlette's header building)."""

    def __init__(self, body: bytes, status_code: int, headers: list[Header]) -> None:
        self.status_code = status_code
        self.background = None
        self.body = body
        headers.append((b"content-length", str(len(body)).encode()))
        headers.append(JSON_CT)
        self.raw_headers = headers


class NoResponse(Response):
    """Sends nothing: the connection is gone or was closed on purpose."""

    def __init__(self) -> None:
        self.status_code = 499
        self.background = None
        self.body = b""
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


def json_response(payload: Any, status_code: int = 200) -> Response:
    """A plain JSON answer (the control API)."""
    return RawResponse(orjson.dumps(payload), status_code, [])


async def pause(receive: Receive, seconds: float) -> bool:
    """Sleep ``seconds``, waking early if the client disconnects. True if it did."""
    if seconds <= 0:
        return False
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return True
    except TimeoutError:
        return False
