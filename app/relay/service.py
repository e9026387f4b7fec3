"""The relay's one code path: authenticate, route, limit, price, hold, forward, settle.

This is the only place where billing (the hold) and the pool (the lease) meet; both customer
dialects (:mod:`app.relay.edges`) go through it:

1. authenticate the key (cached ≤ 1 s) and parse the body into a Messages request;
2. route: a model alias, the key's small-request rule; check the key may use the model;
3. the key's rpm/tpm windows (Redis, shared by all processes) — 429 with ``retry-after``;
4. price the model (no price → 400 before anything is held or sent);
5. reserve against the key's budgets and hold the worst case against the balance, each one
   conditional update (refused → 403 budget / 400 "credit balance too low", nothing sent);
6. lease an account and open the upstream response, failing over before the first byte;
7. relay: JSON is read whole, streams are forwarded chunk by chunk while usage is read;
8. settle in a short transaction of its own: one usage record and one ledger debit,
   idempotent by request id; failed attempts and requests that never reached the customer
   are released without charge; release the lease.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app import errors, http_limits
from app.errors import to_api_error
from app.logs import log_request
from app.owned import file_pin
from app.ratelimit import KeyRateLimiter
from app.relay.edges import Edge
from app.relay.forward import Opened, Trace, header_budget, on_failure, open_upstream
from app.relay.sse import StreamMeter
from app.relay.stream import ClientWatch, RelayStream, StreamEnd
from app.state import Services
from billing import budgets, holds, request_log
from billing.budgets import Budget, Reservation
from billing.customers import KeyContext, touch_key
from billing.errors import BillingError, BudgetExceeded, NoPrice
from billing.estimate import estimate_input_tokens_upper, worst_case_usage
from billing.holds import HoldRequest, Outcome
from billing.holds_pg import PLACE_TIMEOUT_SECONDS
from billing.ids import new_id
from billing.money import format_usd
from billing.pricing import Price, Usage, cost_micros
from billing.reconcile import progress_key
from billing.request_log import Entry
from pool.affinity import affinity_key, session_id
from pool.errors import PoolError
from pool.patterns import model_matches
from pool.upstream import customer_headers

log = logging.getLogger("poolrelay.relay")

PROGRESS_TTL = 86_400
TOUCH_INTERVAL = 60.0
RETRY_MAX_DELAY = 30.0

__all__ = ["Relay", "check_model_allowed", "check_model_id", "model_matches", "read_body"]


async def read_body(request: Request, limit: int, seconds: float | None = None) -> bytes:
    """The request's body: at most ``limit`` bytes (413, readable by the client: the rest of
    the body is read and dropped first, within bounds), all of it within ``seconds`` (408
    ``timeout_error``, connection closed). See :mod:`app.http_limits`."""
    return await http_limits.read_body(request.receive, request.headers, limit, seconds)


MODEL_MAX_CHARS = 200
"""The longest model id the relay takes (and the request log stores)."""


def check_model_id(model: Any) -> str:
    """A model id the relay can price, log and forward: a non-empty string of at most
    ``MODEL_MAX_CHARS`` characters without NUL or control characters."""
    if not isinstance(model, str) or not model:
        raise errors.invalid_request("model: Field required (a model id string)")
    if len(model) > MODEL_MAX_CHARS:
        raise errors.invalid_request(
            f"model: String should have at most {MODEL_MAX_CHARS} characters"
        )
    if not model.isprintable():
        raise errors.invalid_request("model: must not contain control characters")
    return model


def validate_messages_body(body: dict[str, Any]) -> None:
    check_model_id(body.get("model"))
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise errors.invalid_request("max_tokens: Field required (a positive integer)")
    if max_tokens < 1:
        raise errors.invalid_request("max_tokens: must be greater than or equal to 1")
    if not isinstance(body.get("messages"), list):
        raise errors.invalid_request("messages: Field required (a list of messages)")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise errors.invalid_request("stream: must be a boolean")


def check_model_allowed(key: KeyContext, model: str) -> None:
    allowed = key.policy.allowed_models
    if allowed is not None and not any(model_matches(model, pattern) for pattern in allowed):
        raise errors.ApiError(
            403,
            "permission_error",
            f"This API key is not allowed to use the model {model!r}.",
            {"x-should-retry": "false"},
        )


@dataclass
class Billed:
    """A request admitted for billing: the hold is placed."""

    request_id: str
    key: KeyContext
    price: Price
    hold_micros: int
    started: float
    stream: bool
    requested_model: str
    headers: dict[str, str] = field(default_factory=dict)
    """Relay notes for the customer: routing, budget warnings, the key's rate-limit state."""
    endpoint: str = "messages"
    expected_tokens: int = 0
    """The worst case in tokens (input bound + max_tokens), for the scheduler's headroom."""
    placement: asyncio.Future[None] | None = None
    """The hold while it is still being placed (PostgreSQL: group commit). Nothing is sent
    upstream before it resolves; None when the hold was placed before admit returned."""
    reservation: Reservation | None = None
    max_tokens: int = 0
    """The request's output cap: no estimate of its output may exceed it."""
    session_id: str | None = None
    only: frozenset[str] | None = None
    """The accounts it may go to, and no other (it names files: their group's accounts)."""


