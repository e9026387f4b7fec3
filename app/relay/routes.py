"""The customer API (``/v1/*``) as plain Starlette routes (no per-request FastAPI overhead)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app import errors
from app.errors import ApiError, to_api_error
from app.owned import file_pin
from app.relay.batches import BatchApi
from app.relay.edges import OpenAIEdge, parse_json_object
from app.relay.files import FileApi
from app.relay.forward import Trace, open_upstream, read_and_release
from app.relay.me import SelfService
from app.relay.models import ModelCatalog
from app.relay.openai import is_openai_client, models_to_openai
from app.relay.queueing import Turn
from app.relay.service import Relay, check_model_allowed, check_model_id, read_body
from app.state import Services
from billing import usage as usage_repo
from billing.customers import KeyContext, get_customer
from billing.errors import BillingError
from billing.holds import Outcome
from billing.ids import new_id
from billing.models import iso
from billing.money import format_usd
from billing.request_log import Entry
from pool.affinity import session_id
from pool.errors import PoolError
from pool.upstream import customer_headers

log = logging.getLogger("poolrelay.api")


def json_response(
    data: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
    *,
    request_id: str | None = None,
) -> Response:
    """A JSON answer; one the relay makes itself for a customer carries its request id."""
    if request_id is not None:
        headers = errors.relay_headers(request_id, status, headers)
    return Response(
        orjson.dumps(data), status_code=status, headers=headers, media_type="application/json"
    )


class CustomerApi:
    def __init__(self, services: Services, relay: Relay) -> None:
        self.services = services
        self.relay = relay
        self.catalog = ModelCatalog(services)
        self.mine = SelfService(services)
        self.batches = BatchApi(services, relay)
        self.files = FileApi(services)

    async def _auth(self, request: Request) -> KeyContext:
        return await self.services.keys.authenticate(request.headers)

    async def messages(self, request: Request) -> Any:
        return await self.relay.messages(request)

    async def chat_completions(self, request: Request) -> Any:
        return await self.relay.handle(request, OpenAIEdge())

    async def count_tokens(self, request: Request) -> Response:
        """Relayed to an account and free: a request-log row at cost 0, nothing held."""
        request_id = new_id("req")
        started = time.monotonic()
        key: KeyContext | None = None
        model: str | None = None
        body: dict[str, Any] | None = None
        trace = Trace()
        try:
            key = await self._auth(request)
            settings = self.services.settings
            raw = await read_body(request, settings.max_body_bytes, settings.client_body_timeout)
            body = parse_json_object(raw)
            found = body.get("model")
            model = found if isinstance(found, str) else None
            model = check_model_id(found)
            if not isinstance(body.get("messages"), list):
                raise errors.invalid_request("messages: Field required (a list of messages)")
            check_model_allowed(key, model)
            only = await file_pin(self.services, key.customer_id, [body], raw)
            opened = await open_upstream(
                self.services,
                method="POST",
                path="/v1/messages/count_tokens",
                query=request.url.query,
                headers=request.headers.items(),
                content=raw,
                model=model,
                expected_tokens=0,
                affinity=None,
                started=started,
                trace=trace,
                queue=Turn(self.services),  # waits for the pool's caps too
                only=only,
            )
        except (ApiError, BillingError, PoolError) as exc:
            err = to_api_error(exc)
            if key is not None:
                await self._log_free(
                    request_id,
                    key,
                    "count_tokens",
                    model,
                    started,
                    Outcome(
                        status="refused" if not trace.attempts else "failed",
                        http_status=err.status,
                        error=err.message,
                        attempts=trace.attempts,
                        accounts_tried=trace.accounts,
                        account_id=trace.accounts[-1] if trace.accounts else None,
                    ),
                    session_id(request.headers, body),
                )
            return errors.anthropic_response(err, request_id)
        content = await read_and_release(self.services, opened)
        status = opened.response.status_code
        await self._log_free(
            request_id,
            key,
            "count_tokens",
            model,
            started,
            Outcome(
                status="ok" if status < 400 else "rejected",
                http_status=status,
                account_id=opened.account.id,
                attempts=opened.attempts,
                accounts_tried=opened.trace.accounts,
                upstream_request_id=opened.response.headers.get("request-id"),
                error=content[:500].decode("utf-8", "replace") if status >= 400 else None,
                ttfb_ms=opened.ttfb_ms,
            ),
            session_id(request.headers, body),
        )
        headers = dict(customer_headers(opened.response.headers))
        headers["x-poolrelay-request-id"] = request_id
        return Response(content, status_code=status, headers=headers)

    async def _log_free(
        self,
        request_id: str,
        key: KeyContext,
        endpoint: str,
        model: str | None,
        started: float,
        outcome: Outcome,
        session: str | None,
    ) -> None:
        outcome.duration_ms = int((time.monotonic() - started) * 1000)
        await self.relay.record_unbilled(
            Entry(
                request_id=request_id,
                customer_id=key.customer_id,
                key_id=key.key_id,
                endpoint=endpoint,
                requested_model=model,
                instance_id=self.services.instance_id,
                session_id=session,
                outcome=outcome,
            )
        )

    async def list_models(self, request: Request) -> Response:
        request_id = new_id("req")
        openai = is_openai_client(request.headers)
        try:
            key = await self._auth(request)
            models = await self.catalog.for_key(key)
        except (ApiError, BillingError, PoolError) as exc:
            return errors.error_response(to_api_error(exc), request_id, openai=openai)
        if openai:
            return json_response(models_to_openai(models), request_id=request_id)
        return json_response(ModelCatalog.page(models, request.query_params), request_id=request_id)

    async def get_model(self, request: Request) -> Response:
        """One model by id or alias (``claude-haiku-4-5`` answers with the dated model it
        resolves to, as Anthropic does); a model the key may not use is not found."""
        request_id = new_id("req")
        openai = is_openai_client(request.headers)
        model_id = request.path_params["model_id"]
        try:
            key = await self._auth(request)
            models = await self.catalog.for_key(key)
            aliases = await self.services.aliases.get()
        except (ApiError, BillingError, PoolError) as exc:
            return errors.error_response(to_api_error(exc), request_id, openai=openai)
        model = ModelCatalog.resolve(models, aliases.get(model_id, model_id))
        if model is None:
            err = errors.not_found(f"model: {model_id}")
            return errors.error_response(err, request_id, openai=openai)
        if openai:
            return json_response(models_to_openai([model])["data"][0], request_id=request_id)
        return json_response(model, request_id=request_id)

    async def me(self, request: Request) -> Response:
        request_id = new_id("req")
        try:
            key = await self._auth(request)
            async with self.services.db.transaction() as session:
                customer = await get_customer(session, key.customer_id)
        except (ApiError, BillingError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        policy = key.policy
        return json_response(
            {
                "customer": {"id": customer.id, "name": customer.name, "status": customer.status},
                "key": {"id": key.key_id},
                "balance_usd": format_usd(customer.balance_micros),
                "held_usd": format_usd(customer.held_micros),
                "available_usd": format_usd(customer.balance_micros - customer.held_micros),
                "price_multiplier": customer.price_multiplier,
                "limits": {
                    "rpm": policy.rpm,
                    "tpm": policy.tpm,
                    "max_concurrency": policy.max_concurrency,
                    "daily_budget_usd": _usd_or_none(policy.daily_budget_micros),
                    "monthly_budget_usd": _usd_or_none(policy.monthly_budget_micros),
                    "budget_action": policy.budget_action,
                    "allowed_models": list(policy.allowed_models)
                    if policy.allowed_models is not None
                    else None,
                    "expires_at": iso(policy.expires_at),
                },
            },
            request_id=request_id,
        )

    async def me_usage(self, request: Request) -> Response:
        request_id = new_id("req")
        try:
            key = await self._auth(request)
            query = usage_repo.UsageQuery.from_params(
                request.query_params, allowed_groups=("model", "day", "key", "session", "batch")
            )
            query.customer_id = key.customer_id
            query.account_id = None  # the pool's accounts are not the customer's business
            async with self.services.db.transaction() as session:
                result = await usage_repo.totals(session, query)
        except (ApiError, BillingError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        return json_response(result, request_id=request_id)

    async def me_sessions(self, request: Request) -> Response:
        return await self.mine.sessions(request)

    async def me_requests(self, request: Request) -> Response:
        return await self.mine.requests(request)

    async def me_request(self, request: Request) -> Response:
        return await self.mine.request(request)

    async def probe(self, request: Request) -> Response:
        if request.method == "HEAD":
            return Response(status_code=200)
        return json_response({"name": "poolrelay", "ok": True})

    async def not_found(self, request: Request) -> Response:
        return errors.error_response(
            errors.not_found(f"Not found: {request.method} {request.url.path}"),
            openai=is_openai_client(request.headers),
        )


ROUTES: list[tuple[str, str, list[str]]] = [
    ("/v1/messages", "messages", ["POST"]),
    ("/v1/messages/count_tokens", "count_tokens", ["POST"]),
    ("/v1/chat/completions", "chat_completions", ["POST"]),
    ("/v1/models", "list_models", ["GET"]),
    ("/v1/models/{model_id:path}", "get_model", ["GET"]),
    ("/v1/me", "me", ["GET"]),
    ("/v1/me/usage", "me_usage", ["GET"]),
    ("/v1/me/sessions", "me_sessions", ["GET"]),
    ("/v1/me/requests", "me_requests", ["GET"]),
    ("/v1/me/requests/{request_id}", "me_request", ["GET"]),
    ("/v1/messages/batches", "batches.create", ["POST"]),
    ("/v1/messages/batches", "batches.list_batches", ["GET"]),
    ("/v1/messages/batches/{batch_id}", "batches.retrieve", ["GET"]),
    ("/v1/messages/batches/{batch_id}", "batches.delete", ["DELETE"]),
    ("/v1/messages/batches/{batch_id}/cancel", "batches.cancel", ["POST"]),
    ("/v1/messages/batches/{batch_id}/results", "batches.results", ["GET"]),
    ("/v1/files", "files.upload", ["POST"]),
    ("/v1/files", "files.list_files", ["GET"]),
    ("/v1/files/{file_id}", "files.metadata", ["GET"]),
    ("/v1/files/{file_id}", "files.delete", ["DELETE"]),
    ("/v1/files/{file_id}/content", "files.content", ["GET"]),
    ("/", "probe", ["GET", "HEAD"]),
    ("/api/hello", "probe", ["GET", "HEAD"]),
    ("/v1/{rest:path}", "not_found", ["GET", "POST", "PUT", "PATCH", "DELETE"]),
]


def customer_routes() -> list[BaseRoute]:
    """Routes bound to ``app.state.customer_api`` (built in the lifespan)."""

    def bind(name: str) -> Callable[[Request], Awaitable[Any]]:
        async def endpoint(request: Request) -> Any:
            try:
                target: Any = request.app.state.customer_api
                for part in name.split("."):  # "batches.create": CustomerApi.batches.create
                    target = getattr(target, part)
                return await target(request)
            except Exception:
                log.exception("unexpected error on %s %s", request.method, request.url.path)
                return errors.error_response(
                    errors.ApiError(500, "api_error", "Internal server error"),
                    openai=is_openai_client(request.headers),
                )

        endpoint.__name__ = name.replace(".", "_")
        return endpoint

    return [
        Route(path, bind(name), methods=methods, include_in_schema=False)
        for path, name, methods in ROUTES
    ]


def _usd_or_none(micros: int | None) -> str | None:
    return format_usd(micros) if micros is not None else None
