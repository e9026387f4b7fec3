"""Scripted faults and the per-credential rate-limit buckets.

A :class:`Fault` is what ``POST /_fake/faults`` scripts for one credential (or ``"*"``); the
kinds are listed in :data:`FAULT_KINDS` and described in :mod:`app.sandbox`. A :class:`Bucket`
holds the ``anthropic-ratelimit-*`` counters of one credential for the current minute.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

import httpx

from app.sandbox.common import Header, NoResponse, next_minute, rfc3339

FAMILIES: Final = ("requests", "tokens", "input-tokens", "output-tokens")
DEFAULT_LIMITS: Final = {
    "requests": 4000,
    "tokens": 2_400_000,
    "input-tokens": 2_000_000,
    "output-tokens": 400_000,
}
LIMIT_FIELDS: Final = {
    "requests_limit": "requests",
    "tokens_limit": "tokens",
    "input_tokens_limit": "input-tokens",
    "output_tokens_limit": "output-tokens",
}

FAULT_KINDS: Final = frozenset(
    {
        "rate_limit",
        "unauthorized",
        "forbidden",
        "no_credit",
        "server_error",
        "overloaded",
        "slow",
        "slow_stream",
        "paced",
        "mid_stream_error",
        "hang",
        "disconnect",
        "error",
    }
)
RATE_LIMIT_MESSAGE: Final = (
    "This request would exceed your organization's rate limit. For details, refer to: "
    "https://docs.claude.com/en/api/rate-limits. You can see the response headers for "
    "current usage. Please reduce the prompt length or the maximum tokens requested, or "
    "try again later."
)
# kind -> (status, error type, message)
ERROR_FAULTS: Final[dict[str, tuple[int, str, str]]] = {
    "rate_limit": (429, "rate_limit_error", RATE_LIMIT_MESSAGE),
    "unauthorized": (401, "authentication_error", "invalid x-api-key"),
    "forbidden": (
        403,
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    "no_credit": (
        400,
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
        "Billing to upgrade or purchase credits.",
    ),
    "server_error": (500, "api_error", "Internal server error"),
    "overloaded": (529, "overloaded_error", "Overloaded"),
}


@dataclass(slots=True)
class Fault:
    """A scripted failure for one credential (or ``"*"``)."""

    kind: str
    times: int | None = None
    retry_after: float = 30.0
    delay: float | None = None
    after_events: int = 4
    all_paths: bool = False
    status: int = 500
    error_type: str = "api_error"
    message: str = "Scripted error"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error_type": self.error_type,
            "message": self.message,
            "fault": self.kind,
            "times": self.times,
            "retry_after": self.retry_after,
            "delay": self.delay,
            "after_events": self.after_events,
            "paths": "all" if self.all_paths else "messages",
        }

    def error(self) -> tuple[int, str, str] | None:
        """The error this fault answers with, or None for the kinds that do not answer one."""
        if self.kind == "error":
            return self.status, self.error_type, self.message
        return ERROR_FAULTS.get(self.kind)


_RL_HEADER_NAMES: Final = {
    fam: (
        f"anthropic-ratelimit-{fam}-limit".encode(),
        f"anthropic-ratelimit-{fam}-remaining".encode(),
        f"anthropic-ratelimit-{fam}-reset".encode(),
    )
    for fam in FAMILIES
}


class Bucket:
    """Rate-limit counters of one credential for the current window."""

    __slots__ = ("limits", "remaining", "reset_at", "tokens_explicit")

    def __init__(self, limits: dict[str, int], tokens_explicit: bool, now: float) -> None:
        self.limits = dict(limits)
        self.remaining = dict(limits)
        self.reset_at = next_minute(now)
        self.tokens_explicit = tokens_explicit

    def refresh(self, now: float) -> None:
        if now >= self.reset_at:
            self.remaining = dict(self.limits)
            self.reset_at = next_minute(now)

    def set_limit(self, family: str, value: int) -> None:
        self.limits[family] = value
        self.remaining[family] = value
        if family == "tokens":
            self.tokens_explicit = True
        elif family in ("input-tokens", "output-tokens") and not self.tokens_explicit:
            combined = self.limits["input-tokens"] + self.limits["output-tokens"]
            self.limits["tokens"] = combined
            self.remaining["tokens"] = combined

    def exceeded(self, input_tokens: int, output_tokens: int) -> str | None:
        """The first family this request would take below zero, else consume and None."""
        need = (1, input_tokens + output_tokens, input_tokens, output_tokens)
        remaining = self.remaining
        for family, amount in zip(FAMILIES, need, strict=True):
            if remaining[family] - amount < 0:
                return family
        for family, amount in zip(FAMILIES, need, strict=True):
            remaining[family] -= amount
        return None

    def headers(self, requests_reset: int | None = None) -> list[Header]:
        reset = rfc3339(self.reset_at)
        out: list[Header] = []
        for family in FAMILIES:
            limit_name, remaining_name, reset_name = _RL_HEADER_NAMES[family]
            remaining = max(0, self.remaining[family])
            family_reset = reset
            if family == "requests":
                if requests_reset is not None:
                    remaining = 0
                    family_reset = rfc3339(requests_reset)
            else:
                remaining = remaining // 1000 * 1000
            out.append((limit_name, str(self.limits[family]).encode()))
            out.append((remaining_name, str(remaining).encode()))
            out.append((reset_name, family_reset))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "limits": dict(self.limits),
            "remaining": dict(self.remaining),
            "reset": rfc3339(self.reset_at).decode(),
        }


def _find_connection() -> tuple[Any, Any] | None:
    """The (request cycle, socket transport) of the current uvicorn request, if any.

    uvicorn runs each request in a task whose coroutine is ``RequestResponseCycle.run_asgi``;
    that cycle holds the connection's transport. Anything else (in-process transports, other
    servers) yields None.
    """
    task = asyncio.current_task()
    if task is None:
        return None
    frame = getattr(task.get_coro(), "cr_frame", None)
    if frame is None:
        return None
    owner = frame.f_locals.get("self")
    transport = getattr(owner, "transport", None)
    if transport is not None and hasattr(transport, "close") and hasattr(transport, "is_closing"):
        return owner, transport
    return None


async def disconnect() -> NoResponse:
    """The ``disconnect`` fault: close the socket without a response.

    In-process (no socket) it raises ``httpx.RemoteProtocolError`` instead.
    """
    connection = _find_connection()
    if connection is None:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
    cycle, transport = connection
    transport.close()
    # Let the server see the connection go, so that it neither sends nor logs anything.
    for _ in range(50):
        await asyncio.sleep(0)
        if getattr(cycle, "disconnected", True):
            break
    return NoResponse()
