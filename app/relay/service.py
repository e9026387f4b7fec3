"""The relay's one code path: authenticate, route, limit, price, hold, forward, settle.

This is the only place where billing (the hold) and the pool (the lease) meet; both customer
dialects (:mod:`app.relay.edges`) go through it:

1. authenticate the key (cached ≤ 1 s) and parse the body into a Messages request;
2. route: a model alias, the key's small-request rule; check the key may use the model;
3. the key's rpm/tpm windows (Redis, shared by all processes) — 429 with ``retry-after``;
4. price the model (no price → 400 before anything is held or sent);
5. reserve the worst case against the key's budgets and hold it against the balance, each one
   conditional update (refused → 403 budget / 400 "credit balance too low", nothing sent); a
   stream's hold starts smaller and grows while it runs (:mod:`app.relay.credit`);
6. lease an account and open the upstream response, failing over before the first byte;
7. relay: JSON is read whole, streams are forwarded chunk by chunk while usage is read;
8. settle (:class:`app.relay.credit.Credit`): one usage record and one ledger debit,
   idempotent by request id; failed attempts and requests that never reached the customer
   are released without charge; release the lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app import errors
from app.errors import to_api_error
from app.logs import log_request
from app.oversight import signals
from app.owned import file_pin
from app.ratelimit import KeyRateLimiter
from app.relay.checks import (
    check_model_allowed,
    check_model_id,
    read_body,
    validate_messages_body,
)
from app.relay.credit import Credit, Desk
from app.relay.edges import Edge
from app.relay.forward import Opened, Trace, header_budget, on_failure, open_upstream
from app.relay.queueing import Turn
from app.relay.stream import ClientWatch, RelayStream, StreamEnd
from app.state import Services
from billing import budgets, request_log
from billing.budgets import Budget, Reservation
from billing.customers import KeyContext, touch_key
from billing.errors import BillingError, BudgetExceeded, NoPrice
from billing.estimate import estimate_input_tokens_upper, worst_case_usage
from billing.holds import HoldRequest, Outcome
from billing.ids import new_id
from billing.money import format_usd
from billing.pricing import Price, Usage, cost_micros
from billing.request_log import Entry
from pool.affinity import affinity_key, session_id
from pool.errors import PoolError
from pool.patterns import model_matches
from pool.upstream import customer_headers

log = logging.getLogger("poolrelay.relay")

TOUCH_INTERVAL = 60.0

__all__ = [
    "Relay",
    "check_model_allowed",
    "check_model_id",
    "model_matches",
    "read_body",
    "validate_messages_body",
]


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
    """The one code path of a billed request (module docstring)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.limiter = KeyRateLimiter(services.redis)
        self.desk = Desk(services, self.limiter)
        self._touched: dict[str, float] = {}

    # -- the endpoint ---------------------------------------------------------------------------

    async def messages(self, request: Request) -> Any:
        return await self.handle(request, Edge())

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
            credit, downgraded = await self.hold(
                request_id,
                key,
                body,
                raw,
                endpoint=edge.endpoint,
                started=started,
                notes=notes,
                client_session=session_id(request.headers, body),
            )
        except Exception as exc:  # expected refusals, and failures (the database unreachable)
            session = session_id(request.headers, body)
            return await self._refuse(exc, request_id, edge, notes, key, body, started, session)
        self.services.metrics.overhead.labels(edge.endpoint).observe(time.monotonic() - started)
        forward = edge.forward_bytes(raw, body, edited or downgraded)
        return await self.forward(request, credit, body, forward, edge, only)

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

    async def hold(
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
    ) -> tuple[Credit, bool]:
        """Price the request, reserve its budgets and start placing its hold. Returns (the
        request's credit, body edited by a downgrade)."""
        model = str(body["model"])
        check_model_allowed(key, model)
        price = await self.price_for(model)
        worst = worst_case_usage(body, price)
        policy = key.policy
        budget = Budget(policy.daily_budget_micros, policy.monthly_budget_micros)
        reservation: Reservation | None = None
        edited = False
        db = self.services.db
        if budget.active:
            # Budgets reserve the whole worst case (a stream's balance hold grows instead).
            amount = cost_micros(worst, price, key.price_multiplier)
            try:
                async with db.transaction() as session:
                    reservation = await budgets.reserve(session, key.key_id, budget, amount)
            except BudgetExceeded as exc:
                # issue 15B: one SADD for the key.budget_exhausted webhook (workers/notify.py)
                await signals.budget_exhausted(
                    self.services.redis, key.key_id, exc.scope, exc.limit_micros
                )
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
                    worst = worst_case_usage(body, price)
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
        credit = Credit(
            self.desk,
            request_id=request_id,
            key=key,
            price=price,
            worst=worst,
            stream=stream,
            model=model,
            notes=notes,
            endpoint=endpoint,
            started=started,
            reservation=reservation,
            session_id=client_session,
        )
        await credit.place(
            HoldRequest(
                request_id=request_id,
                customer_id=key.customer_id,
                key_id=key.key_id,
                amount_micros=credit.hold_micros,
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
        )
        return credit, edited

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

        self.desk.spawn(write())

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
        model = body.get("model") if body is not None else None
        await self.record_refusal(
            exc,
            err,
            request_id,
            key,
            edge.endpoint,
            model if isinstance(model, str) else None,
            started,
            stream=bool(body.get("stream")) if body is not None else False,
            session=session,
        )
        return edge.render_error(err, request_id)

    async def record_refusal(
        self,
        exc: Exception,
        err: errors.ApiError,
        request_id: str,
        key: KeyContext | None,
        endpoint: str,
        model: str | None,
        started: float,
        *,
        stream: bool = False,
        session: str | None = None,
    ) -> None:
        """The request-log row of an authenticated request the relay refused, when the refusal
        is certain (an expected one): a failure that may have left a hold written keeps that
        hold's own row."""
        if key is None or not isinstance(exc, errors.ApiError | BillingError | PoolError):
            return
        await self.record_unbilled(
            Entry(
                request_id=request_id,
                customer_id=key.customer_id,
                key_id=key.key_id,
                endpoint=endpoint,
                requested_model=model,
                stream=stream,
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

    # -- lease and forward, relay ---------------------------------------------------------------

    async def forward(
        self,
        request: Request,
        credit: Credit,
        body: dict[str, Any],
        raw: bytes,
        edge: Edge,
        only: frozenset[str] | None = None,
    ) -> Any:
        """Lease an account and forward (``only``: the accounts it may go to, and no other —
        it names files: their group's accounts), then relay the answer."""
        services = self.services
        request_id = credit.request_id
        trace = Trace()
        # the key's and the pool's concurrency caps: wait, do not refuse
        turn = credit.turn = Turn(
            services,
            key_id=credit.key.key_id,
            cap=credit.key.policy.max_concurrency,
            gate=credit.placement,
            notes=credit.headers,
        )
        # The client may leave while the upstream thinks: then the attempt stops at once.
        watch = ClientWatch(request.receive)
        try:
            await turn.take_key_slot()
            opened = await open_upstream(
                services,
                method="POST",
                path="/v1/messages",
                query=request.scope["query_string"].decode("latin-1"),
                headers=edge.upstream_headers(request.headers),
                content=raw,
                model=credit.requested_model,
                expected_tokens=credit.expected_tokens,
                affinity=affinity_key(
                    customer_id=credit.key.customer_id, headers=request.headers, body=body
                ),
                started=credit.started,
                gate=credit.placement,
                trace=trace,
                header=header_budget(
                    services.settings, streaming=credit.stream, max_tokens=credit.max_tokens
                ),
                queue=turn,
                only=only,
            )
        except asyncio.CancelledError:
            watch.stop()
            await turn.release()
            if not watch.withdraw():
                raise
            return await self._client_left(credit, trace, edge)
        except Exception as exc:
            watch.stop()
            await turn.release()
            refusal = await credit.refusal()
            if refusal is not None:  # no hold: the balance (or the customer) said no
                return await self._refuse(
                    refusal,
                    request_id,
                    edge,
                    credit.headers,
                    credit.key,
                    body,
                    credit.started,
                    credit.session_id,
                )
            api_error = to_api_error(exc)
            if api_error.status == 500:
                log.exception("request %s failed before reaching the upstream", request_id)
            await credit.release(
                Outcome(
                    status="failed",
                    http_status=api_error.status,
                    error=api_error.message,
                    attempts=trace.attempts,
                    accounts_tried=trace.accounts,
                    account_id=trace.accounts[-1] if trace.accounts else None,
                )
            )
            api_error.headers = {**credit.headers, **api_error.headers}
            return edge.render_error(api_error, request_id)
        watch.stop()

        credit.outcome = Outcome(
            status="ok",
            http_status=opened.response.status_code,
            account_id=opened.account.id,
            attempts=opened.attempts,
            accounts_tried=opened.trace.accounts,
            upstream_request_id=opened.response.headers.get("request-id"),
            ttfb_ms=opened.ttfb_ms,
        )
        headers = customer_headers(opened.response.headers)
        headers.extend(credit.headers.items())
        headers.append(("x-poolrelay-request-id", request_id))
        if opened.body is not None:  # the upstream rejected the request on its merits
            await services.scheduler.release(opened.lease)
            await turn.release()
            outcome = credit.outcome
            outcome.status = "rejected"
            outcome.error = opened.body[:500].decode("utf-8", "replace")
            await credit.release(outcome)
            return edge.render_json(opened.response.status_code, dict(headers), opened.body)

        if opened.response.headers.get("content-type", "").startswith("text/event-stream"):
            renewal = self._keep_lease(opened)
            turn.keep()  # renewed while the stream runs

            async def end_lease(end: StreamEnd) -> None:
                renewal.cancel()
                await turn.release()  # the key slot goes back
                ending = self._end_lease(opened, success=end.status == "ok")
                if end.account_fault:  # the account broke the stream: its breaker counts it
                    try:
                        await on_failure(services, opened.account.id, end.error or "stream failed")
                    except Exception:
                        log.warning("could not count a stream failure of %s", opened.account.id)
                await self._lease_ended(ending)

            return RelayStream(
                opened.response,
                headers,
                credit,
                end_lease,
                transform=edge.stream_transform(body),
                max_seconds=services.settings.max_request_seconds,
                started=credit.started,
            )
        try:
            return await self._finish_json(credit, opened, headers, edge)
        finally:
            await turn.release()

    async def _client_left(self, credit: Credit, trace: Trace, edge: Edge) -> Response:
        """The client closed the connection before the upstream answered: the attempt was
        stopped (its connection closed, its lease released); the hold goes back now. The
        answer is never sent."""
        if await credit.refusal() is None:  # else no hold was placed
            await credit.release(
                Outcome(
                    status="client_disconnect",
                    http_status=499,
                    error="the client closed the connection before the upstream answered",
                    attempts=trace.attempts,
                    accounts_tried=trace.accounts,
                    account_id=trace.accounts[-1] if trace.accounts else None,
                )
            )
        return edge.render_error(
            errors.ApiError(
                499, "api_error", "The client closed the connection before the upstream answered."
            ),
            credit.request_id,
        )

    async def _finish_json(
        self, credit: Credit, opened: Opened, headers: list[tuple[str, str]], edge: Edge
    ) -> Response:
        services = self.services
        outcome = credit.outcome
        try:
            content = await opened.response.aread()
        except Exception as exc:
            await services.scheduler.release(opened.lease)
            outcome.status = "upstream_error"
            outcome.error = f"{type(exc).__name__} while reading the upstream body"
            await credit.release(outcome)
            return edge.render_error(
                errors.ApiError(502, "api_error", "The upstream connection failed."),
                credit.request_id,
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
            cost = await credit.charge(usage, model, outcome)
        except Exception:
            # The answer is withheld, so it is not charged: the hold is released (later, when
            # the database answers again).
            log.exception("settlement of %s failed; the answer is withheld", credit.request_id)
            await self._lease_ended(ending)
            outcome.status = "failed"
            outcome.http_status = 500
            outcome.error = "the settlement could not be written; the answer was withheld"
            credit.charge_later(None, None, outcome)
            return edge.render_error(
                errors.ApiError(
                    500, "api_error", "The response could not be billed; it was not charged."
                ),
                credit.request_id,
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

        return LeaseRenewal(scheduler.lease_ttl / 3, lambda: self.desk.spawn(renew()))

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
