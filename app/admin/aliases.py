"""Admin API: model aliases (``PUT /admin/aliases/fast {"model": "claude-haiku-4-5"}``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app import errors
from app.admin.deps import Cursor, Limit, ServicesDep, SessionDep, page
from app.oversight import audit
from billing import aliases
from billing.models import ModelAlias

router = APIRouter(tags=["aliases"])


class AliasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)


@router.get("/admin/aliases")
async def list_aliases(
    session: SessionDep, limit: Limit = 100, cursor: Cursor = None
) -> dict[str, Any]:
    rows = [r for r in await aliases.list_aliases(session) if cursor is None or r.alias > cursor]
    return page([aliases.alias_view(r) for r in rows[:limit]], limit, "alias")


@router.put("/admin/aliases/{alias:path}")
async def put_alias(
    alias: str, body: AliasBody, services: ServicesDep, session: SessionDep
) -> dict[str, Any]:
    existing = await session.get(ModelAlias, alias)
    before = aliases.alias_view(existing) if existing is not None else None
    row = await aliases.put_alias(session, alias, body.model)
    view = aliases.alias_view(row)
    await audit.record(session, "alias.put", f"alias:{row.alias}", before=before, after=view)
    services.aliases.invalidate()
    return view


@router.delete("/admin/aliases/{alias:path}")
async def delete_alias(alias: str, services: ServicesDep, session: SessionDep) -> dict[str, Any]:
    existing = await session.get(ModelAlias, alias)
    before = aliases.alias_view(existing) if existing is not None else None
    if not await aliases.delete_alias(session, alias):
        raise errors.not_found(f"alias {alias!r} not found")
    await audit.record(session, "alias.delete", f"alias:{alias}", before=before)
    services.aliases.invalidate()
    return {"alias": alias, "deleted": True}