def worst_case(body: dict[str, Any], price: Price, multiplier: Decimal) -> tuple[int, int]:
    """(hold in micro-USD, expected tokens) from one scan of the body."""
    worst = worst_case_usage(body, price)
    return cost_micros(worst, price, multiplier), worst.total_input() + worst.output_tokens


def _usage_tokens(usage: Usage) -> int:
    """Tokens that count toward a key's tpm (cache reads are free, as in Anthropic's ITPM)."""
    return usage.input_tokens + usage.cache_creation_input_tokens + usage.output_tokens


class LeaseRenewal:
    """Calls ``renew`` every ``every`` seconds until cancelled: one timer on the loop, no task
    (most streams end long before the first renewal is due)."""

    __slots__ = ("_every", "_handle", "_renew")

    def __init__(self, every: float, renew: Callable[[], None]) -> None:
        self._every = every
        self._renew = renew
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            every, self._due
        )

    def _due(self) -> None:
        self._renew()
        self._handle = asyncio.get_running_loop().call_later(self._every, self._due)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Relay:
    retry_first_delay = 0.5
    """Seconds before a settlement that could not be written is tried again in the background
    (doubling up to ``RETRY_MAX_DELAY``)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.ambiguous_hold_wait = PLACE_TIMEOUT_SECONDS + 1.0 if services.holds else 0.0
        """Seconds after a hold's uncertain failure by which its statement has ended."""
        self.limiter = KeyRateLimiter(services.redis)
        self._touched: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()

    # -- admission -----------------------------------------------------------------------------

    async def price_for(self, model: str) -> Price:
        book = await self.services.prices.get()
        price = book.match(model)
        if price is None:
            raise NoPrice(model)
        return price

    async def route(self, key: KeyContext, body: dict[str, Any], notes: dict[str, str]) -> bool:
        """Apply a model alias and the key's small-request rule. Returns True if the body changed."""
        requested = str(body["model"])
        model = requested
        aliases = await self.services.aliases.get()
        if model in aliases:
            model = aliases[model]
            notes["x-poolrelay-route"] = "alias"
        policy = key.policy
        if (
            policy.route_small_to
            and policy.route_small_max_input_tokens is not None
            and not body.get("tools")
            and estimate_input_tokens_upper(body) <= policy.route_small_max_input_tokens
        ):
            model = policy.route_small_to
            notes["x-poolrelay-route"] = "small_request"
        if model == requested:
            return False
        body["model"] = model
        notes["x-poolrelay-model"] = model
        notes["x-poolrelay-requested-model"] = requested
        return True

    async def limit(
        self, key: KeyContext, request_id: str, raw: bytes, notes: dict[str, str]
    ) -> None:
        policy = key.policy
        if policy.rpm is None and policy.tpm is None:
            return
        decision = await self.limiter.admit(
            key.key_id,
            request_id,
            rpm=policy.rpm,
            tpm=policy.tpm,
            estimated_tokens=len(raw) // 4,
            now=time.time(),
        )
        if not decision.allowed:
            what = "requests" if decision.reason == "rpm" else "tokens"
            raise errors.rate_limited(
                f"This API key is over its {what}-per-minute limit; retry after {decision.retry_after} s.",
                decision.retry_after,
                decision.headers(),
            )
        notes.update(decision.headers())

    async def admit(
        self,
        request_id: str,
        key: KeyContext,
        body: dict[str, Any],
        raw: bytes,
        *,
        endpoint: str,
        started: float,
        notes: dict[str, str],
        client_session: str | None = None,
    ) -> tuple[Billed, bool]:
        """Reserve budgets and hold the balance. Returns (billed, body edited by a downgrade)."""
        model = str(body["model"])
        check_model_allowed(key, model)
        price = await self.price_for(model)
        amount, expected = worst_case(body, price, key.price_multiplier)
        policy = key.policy
        budget = Budget(policy.daily_budget_micros, policy.monthly_budget_micros)
        reservation: Reservation | None = None
        edited = False
        db = self.services.db
        if budget.active:
            try:
                async with db.transaction() as session:
                    reservation = await budgets.reserve(session, key.key_id, budget, amount)
            except BudgetExceeded as exc:
                if policy.budget_action == "block":
                    raise
                message = f"{exc.scope} budget of {format_usd(exc.limit_micros)} USD exhausted"
                if (
                    policy.budget_action == "downgrade"
                    and policy.downgrade_model
                    and policy.downgrade_model != model
                ):
                    model = policy.downgrade_model
                    body["model"] = model
                    edited = True
                    check_model_allowed(key, model)
                    price = await self.price_for(model)
                    amount, expected = worst_case(body, price, key.price_multiplier)
                    notes["x-poolrelay-route"] = "budget_downgrade"
                    notes["x-poolrelay-model"] = model
                    notes["x-poolrelay-budget-downgrade"] = message
                else:
                    notes["x-poolrelay-budget-warning"] = message
                async with db.transaction() as session:
                    reservation = await budgets.reserve(
                        session, key.key_id, budget, amount, enforce=False
                    )
        stream = bool(body.get("stream"))
        hold = HoldRequest(
            request_id=request_id,
            customer_id=key.customer_id,
            key_id=key.key_id,
            amount_micros=amount,
            instance_id=self.services.instance_id,
            endpoint=endpoint,
            requested_model=model,
            stream=stream,
            request_body=raw.decode("utf-8", "replace")
            if self.services.settings.log_bodies
            else None,
            budget=reservation,
            session_id=client_session,
        )
        try:
            placement = await self._place_hold(hold)
        except BaseException as exc:
            await self._hold_not_placed(exc, request_id, key, reservation)
            raise
        billed = Billed(
            request_id,
            key,
            price,
            amount,
            started,
            stream,
            model,
            notes,
            endpoint,
            expected,
            placement,
            reservation,
            int(body["max_tokens"]),
            client_session,
        )
        return billed, edited

    async def _place_hold(self, hold: HoldRequest) -> asyncio.Future[None] | None:
        """Place the hold: on PostgreSQL start it (group commit) and return its future, so it
        is written while the scheduler leases an account (``open_upstream`` awaits it before
        sending anything); on SQLite place it in a transaction of its own and return None."""
        if self.services.holds is not None:
            return self.services.holds.place_nowait(hold)
        async with self.services.db.transaction() as session:
            await holds.place(session, hold)
        return None

    async def _hold_not_placed(
        self,
        exc: BaseException,
        request_id: str,
        key: KeyContext,
        reservation: Reservation | None,
    ) -> None:
        """After a hold's placement raised: a refusal held nothing, so its budget reservation
        goes back now; any other failure may have left the hold written (resolved later)."""
        if isinstance(exc, BillingError):
            await self._undo_reservation(key, reservation)
        else:
            self.resolve_hold_later(request_id, key, reservation)

    def resolve_hold_later(
        self, request_id: str, key: KeyContext, reservation: Reservation | None
    ) -> None:
        """A hold whose placement failed without a refusal (the connection broke, the request
        was cancelled) may have been written all the same. Once its statement has certainly
        ended (``ambiguous_hold_wait``), release the hold if it is there — which also gives back
        its budget reservation — or else give the reservation back alone; retried in the
        background while the database is unreachable. The request itself was refused, so
        nothing is charged."""
        outcome = Outcome(
            status="failed", error="the hold could not be confirmed; the request was refused"
        )

        async def resolve() -> None:
            if not await self._write_settlement(request_id, None, 0, outcome):
                await self._undo_reservation(key, reservation)

        self._spawn(
            self._until_done(
                f"resolving hold {request_id}", "hold", resolve, self.ambiguous_hold_wait
            )
        )

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        """Run ``job`` in the background, kept referenced until it ends."""
        task = asyncio.create_task(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _until_done(
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

    async def _undo_reservation(self, key: KeyContext, reservation: Reservation | None) -> None:
        if reservation is not None:
            async with self.services.db.transaction() as session:
                await budgets.settle(session, key.key_id, reservation, 0)

    async def _placement_error(self, billed: Billed) -> Exception | None:
        """Why the hold was not placed (its refusal, or the failure that left it uncertain), or
        None when it was."""
        if billed.placement is None:
            return None
        try:
            await billed.placement
            return None
        except Exception as exc:
            await self._hold_not_placed(exc, billed.request_id, billed.key, billed.reservation)
            return exc

    def touch(self, key: KeyContext) -> None:
        """Keep ``last_used_at`` roughly current: at most one write per key per minute."""
        now = time.monotonic()
        if now - self._touched.get(key.key_id, -1e9) < TOUCH_INTERVAL:
            return
        self._touched[key.key_id] = now

        async def write() -> None:
            try:
                async with self.services.db.transaction() as session:
                    await touch_key(session, key.key_id)
            except Exception:
                log.debug("could not record last_used_at", exc_info=True)

        self._spawn(write())

    # -- settlement -----------------------------------------------------------------------------

    async def settle(
        self,
        billed: Billed,
        usage: Usage | None,
        model: str | None,
        outcome: Outcome,
        *,
        estimate: bool = False,
    ) -> int:
        """Charge what the upstream reported; 0 (a release) when nothing was used. A charge
        the relay estimated (a stream cut short) never exceeds the hold: only what the
        upstream itself reports may cost more than was held."""
        cost = 0
        if usage is not None:
            price = billed.price
            if model and model != billed.requested_model:
                book = await self.services.prices.get()
                price = book.match(model) or billed.price
            cost = cost_micros(usage, price, billed.key.price_multiplier)
            if estimate:
                cost = min(cost, billed.hold_micros)
        outcome.model = model or outcome.model
        if outcome.duration_ms is None:
            outcome.duration_ms = int((time.monotonic() - billed.started) * 1000)
        for attempt in range(3):
            try:
                found = await self._write_settlement(billed.request_id, usage, cost, outcome)
                break
            except Exception:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        if not found and cost > 0:
            cost = await self._charge_without_hold(billed, usage, cost, outcome)
        if cost > billed.hold_micros:
            log.warning(
                "request %s cost %s above its hold %s", billed.request_id, cost, billed.hold_micros
            )
        self._observe(billed, usage, cost, outcome)
        if usage is not None and billed.key.policy.tpm is not None:
            try:
                await self.limiter.record_tokens(
                    billed.key.key_id, billed.request_id, _usage_tokens(usage)
                )
            except Exception:
                log.debug("could not correct the key's token window", exc_info=True)
        return cost

    async def _charge_without_hold(
        self, billed: Billed, usage: Usage | None, cost: int, outcome: Outcome
    ) -> int:
        """A delivered answer whose hold is gone: charge it all the same (idempotent by request
        id). Returns what this call charged: 0 when the ledger already had the charge (an
        earlier attempt of this settlement, or a reconciliation, made it)."""
        async with self.services.db.transaction() as session:
            charged = await holds.charge_without_hold(
                session, billed.request_id, billed.key.customer_id, usage, cost, outcome
            )
        if not charged:
            return 0
        self.services.metrics.charged_without_hold.inc()
        log.warning(
            "request %s was charged %s µUSD without its hold (the hold had been released)",
            billed.request_id,
            cost,
        )
        return cost

    async def _write_settlement(
        self, request_id: str, usage: Usage | None, cost: int, outcome: Outcome
    ) -> bool:
        """One attempt at the settlement's write: idempotent by request id (the hold row is
        deleted by exactly one writer), so repeating an attempt that did commit is a no-op.
        Returns whether this attempt found the hold."""
        if self.services.holds is not None:
            return await self.services.holds.settle(request_id, usage, cost, outcome)
        async with self.services.db.transaction() as session:
            return await holds.settle(session, request_id, usage, cost, outcome)

    def settle_later(
        self,
        billed: Billed,
        usage: Usage | None,
        model: str | None,
        outcome: Outcome,
        *,
        estimate: bool = False,
    ) -> None:
        """Keep trying, in the background, a settlement that could not be written (the
        database was unreachable): until it lands the hold keeps the customer's money reserved
        and a charge is missing from the ledger, so it must not wait for a restart. Retries
        back off from ``retry_first_delay`` to ``RETRY_MAX_DELAY`` seconds for as long as the
        process runs; if it stops first, reconciliation finishes the hold as a stopped
        process's (charged from the stream's recorded progress, or released)."""

        async def attempt() -> None:
            await self.settle(billed, usage, model, outcome, estimate=estimate)
            if usage is not None:
                await self._forget_progress(billed.request_id)

        what = f"settlement of {billed.request_id}"
        self._spawn(self._until_done(what, "settlement", attempt, self.retry_first_delay))

    def _observe(self, billed: Billed, usage: Usage | None, cost: int, outcome: Outcome) -> None:
        metrics = self.services.metrics
        route = billed.endpoint
        model = outcome.model or billed.requested_model
        metrics.request_done(
            route,
            model,
            outcome.status,
            (outcome.duration_ms or 0) / 1000,
            outcome.ttfb_ms / 1000 if outcome.ttfb_ms is not None else None,
        )
        if cost:
            metrics.charged.inc(cost)
        u = usage or Usage()
        log_request(
            request_id=billed.request_id,
            upstream_request_id=outcome.upstream_request_id,
            customer_id=billed.key.customer_id,
            key_id=billed.key.key_id,
            account_id=outcome.account_id,
            route=route,
            model=model,
            stream=billed.stream,
            status=outcome.status,
            http_status=outcome.http_status,
            attempts=outcome.attempts,
            ttfb_ms=outcome.ttfb_ms,
            duration_ms=outcome.duration_ms,
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_write_tokens=u.cache_creation_input_tokens,
            cache_read_tokens=u.cache_read_input_tokens,
            cost_micros=cost,
            hold_micros=billed.hold_micros,
            error=outcome.error,
        )

    async def _release_quietly(self, billed: Billed, outcome: Outcome) -> None:
        try:
            await self.settle(billed, None, None, outcome)
        except Exception:
            log.exception("releasing hold %s failed; retrying in the background", billed.request_id)
            self.settle_later(billed, None, None, outcome)

    # -- the endpoint ---------------------------------------------------------------------------

    async def handle(self, request: Request, edge: Edge) -> Any:
        request_id = new_id("req")
        started = time.monotonic()
        notes: dict[str, str] = {}
        key: KeyContext | None = None
        body: dict[str, Any] | None = None
        try:
            key = await self.services.keys.authenticate(request.headers)
            self.touch(key)
            settings = self.services.settings
            raw = await read_body(request, settings.max_body_bytes, settings.client_body_timeout)
            body = edge.parse(raw)
            validate_messages_body(body)
            only = await file_pin(self.services, key.customer_id, [body], raw)
            edited = await self.route(key, body, notes)
            check_model_allowed(key, str(body["model"]))
            await self.limit(key, request_id, raw, notes)
            billed, downgraded = await self.admit(
                request_id,
                key,
                body,
                raw,
                endpoint=edge.endpoint,
                started=started,
                notes=notes,
                client_session=session_id(request.headers, body),
            )
            billed.only = only
        except Exception as exc:  # expected refusals, and failures (the database unreachable)
            session = session_id(request.headers, body)
            return await self._refuse(exc, request_id, edge, notes, key, body, started, session)
        self.services.metrics.overhead.labels(edge.endpoint).observe(time.monotonic() - started)
        forward = edge.forward_bytes(raw, body, edited or downgraded)
        return await self.forward_billed(request, billed, body, forward, edge)

    async def _refuse(
        self,
        exc: Exception,
        request_id: str,
        edge: Edge,
        notes: dict[str, str],
        key: KeyContext | None,
        body: dict[str, Any] | None,
        started: float,
        session: str | None,
    ) -> Any:
        """A request turned away before anything was held or sent. An authenticated one gets
        its request-log row (status code and reason) when the refusal is certain: a failure
        that may have left a hold written keeps that hold's own row."""
        err = to_api_error(exc)
        if err.status == 500:
            log.error("request %s refused by an unexpected error", request_id, exc_info=exc)
        err.headers = {**notes, **err.headers}
        self.services.metrics.requests.labels(edge.endpoint, "", f"refused_{err.status}").inc()
        log_request(
            request_id=request_id,
            route=edge.endpoint,
            status="refused",
            http_status=err.status,
            error=err.message,
            customer_id=key.customer_id if key else None,
            key_id=key.key_id if key else None,
        )
        if key is not None and isinstance(exc, errors.ApiError | BillingError | PoolError):
            model = body.get("model") if body is not None else None
            await self.record_unbilled(
                Entry(
                    request_id=request_id,
                    customer_id=key.customer_id,
                    key_id=key.key_id,
                    endpoint=edge.endpoint,
                    requested_model=model if isinstance(model, str) else None,
                    stream=bool(body.get("stream")) if body is not None else False,
                    instance_id=self.services.instance_id,
                    session_id=session,
                    outcome=Outcome(
                        status="refused",
                        http_status=err.status,
                        error=err.message,
                        duration_ms=int((time.monotonic() - started) * 1000),
                    ),
                )
            )
        return edge.render_error(err, request_id)

    async def record_unbilled(self, entry: Entry) -> None:
        """The request-log row of a request that held nothing (best effort: a log row never
        turns an answer into an error)."""
        try:
            async with self.services.db.transaction() as session:
                await request_log.record(session, entry)
        except Exception:
            log.warning(
                "could not write the request-log row of %s", entry.request_id, exc_info=True
            )

    async def messages(self, request: Request) -> Any:
        return await self.handle(request, Edge())

    async def forward_billed(
        self, request: Request, billed: Billed, body: dict[str, Any], raw: bytes, edge: Edge
    ) -> Any:
        services = self.services
        request_id = billed.request_id
        pg_holds = services.holds
        if billed.placement is not None and pg_holds is not None and pg_holds.placing.queued == 1:
            # A lone hold: let its statement leave before the lease's script, the database
            # commit being the longer of the two round trips that open_upstream overlaps.
            # (Under load the hold waits for the next batch anyway; yielding would only queue
            # this request behind all the others.)
            await asyncio.sleep(0)
        trace = Trace()
        # The client may leave while the upstream thinks: then the attempt stops at once.
        watch = ClientWatch(request.receive)
        try:
            opened = await open_upstream(
                services,
                method="POST",
                path="/v1/messages",
                query=request.scope["query_string"].decode("latin-1"),
                headers=edge.upstream_headers(request.headers),
                content=raw,
                model=billed.requested_model,
                expected_tokens=billed.expected_tokens,
                affinity=affinity_key(
                    customer_id=billed.key.customer_id, headers=request.headers, body=body
                ),
                started=billed.started,
                gate=billed.placement,
                trace=trace,
                header=header_budget(
                    services.settings, streaming=billed.stream, max_tokens=billed.max_tokens
                ),
                only=billed.only,
            )
        except asyncio.CancelledError:
            watch.stop()
            if not watch.withdraw():
                raise
            return await self._client_left(billed, trace, edge)
        except Exception as exc:
            watch.stop()
            refusal = await self._placement_error(billed)
            if refusal is not None:  # no hold: the balance (or the customer) said no
                return await self._refuse(
                    refusal,
                    request_id,
                    edge,
                    billed.headers,
                    billed.key,
                    body,
                    billed.started,
                    billed.session_id,
                )
            api_error = to_api_error(exc)
            if api_error.status == 500:
                log.exception("request %s failed before reaching the upstream", request_id)
            await self._release_quietly(
                billed,
                Outcome(
                    status="failed",
                    http_status=api_error.status,
                    error=api_error.message,
                    attempts=trace.attempts,
                    accounts_tried=trace.accounts,
                    account_id=trace.accounts[-1] if trace.accounts else None,
                ),
            )
            api_error.headers = {**billed.headers, **api_error.headers}
            return edge.render_error(api_error, request_id)
        watch.stop()

        headers = customer_headers(opened.response.headers)
        headers.extend(billed.headers.items())
        headers.append(("x-poolrelay-request-id", request_id))
        if opened.body is not None:  # the upstream rejected the request on its merits
            await services.scheduler.release(opened.lease)
            await self._release_quietly(
                billed,
                Outcome(
                    status="rejected",
                    http_status=opened.response.status_code,
                    account_id=opened.account.id,
                    attempts=opened.attempts,
                    accounts_tried=opened.trace.accounts,
                    upstream_request_id=opened.response.headers.get("request-id"),
                    error=opened.body[:500].decode("utf-8", "replace"),
                    ttfb_ms=opened.ttfb_ms,
                ),
            )
            return edge.render_json(opened.response.status_code, dict(headers), opened.body)

        if opened.response.headers.get("content-type", "").startswith("text/event-stream"):
            renewal = self._keep_lease(opened)
            return RelayStream(
                opened.response,
                headers,
                on_finish=lambda meter, end: self._finish_stream(
                    billed, opened, meter, end, renewal
                ),
                on_started=lambda meter: self._record_progress(billed, meter),
                transform=edge.stream_transform(body),
                max_seconds=services.settings.max_request_seconds,
                started=billed.started,
            )
        return await self._finish_json(billed, opened, headers, edge)

    async def _client_left(self, billed: Billed, trace: Trace, edge: Edge) -> Response:
        """The client closed the connection before the upstream answered: the attempt was
        stopped (its connection closed, its lease released); the hold goes back now. The
        answer is never sent."""
        if await self._placement_error(billed) is None:  # else no hold was placed
            await self._release_quietly(
                billed,
                Outcome(
                    status="client_disconnect",
                    http_status=499,
                    error="the client closed the connection before the upstream answered",
                    attempts=trace.attempts,
                    accounts_tried=trace.accounts,
                    account_id=trace.accounts[-1] if trace.accounts else None,
                ),
            )
        return edge.render_error(
            errors.ApiError(
                499, "api_error", "The client closed the connection before the upstream answered."
            ),
            billed.request_id,
        )

    async def _finish_json(
        self, billed: Billed, opened: Opened, headers: list[tuple[str, str]], edge: Edge
    ) -> Response:
        services = self.services
        outcome = Outcome(
            status="ok",
            http_status=opened.response.status_code,
            account_id=opened.account.id,
            attempts=opened.attempts,
            accounts_tried=opened.trace.accounts,
            upstream_request_id=opened.response.headers.get("request-id"),
            ttfb_ms=opened.ttfb_ms,
        )
        try:
            content = await opened.response.aread()
        except Exception as exc:
            await services.scheduler.release(opened.lease)
            outcome.status = "upstream_error"
            outcome.error = f"{type(exc).__name__} while reading the upstream body"
            await self._release_quietly(billed, outcome)
            return edge.render_error(
                errors.ApiError(502, "api_error", "The upstream connection failed."),
                billed.request_id,
            )
        finally:
            await opened.response.aclose()
        ending = self._end_lease(opened, success=True)
        usage: Usage | None = None
        model: str | None = None
        try:
            data = orjson.loads(content)
            if isinstance(data, dict):
                usage = Usage.from_api(data.get("usage"))
                model = data.get("model") if isinstance(data.get("model"), str) else None
        except orjson.JSONDecodeError:
            outcome.error = "the upstream answered 200 with a body that is not JSON"
        if services.settings.log_bodies:
            outcome.response_body = content.decode("utf-8", "replace")
        try:
            cost = await self.settle(billed, usage, model, outcome)
        except Exception:
            # The answer is withheld, so it is not charged: the hold is released (later, when
            # the database answers again).
            log.exception("settlement of %s failed; the answer is withheld", billed.request_id)
            await self._lease_ended(ending)
            outcome.status = "failed"
            outcome.http_status = 500
            outcome.error = "the settlement could not be written; the answer was withheld"
            self.settle_later(billed, None, None, outcome)
            return edge.render_error(
                errors.ApiError(
                    500, "api_error", "The response could not be billed; it was not charged."
                ),
                billed.request_id,
            )
        await self._lease_ended(ending)
        headers.append(("x-poolrelay-cost-usd", format_usd(cost)))
        return edge.render_json(opened.response.status_code, dict(headers), content)

    def _keep_lease(self, opened: Opened) -> LeaseRenewal:
        """Renew a stream's lease every third of its lifetime while the stream runs, so a
        stream longer than the lease's expiry keeps its concurrency slot (an expired lease
        would free the slot while the upstream is still busy with the request)."""
        scheduler = self.services.scheduler

        async def renew() -> None:
            try:
                await scheduler.renew(opened.lease)
            except Exception:
                log.warning("could not renew the lease of a long stream", exc_info=True)

        return LeaseRenewal(scheduler.lease_ttl / 3, lambda: self._spawn(renew()))

    def _end_lease(self, opened: Opened, *, success: bool) -> asyncio.Future[None]:
        """Start ending the request's lease (release + the response's headroom) in a batched
        Redis call; it runs while the settlement goes to the database."""
        scheduler = self.services.scheduler
        end = scheduler.ending(opened.lease, headers=opened.response.headers, success=success)
        return self.services.lease_ends.submit_nowait(end)

    @staticmethod
    async def _lease_ended(ending: asyncio.Future[None]) -> None:
        try:
            await ending
        except Exception:  # the lease expires by itself; the money is already settled
            log.warning("could not end a lease; it will expire", exc_info=True)

    async def _record_progress(self, billed: Billed, meter: StreamMeter) -> None:
        """What a stream has used so far, for the reconciliation of a crashed process."""
        try:
            progress = orjson.dumps({"model": meter.model, "usage": meter.usage.to_api()})
            await self.services.redis_commands.submit(
                ("SET", progress_key(billed.request_id), progress, "EX", PROGRESS_TTL)
            )
        except Exception:
            log.warning("could not record stream progress for %s", billed.request_id, exc_info=True)

    async def _finish_stream(
        self,
        billed: Billed,
        opened: Opened,
        meter: StreamMeter,
        end: StreamEnd,
        renewal: LeaseRenewal,
    ) -> None:
        renewal.cancel()
        ending = self._end_lease(opened, success=end.status == "ok")
        if end.account_fault:  # the account broke the stream: its circuit breaker counts it
            try:
                await on_failure(self.services, opened.account.id, end.error or "stream failed")
            except Exception:
                log.warning("could not count a stream failure of %s", opened.account.id)
        usage: Usage | None = None
        estimate = False
        if meter.started:
            usage = meter.usage
            if not meter.stopped:
                # Partial stream: input and cache from message_start, output from the last
                # message_delta or, when larger, an estimate from the deltas relayed so far.
                # Never more than the request allowed the model to write.
                estimated = max(usage.output_tokens, meter.estimated_output_tokens())
                estimated = min(estimated, billed.max_tokens) if billed.max_tokens else estimated
                usage = dataclasses.replace(usage, output_tokens=estimated)
                estimate = True
        outcome = Outcome(
            status=end.status,
            http_status=200,
            account_id=opened.account.id,
            attempts=opened.attempts,
            accounts_tried=opened.trace.accounts,
            upstream_request_id=opened.response.headers.get("request-id"),
            error=end.error,
            ttfb_ms=opened.ttfb_ms,
        )
        try:
            await self.settle(billed, usage, meter.model, outcome, estimate=estimate)
        except Exception:
            # The bytes were delivered: the charge stands and is written when the database
            # answers again (the stream's progress record stays until then, for a crash).
            log.exception("settlement of stream %s failed; retrying it", billed.request_id)
            self.settle_later(billed, usage, meter.model, outcome, estimate=estimate)
            return
        finally:
            await self._lease_ended(ending)
        await self._forget_progress(billed.request_id)

    async def _forget_progress(self, request_id: str) -> None:
        try:
            await self.services.redis_commands.submit(("DEL", progress_key(request_id)))
        except Exception:
            log.debug("progress key cleanup failed", exc_info=True)
