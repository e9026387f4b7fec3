"""The relay's one code path: authenticate, price, hold, forward with failover, settle.

This is the only place where billing (the hold) and the pool (the lease) meet:

1. authenticate the key (cached ≤ 1 s) and check its policy;
2. price the model (no price → 400 before anything is held or sent);
3. place a hold for the worst case in one short transaction (refused → 400 "credit balance
   too low", nothing sent upstream);
4. lease an account and open the upstream response, failing over before the first byte;
5. relay: JSON is read whole, streams are forwarded chunk by chunk while usage is read;
6. settle in a short transaction of its own: one usage record and one ledger debit,
   idempotent by request id; failed attempts and requests that never reached the customer
   are released without charge;
7. release the lease (headroom was updated from the response headers in step 4).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app import errors
from app.errors import ApiError, to_api_error
from app.relay.forward import Opened, open_upstream
from app.relay.sse import StreamMeter
from app.relay.stream import RelayStream, StreamEnd
from app.state import Services
from billing import holds
from billing.customers import KeyContext
from billing.errors import BillingError, NoPrice
from billing.estimate import estimate_input_tokens_upper, hold_micros
from billing.holds import HoldRequest, Outcome
from billing.ids import new_id
from billing.money import format_usd
from billing.pricing import Price, Usage, cost_micros
from pool.affinity import affinity_key
from pool.errors import PoolError
from pool.upstream import customer_headers

log = logging.getLogger("poolrelay.relay")

PROGRESS_TTL = 86_400


def progress_key(request_id: str) -> str:
    return f"poolrelay:progress:{request_id}"


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise errors.too_large(limit)
        except ValueError:
            raise errors.invalid_request("invalid content-length header") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise errors.invalid_request("The request body is empty; a JSON object is required.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.invalid_request(f"The request body is not valid JSON: {exc.msg}") from None
    if not isinstance(body, dict):
        raise errors.invalid_request("The request body must be a JSON object.")
    return body


def validate_messages_body(body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise errors.invalid_request("model: Field required (a model id string)")
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
    if allowed is not None and not any(_model_matches(model, pattern) for pattern in allowed):
        raise errors.ApiError(
            403,
            "permission_error",
            f"This API key is not allowed to use the model {model!r}.",
            {"x-should-retry": "false"},
        )


def _model_matches(model: str, pattern: str) -> bool:
    if pattern.endswith("*"):
        return model.startswith(pattern[:-1])
    return model == pattern or model.startswith(pattern + "-")


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


class Relay:
    def __init__(self, services: Services) -> None:
        self.services = services

    # -- the admission steps -----------------------------------------------------------------

    async def price_for(self, model: str) -> Price:
        book = await self.services.prices.book()
        price = book.match(model)
        if price is None:
            raise NoPrice(model)
        return price

    async def admit(
        self,
        request_id: str,
        key: KeyContext,
        body: dict[str, Any],
        raw: bytes,
        *,
        endpoint: str,
        started: float,
    ) -> Billed:
        model = str(body["model"])
        check_model_allowed(key, model)
        price = await self.price_for(model)
        amount = hold_micros(body, price, key.price_multiplier)
        stream = bool(body.get("stream"))
        log_bodies = self.services.settings.log_bodies
        hold = HoldRequest(
            request_id=request_id,
            customer_id=key.customer_id,
            key_id=key.key_id,
            amount_micros=amount,
            instance_id=self.services.instance_id,
            endpoint=endpoint,
            requested_model=model,
            stream=stream,
            request_body=raw.decode("utf-8", "replace") if log_bodies else None,
        )
        db = self.services.db
        if db.has_fast_path:
            async with db.raw() as conn:
                await holds.place_fast(conn, hold)
        else:
            async with db.transaction() as session:
                await holds.place(session, hold)
        return Billed(request_id, key, price, amount, started, stream, model)

    async def settle(
        self, billed: Billed, usage: Usage | None, model: str | None, outcome: Outcome
    ) -> int:
        """Charge what the upstream reported; 0 (a release) when nothing was used."""
        cost = 0
        if usage is not None:
            price = billed.price
            if model and model != billed.requested_model:
                book = await self.services.prices.book()
                price = book.match(model) or billed.price
            cost = cost_micros(usage, price, billed.key.price_multiplier)
        outcome.model = model or outcome.model
        outcome.duration_ms = int((time.monotonic() - billed.started) * 1000)
        for attempt in range(3):
            try:
                db = self.services.db
                if db.has_fast_path:
                    async with db.raw() as conn:
                        await holds.settle_fast(conn, billed.request_id, usage, cost, outcome)
                else:
                    async with db.transaction() as session:
                        await holds.settle(session, billed.request_id, usage, cost, outcome)
                break
            except Exception:
                if attempt == 2:
                    log.exception(
                        "settlement of %s failed; reconciliation will retry", billed.request_id
                    )
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        if cost > billed.hold_micros:
            log.warning(
                "request %s cost %s above its hold %s", billed.request_id, cost, billed.hold_micros
            )
        return cost

    async def release(self, billed: Billed, outcome: Outcome) -> None:
        await self.settle(billed, None, None, outcome)

    # -- the endpoint --------------------------------------------------------------------------

    async def messages(self, request: Request) -> Any:
        request_id = new_id("req")
        started = time.monotonic()
        try:
            key = await self.services.keys.authenticate(request.headers)
            raw = await read_body(request, self.services.settings.max_body_bytes)
            body = parse_json_object(raw)
            validate_messages_body(body)
            billed = await self.admit(
                request_id, key, body, raw, endpoint="messages", started=started
            )
        except (ApiError, BillingError, PoolError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        return await self.forward_billed(request, billed, body, raw)

    async def forward_billed(
        self,
        request: Request,
        billed: Billed,
        body: dict[str, Any],
        raw: bytes,
        *,
        stream_wrapper: Callable[[RelayStream], Any] | None = None,
        json_transform: Callable[[int, list[tuple[str, str]], bytes], Awaitable[Response]]
        | None = None,
    ) -> Any:
        services = self.services
        request_id = billed.request_id
        try:
            opened = await open_upstream(
                services,
                method="POST",
                path="/v1/messages",
                query=request.url.query,
                headers=request.headers.items(),
                content=raw,
                model=billed.requested_model,
                expected_tokens=estimate_input_tokens_upper(body) + int(body.get("max_tokens", 0)),
                affinity=affinity_key(
                    customer_id=billed.key.customer_id, headers=request.headers, body=body
                ),
                started=billed.started,
            )
        except Exception as exc:
            api_error = to_api_error(exc)
            if api_error.status == 500:
                log.exception("request %s failed before reaching the upstream", request_id)
            await self._release_quietly(
                billed,
                Outcome(status="failed", http_status=api_error.status, error=api_error.message),
            )
            return errors.anthropic_response(api_error, request_id)

        headers = customer_headers(opened.response.headers)
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
                    upstream_request_id=opened.response.headers.get("request-id"),
                    error=opened.body[:500].decode("utf-8", "replace"),
                    ttfb_ms=opened.ttfb_ms,
                ),
            )
            if json_transform is not None:
                return await json_transform(opened.response.status_code, headers, opened.body)
            return Response(
                opened.body, status_code=opened.response.status_code, headers=dict(headers)
            )

        is_sse = opened.response.headers.get("content-type", "").startswith("text/event-stream")
        if is_sse:
            relay_stream = RelayStream(
                opened.response,
                headers,
                on_finish=lambda meter, end: self._finish_stream(billed, opened, meter, end),
                on_started=lambda meter: self._record_progress(billed, meter),
            )
            return stream_wrapper(relay_stream) if stream_wrapper is not None else relay_stream
        return await self._finish_json(billed, opened, headers, json_transform)

    async def _release_quietly(self, billed: Billed, outcome: Outcome) -> None:
        try:
            await self.release(billed, outcome)
        except Exception:
            log.exception(
                "releasing hold %s failed; reconciliation will release it", billed.request_id
            )

    async def _finish_json(
        self,
        billed: Billed,
        opened: Opened,
        headers: list[tuple[str, str]],
        json_transform: Callable[[int, list[tuple[str, str]], bytes], Awaitable[Response]] | None,
    ) -> Response:
        services = self.services
        outcome = Outcome(
            status="ok",
            http_status=opened.response.status_code,
            account_id=opened.account.id,
            attempts=opened.attempts,
            upstream_request_id=opened.response.headers.get("request-id"),
            ttfb_ms=opened.ttfb_ms,
        )
        try:
            content = await opened.response.aread()
        except Exception as exc:
            await opened.response.aclose()
            await services.scheduler.release(opened.lease)
            outcome.status = "upstream_error"
            outcome.error = f"{type(exc).__name__} while reading the upstream body"
            await self._release_quietly(billed, outcome)
            return errors.anthropic_response(
                errors.ApiError(502, "api_error", "The upstream connection failed."),
                billed.request_id,
            )
        finally:
            await opened.response.aclose()
        await services.scheduler.release(opened.lease)
        await services.scheduler.record_success(opened.account.id)
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
            return errors.anthropic_response(
                errors.ApiError(
                    500, "api_error", "The response could not be billed; it was not charged."
                ),
                billed.request_id,
            )
        headers.append(("x-poolrelay-cost-usd", format_usd(cost)))
        if json_transform is not None:
            return await json_transform(opened.response.status_code, headers, content)
        return Response(content, status_code=opened.response.status_code, headers=dict(headers))

    async def _record_progress(self, billed: Billed, meter: StreamMeter) -> None:
        """What a stream has used so far, for the reconciliation of a crashed process."""
        try:
            await self.services.redis.set(
                progress_key(billed.request_id),
                orjson.dumps({"model": meter.model, "usage": usage_dict(meter.usage)}),
                ex=PROGRESS_TTL,
            )
        except Exception:
            log.warning("could not record stream progress for %s", billed.request_id, exc_info=True)

    async def _finish_stream(
        self, billed: Billed, opened: Opened, meter: StreamMeter, end: StreamEnd
    ) -> None:
        services = self.services
        await services.scheduler.release(opened.lease)
        if end.status == "ok":
            await services.scheduler.record_success(opened.account.id)
        usage: Usage | None = None
        if meter.started:
            usage = meter.usage
            if not meter.stopped:
                # Partial stream: input and cache from message_start, output from the last
                # message_delta or, when larger, an estimate from the deltas relayed so far.
                usage = replace_output(usage, meter.estimated_output_tokens())
        outcome = Outcome(
            status=end.status,
            http_status=200,
            account_id=opened.account.id,
            attempts=opened.attempts,
            upstream_request_id=opened.response.headers.get("request-id"),
            error=end.error,
            ttfb_ms=opened.ttfb_ms,
        )
        await self.settle(billed, usage, meter.model, outcome)
        try:
            await services.redis.delete(progress_key(billed.request_id))
        except Exception:
            log.debug("progress key cleanup failed", exc_info=True)


def replace_output(usage: Usage, output_tokens: int) -> Usage:
    from dataclasses import replace

    return replace(usage, output_tokens=max(usage.output_tokens, output_tokens))


def usage_dict(usage: Usage) -> dict[str, Any]:
    return usage.to_api()
