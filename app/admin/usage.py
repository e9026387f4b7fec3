"""Admin API: usage totals, sessions and the per-request log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from app import errors
from app.admin.deps import Cursor, Limit, ServicesDep, SessionDep
from billing import sessions as sessions_repo
from billing import usage as usage_repo

router = APIRouter(tags=["usage"])


@router.get("/admin/usage")
async def usage(request: Request, session: SessionDep) -> dict[str, Any]:
    query = usage_repo.UsageQuery.from_params(request.query_params)
    return await usage_repo.totals(session, query)


@router.get("/admin/requests")
async def requests(
    request: Request,
    services: ServicesDep,
    session: SessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    status: str | None = None,
) -> dict[str, Any]:
    query = usage_repo.UsageQuery.from_params(request.query_params, allowed_groups=())
    rows = await usage_repo.list_requests(
        session, query, status=status, before_id=cursor, limit=limit
    )
    with_bodies = services.settings.log_bodies
    items = [usage_repo.request_view(r, with_bodies=with_bodies) for r in rows]
    return {"items": items, "next_cursor": items[-1]["id"] if len(items) == limit else None}


@router.get("/admin/requests/{request_id}")
async def request_detail(
    request_id: str, services: ServicesDep, session: SessionDep
) -> dict[str, Any]:
    row = await usage_repo.get_request(session, request_id)
    if row is None:
        raise errors.not_found(f"request {request_id!r} not found")
    return usage_repo.request_view(row, with_bodies=services.settings.log_bodies)


@router.get("/admin/sessions")
async def sessions(
    session: SessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    customer_id: str | None = None,
    from_: Annotated[str | None, Query(alias="from")] = None,
    to: str | None = None,
) -> dict[str, Any]:
    """Sessions across customers (or one customer's), newest first by ``last_seen``."""
    query = sessions_repo.SessionQuery(
        customer_id=customer_id or None,
        start=usage_repo.parse_time(from_, "from"),
        end=usage_repo.parse_time(to, "to", end=True),
        cursor=sessions_repo.Cursor.decode(cursor) if cursor else None,
        limit=limit,
    )
    return await sessions_repo.list_sessions(session, query, with_customer=True)
