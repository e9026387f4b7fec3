"""``POST /v1/messages/batches``: check, hold at the batch rate, send to one account.

Every request's ``params`` is checked as a Messages body (model priced and allowed for the key,
relay aliases and the key's routing applied, ``stream`` refused); ONE hold is placed for the
batch (:func:`billing.batch_billing.batch_hold_micros`, the same conditional update as a
message's hold: a batch that does not fit is refused 400 "Your credit balance is too low …" and
never sent); then the batch goes to one account chosen by the scheduler — one that allows every
model in it and, when it names files, one of the files' group — failing over like a message
until one accepts it. The relay records which customer, key and account own the batch; a batch
that was not accepted has its hold released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

import orjson
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from app import errors
from app.errors import ApiError, to_api_error
from app.owned import file_pin, send_to_owner
from app.relay.forward import Trace, open_upstream, read_and_release
from app.relay.owned_api import answer, json_of, relay_base
from app.relay.service import Relay, check_model_allowed, read_body, validate_messages_body
from app.state import Services
from billing import budgets, holds
from billing.batch_billing import (
    BATCH_ENDPOINT,
    BATCH_HOLD_INSTANCE,
    batch_hold_micros,
    record_batch,
)
from billing.budgets import Budget, Reservation
from billing.customers import KeyContext
from billing.holds import HoldRequest, Outcome
from billing.ids import new_id
from billing.owned import MessageBatch
from billing.pricing import Price
from pool.accounts import LiveAccount

log = logging.getLogger("poolrelay.batches")

BATCH_MAX_BODY_BYTES: Final = 256 * 1024 * 1024
MAX_REQUESTS: Final = 100_000


def rewrite(data: Any, base: str) -> Any:
    """A batch object with its ``results_url`` naming the relay (never the upstream)."""
    if isinstance(data, dict) and data.get("type") == "message_batch" and data.get("results_url"):
        data["results_url"] = f"{base}/v1/messages/batches/{data['id']}/results"
    return data


def _requests(body: dict[str, Any]) -> list[dict[str, Any]]:
    items = body.get("requests")
    if items is None:
        raise errors.invalid_request("requests: Field required")
    if not isinstance(items, list):
        raise errors.invalid_request("requests: Input should be a valid list")
    if not items:
        raise errors.invalid_request("requests: List should have at least 1 item")
    if len(items) > MAX_REQUESTS:
        raise errors.invalid_request(f"requests: List should have at most {MAX_REQUESTS} items")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise errors.invalid_request(f"requests.{i}: Input should be a valid dictionary")
        if not isinstance(item.get("custom_id"), str):
            raise errors.invalid_request(f"requests.{i}.custom_id: Field required")
        params = item.get("params")
        if not isinstance(params, dict):
            raise errors.invalid_request(f"requests.{i}.params: Field required (an object)")
        try:
            validate_messages_body(params)
        except ApiError as exc:
            raise errors.invalid_request(f"requests.{i}.params.{exc.message}") from None
        if params.get("stream") is True:
            raise errors.invalid_request(
                f"requests.{i}.params.stream: streaming is not supported in batches"
            )
    return items


class BatchCreator:
    def __init__(self, services: Services, relay: Relay) -> None:
        self.services = services
        self.relay = relay

    async def create(self, request: Request) -> Response:
        services = self.services
        request_id = new_id("req")
        started = time.monotonic()
        key: KeyContext | None = None
        model: str | None = None
        try:
            key = await services.keys.authenticate(request.headers)
            self.relay.touch(key)
            raw = await read_body(
                request, BATCH_MAX_BODY_BYTES, services.settings.client_body_timeout
            )
            body = orjson.loads(raw) if raw else None
            if not isinstance(body, dict):
                raise errors.invalid_request("The request body must be a JSON object.")
            items = _requests(body)
            edited = False
            notes: dict[str, str] = {}
            priced: list[tuple[dict[str, Any], Price]] = []
            models: set[str] = set()
            for item in items:
                params = item["params"]
                edited = await self.relay.route(key, params, notes) or edited
                model = str(params["model"])
                check_model_allowed(key, model)
                priced.append((params, await self.relay.price_for(model)))
                models.add(model)
            await self._count_request(key, request_id)
            amount = batch_hold_micros(priced, key.price_multiplier)
            only = await self._accounts_for(key, items, models)
            content = orjson.dumps(body) if edited else raw
            hold = HoldRequest(
                request_id=request_id,
                customer_id=key.customer_id,
                key_id=key.key_id,
                amount_micros=amount,
                instance_id=BATCH_HOLD_INSTANCE,
                endpoint=BATCH_ENDPOINT,
                requested_model=model,
            )
            async with services.db.transaction() as session:
                hold.budget = await self._reserve_budget(session, key, amount)
                await holds.place(session, hold)
        except orjson.JSONDecodeError as exc:
            err = errors.invalid_request(f"The request body is not valid JSON: {exc}")
            return await self._refused(err, request_id, key, model, started)
        except Exception as exc:  # refusals, and failures (the database unreachable)
            return await self._refused(exc, request_id, key, model, started)
        return await self._send(
            request, request_id, key, amount, len(items), content, only, started
        )

    async def _count_request(self, key: KeyContext, request_id: str) -> None:
        """A batch is one request against the key's ``rpm`` (its tokens are not counted
        against ``tpm``: they are processed later, at the upstream's pace)."""
        rpm = key.policy.rpm
        if rpm is None:
            return
        decision = await self.relay.limiter.admit(
            key.key_id, request_id, rpm=rpm, tpm=None, estimated_tokens=0, now=time.time()
        )
        if not decision.allowed:
            raise errors.rate_limited(
                f"This API key is over its requests-per-minute limit; retry after "
                f"{decision.retry_after} s.",
                decision.retry_after,
                decision.headers(),
            )

    @staticmethod
    async def _reserve_budget(
        session: AsyncSession, key: KeyContext, amount: int
    ) -> Reservation | None:
        """The batch's hold reserved against the key's budgets, in the hold's transaction (a
        budget that cannot take it: 403 with ``budget_action: block``; otherwise the batch is
        only counted — a batch is not downgraded). Settled with the rest of the hold."""
        policy = key.policy
        budget = Budget(policy.daily_budget_micros, policy.monthly_budget_micros)
        if not budget.active:
            return None
        enforce = policy.budget_action == "block"
        return await budgets.reserve(session, key.key_id, budget, amount, enforce=enforce)

    async def _accounts_for(
        self, key: KeyContext, items: list[dict[str, Any]], models: set[str]
    ) -> frozenset[str]:
        """The accounts that may take this batch: they allow every model of it and, when it
        names files, hold them (their group)."""
        services = self.services
        live = await services.directory.accounts()
        allowed = {a.id for a in live.values() if all(a.allows(m) for m in models)}
        pinned = await file_pin(services, key.customer_id, [i["params"] for i in items])
        if pinned is not None:
            allowed &= pinned
        return frozenset(allowed)

    async def _refused(
        self,
        exc: Exception,
        request_id: str,
        key: KeyContext | None,
        model: str | None,
        started: float,
    ) -> Response:
        err = to_api_error(exc)
        if err.status == 500:
            log.error("batch %s refused by an unexpected error", request_id, exc_info=exc)
        await self.relay.record_refusal(exc, err, request_id, key, BATCH_ENDPOINT, model, started)
        return errors.anthropic_response(err, request_id)

    async def _unrecorded(
        self, batch: MessageBatch, account: LiveAccount, request_id: str
    ) -> Response:
        """The upstream took the batch but the relay could not record who owns it (the
        database is unreachable): the batch is canceled upstream (it could be neither
        read nor charged) and the customer told to retry. Its hold is released, now or — if
        the database is still away — by reconciliation (a batch hold without its batch)."""
        log.error("batch %s could not be recorded; canceling it upstream", batch.id)
        with contextlib.suppress(Exception):
            upstream = await send_to_owner(
                self.services, account, "POST", f"/v1/messages/batches/{batch.id}/cancel"
            )
            await upstream.aread()
            await upstream.aclose()
        with contextlib.suppress(Exception):
            await self._release(
                request_id,
                Outcome(status="failed", error="the batch could not be recorded; canceled"),
            )
        return errors.anthropic_response(
            errors.overloaded(
                "The batch could not be recorded by the relay and was canceled; retry shortly."
            ),
            request_id,
        )

    async def _release(self, request_id: str, outcome: Outcome) -> None:
        async with self.services.db.transaction() as session:
            await holds.release(session, request_id, outcome)

    async def _send(
        self,
        request: Request,
        request_id: str,
        key: KeyContext,
        amount: int,
        count: int,
        content: bytes,
        only: frozenset[str],
        started: float,
    ) -> Response:
        services = self.services
        trace = Trace()
        try:
            opened = await open_upstream(
                services,
                method="POST",
                path="/v1/messages/batches",
                query=request.url.query,
                headers=request.headers.items(),
                content=content,
                model=None,
                expected_tokens=0,
                affinity=None,
                started=started,
                trace=trace,
                only=only,
            )
        except Exception as exc:
            err = to_api_error(exc)
            await self._release(
                request_id,
                Outcome(
                    status="failed",
                    http_status=err.status,
                    error=err.message,
                    attempts=trace.attempts,
                    accounts_tried=trace.accounts,
                ),
            )
            return errors.anthropic_response(err, request_id)
        reply = await read_and_release(services, opened)
        status = opened.response.status_code
        data = json_of(reply)
        outcome = Outcome(
            status="rejected",
            http_status=status,
            account_id=opened.account.id,
            attempts=opened.attempts,
            accounts_tried=opened.trace.accounts,
            upstream_request_id=opened.response.headers.get("request-id"),
            ttfb_ms=opened.ttfb_ms,
            error=reply[:500].decode("utf-8", "replace") if status >= 400 else None,
        )
        if status >= 400 or not isinstance(data, dict) or not isinstance(data.get("id"), str):
            if status < 400:
                outcome.status, outcome.error = "failed", "the upstream's answer is not a batch"
            await self._release(request_id, outcome)
            return answer(opened.response, reply, request_id)
        batch = MessageBatch(
            id=data["id"],
            customer_id=key.customer_id,
            key_id=key.key_id,
            account_id=opened.account.id,
            account_group=opened.account.group,
            request_id=request_id,
            hold_micros=amount,
            request_count=count,
            processing_status=str(data.get("processing_status") or "in_progress")[:20],
            snapshot=reply.decode("utf-8", "replace"),
        )
        for attempt in range(3):
            try:
                async with services.db.transaction() as session:
                    await record_batch(
                        session,
                        MessageBatch(**batch.model_dump()),
                        upstream_request_id=opened.response.headers.get("request-id"),
                        attempts=opened.attempts,
                        accounts_tried=opened.trace.accounts,
                        ttfb_ms=opened.ttfb_ms,
                        duration_ms=int((time.monotonic() - started) * 1000),
                    )
                break
            except Exception:
                if attempt < 2:
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                return await self._unrecorded(batch, opened.account, request_id)
        return answer(opened.response, reply, request_id, rewrite(data, relay_base(request)))
