"""``POST /v1/messages`` (JSON and SSE) and ``POST /v1/messages/count_tokens``.

After the gate (:mod:`app.sandbox.gate`): 413 above 32 MB, 400 for a body that is not JSON or
fails :func:`~app.sandbox.validation.check_body`, 404 for an unknown model, 400 for a
``max_tokens`` above the model's; then the prompt is counted (never more tokens than body
bytes), the cache simulated, the reply planned and the credential's rate limits charged
(429 when a family would go below zero).
"""

from __future__ import annotations

import time
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.sandbox.common import (
    MAX_BODY_BYTES,
    NoResponse,
    Problem,
    RawResponse,
    new_id,
    pause,
    tokens,
)
from app.sandbox.files import missing_file
from app.sandbox.gate import Exchange, Gate
from app.sandbox.prompt import analyze
from app.sandbox.render import SSEResponse, message_json, sse_events
from app.sandbox.reply import plan_reply
from app.sandbox.validation import check_body, check_model_limit, unknown_model

TOO_LARGE: Final[Problem] = (
    413,
    "request_too_large",
    "Request exceeds the maximum allowed number of bytes. The maximum request size is 32 MB.",
)


async def _read(request: Request) -> tuple[bytes, Any, Problem | None]:
    """The raw body, its JSON (None when not parsed) and why it cannot be used, if so."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        return raw, None, TOO_LARGE
    try:
        return raw, orjson.loads(raw), None
    except orjson.JSONDecodeError as exc:
        return (
            raw,
            None,
            (400, "invalid_request_error", f"The request body is not valid JSON: {exc}"),
        )


def _rate_limited_message(limit: int, family: str) -> str:
    return (
        f"This request would exceed your organization's rate limit of {limit:,} "
        f"{family.replace('-', ' ')} per minute. For details, refer to: "
        "https://docs.claude.com/en/api/rate-limits. You can see the response headers for "
        "current usage. Please reduce the prompt length or the maximum tokens requested, or "
        "try again later."
    )


class MessageRoutes:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def messages(self, request: Request) -> Response:
        gate = self.gate
        state = gate.state
        raw, body, unusable = await _read(request)
        wants_stream = isinstance(body, dict) and body.get("stream") is True
        ex = await gate.open(
            request, "/v1/messages", body, len(raw), is_messages=True, streaming=wants_stream
        )
        if isinstance(ex, Response):
            return ex
        problem = unusable or check_body(body, messages_endpoint=True, version=ex.version)
        if problem is not None:
            return gate.fail(ex, problem)
        info = state.models.resolve(body["model"])
        if info is None:
            return gate.fail(ex, unknown_model(body["model"]))
        problem = check_model_limit(body["max_tokens"], info.max_tokens, info.id)
        problem = problem or missing_file(state.files, body, ex.credential)
        if problem is not None:
            return gate.fail(ex, problem)
        return await self._answer(request, ex, body, len(raw), info.id)

    async def _answer(
        self, request: Request, ex: Exchange, body: dict[str, Any], body_bytes: int, model: str
    ) -> Response:
        gate = self.gate
        state = gate.state
        credential = ex.credential
        prompt = analyze(body)
        total = max(1, min(tokens(prompt.chars), body_bytes))
        plan = state.cache.plan(credential, model, prompt, total) if prompt.breakpoints else None
        cached = (plan.read + plan.written) if plan else 0
        input_tokens = total - cached
        reply = plan_reply(body)

        now = time.time()
        bucket = state.bucket(credential, now)
        family = bucket.exceeded(input_tokens + (plan.written if plan else 0), reply.output_tokens)
        if family is not None:
            wait = max(1, int(bucket.reset_at - now + 0.999))
            problem = (
                429,
                "rate_limit_error",
                _rate_limited_message(bucket.limits[family], family),
            )
            return gate.fail(ex, problem, [(b"retry-after", str(wait).encode())])
        if plan is not None:
            state.cache.commit(plan)

        gap, gap_all_events, error_after = 0.0, False, None
        fault = ex.fault
        if fault is not None:
            delay = 1.0 if fault.delay is None else fault.delay
            if fault.kind == "slow":
                gap = delay
            elif fault.kind == "slow_stream":
                gap, gap_all_events = delay, True
            elif fault.kind == "paced":
                gap = 0.02 if fault.delay is None else fault.delay
            elif fault.kind == "mid_stream_error":
                error_after = fault.after_events

        headers = gate.headers(ex.request_id)
        headers.extend(bucket.headers())
        msg_id = new_id("msg_01")
        ex.entry["status"] = 200
        if body.get("stream") is True:
            events = sse_events(msg_id, model, reply, input_tokens, plan)
            return SSEResponse(events, headers, gap, gap_all_events, error_after)
        if gap_all_events and await pause(request.receive, gap):
            return NoResponse()
        return RawResponse(message_json(msg_id, model, reply, input_tokens, plan), 200, headers)

    async def count_tokens(self, request: Request) -> Response:
        gate = self.gate
        raw, body, unusable = await _read(request)
        ex = await gate.open(request, "/v1/messages/count_tokens", body, len(raw))
        if isinstance(ex, Response):
            return ex
        problem = unusable or check_body(body, messages_endpoint=False, version=ex.version)
        if problem is not None:
            return gate.fail(ex, problem)
        if gate.state.models.resolve(body["model"]) is None:
            return gate.fail(ex, unknown_model(body["model"]))
        problem = missing_file(gate.state.files, body, ex.credential)
        if problem is not None:
            return gate.fail(ex, problem)
        total = max(1, min(tokens(analyze(body).chars), len(raw)))
        return gate.ok(ex, {"input_tokens": total})
