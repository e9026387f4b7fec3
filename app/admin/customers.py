"""Admin API: customers, their keys, top-ups, adjustments and the ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from app.admin.deps import (
    Cursor,
    Limit,
    SessionDep,
    customer_view,
    entry_view,
    key_view,
    page,
)
from app.oversight import audit
from billing import customers as customer_svc
from billing import ledger
from billing.customers import KeyPolicy
from billing.errors import InvalidField
from billing.models import CustomerKey
from billing.money import format_usd, parse_usd

router = APIRouter(tags=["customers"])

# Money arrives as a decimal string; JSON numbers are accepted, JSON booleans are not.
Number = StrictStr | StrictInt | StrictFloat


def _decimal_text(value: Number) -> str:
    """Money arrives as a decimal string; a JSON number is read by its shortest decimal form."""
    if isinstance(value, bool):
        raise InvalidField("amount_usd", "must be a decimal string")
    if isinstance(value, float):
        return repr(value)
    return str(value)


class CustomerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    price_multiplier: Number | None = None


class CustomerPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=200)
    status: str | None = None
    price_multiplier: Number | None = None
    low_balance_usd: Number | None = None
    """``customer.balance_low`` fires below this; ``null`` turns it off."""


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="default", min_length=1, max_length=200)
    rpm: int | None = Field(default=None, ge=1, le=1_000_000)
    tpm: int | None = Field(default=None, ge=1, le=1_000_000_000)
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    daily_budget_usd: Number | None = None
    monthly_budget_usd: Number | None = None
    budget_action: str = "block"
    downgrade_model: str | None = Field(default=None, max_length=200)
    allowed_models: list[str] | None = None
    expires_at: datetime | None = None
    route_small_to: str | None = Field(default=None, max_length=200)
    route_small_max_input_tokens: int | None = Field(default=None, ge=1, le=10_000_000)


class MoneyMove(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount_usd: Number
    memo: str | None = Field(default=None, max_length=500)


def _budget(value: Number | None, field: str) -> int | None:
    if value is None:
        return None
    return parse_usd(_decimal_text(value), field=field)


@router.post("/admin/customers", status_code=201)
async def create_customer(body: CustomerCreate, session: SessionDep) -> dict[str, Any]:
    multiplier = _decimal_text(body.price_multiplier) if body.price_multiplier is not None else "1"
    customer = await customer_svc.create_customer(session, body.name, multiplier)
    view = customer_view(customer)
    await audit.record(session, "customer.create", f"customer:{customer.id}", after=view)
    return view


@router.get("/admin/customers")
async def list_customers(
    session: SessionDep, limit: Limit = 50, cursor: Cursor = None
) -> dict[str, Any]:
    rows = await customer_svc.list_customers(session, after_id=cursor, limit=limit)
    return page([customer_view(c) for c in rows], limit, "id")


@router.get("/admin/customers/{customer_id}")
async def get_customer(customer_id: str, session: SessionDep) -> dict[str, Any]:
    return customer_view(await customer_svc.get_customer(session, customer_id))


@router.patch("/admin/customers/{customer_id}")
async def patch_customer(
    customer_id: str, body: CustomerPatch, session: SessionDep
) -> dict[str, Any]:
    before = customer_view(await customer_svc.get_customer(session, customer_id))
    customer = await customer_svc.update_customer(
        session,
        customer_id,
        name=body.name,
        status=body.status,
        price_multiplier=_decimal_text(body.price_multiplier)
        if body.price_multiplier is not None
        else None,
    )
    if "low_balance_usd" in body.model_fields_set:
        customer = await customer_svc.set_low_balance(
            session, customer_id, _budget(body.low_balance_usd, "low_balance_usd")
        )
    view = customer_view(customer)
    await audit.record(
        session, "customer.update", f"customer:{customer_id}", before=before, after=view
    )
    return view


@router.post("/admin/customers/{customer_id}/keys", status_code=201)
async def create_key(customer_id: str, body: KeyCreate, session: SessionDep) -> dict[str, Any]:
    if body.allowed_models is not None and any(not m.strip() for m in body.allowed_models):
        raise InvalidField("allowed_models", "must be a list of model ids or patterns")
    expires = body.expires_at
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    policy = KeyPolicy(
        rpm=body.rpm,
        tpm=body.tpm,
        max_concurrency=body.max_concurrency,
        daily_budget_micros=_budget(body.daily_budget_usd, "daily_budget_usd"),
        monthly_budget_micros=_budget(body.monthly_budget_usd, "monthly_budget_usd"),
        budget_action=body.budget_action,
        downgrade_model=body.downgrade_model,
        allowed_models=body.allowed_models,
        expires_at=expires,
        route_small_to=body.route_small_to,
        route_small_max_input_tokens=body.route_small_max_input_tokens,
    )
    row, plaintext = await customer_svc.create_key(session, customer_id, body.name, policy)
    view = key_view(row)
    await audit.record(session, "key.create", f"key:{row.id}", after=view)
    return {**view, "key": plaintext}


@router.get("/admin/customers/{customer_id}/keys")
async def list_keys(
    customer_id: str, session: SessionDep, limit: Limit = 50, cursor: Cursor = None
) -> dict[str, Any]:
    rows = await customer_svc.list_keys(session, customer_id, after_id=cursor, limit=limit)
    return page([key_view(k) for k in rows], limit, "id")


@router.delete("/admin/keys/{key_id}")
async def revoke_key(key_id: str, session: SessionDep) -> dict[str, Any]:
    existing = await session.get(CustomerKey, key_id)
    before = key_view(existing) if existing is not None else None
    view = key_view(await customer_svc.revoke_key(session, key_id))
    await audit.record(session, "key.revoke", f"key:{key_id}", before=before, after=view)
    return view


IdempotencyKey = Annotated[str | None, Header(max_length=200)]


async def _move_money(
    session: SessionDep,
    customer_id: str,
    kind: str,
    body: MoneyMove,
    key: str | None,
    response: Response,
) -> dict[str, Any]:
    """A top-up or an adjustment: one ledger entry, at most once per ``Idempotency-Key``."""
    customer = await customer_svc.get_customer(session, customer_id)
    balance_before = format_usd(customer.balance_micros)
    if kind == "adjustment" and (not body.memo or not body.memo.strip()):
        raise InvalidField("memo", "an adjustment needs a memo saying why")
    amount = parse_usd(
        _decimal_text(body.amount_usd), field="amount_usd", allow_negative=kind == "adjustment"
    )
    entry, created = await ledger.credit(
        session, customer_id, kind, amount, memo=body.memo, idempotency_key=key
    )
    view = entry_view(entry)
    if not created:
        response.headers["idempotent-replayed"] = "true"
    else:  # a replay writes nothing, and so records nothing
        await audit.record(
            session,
            f"{kind}.create",
            f"customer:{customer_id}",
            before={"balance_usd": balance_before},
            after=view,
        )
    return view


@router.post("/admin/customers/{customer_id}/topups", status_code=201)
async def topup(
    customer_id: str,
    body: MoneyMove,
    session: SessionDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    return await _move_money(session, customer_id, "topup", body, idempotency_key, response)


@router.post("/admin/customers/{customer_id}/adjustments", status_code=201)
async def adjustment(
    customer_id: str,
    body: MoneyMove,
    session: SessionDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    return await _move_money(session, customer_id, "adjustment", body, idempotency_key, response)


@router.get("/admin/customers/{customer_id}/ledger")
async def customer_ledger(
    customer_id: str, session: SessionDep, limit: Limit = 50, cursor: Cursor = None
) -> dict[str, Any]:
    await customer_svc.get_customer(session, customer_id)
    try:
        before = int(cursor) if cursor else None
    except ValueError:
        raise InvalidField("cursor", "is not a cursor this API returned") from None
    if before is not None and not 0 < before < 2**63:
        raise InvalidField("cursor", "is not a cursor this API returned")
    rows = await ledger.entries(session, customer_id, before_id=before, limit=limit)
    return page([entry_view(e) for e in rows], limit, "id")
