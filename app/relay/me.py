"""The customer's own records (``/v1/me/*`` beyond the balance): sessions and requests.

Every answer is scoped to the customer of the key that asks; another customer's request id is
answered exactly as an unknown one (404 ``not_found_error``), so ids cannot be probed. Errors are
Anthropic-shaped and carry the relay's request id, as every ``/v1/*`` answer the relay makes.
The request-log columns a customer sees leave out what describes the pool (accounts tried,
the upstream account) and the relay's internals (hold, instance, bodies).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app import errors
from app.errors import ApiError, to_api_error
from app.state import Services
from billing import sessions as sessions_repo
from billing import usage as usage_repo
from billing.customers import KeyContext
from billing.errors import BillingError
from billing.ids import new_id
from billing.models import RequestRecord, iso
from billing.money import format_usd

DEFAULT_LIMIT = 50
MAX_LIMIT = 100


def _json(data: Any, request_id: str) -> Response:
    return Response(
        orjson.dumps(data),
        headers=errors.relay_headers(request_id, 200, None),
        media_type="application/json",
    )


def parse_limit(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_LIMIT
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise errors.invalid_request(f"limit: must be an integer from 1 to {MAX_LIMIT}")
    return limit


def parse_cursor(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > 200:
        raise errors.invalid_request("cursor: is not a cursor this list returned")
    return value


def customer_request_view(row: RequestRecord) -> dict[str, Any]:
    """One request as its customer sees it: what it asked, how it ended, what it used and cost."""
    cache_write = row.cache_write_5m_tokens + row.cache_write_1h_tokens
    return {
        "request_id": row.id,
        "id": row.id,  # as in the admin request log
        "key_id": row.key_id,
        "endpoint": row.endpoint,
        "requested_model": row.requested_model,
        "model": row.model,
        "stream": row.stream,
        "status": row.status,
        "http_status": row.http_status,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cache_write_tokens": cache_write,
        "cache_write_5m_tokens": row.cache_write_5m_tokens,
        "cache_write_1h_tokens": row.cache_write_1h_tokens,
        "cache_read_tokens": row.cache_read_tokens,
        "cost_usd": format_usd(row.cost_micros),
        "session_id": row.session_id,
        "upstream_request_id": row.upstream_request_id,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "duration_ms": row.duration_ms,
    }


class SelfService:
    """``/v1/me/sessions``, ``/v1/me/requests`` and ``/v1/me/requests/{request_id}``."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def _auth(self, request: Request) -> KeyContext:
        return await self.services.keys.authenticate(request.headers)

    async def sessions(self, request: Request) -> Response:
        request_id = new_id("req")
        try:
            key = await self._auth(request)
            params = request.query_params
            cursor = parse_cursor(params.get("cursor"))
            query = sessions_repo.SessionQuery(
                customer_id=key.customer_id,
                start=usage_repo.parse_time(params.get("from"), "from"),
                end=usage_repo.parse_time(params.get("to"), "to", end=True),
                cursor=sessions_repo.Cursor.decode(cursor) if cursor else None,
                limit=parse_limit(params.get("limit")),
            )
            async with self.services.db.transaction() as session:
                page = await sessions_repo.list_sessions(session, query, with_customer=False)
        except (ApiError, BillingError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        return _json(page, request_id)

    async def requests(self, request: Request) -> Response:
        """This customer's requests, newest first (``?session_id=`` narrows to one session)."""
        request_id = new_id("req")
        try:
            key = await self._auth(request)
            params = request.query_params
            limit = parse_limit(params.get("limit"))
            query = usage_repo.UsageQuery(
                customer_id=key.customer_id,
                session_id=params.get("session_id") or None,
                start=usage_repo.parse_time(params.get("from"), "from"),
                end=usage_repo.parse_time(params.get("to"), "to", end=True),
            )
            async with self.services.db.transaction() as session:
                rows = await usage_repo.list_requests(
                    session,
                    query,
                    status=None,
                    before_id=parse_cursor(params.get("cursor")),
                    limit=limit,
                )
        except (ApiError, BillingError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        items = [customer_request_view(row) for row in rows]
        next_cursor = items[-1]["request_id"] if len(items) == limit else None
        return _json({"items": items, "next_cursor": next_cursor}, request_id)

    async def request(self, request: Request) -> Response:
        """One of this customer's requests; another customer's is as unknown as no request."""
        request_id = new_id("req")
        wanted = request.path_params["request_id"]
        try:
            key = await self._auth(request)
            row = None
            if len(wanted) <= 40:
                async with self.services.db.transaction() as session:
                    row = await usage_repo.get_request(session, wanted)
            if row is None or row.customer_id != key.customer_id:
                raise errors.not_found(f"request {wanted[:40]!r} not found")
        except (ApiError, BillingError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        return _json(customer_request_view(row), request_id)
