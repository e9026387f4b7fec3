"""One request's money, from its hold to its charge: :class:`Credit`.

The relay opens one :class:`Credit` per admitted request. It places the
hold, tells whether the placement was refused, grows a stream's hold while the stream runs,
and turns the hold into the real charge (or releases it) when the request ends — retrying in
the background while the database does not answer. The stream calls it directly
(:class:`app.relay.stream.RelayStream`): :meth:`Credit.stream_progress`, :meth:`Credit.cover`
before each chunk, :meth:`Credit.stream_ended` once.

A stream's hold grows (contract §6). Its first hold covers the input bound and
``STREAM_HOLD_TOKENS`` of output (or ``max_tokens``, if smaller). Before the customer receives
output beyond what is held — each byte of delta text counted as a token, an upper bound — the
hold is extended by as many more slices as needed, never beyond ``max_tokens``, with the same
conditional update as the first hold. An extension that does not fit ends the stream
(:class:`app.relay.stream.RelayStream` sends one ``error`` event); what was delivered is
charged, never more than was held. JSON requests hold their whole ``max_tokens``.

:class:`Desk` is the process's side: background retries, metrics, the log line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from decimal import Decimal
from typing import Any

import orjson

from app.logs import log_request
from app.ratelimit import KeyRateLimiter
from app.redis_keys import progress as progress_key
from app.relay.queueing import Turn
from app.relay.sse import StreamMeter
from app.state import Services
from billing import budgets, holds
from billing.budgets import Reservation
from billing.customers import KeyContext
from billing.errors import BillingError, InsufficientBalance
from billing.holds import HoldRequest, Outcome
from billing.pricing import Price, Usage, cost_micros

log = logging.getLogger("poolrelay.relay")

PROGRESS_TTL = 86_400
RETRY_MAX_DELAY = 30.0
EXTEND_RETRY_DELAYS = (0.1, 0.4, 1.0, 2.0)
"""Waits between tries of an extension the database did not answer; the stream is paused
meanwhile (its bytes wait in the upstream connection), then cut if it never answers."""


def _usage_tokens(usage: Usage) -> int:
    """Tokens that count toward a key's tpm (cache reads are free, as in Anthropic's ITPM)."""
    return usage.input_tokens + usage.cache_creation_input_tokens + usage.output_tokens


class Desk:
    """The process's part of every request's credit: background work and its retries."""

    retry_first_delay = 0.5
    """Seconds before a settlement that could not be written is tried again in the background
    (doubling up to ``RETRY_MAX_DELAY``)."""

    def __init__(self, services: Services, limiter: KeyRateLimiter) -> None:
        self.services = services
        self.limiter = limiter
        wait = services.holds.place_timeout
        self.ambiguous_hold_wait = wait + 1.0 if wait else 0.0
        """Seconds after a hold's uncertain failure by which its statement has ended."""
        self._background: set[asyncio.Task[None]] = set()

    def spawn(self, job: Coroutine[Any, Any, None]) -> None:
        """Run ``job`` in the background, kept referenced until it ends."""
        task = asyncio.create_task(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def until_done(
        self, what: str, kind: str, attempt: Callable[[], Awaitable[None]], first_wait: float
    ) -> None:
        """Call ``attempt`` after ``first_wait`` seconds, then again after each failure, waiting
        from ``retry_first_delay`` doubling up to ``RETRY_MAX_DELAY``, until it succeeds or the
        process stops (the database may be unreachable for a while). Counted meanwhile in
        ``poolrelay_billing_writes_retrying{kind}``."""
        pending = self.services.metrics.billing_retries.labels(kind)
        pending.inc()
        try:
            await asyncio.sleep(first_wait)
            delay, tries = self.retry_first_delay, 0
            while True:
                tries += 1
                try:
                    await attempt()
                except Exception as exc:
                    if tries in (1, 10) or tries % 100 == 0:
                        log.warning(
                            "%s: try %d failed (%s); retrying", what, tries, type(exc).__name__
                        )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_DELAY)
                    continue
                if tries > 1:
                    log.warning("%s: done at try %d", what, tries)
                return
        finally:
            pending.dec()

    async def undo_reservation(self, key: KeyContext, reservation: Reservation | None) -> None:
        if reservation is not None:
            async with self.services.db.transaction() as session:
                await budgets.settle(session, key.key_id, reservation, 0)


