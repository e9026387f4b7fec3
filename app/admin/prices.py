"""Admin API: prices (USD per million tokens as decimal strings)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from app.admin.deps import Cursor, Limit, ServicesDep, SessionDep, page
from app.oversight import audit
from billing import prices as price_repo
from billing.models import PriceRow

router = APIRouter(tags=["prices"])


@router.get("/admin/prices")
async def list_prices(
    session: SessionDep, limit: Limit = 100, cursor: Cursor = None
) -> dict[str, Any]:
    rows = [r for r in await price_repo.list_prices(session) if cursor is None or r.model > cursor]
    return page([price_repo.price_view(r) for r in rows[:limit]], limit, "model")


@router.put("/admin/prices/{model:path}")
async def put_price(
    model: str, services: ServicesDep, session: SessionDep, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    existing = await session.get(PriceRow, model)
    before = price_repo.price_view(existing) if existing is not None else None
    row = await price_repo.upsert_price(session, model, body)
    view = price_repo.price_view(row)
    await audit.record(session, "price.put", f"price:{row.model}", before=before, after=view)
    services.prices.invalidate()
    return view
