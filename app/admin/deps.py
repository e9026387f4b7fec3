"""Shared pieces of the admin API: dependencies, pagination and the JSON views."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors
from app.auth import admin_token_from
from app.oversight import audit
from app.oversight import tokens as admin_tokens
from app.oversight.tokens import Principal
from app.state import Services
from billing.customers import multiplier_of
from billing.ledger import Entry
from billing.models import Customer, CustomerKey, iso
from billing.money import format_multiplier, format_usd


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_session(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    """One transaction per admin request: services flush, this commits."""
    async with services.db.transaction() as session:
        yield session


# scope="function": the transaction commits when the route returns and BEFORE the response is
# sent. FastAPI's default for a dependency with yield ends it after the response has gone out,
# so a client could be told 201 for a top-up whose commit then failed, or read the row before
# it is visible.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def require_admin(request: Request, session: SessionDep) -> Principal:
    """Every ``/admin/*`` route: a valid admin token (looked up in the request's own transaction,
    so a revocation holds at once on every process), and a ``readonly`` one only reads. The
    token's name becomes the audit log's actor for the writes of this transaction."""
    token = admin_token_from(request.headers)
    principal = await admin_tokens.authenticate(session, token) if token else None
    if principal is None:
        raise errors.authentication(
            "a valid admin token is required (Authorization: Bearer <token>)"
        )
    if principal.readonly and request.method not in READ_METHODS:
        raise errors.ApiError(
            403,
            "permission_error",
            f"the admin token {principal.name!r} is read-only: it may not {request.method} "
            "anything",
        )
    audit.act_as(session, principal.name)
    request.state.admin = principal
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=200)]


def page(items: list[dict[str, Any]], limit: int, cursor_of: str) -> dict[str, Any]:
    next_cursor = str(items[-1][cursor_of]) if len(items) == limit else None
    return {"items": items, "next_cursor": next_cursor}


def customer_view(customer: Customer) -> dict[str, Any]:
    return {
        "id": customer.id,
        "name": customer.name,
        "status": customer.status,
        "price_multiplier": format_multiplier(multiplier_of(customer)),
        "balance_usd": format_usd(customer.balance_micros),
        "held_usd": format_usd(customer.held_micros),
        "available_usd": format_usd(customer.balance_micros - customer.held_micros),
        "low_balance_usd": _usd(customer.low_balance_micros),
        "created_at": iso(customer.created_at),
    }


def _usd(micros: int | None) -> str | None:
    return format_usd(micros) if micros is not None else None


def key_view(key: CustomerKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "customer_id": key.customer_id,
        "name": key.name,
        "prefix": key.prefix,
        "status": key.status,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "max_concurrency": key.max_concurrency,
        "daily_budget_usd": _usd(key.daily_budget_micros),
        "monthly_budget_usd": _usd(key.monthly_budget_micros),
        "budget_action": key.budget_action,
        "downgrade_model": key.downgrade_model,
        "allowed_models": key.allowed_models,
        "route_small_to": key.route_small_to,
        "route_small_max_input_tokens": key.route_small_max_input_tokens,
        "expires_at": iso(key.expires_at),
        "created_at": iso(key.created_at),
        "last_used_at": iso(key.last_used_at),
    }


def entry_view(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "customer_id": entry.customer_id,
        "kind": entry.kind,
        "amount_usd": format_usd(entry.amount_micros),
        "balance_after_usd": format_usd(entry.balance_after_micros),
        "request_id": entry.request_id,
        "memo": entry.memo,
        "created_at": iso(entry.created_at),
    }
