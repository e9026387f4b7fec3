"""Admin API: model aliases (``PUT /admin/aliases/fast {"model": "claude-haiku-4-5"}``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app import errors
from app.admin.deps import Cursor, Limit, ServicesDep, SessionDep, page
from billing import aliases

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
    row = await aliases.put_alias(session, alias, body.model)
    services.aliases.invalidate()
    return aliases.alias_view(row)


@router.delete("/admin/aliases/{alias:path}")
async def delete_alias(alias: str, services: ServicesDep, session: SessionDep) -> dict[str, Any]:
    if not await aliases.delete_alias(session, alias):
        raise errors.not_found(f"alias {alias!r} not found")
    services.aliases.invalidate()
    return {"alias": alias, "deleted": True}
