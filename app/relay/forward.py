"""Choosing an account and opening the upstream response, with failover before the first byte.

:func:`open_upstream` leases the best account from the scheduler, sends the request with that
account's credential, and reads the status line. An answer that is the account's fault (429, 401,
403, out of credit, 5xx, 529, connection errors, timeouts) quarantines or marks the account as
the pool's table says, and the request moves to another account — up to ``MAX_ATTEMPTS`` and
within the request deadline. Nothing has reached the customer yet at that point. A request the
upstream rejects on its merits (any other 4xx) comes back as it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app import errors
from app.state import Services
from pool import accounts as account_repo
from pool.accounts import LiveAccount
from pool.errors import NoAccount, NoCapacity
from pool.headroom import parse_ratelimit_headers, parse_retry_after
from pool.scheduler import Lease
from pool.upstream import (
    QUARANTINE_REASON,
    TRANSPORT_ERRORS,
    UpstreamResponse,
    Verdict,
    classify,
    parse_error,
    upstream_headers,
)

log = logging.getLogger("poolrelay.relay")


@dataclass
class Trace:
    """What the attempts of one request did, filled in as they go (so the caller has it also
    when every attempt failed): how many were made and the account each went to."""

    attempts: int = 0
    accounts: list[str] = field(default_factory=list)


@dataclass
class Opened:
    """An upstream response whose status line is in hand (the body is not read yet)."""

    response: UpstreamResponse
    account: LiveAccount
    lease: Lease
    attempts: int
    verdict: Verdict
    ttfb_ms: int
    body: bytes | None = None  # read already when the answer is an error
    failures: list[str] = field(default_factory=list)
    trace: Trace = field(default_factory=Trace)


def _reset_until(headers: Mapping[str, str], now: float) -> float | None:
    resets = [
        f.reset for f in parse_ratelimit_headers(headers).values() if f.reset and f.remaining <= 0
    ]
    return min(resets) if resets else None


async def _note_quarantine(
    services: Services, account_id: str, reason: str, until: float | None, error: str
) -> None:
    """Redis first (every process sees it at once), then a durable copy for the operator."""
    await services.scheduler.quarantine(account_id, reason, until, error)
    services.metrics.quarantines.labels(reason).inc()
    try:
        async with services.db.transaction() as session:
            await account_repo.record_quarantine(
                session,
                account_id,
                reason,
                datetime.fromtimestamp(until, UTC) if until else None,
                error,
            )
    except Exception:  # the live state is in Redis; the copy is best effort
        log.warning("could not record quarantine of %s in the database", account_id, exc_info=True)


async def open_upstream(
    services: Services,
    *,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str] | list[tuple[str, str]],
    content: bytes | None,
    model: str | None,
    expected_tokens: int,
    affinity: tuple[str, int] | None,
    started: float,
    gate: Awaitable[None] | None = None,
    trace: Trace | None = None,
) -> Opened:
    """Lease an account and send the request to it, failing over before the first byte.

    ``gate`` (the request's hold, still being placed) is awaited after the first lease and
    before anything is sent, so the two round trips overlap; when it raises, the lease is given
    back and its error propagates. ``trace`` collects the attempts made.
    """
    trace = trace if trace is not None else Trace()
    settings = services.settings
    deadline = started + settings.request_deadline
    exclude: set[str] = set()
    failures: list[str] = []
    last_verdict: Verdict | None = None
    rate_limited_until: list[float] = []
    for attempt in range(1, settings.max_attempts + 1):
        live = await services.directory.accounts()
        candidates = services.directory.candidates(model)
        try:
            call = services.scheduler.acquire_call(
                candidates, expected_tokens=expected_tokens, affinity=affinity, exclude=exclude
            )
            lease = await services.lease_starts.submit(call)
        except NoCapacity as exc:
            # What is left is rate limited or full: 429, as the next request would get from
            # the scheduler, whatever this request's earlier attempts ran into.
            if rate_limited_until:
                wait = min(exc.retry_after, min(rate_limited_until) - time.time())
                raise NoCapacity(wait) from None
            raise
        except NoAccount:
            if rate_limited_until:  # an account this request tried is rate limited
                raise NoCapacity(max(1.0, min(rate_limited_until) - time.time())) from None
            if attempt == 1:
                raise
            raise errors.overloaded() from None
        account = live[lease.account_id]
        if gate is not None:
            try:
                await gate
            except BaseException:
                await services.scheduler.release(lease)
                raise
            gate = None
        trace.attempts = attempt
        trace.accounts.append(account.id)
        url = f"{account.base_url}{path}" + (f"?{query}" if query else "")
        timeout_left = max(1.0, deadline - time.monotonic())
        sent = time.monotonic()
        try:
            response = await services.upstream.send(
                method,
                url,
                headers=upstream_headers(headers, account.credential.reveal()),
                content=content,
                connect_timeout=min(settings.upstream_connect_timeout, timeout_left),
            )
        except TRANSPORT_ERRORS as exc:
            await services.scheduler.release(lease)
            reason = f"{type(exc).__name__}: connection to upstream failed"
            failures.append(reason)
            services.metrics.failovers.labels("connection").inc()
            await _on_failure(services, account.id, reason)
            exclude.add(account.id)
            last_verdict = Verdict.SERVER_ERROR
            if time.monotonic() >= deadline:
                break
            continue
        arrived = time.monotonic()
        services.metrics.upstream_latency.observe(arrived - sent)
        ttfb_ms = int((arrived - started) * 1000)
        now = time.time()
        if response.status_code < 400:
            # Headroom from a success is stored when the request ends (Scheduler.finish: one
            # Redis call for lease, headroom and breaker).
            return Opened(
                response,
                account,
                lease,
                attempt,
                Verdict.OK,
                ttfb_ms,
                failures=failures,
                trace=trace,
            )
        await services.scheduler.record_headers(account.id, response.headers, now)
        body = await response.aread()
        await response.aclose()
        verdict = classify(response.status_code, body)
        if verdict is Verdict.CUSTOMER_ERROR:
            return Opened(
                response,
                account,
                lease,
                attempt,
                verdict,
                ttfb_ms,
                body=body,
                failures=failures,
                trace=trace,
            )
        await services.scheduler.release(lease)
        info = parse_error(body)
        detail = f"{response.status_code} {info.type or ''}: {info.message or ''}".strip()
        failures.append(detail)
        services.metrics.failovers.labels(verdict.value).inc()
        last_verdict = verdict
        exclude.add(account.id)
        if verdict is Verdict.RATE_LIMITED:
            retry = parse_retry_after(response.headers, now)
            until = now + retry if retry else _reset_until(response.headers, now)
            until = until if until and until > now else now + 30.0
            rate_limited_until.append(until)
            await _note_quarantine(services, account.id, "rate_limited", until, detail)
        elif verdict in QUARANTINE_REASON:
            await _note_quarantine(services, account.id, QUARANTINE_REASON[verdict], None, detail)
        elif verdict is Verdict.SERVER_ERROR:
            await _on_failure(services, account.id, detail)
        elif verdict is Verdict.OVERLOADED:
            await asyncio.sleep(min(0.25 * attempt, 1.0))
        log.info("upstream attempt %d on %s failed: %s", attempt, account.name, detail)
        if time.monotonic() >= deadline:
            break
    if last_verdict is Verdict.RATE_LIMITED and rate_limited_until:
        raise NoCapacity(max(1.0, min(rate_limited_until) - time.time()))
    raise errors.overloaded("No upstream account could serve this request; retry later.")


async def read_and_release(services: Services, opened: Opened) -> bytes:
    """The whole body of a small (non-billed) answer; the connection and the lease go back."""
    try:
        return opened.body if opened.body is not None else await opened.response.aread()
    finally:
        await opened.response.aclose()
        await services.scheduler.release(opened.lease)


async def _on_failure(services: Services, account_id: str, reason: str) -> None:
    tripped = await services.scheduler.record_failure(account_id, reason)
    if tripped:
        services.metrics.quarantines.labels("upstream_errors").inc()
        try:
            async with services.db.transaction() as session:
                await account_repo.record_quarantine(
                    session, account_id, "upstream_errors", None, reason
                )
        except Exception:
            log.warning("could not record quarantine of %s", account_id, exc_info=True)


def response_info(opened: Opened) -> dict[str, Any]:
    return {
        "account_id": opened.account.id,
        "attempts": opened.attempts,
        "upstream_request_id": opened.response.headers.get("request-id"),
        "ttfb_ms": opened.ttfb_ms,
    }
