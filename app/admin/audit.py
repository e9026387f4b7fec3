"""Admin API: the audit log (``GET /admin/audit``), newest first; append-only (no writes)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.admin.deps import Cursor, Limit, SessionDep, page
from app.oversight import audit

router = APIRouter(tags=["audit"])

Filter = Annotated[str | None, Query(max_length=200)]


@router.get("/admin/audit")
async def list_audit(
    session: SessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    actor: Filter = None,
    action: Filter = None,
) -> dict[str, Any]:
    rows = await audit.entries(
        session,
        before_id=audit.parse_cursor(cursor),
        limit=limit,
        actor=actor,
        action=action,
    )
    return page([audit.entry_view(r) for r in rows], limit, "id")
