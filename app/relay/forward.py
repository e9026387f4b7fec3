"""Choosing an account and opening the upstream response, with failover before the first byte.

:func:`open_upstream` leases the best account from the scheduler, sends the request with that
account's credential, and reads the status line. An answer that is the account's fault (429, 401,
403, out of credit, 5xx, 529, connection errors, timeouts) quarantines or marks the account as
the pool's table says, and the request moves to another account — up to ``MAX_ATTEMPTS`` and
within the request deadline. Nothing has reached the customer yet at that point. A request the
upstream rejects on its merits (any other 4xx) comes back as it is.

Each attempt waits for the response headers only so long (:func:`header_budget`): an account
that accepts the connection and never answers is an account failure like a refused
connection — its connection is closed, its lease released, its circuit breaker counts it — and
the request moves on while attempts and time remain. A caller that cancels
:func:`open_upstream` (the client went away) gets the attempt's lease released and its
connection closed too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app import errors
from app.relay.queueing import Turn
from app.settings import Settings
from app.state import Services
from pool import accounts as account_repo
from pool.accounts import LiveAccount
from pool.errors import NoAccount, NoCapacity, Queued
from pool.headroom import parse_ratelimit_headers, parse_retry_after
from pool.scheduler import Lease
from pool.upstream import (
    QUARANTINE_REASON,
    TRANSPORT_ERRORS,
    HeaderTimeout,
    UpstreamResponse,
    Verdict,
    classify,
    parse_error,
    upstream_headers,
)

log = logging.getLogger("poolrelay.relay")


GENERATION_SECONDS_PER_TOKEN = 3600.0 / 128_000
"""How long the anthropic SDK expects a non-streaming answer to take per output token (it
refuses a non-streaming request whose ``max_tokens`` makes that more than 10 minutes)."""


@dataclass(frozen=True, slots=True)
class HeaderBudget:
    """How long the upstream may take to send a request's response headers.

    ``total``: seconds from the request's start by which they must be in hand, whichever
    attempt brings them; ``floor``: the least one attempt is given while ``total`` allows (the
    time a non-streaming answer may legitimately take before its first header)."""

    total: float
    floor: float = 0.0

    def attempt(self, left: float, attempts_left: int) -> float:
        """One attempt's wait: an even share of what is left of ``total`` among the attempts
        left (so that a hanging account leaves time to fail over), at least ``floor``, at
        most what is left."""
        share = left / max(1, attempts_left)
        return max(0.0, min(left, max(share, self.floor)))


def header_budget(
    settings: Settings, *, streaming: bool, max_tokens: int | None = None
) -> HeaderBudget:
    """The response-header budget of a request.

    A streaming Messages request (and count_tokens, models: small answers) gets its headers
    at once, so it has what is left of ``REQUEST_DEADLINE``. A non-streaming Messages request
    gets them only once the whole answer is generated, which may take minutes: it has
    ``max(REQUEST_DEADLINE, min(UPSTREAM_READ_TIMEOUT, 3600 s × max_tokens / 128000))`` from
    the request's start, and each attempt at least the expected generation time."""
    deadline = settings.request_deadline
    if streaming or not max_tokens:
        return HeaderBudget(deadline)
    expected = min(settings.upstream_read_timeout, max_tokens * GENERATION_SECONDS_PER_TOKEN)
    return HeaderBudget(max(deadline, expected), floor=expected)


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
    header: HeaderBudget | None = None,
    queue: Turn | None = None,
    only: Collection[str] | None = None,
) -> Opened:
    """Lease an account and send the request to it, failing over before the first byte.

    ``gate`` (the request's hold, still being placed) is awaited after the first lease and
    before anything is sent, so the two round trips overlap; when it raises, the lease is given
    back and its error propagates. ``trace`` collects the attempts made. ``header`` bounds the
    wait for each attempt's response headers (default: what is left of ``REQUEST_DEADLINE``,
    see :func:`header_budget`).

    ``queue``: the request's :class:`~app.relay.queueing.Turn`. With one, a request that only
    accounts' concurrency caps keep out waits in the pool's queue (first come, first served,
    for what is left of ``QUEUE_SECONDS``) and goes on with the slot it is handed; the time
    waited is not taken from the deadlines above. Without one it is refused at once (429).

    ``only``: the accounts the request may go to, and no other (a request naming a file: the
    accounts of the file's group; see the scheduler).
    """
    trace = trace if trace is not None else Trace()
    settings = services.settings
    # time spent waiting for a concurrency slot (the key's, before this) is not the upstream's
    waited = queue.waited if queue is not None else 0.0
    deadline = started + waited + settings.request_deadline
    header = header if header is not None else HeaderBudget(settings.request_deadline)
    headers_due = started + waited + header.total
    exclude: set[str] = set()
    failures: list[str] = []
    last_verdict: Verdict | None = None
    rate_limited_until: list[float] = []
    for attempt in range(1, settings.max_attempts + 1):
        live = await services.directory.accounts()
        candidates = services.directory.candidates(model)
        try:
            call = services.scheduler.acquire_call(
                candidates,
                expected_tokens=expected_tokens,
                affinity=affinity,
                exclude=exclude,
                wait=queue.left if queue is not None else 0.0,
                only=only,
            )
            try:
                lease = await services.lease_starts.submit(call)
            except Queued as queued:
                assert queue is not None  # only a call with a wait is queued
                before = queue.waited
                lease = await queue.wait_for_lease(queued)
                deadline += queue.waited - before  # waiting does not eat the upstream's time
                headers_due += queue.waited - before
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
        held: Lease | None = lease  # until released or handed to the caller
        response: UpstreamResponse | None = None
        try:
            account = live[lease.account_id]
            if gate is not None:
                # Shielded: a request cancelled meanwhile must not cancel the placement,
                # whose outcome the caller still reads.
                await asyncio.shield(gate)
                gate = None
            sent = time.monotonic()
            wait = header.attempt(headers_due - sent, settings.max_attempts - attempt + 1)
            if wait <= 0:  # the time for the headers ran out before this attempt
                await services.scheduler.release(lease)
                held = None
                break
            trace.attempts = attempt
            trace.accounts.append(account.id)
            url = f"{account.base_url}{path}" + (f"?{query}" if query else "")
            try:
                response = await services.upstream.send(
                    method,
                    url,
                    headers=upstream_headers(headers, account.credential.reveal()),
                    content=content,
                    connect_timeout=min(settings.upstream_connect_timeout, wait),
                    header_timeout=wait,
                )
            except TRANSPORT_ERRORS as exc:
                await services.scheduler.release(lease)
                held = None
                if isinstance(exc, HeaderTimeout):
                    reason, label = f"HeaderTimeout: {exc}", "timeout"
                else:
                    reason, label = (
                        f"{type(exc).__name__}: connection to upstream failed",
                        "connection",
                    )
                failures.append(reason)
                services.metrics.failovers.labels(label).inc()
                await on_failure(services, account.id, reason)
                exclude.add(account.id)
                last_verdict = Verdict.SERVER_ERROR
                log.info("upstream attempt %d on %s failed: %s", attempt, account.name, reason)
                if time.monotonic() >= deadline:
                    break
                continue
            arrived = time.monotonic()
            services.metrics.upstream_latency.observe(arrived - sent)
            ttfb_ms = int((arrived - started) * 1000)
            now = time.time()
            body: bytes | None = None
            if response.status_code < 400:
                # Headroom from a success is stored when the request ends (Scheduler.finish: one
                # Redis call for lease, headroom and breaker).
                verdict = Verdict.OK
            else:
                await services.scheduler.record_headers(account.id, response.headers, now)
                body = await response.aread()
                await response.aclose()
                verdict = classify(response.status_code, body)
            if verdict in (Verdict.OK, Verdict.CUSTOMER_ERROR):
                # an answer for the customer: a success, or a refusal on the request's merits
                held = None
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
            held = None
        except BaseException:
            # Cancelled (the client went away) or failed mid-attempt: the connection closes and
            # the lease goes back, even while this task is being cancelled.
            if response is not None:
                await response.aclose()
            if held is not None:
                await asyncio.shield(services.scheduler.release(held))
            raise
        info = parse_error(body or b"")
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
            await on_failure(services, account.id, detail)
        elif verdict is Verdict.OVERLOADED:
            # passed over for a short backoff, so later requests do not each pay for it
            try:
                await services.scheduler.back_off(account.id, detail)
            except Exception:
                log.warning("could not record the 529 backoff of %s", account.name, exc_info=True)
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


async def on_failure(services: Services, account_id: str, reason: str) -> None:
    """Count an account failure (5xx, timeout, broken connection or stream) toward its circuit
    breaker; when it trips, the quarantine (``upstream_errors``) is also kept in the database."""
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
