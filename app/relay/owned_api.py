"""What the Batches and Files endpoints share: the relay's own URL, list pages over the
customer's own objects, calls to the owning account (:class:`OwnedApi`), and streaming an
answer through.

A customer's list is the relay's (its objects may live on several accounts): newest first by
creation, paged as Anthropic pages (``limit`` 1–1000, default 20, ``after_id``, ``before_id``;
``data``, ``has_more``, ``first_id``, ``last_id``). An id the customer does not own is a 404
``not_found_error``, the same answer as an unknown id, given by the relay without a call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import SQLModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app import errors
from app.errors import ApiError, to_api_error
from app.owned import owning_account, send_to_owner
from app.state import Services
from billing.customers import KeyContext
from billing.errors import BillingError
from billing.ids import new_id
from billing.owned import MessageBatch, UpstreamFile
from pool.accounts import LiveAccount
from pool.errors import PoolError
from pool.upstream import TRANSPORT_ERRORS, UpstreamResponse, customer_headers

T = TypeVar("T", bound=SQLModel)
OwnedT = TypeVar("OwnedT", MessageBatch, UpstreamFile)


def relay_base(request: Request) -> str:
    """The relay's own URL as the customer reached it (``results_url`` must name the relay:
    the SDK follows it with the customer's key). Behind a proxy, its ``x-forwarded-proto`` and
    ``x-forwarded-host`` say how (they only shape this customer's own answer)."""
    base = str(request.base_url).rstrip("/")
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    host = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
    if proto not in ("http", "https") and not host:
        return base
    scheme, _, rest = base.partition("://")
    netloc, slash, path = rest.partition("/")
    if proto in ("http", "https"):
        scheme = proto
    if host and "/" not in host and " " not in host:
        netloc = host
    return f"{scheme}://{netloc}{slash}{path}".rstrip("/")


def page_params(params: Mapping[str, str]) -> tuple[int, str | None, str | None]:
    raw = params.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if not 1 <= limit <= 1000:
        raise errors.invalid_request("limit: Input should be between 1 and 1000")
    after_id, before_id = params.get("after_id") or None, params.get("before_id") or None
    if after_id and before_id:
        raise errors.invalid_request("after_id and before_id cannot both be given")
    return limit, after_id, before_id


async def owned_page(
    session: AsyncSession, model: type[T], customer_id: str, params: Mapping[str, str]
) -> tuple[list[T], bool]:
    """One page of the customer's live objects (``deleted_at`` null), newest first, and
    whether there are more in the direction paged."""
    limit, after_id, before_id = page_params(params)
    table = model.__table__  # type: ignore[attr-defined]
    mine = [table.c.customer_id == customer_id, table.c.deleted_at.is_(None)]
    key = sa.tuple_(table.c.created_at, table.c.id)
    stmt = sa.select(model).where(*mine)
    pivot_id = after_id or before_id
    if pivot_id is not None:
        pivot = (
            await session.execute(
                sa.select(table.c.created_at, table.c.id).where(*mine, table.c.id == pivot_id)
            )
        ).first()
        if pivot is None:
            name = "after_id" if after_id else "before_id"
            raise errors.invalid_request(f"{name}: no object with id {pivot_id!r}")
        bound = sa.tuple_(sa.literal(pivot.created_at), sa.literal(pivot.id))
        stmt = stmt.where(key < bound) if after_id else stmt.where(key > bound)
    if before_id:
        stmt = stmt.order_by(table.c.created_at.asc(), table.c.id.asc())
    else:
        stmt = stmt.order_by(table.c.created_at.desc(), table.c.id.desc())
    rows = list((await session.execute(stmt.limit(limit + 1))).scalars())
    has_more = len(rows) > limit
    rows = rows[:limit]
    if before_id:
        rows.reverse()
    return rows, has_more


def page_body(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


async def owner_of(services: Services, account_id: str, what: str) -> LiveAccount:
    account = await owning_account(services, account_id)
    if account is None:
        raise errors.overloaded(
            f"The upstream account that holds this {what} is no longer available."
        )
    return account


async def call_owner(
    services: Services,
    account: LiveAccount,
    request: Request,
    method: str,
    path: str,
) -> UpstreamResponse:
    """Forward a customer's call to the owning account (headers and query pass as on the
    Messages path; the account's credential replaces the customer's)."""
    try:
        return await send_to_owner(
            services,
            account,
            method,
            path,
            query=request.url.query,
            headers=request.headers.items(),
        )
    except TRANSPORT_ERRORS:
        raise errors.overloaded(
            "The upstream account that holds this object did not answer; retry shortly."
        ) from None


async def read_answer(upstream: UpstreamResponse) -> bytes:
    try:
        return await upstream.aread()
    finally:
        await upstream.aclose()


def answer(
    upstream: UpstreamResponse, content: bytes, request_id: str, data: Any = None
) -> Response:
    """The upstream's answer for the customer (``data``: a rewritten JSON body)."""
    headers = dict(customer_headers(upstream.headers))
    headers["x-poolrelay-request-id"] = request_id
    if data is not None:
        content = orjson.dumps(data)
        headers["content-type"] = "application/json"
    return Response(content, status_code=upstream.status_code, headers=headers)


def json_of(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


class PassThrough(Response):
    """An upstream body streamed to the customer as it arrives (batch results, file
    content: never held whole). A client that leaves closes the upstream connection."""

    def __init__(self, upstream: UpstreamResponse, request_id: str) -> None:
        self.status_code = upstream.status_code
        self.background = None
        self.body = b""
        headers = customer_headers(upstream.headers)
        headers.append(("x-poolrelay-request-id", request_id))
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def client_left() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.create_task(client_left())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self.upstream.aiter_raw():
                if watcher.done():
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
            await self.upstream.aclose()


async def stream_answer(upstream: UpstreamResponse, request_id: str) -> Response:
    """A 200 streamed through as it arrives (batch results, file content); anything else read
    and answered whole."""
    if upstream.status_code != 200:
        return answer(upstream, await read_answer(upstream), request_id)
    return PassThrough(upstream, request_id)


@dataclass(frozen=True)
class Forwarded(Generic[OwnedT]):
    request_id: str
    found: OwnedT
    upstream: UpstreamResponse


class OwnedApi(Generic[OwnedT]):
    """A customer's calls on one kind of object that lives on an upstream account: the
    object must be the customer's own (else 404, as an unknown id) and the call goes to its
    account."""

    model: ClassVar[type[Any]]
    id_param: ClassVar[str]  # the route's path parameter
    path: ClassVar[str]  # the upstream collection: the object is ``{path}/{id}``
    noun: ClassVar[str]  # "<noun> not found: {id}"
    what: ClassVar[str]  # "the upstream account that holds this <what>"
    services: Services

    async def _own(self, key: KeyContext, object_id: str) -> OwnedT:
        async with self.services.db.transaction() as session:
            found: OwnedT | None = await session.get(self.model, object_id)
        if found is None or found.customer_id != key.customer_id or found.deleted_at is not None:
            raise errors.not_found(f"{self.noun} not found: {object_id}")
        return found

    async def _forward(
        self, request: Request, method: str, suffix: str = ""
    ) -> Forwarded[OwnedT] | Response:
        """The customer's call on its object, sent to the object's account (or the error
        answer: unauthenticated, not the customer's, account gone or silent)."""
        request_id = new_id("req")
        try:
            key = await self.services.keys.authenticate(request.headers)
            found = await self._own(key, request.path_params[self.id_param])
            account = await owner_of(self.services, found.account_id, self.what)
            upstream = await call_owner(
                self.services, account, request, method, f"{self.path}/{found.id}{suffix}"
            )
        except (ApiError, BillingError, PoolError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        return Forwarded(request_id, found, upstream)
