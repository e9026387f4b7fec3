"""The upstream HTTP clients and the classification of upstream answers.

The relay's hot path talks to the upstream with aiohttp directly (:class:`UpstreamClient`): on
this hardware httpx's default transport spends milliseconds of CPU per request at high
concurrency, and even on aiohttp's transport httpx's own layers cost about a fifth of the
relay's CPU (README, "Benchmarks"). One session per process, connections pooled per host.

:func:`classify` is the pool's one table of what an upstream answer means for the account and
for the request (spec §4, contract §7).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING

import aiohttp
import orjson

if TYPE_CHECKING:  # httpx only serves probes and CLI checks; imported when they need it
    import httpx

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


def make_client(*, connect_timeout: float, read_timeout: float) -> httpx.AsyncClient:
    """httpx for the occasional upstream call off the hot path (health probes, ``accounts check``)."""
    import httpx

    timeout = httpx.Timeout(
        connect=connect_timeout, read=read_timeout, write=60.0, pool=connect_timeout
    )
    # No cookie jar: a cookie set by the upstream for one account must never be sent with
    # another account's request.
    cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(timeout=timeout, trust_env=False, cookies=cookies)


class UpstreamResponse:
    """An upstream answer whose status line and headers are in hand, the body not yet read."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status_code(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def aread(self) -> bytes:
        return await self._response.read()

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """Chunks as they arrive (no re-chunking, no buffering)."""
        return self._response.content.iter_any()

    async def aclose(self) -> None:
        # A body read to the end gives the connection back to the pool; anything else (a client
        # that went away mid-stream) closes it, which stops the upstream request at once.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class HeaderTimeout(TimeoutError):
    """The upstream accepted the request but sent no status line and headers in time (an
    account that hangs). The attempt's connection is closed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no response headers from the upstream within {seconds:.1f} s")
        self.seconds = seconds


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)


class UpstreamClient:
    """The relay's upstream client: one aiohttp session per process (connection pooling per
    upstream host, no cookie jar, no automatic decompression, no redirects).

    The hot path uses aiohttp directly: on this hardware httpx's request/response layers on top
    of the same transport cost about a fifth of the relay's CPU per request (README,
    "Benchmarks"). Health probes and admin tools keep httpx's API (:func:`make_client`).
    """

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, max_connections: int = 2000
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=60, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | AsyncIterable[bytes] | None,
        connect_timeout: float,
        header_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send the request and wait for the status line and headers: at most
        ``header_timeout`` seconds in all when given (:class:`HeaderTimeout`), else only the
        socket read timeout bounds the wait. A wait cut short (the timeout, or the caller
        cancelled) closes the request's connection, which stops the upstream request; the
        body's reads are bounded by the read timeout alone. ``content`` may be an async
        iterable (an upload streamed through; give its ``content-length`` in ``headers``)."""
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout,
            sock_connect=connect_timeout,
            sock_read=self._read_timeout,
        )
        request = self._get_session().request(
            method, url, headers=headers, data=content, allow_redirects=False, timeout=timeout
        )
        if header_timeout is None:
            return UpstreamResponse(await request)
        # aiohttp closes the connection of a request cancelled before its headers arrived.
        waiting = asyncio.timeout(header_timeout)
        try:
            async with waiting:
                response = await request
        except TimeoutError:
            if waiting.expired():
                raise HeaderTimeout(header_timeout) from None
            raise
        return UpstreamResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


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


def customer_headers(upstream: Mapping[str, str]) -> list[tuple[str, str]]:
    """Response headers for the customer: pool-describing headers removed."""
    out: list[tuple[str, str]] = []
    for name, value in upstream.items():
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