class Credit:
    """One admitted request's hold, its growth and its settlement (module docstring)."""

    def __init__(
        self,
        desk: Desk,
        *,
        request_id: str,
        key: KeyContext,
        price: Price,
        worst: Usage,
        stream: bool,
        model: str,
        notes: dict[str, str],
        endpoint: str,
        started: float,
        reservation: Reservation | None,
        session_id: str | None,
    ) -> None:
        self.desk = desk
        self.request_id = request_id
        self.key = key
        self.price = price
        self.stream = stream
        self.requested_model = model
        self.headers = notes
        """Relay notes for the customer: routing, budget warnings, the key's rate-limit state."""
        self.endpoint = endpoint
        self.started = started
        self.reservation = reservation
        self.session_id = session_id
        self.max_tokens = worst.output_tokens
        """The request's output cap: no estimate of its output may exceed it."""
        self.expected_tokens = worst.total_input() + worst.output_tokens
        """The worst case in tokens, for the scheduler's headroom."""
        self._worst = worst
        self.slice = desk.services.settings.stream_hold_tokens
        self.held_output = min(self.max_tokens, self.slice) if stream else self.max_tokens
        """Output tokens the hold covers now."""
        self.hold_micros = self._cost_of_output(self.held_output)
        self.placement: asyncio.Future[None] | None = None
        """The hold while it is still being placed (group commit): nothing is sent upstream
        before it resolves."""
        self.outcome = Outcome(status="ok")
        """How the request went, filled in as it goes (account, attempts, ttfb)."""
        self.cut_for_credit = False
        self.turn: Turn | None = None
        """The request's turn at the concurrency caps (app.relay.queueing)."""

    def _cost_of_output(self, output_tokens: int) -> int:
        usage = dataclasses.replace(self._worst, output_tokens=output_tokens)
        return cost_micros(usage, self.price, self.key.price_multiplier)

    @property
    def multiplier(self) -> Decimal:
        return self.key.price_multiplier

    # -- the hold --------------------------------------------------------------------------

    async def place(self, hold: HoldRequest) -> None:
        """Start placing the hold (``hold.amount_micros`` is set here). Raises the refusal when
        the store answers at once; otherwise :meth:`refusal` tells later."""
        hold.amount_micros = self.hold_micros
        try:
            self.placement = await self.desk.services.holds.begin(hold)
        except BaseException as exc:
            await self._not_placed(exc)
            raise

    async def refusal(self) -> Exception | None:
        """Why the hold was not placed (its refusal, or the failure that left it uncertain),
        or None when it was."""
        if self.placement is None:
            return None
        try:
            await self.placement
            return None
        except Exception as exc:
            await self._not_placed(exc)
            return exc

    async def _not_placed(self, exc: BaseException) -> None:
        """A refusal held nothing, so its budget reservation goes back now; any other failure
        may have left the hold written (resolved later)."""
        if isinstance(exc, BillingError):
            await self.desk.undo_reservation(self.key, self.reservation)
        else:
            self.resolve_later()

    def resolve_later(self) -> None:
        """A hold whose placement failed without a refusal (the connection broke, the request
        was cancelled) may have been written all the same. Once its statement has certainly
        ended, release the hold if it is there — which also gives back its budget reservation
        — or else give the reservation back alone; retried in the background while the
        database is unreachable. The request itself was refused, so nothing is charged."""
        outcome = Outcome(
            status="failed", error="the hold could not be confirmed; the request was refused"
        )
        desk = self.desk

        async def resolve() -> None:
            if not await desk.services.holds.settle(self.request_id, None, 0, outcome):
                await desk.undo_reservation(self.key, self.reservation)

        desk.spawn(
            desk.until_done(
                f"resolving hold {self.request_id}", "hold", resolve, desk.ambiguous_hold_wait
            )
        )

    async def cover(self, delivered_tokens: int) -> bool:
        """Before ``delivered_tokens`` of output (an upper bound) reach the customer: make the
        hold cover them, extending it by as many slices as needed (never beyond
        ``max_tokens``). False when it cannot: the balance does not cover the extension (the
        hold then still grows by the slices that do fit, so that the stream can deliver up
        to there) or the database never answered. The stream must not send beyond
        :attr:`held_output` then."""
        if delivered_tokens <= self.held_output or self.held_output >= self.max_tokens:
            return True
        slices = -(-(delivered_tokens - self.held_output) // self.slice)
        refused = await self._grow(slices)
        if refused is None:
            return True
        if refused.available_micros > 0 and slices > 1:
            fits = self._slices_within(refused.available_micros, slices - 1)
            if fits:
                await self._grow(fits)
        return False

    def _target(self, slices: int) -> int:
        return min(self.max_tokens, self.held_output + slices * self.slice)

    def _slices_within(self, available: int, most: int) -> int:
        """The most slices (≤ ``most``) whose extension costs at most ``available``."""
        low, high = 0, most
        while low < high:
            mid = (low + high + 1) // 2
            if self._cost_of_output(self._target(mid)) - self.hold_micros <= available:
                low = mid
            else:
                high = mid - 1
        return low

    async def _grow(self, slices: int) -> InsufficientBalance | None:
        """Extend the hold by ``slices``; the refusal when the balance does not cover it (or
        when the database never answered, with nothing available)."""
        target = self._target(slices)
        amount = self._cost_of_output(target) - self.hold_micros
        metrics = self.desk.services.metrics
        if amount > 0:
            for delay in (*EXTEND_RETRY_DELAYS, None):
                try:
                    grown = await self.desk.services.holds.extend(self.request_id, amount)
                    break
                except InsufficientBalance as exc:
                    metrics.hold_extensions.labels("refused").inc()
                    self.cut_for_credit = True
                    return exc
                except Exception:
                    if delay is None:
                        log.warning(
                            "could not extend the hold of %s; ending the stream",
                            self.request_id,
                            exc_info=True,
                        )
                        metrics.hold_extensions.labels("failed").inc()
                        return InsufficientBalance(amount, 0)
                    await asyncio.sleep(delay)
            if not grown:  # released by a reconciliation: charged without it at the end
                log.warning("the hold of stream %s is gone; it is not extended", self.request_id)
            metrics.hold_extensions.labels("ok").inc()
        self.held_output = target
        self.hold_micros += amount
        return None

    # -- settlement ------------------------------------------------------------------------

    async def charge(
        self, usage: Usage | None, model: str | None, outcome: Outcome, *, estimate: bool = False
    ) -> int:
        """Charge what the upstream reported; 0 (a release) when nothing was used. A charge
        the relay estimated (a stream cut short) never exceeds the hold: only what the
        upstream itself reports may cost more than was held. Returns what was charged."""
        cost = 0
        if usage is not None:
            price = self.price
            if model and model != self.requested_model:
                book = await self.desk.services.prices.get()
                price = book.match(model) or self.price
            cost = cost_micros(usage, price, self.multiplier)
            if estimate:
                cost = min(cost, self.hold_micros)
        outcome.model = model or outcome.model
        if outcome.duration_ms is None:
            outcome.duration_ms = int((time.monotonic() - self.started) * 1000)
        if self.turn is not None:  # time waited for concurrency slots
            outcome.queue_ms = self.turn.queue_ms
        store = self.desk.services.holds
        for attempt in range(3):
            try:
                found = await store.settle(self.request_id, usage, cost, outcome)
                break
            except Exception:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        if not found and cost > 0:
            cost = await self._charge_without_hold(usage, cost, outcome)
        if cost > self.hold_micros:
            log.warning(
                "request %s cost %s above its hold %s", self.request_id, cost, self.hold_micros
            )
        self._observe(usage, cost, outcome)
        if usage is not None and self.key.policy.tpm is not None:
            try:
                await self.desk.limiter.record_tokens(
                    self.key.key_id, self.request_id, _usage_tokens(usage)
                )
            except Exception:
                log.debug("could not correct the key's token window", exc_info=True)
        return cost

    async def _charge_without_hold(self, usage: Usage | None, cost: int, outcome: Outcome) -> int:
        """A delivered answer whose hold is gone: charge it all the same (idempotent by request
        id). Returns what this call charged: 0 when the ledger already had the charge (an
        earlier attempt of this settlement, or a reconciliation, made it)."""
        services = self.desk.services
        async with services.db.transaction() as session:
            charged = await holds.charge_without_hold(
                session, self.request_id, self.key.customer_id, usage, cost, outcome
            )
        if not charged:
            return 0
        services.metrics.charged_without_hold.inc()
        log.warning(
            "request %s was charged %s µUSD without its hold (the hold had been released)",
            self.request_id,
            cost,
        )
        return cost

    def charge_later(
        self, usage: Usage | None, model: str | None, outcome: Outcome, *, estimate: bool = False
    ) -> None:
        """Keep trying, in the background, a settlement that could not be written (the
        database was unreachable): until it lands the hold keeps the customer's money reserved
        and a charge is missing from the ledger, so it must not wait for a restart. Retries
        back off from ``retry_first_delay`` to ``RETRY_MAX_DELAY`` seconds for as long as the
        process runs; if it stops first, reconciliation finishes the hold as a stopped
        process's (charged from the stream's recorded progress, or released)."""

        async def attempt() -> None:
            await self.charge(usage, model, outcome, estimate=estimate)
            if usage is not None:
                await self._forget_progress()

        desk = self.desk
        what = f"settlement of {self.request_id}"
        desk.spawn(desk.until_done(what, "settlement", attempt, desk.retry_first_delay))

    async def release(self, outcome: Outcome) -> None:
        """Give the hold back without charging (nothing reached the customer); in the
        background when the database does not answer."""
        try:
            await self.charge(None, None, outcome)
        except Exception:
            log.exception("releasing hold %s failed; retrying in the background", self.request_id)
            self.charge_later(None, None, outcome)

    def _observe(self, usage: Usage | None, cost: int, outcome: Outcome) -> None:
        metrics = self.desk.services.metrics
        model = outcome.model or self.requested_model
        metrics.request_done(
            self.endpoint,
            model,
            outcome.status,
            (outcome.duration_ms or 0) / 1000,
            outcome.ttfb_ms / 1000 if outcome.ttfb_ms is not None else None,
        )
        if cost:
            metrics.charged.inc(cost)
        u = usage or Usage()
        log_request(
            request_id=self.request_id,
            upstream_request_id=outcome.upstream_request_id,
            customer_id=self.key.customer_id,
            key_id=self.key.key_id,
            account_id=outcome.account_id,
            route=self.endpoint,
            model=model,
            stream=self.stream,
            status=outcome.status,
            http_status=outcome.http_status,
            attempts=outcome.attempts,
            ttfb_ms=outcome.ttfb_ms,
            duration_ms=outcome.duration_ms,
            queue_ms=outcome.queue_ms,
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_write_tokens=u.cache_creation_input_tokens,
            cache_read_tokens=u.cache_read_input_tokens,
            cost_micros=cost,
            hold_micros=self.hold_micros,
            error=outcome.error,
        )

    # -- the stream ------------------------------------------------------------------------

    def stream_progress(self, meter: StreamMeter) -> None:
        """Record what the stream has used so far (``message_start``'s usage, and the output
        delivered), for the reconciliation of a crashed process: once when it starts and at
        each growth of its hold — in the background, the deltas never wait for it."""
        usage = meter.billable_usage()
        if usage.output_tokens > self.max_tokens:
            usage = dataclasses.replace(usage, output_tokens=self.max_tokens)
        progress = orjson.dumps({"model": meter.model, "usage": usage.to_api()})
        commands = self.desk.services.redis_commands

        async def record() -> None:
            try:
                await commands.submit(
                    ("SET", progress_key(self.request_id), progress, "EX", PROGRESS_TTL)
                )
            except Exception:
                log.warning("could not record stream progress for %s", self.request_id)

        self.desk.spawn(record())

    async def stream_ended(self, meter: StreamMeter, status: str, error: str | None) -> None:
        """Charge the stream: the upstream's reported usage when it ended as meant, else
        input and cache from ``message_start`` and output from the last ``message_delta`` or,
        when larger, an estimate from the deltas relayed so far — never more than the request
        allowed the model to write, never more than was held."""
        usage: Usage | None = None
        estimate = False
        if meter.started:
            usage = meter.usage
            if not meter.stopped:
                estimated = max(usage.output_tokens, meter.estimated_output_tokens())
                estimated = min(estimated, self.max_tokens) if self.max_tokens else estimated
                usage = dataclasses.replace(usage, output_tokens=estimated)
                estimate = True
        outcome = dataclasses.replace(self.outcome, status=status, http_status=200, error=error)
        try:
            await self.charge(usage, meter.model, outcome, estimate=estimate)
        except Exception:
            # The bytes were delivered: the charge stands and is written when the database
            # answers again (the stream's progress record stays until then, for a crash).
            log.exception("settlement of stream %s failed; retrying it", self.request_id)
            self.charge_later(usage, meter.model, outcome, estimate=estimate)
            return
        await self._forget_progress()

    async def _forget_progress(self) -> None:
        try:
            await self.desk.services.redis_commands.submit(("DEL", progress_key(self.request_id)))
        except Exception:
            log.debug("progress key cleanup failed", exc_info=True)
