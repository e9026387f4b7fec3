"""Admin API: webhooks (``POST/GET /admin/webhooks``, ``DELETE /admin/webhooks/{id}``), every
try of their deliveries (``GET /admin/webhooks/{id}/deliveries``) and, for the dashboard, the
tries that failed across all webhooks (``GET /admin/webhook-deliveries?failed=true``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.admin.deps import Cursor, Limit, ServicesDep, SessionDep, page
from app.oversight import audit, webhooks

router = APIRouter(tags=["webhooks"])


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2000)
    events: list[str] = Field(min_length=1, max_length=20)
    secret: str | None = Field(default=None, min_length=16, max_length=200)


@router.post("/admin/webhooks", status_code=201)
async def create_webhook(
    body: WebhookCreate, services: ServicesDep, session: SessionDep
) -> dict[str, Any]:
    row, secret = await webhooks.create_webhook(
        session, services.cipher, body.url, body.events, body.secret
    )
    view = webhooks.webhook_view(row)
    await audit.record(session, "webhook.create", f"webhook:{row.id}", after=view)
    return {**view, "secret": secret}


@router.get("/admin/webhooks")
async def list_webhooks(
    session: SessionDep, limit: Limit = 50, cursor: Cursor = None
) -> dict[str, Any]:
    rows = await webhooks.list_webhooks(session, after_id=cursor, limit=limit)
    return page([webhooks.webhook_view(r) for r in rows], limit, "id")


@router.get("/admin/webhook-deliveries")
async def all_deliveries(
    session: SessionDep, limit: Limit = 50, cursor: Cursor = None, failed: bool = False
) -> dict[str, Any]:
    rows = await webhooks.attempts(
        session,
        before_id=audit.parse_cursor(cursor),
        limit=limit,
        failed_only=failed,
    )
    items = [{**webhooks.attempt_view(r), "webhook_id": r.webhook_id} for r in rows]
    return page(items, limit, "id")


@router.get("/admin/webhooks/{webhook_id}")
async def get_webhook(webhook_id: str, session: SessionDep) -> dict[str, Any]:
    return webhooks.webhook_view(await webhooks.get_webhook(session, webhook_id))


@router.delete("/admin/webhooks/{webhook_id}")
async def delete_webhook(webhook_id: str, session: SessionDep) -> dict[str, Any]:
    before = webhooks.webhook_view(await webhooks.get_webhook(session, webhook_id))
    view = webhooks.webhook_view(await webhooks.delete_webhook(session, webhook_id))
    await audit.record(
        session, "webhook.delete", f"webhook:{webhook_id}", before=before, after=view
    )
    return view


@router.get("/admin/webhooks/{webhook_id}/deliveries")
async def deliveries(
    webhook_id: str, session: SessionDep, limit: Limit = 50, cursor: Cursor = None
) -> dict[str, Any]:
    """Every try, newest first: event id and type, try number, status code, error, time."""
    await webhooks.get_webhook(session, webhook_id)
    rows = await webhooks.attempts(
        session, webhook_id=webhook_id, before_id=audit.parse_cursor(cursor), limit=limit
    )
    return page([webhooks.attempt_view(r) for r in rows], limit, "id")
