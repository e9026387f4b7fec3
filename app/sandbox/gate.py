"""What every Anthropic endpoint of the sandbox does first, and how it answers.

:meth:`Gate.open` records the request (stats and log), then refuses, in this order: a missing
or malformed credential (401), a missing or unknown ``anthropic-version`` (400), and a
scripted fault for the credential. What is left is an :class:`Exchange`; the endpoint then
checks its body (413, 400, 404) and answers with :meth:`Gate.ok` or :meth:`Gate.refuse`.

Every answer carries ``request-id``; every error also ``x-should-retry`` and the body's
``request_id``. Answers to an authenticated credential carry ``anthropic-organization-id``
and the credential's ``anthropic-ratelimit-*`` headers; a refused credential gets neither.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from app.sandbox.common import (
    Header,
    NoResponse,
    Problem,
    RawResponse,
    error_body,
    error_headers,
    new_request_id,
    pause,
)
from app.sandbox.faults import Fault, disconnect
from app.sandbox.state import FakeState
from app.sandbox.validation import check_credential, check_version, read_headers


@dataclass(slots=True)
class Exchange:
    """A request that passed the gate."""

    request_id: str
    credential: str
    version: str  # anthropic-version, one of the known ones
    entry: dict[str, Any]  # its log entry
    fault: Fault | None  # a fault that shapes the answer (slow, slow_stream, mid_stream_error)


class Gate:
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def headers(self, request_id: str) -> list[Header]:
        return [(b"request-id", request_id.encode()), self.state.org_header]

    def refuse(
        self,
        entry: dict[str, Any] | None,
        request_id: str,
        credential: str | None,
        problem: Problem,
        extra: list[Header] | None = None,
        requests_reset: int | None = None,
    ) -> Response:
        """An Anthropic error; ``credential`` None for a request refused before it had one."""
        status, error_type, message = problem
        headers = error_headers(request_id, status)
        if credential is not None:
            headers.append(self.state.org_header)
            headers.extend(self.state.bucket(credential, time.time()).headers(requests_reset))
        if extra:
            headers.extend(extra)
        if entry is not None:
            entry["status"] = status
        return RawResponse(error_body(request_id, error_type, message), status, headers)

    def fail(self, ex: Exchange, problem: Problem, extra: list[Header] | None = None) -> Response:
        return self.refuse(ex.entry, ex.request_id, ex.credential, problem, extra)

    def ok(self, ex: Exchange, payload: Any) -> Response:
        headers = self.headers(ex.request_id)
        headers.extend(self.state.bucket(ex.credential, time.time()).headers())
        ex.entry["status"] = 200
        return RawResponse(orjson.dumps(payload), 200, headers)

    async def open(
        self,
        request: Request,
        path: str,
        body: Any = None,
        body_bytes: int = 0,
        *,
        is_messages: bool = False,
        streaming: bool = False,
    ) -> Exchange | Response:
        """Record the request and check what every endpoint checks; a Response refuses it."""
        state = self.state
        request_id = new_request_id()
        credential, version = read_headers(request.scope["headers"])
        entry = state.record(request, path, body, body_bytes, credential, request_id, is_messages)
        problem = check_credential(credential)
        if problem is not None:
            return self.refuse(entry, request_id, None, problem)
        assert credential is not None
        problem = check_version(version)
        if problem is not None:
            return self.refuse(entry, request_id, credential, problem)
        assert version is not None
        fault = state.take_fault(credential, is_messages)
        if fault is not None:
            early = await self._apply(
                fault, entry, request_id, credential, request.receive, streaming
            )
            if early is not None:
                return early
        return Exchange(request_id, credential, version, entry, fault)

    async def _apply(
        self,
        fault: Fault,
        entry: dict[str, Any],
        request_id: str,
        credential: str,
        receive: Receive,
        streaming: bool,
    ) -> Response | None:
        """Apply a fault that ends the request or delays it; None when the request goes on."""
        kind = fault.kind
        error = fault.error()
        if error is not None:
            extra: list[Header] = []
            requests_reset: int | None = None
            if kind == "rate_limit":
                seconds = fault.retry_after
                value = str(int(seconds)) if float(seconds).is_integer() else str(seconds)
                extra.append((b"retry-after", value.encode()))
                requests_reset = int(time.time() + seconds + 0.999)
            return self.refuse(entry, request_id, credential, error, extra, requests_reset)
        if kind == "disconnect":
            entry["status"] = 0
            return await disconnect()
        if kind == "hang":
            if await pause(receive, 3600.0 if fault.delay is None else fault.delay):
                return NoResponse()
        elif kind == "slow" or (kind == "slow_stream" and not streaming):
            if await pause(receive, 1.0 if fault.delay is None else fault.delay):
                return NoResponse()
        elif kind == "mid_stream_error" and not streaming:
            overloaded = (529, "overloaded_error", "Overloaded")
            return self.refuse(entry, request_id, credential, overloaded)
        return None

    def not_found(self, status: int) -> Response:
        """404 for a path that is not Anthropic's (405 for a wrong method), credential unread."""
        request_id = new_request_id()
        problem: Problem = (404, "not_found_error", "Not Found")
        if status == 405:
            problem = (405, "invalid_request_error", "Method Not Allowed")
        body = error_body(request_id, problem[1], problem[2])
        return RawResponse(body, problem[0], error_headers(request_id, problem[0]))
