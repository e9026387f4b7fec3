"""The upstream HTTP client and the classification of upstream answers.

httpx's API on the aiohttp transport (``httpx-aiohttp``): on this hardware httpx's default
transport spends several milliseconds of CPU per request at high concurrency, aiohttp under one
(see README, "Benchmarks"). One client per process, connections pooled per upstream host.

:func:`classify` is the pool's one table of what an upstream answer means for the account and
for the request (spec §4, contract §7).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers that never reach the upstream: the customer's credentials, framing the relay
# recomputes, and compression (the relay reads usage from the bytes it forwards).
DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    "x-api-key",
    "authorization",
    "cookie",
    "accept-encoding",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
}
DROP_RESPONSE = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "anthropic-organization-id",
    "date",
    "server",
}
POOL_HEADER_PREFIXES = ("anthropic-ratelimit-", "anthropic-priority-")


def make_client(
    *, connect_timeout: float, read_timeout: float, use_aiohttp: bool = True
) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=connect_timeout, read=read_timeout, write=60.0, pool=connect_timeout
    )
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=500, keepalive_expiry=60)
    # No cookie jar: a cookie set by the upstream for one account must never be sent with
    # another account's (or another customer's) request.
    cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    if use_aiohttp:

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(
                limit=limits.max_connections or 0, keepalive_timeout=60
            )
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

        transport = AiohttpTransport(client=session, trust_env=False)
        return httpx.AsyncClient(
            transport=transport, timeout=timeout, trust_env=False, cookies=cookies
        )
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False, cookies=cookies)


def upstream_headers(
    incoming: Mapping[str, str] | list[tuple[str, str]], credential: str
) -> dict[str, str]:
    """The forwarded request headers: everything but credentials and hop-by-hop framing."""
    items = incoming.items() if isinstance(incoming, Mapping) else incoming
    out: dict[str, str] = {}
    for name, value in items:
        lower = name.lower()
        if lower in DROP_REQUEST or lower.startswith("x-poolrelay-"):
            continue
        if lower == "anthropic-beta":
            # An OAuth beta token means nothing when the relay authenticates with an API key.
            tokens = [
                t for t in (s.strip() for s in value.split(",")) if t and t != "oauth-2025-04-20"
            ]
            if not tokens:
                continue
            value = ",".join(tokens)
        out[lower] = value
    out["x-api-key"] = credential
    out["accept-encoding"] = "identity"
    return out


def customer_headers(upstream: httpx.Headers) -> list[tuple[str, str]]:
    """Response headers for the customer: pool-describing headers removed."""
    out: list[tuple[str, str]] = []
    for name, value in upstream.multi_items():
        lower = name.lower()
        if lower in DROP_RESPONSE or lower.startswith(POOL_HEADER_PREFIXES):
            continue
        out.append((lower, value))
    return out


class Verdict(enum.Enum):
    OK = "ok"
    CUSTOMER_ERROR = "customer_error"  # the request's own fault: relay as is, never fail over
    RATE_LIMITED = "rate_limited"
    CREDENTIAL_INVALID = "credential_invalid"
    PERMISSION_DENIED = "permission_denied"
    UPSTREAM_BILLING = "upstream_billing"
    OVERLOADED = "overloaded"  # 529: elsewhere, no quarantine
    SERVER_ERROR = "server_error"  # 5xx: elsewhere, counts toward the circuit breaker


QUARANTINE_REASON = {
    Verdict.RATE_LIMITED: "rate_limited",
    Verdict.CREDENTIAL_INVALID: "credential_invalid",
    Verdict.PERMISSION_DENIED: "permission_denied",
    Verdict.UPSTREAM_BILLING: "upstream_billing",
}


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    type: str | None
    message: str | None


def parse_error(body: bytes) -> ErrorInfo:
    try:
        data = orjson.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            etype, msg = err.get("type"), err.get("message")
            return ErrorInfo(
                etype if isinstance(etype, str) else None, msg if isinstance(msg, str) else None
            )
    except orjson.JSONDecodeError:
        pass
    return ErrorInfo(None, None)


def is_credit_error(info: ErrorInfo) -> bool:
    return bool(info.message) and "credit balance" in (info.message or "").lower()


def classify(status: int, body: bytes) -> Verdict:
    if status < 400:
        return Verdict.OK
    if status == 429:
        return Verdict.RATE_LIMITED
    if status == 401:
        return Verdict.CREDENTIAL_INVALID
    if status == 403:
        return Verdict.PERMISSION_DENIED
    if status == 402:
        return Verdict.UPSTREAM_BILLING
    if status == 400 and is_credit_error(parse_error(body)):
        return Verdict.UPSTREAM_BILLING
    if status == 529:
        return Verdict.OVERLOADED
    if status >= 500 or status in (408, 409):
        return Verdict.SERVER_ERROR
    return Verdict.CUSTOMER_ERROR
