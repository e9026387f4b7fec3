"""Admin API: the pool's accounts (never a credential) and operator control."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter

from app.admin.deps import Cursor, Limit, ServicesDep, SessionDep, page
from app.oversight import audit
from app.state import Services
from billing.models import iso
from pool import accounts as account_repo
from pool.models import UpstreamAccount

router = APIRouter(tags=["accounts"])


def _iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None


async def account_views(services: Services, rows: list[UpstreamAccount]) -> list[dict[str, Any]]:
    """DB rows joined with the live pool state in Redis."""
    now = time.time()
    states = await services.scheduler.states([r.id for r in rows], now)
    views = []
    for row in rows:
        state = states.get(row.id)
        status = row.status
        reason: str | None = None
        until: str | None = None
        if status == "active" and state is not None and state.quarantined:
            status = "quarantined"
            reason = state.reason
            until = _iso(state.until)
        headroom = {}
        if state is not None:
            for family, fam in state.headroom.items():
                headroom[family] = {
                    "limit": fam.limit,
                    "remaining": fam.remaining,
                    "reset": _iso(fam.reset),
                }
        views.append(
            {
                "id": row.id,
                "name": row.name,
                "group": row.group,
                "base_url": row.base_url,
                "models": row.models,
                "max_concurrency": row.max_concurrency,
                "weight": row.weight,
                "status": status,
                "quarantine_reason": reason,
                "quarantined_until": until,
                "backoff_until": _iso(state.backoff_until) if state is not None else None,
                "in_flight": state.in_flight if state is not None else 0,
                "headroom": headroom,
                "score": state.score if state is not None else None,
                "last_error": (
                    state.last_error if state is not None and state.last_error else row.last_error
                ),
                "fingerprint": row.fingerprint,
                "created_at": iso(row.created_at),
            }
        )
    return views


@router.get("/admin/accounts")
async def list_accounts(
    services: ServicesDep, session: SessionDep, limit: Limit = 50, cursor: Cursor = None
) -> dict[str, Any]:
    rows = [
        r for r in await account_repo.list_accounts(session) if cursor is None or r.name > cursor
    ]
    return page(await account_views(services, rows[:limit]), limit, "name")


@router.get("/admin/accounts/{account_id}")
async def get_account(
    account_id: str, services: ServicesDep, session: SessionDep
) -> dict[str, Any]:
    row = await account_repo.find_account(session, account_id)
    return (await account_views(services, [row]))[0]


@router.post("/admin/accounts/{account_id}/enable")
async def enable(account_id: str, services: ServicesDep, session: SessionDep) -> dict[str, Any]:
    before = audit.account_view(await account_repo.find_account(session, account_id))
    row = await account_repo.set_status(session, account_id, "active")
    after = audit.account_view(row)
    await audit.record(session, "account.enable", f"account:{row.id}", before=before, after=after)
    await services.scheduler.clear_quarantine(row.id)
    services.directory.invalidate()
    return (await account_views(services, [row]))[0]


@router.post("/admin/accounts/{account_id}/disable")
async def disable(account_id: str, services: ServicesDep, session: SessionDep) -> dict[str, Any]:
    before = audit.account_view(await account_repo.find_account(session, account_id))
    row = await account_repo.set_status(session, account_id, "disabled")
    after = audit.account_view(row)
    await audit.record(session, "account.disable", f"account:{row.id}", before=before, after=after)
    services.directory.invalidate()
    return (await account_views(services, [row]))[0]
