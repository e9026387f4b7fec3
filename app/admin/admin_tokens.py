"""Admin API: admin tokens (``GET/POST /admin/admin-tokens``, ``DELETE /admin/admin-tokens/{id}``).

The same service as ``poolrelay admin-tokens``; the token is in the create response only."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.admin.deps import Cursor, Limit, SessionDep, page
from app.oversight import audit
from app.oversight import tokens as admin_tokens

router = APIRouter(tags=["admin tokens"])


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["admin", "readonly"]
    name: str | None = Field(default=None, min_length=1, max_length=200)


@router.get("/admin/admin-tokens")
async def list_tokens(
    session: SessionDep, limit: Limit = 50, cursor: Cursor = None
) -> dict[str, Any]:
    rows = await admin_tokens.list_tokens(session, after_id=cursor, limit=limit)
    return page([admin_tokens.token_view(r) for r in rows], limit, "id")


@router.post("/admin/admin-tokens", status_code=201)
async def create_token(body: TokenCreate, session: SessionDep) -> dict[str, Any]:
    row, plaintext = await admin_tokens.create_token(session, body.role, body.name)
    view = admin_tokens.token_view(row)
    await audit.record(session, "admin_token.create", f"admin_token:{row.id}", after=view)
    return {**view, "token": plaintext}


@router.delete("/admin/admin-tokens/{token_id}")
async def revoke_token(token_id: str, session: SessionDep) -> dict[str, Any]:
    before = admin_tokens.token_view(await admin_tokens.find_token(session, token_id))
    row = await admin_tokens.revoke_token(session, token_id)
    view = admin_tokens.token_view(row)
    await audit.record(
        session, "admin_token.revoke", f"admin_token:{row.id}", before=before, after=view
    )
    return view
