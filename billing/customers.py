"""Customers and their keys.

A customer key is ``sk-pr-`` followed by 43 URL-safe random characters. Only its SHA-256 is
stored, with a short prefix for display; the key itself is shown once, when it is created.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from billing.errors import CustomerNotFound, InvalidField, KeyNotFound
from billing.models import Customer, CustomerKey, utcnow
from billing.money import format_multiplier, parse_multiplier
from billing.text import clean_text

KEY_PREFIX = "sk-pr-"
CUSTOMER_STATUSES = ("active", "suspended")
BUDGET_ACTIONS = ("block", "downgrade", "warn")

_customers = Customer.__table__  # type: ignore[attr-defined]
_keys = CustomerKey.__table__  # type: ignore[attr-defined]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and 40 <= len(value) <= 200


def _name(value: object, field: str = "name") -> str:
    return clean_text(value, field)


async def create_customer(
    session: AsyncSession, name: object, price_multiplier: object = "1"
) -> Customer:
    multiplier = parse_multiplier(price_multiplier)  # type: ignore[arg-type]
    customer = Customer(name=_name(name), price_multiplier=format_multiplier(multiplier))
    session.add(customer)
    await session.flush()
    return customer


async def get_customer(session: AsyncSession, customer_id: str) -> Customer:
    customer = await session.get(Customer, customer_id)
    if customer is None:
        raise CustomerNotFound(customer_id)
    return customer


async def find_customer(session: AsyncSession, ref: str) -> Customer:
    """By id, else by (unique-enough) name: the CLI accepts either."""
    customer = await session.get(Customer, ref)
    if customer is not None:
        return customer
    result = await session.execute(
        sa.select(Customer).where(Customer.name == ref).order_by(Customer.id).limit(2)  # type: ignore[arg-type]
    )
    found = list(result.scalars())
    if len(found) != 1:
        raise CustomerNotFound(ref)
    return found[0]


async def list_customers(
    session: AsyncSession, *, after_id: str | None, limit: int
) -> list[Customer]:
    query = sa.select(Customer).order_by(Customer.id)
    if after_id:
        query = query.where(Customer.id > after_id)  # type: ignore[arg-type]
    result = await session.execute(query.limit(limit))
    return list(result.scalars())


async def update_customer(
    session: AsyncSession,
    customer_id: str,
    *,
    name: object = None,
    status: object = None,
    price_multiplier: object = None,
) -> Customer:
    customer = await get_customer(session, customer_id)
    if name is not None:
        customer.name = _name(name)
    if status is not None:
        if status not in CUSTOMER_STATUSES:
            raise InvalidField("status", "must be 'active' or 'suspended'")
        customer.status = str(status)
    if price_multiplier is not None:
        customer.price_multiplier = format_multiplier(parse_multiplier(price_multiplier))  # type: ignore[arg-type]
    session.add(customer)
    await session.flush()
    return customer


async def set_low_balance(
    session: AsyncSession, customer_id: str, low_balance_micros: int | None
) -> Customer:
    """The balance below which ``customer.balance_low`` is raised (None: never)."""
    customer = await get_customer(session, customer_id)
    if low_balance_micros is not None and low_balance_micros < 0:
        raise InvalidField("low_balance_usd", "must not be negative")
    customer.low_balance_micros = low_balance_micros
    session.add(customer)
    await session.flush()
    return customer


def multiplier_of(customer: Customer) -> Decimal:
    return Decimal(customer.price_multiplier)


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    daily_budget_micros: int | None = None
    monthly_budget_micros: int | None = None
    budget_action: str = "block"
    downgrade_model: str | None = None
    allowed_models: Sequence[str] | None = None
    expires_at: datetime | None = None
    route_small_to: str | None = None
    route_small_max_input_tokens: int | None = None

    @classmethod
    def of(cls, key: CustomerKey) -> KeyPolicy:
        """The policy stored on a key row (its columns carry the same names)."""
        values = {f.name: getattr(key, f.name) for f in dataclasses.fields(cls)}
        if values["allowed_models"] is not None:
            values["allowed_models"] = tuple(values["allowed_models"])
        return cls(**values)

    def columns(self) -> dict[str, Any]:
        """The key-row columns for this policy."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if values["allowed_models"] is not None:
            values["allowed_models"] = list(values["allowed_models"])
        return values


async def create_key(
    session: AsyncSession,
    customer_id: str,
    name: object = "default",
    policy: KeyPolicy | None = None,
) -> tuple[CustomerKey, str]:
    """Returns the stored key row and the plaintext key (to be shown once)."""
    await get_customer(session, customer_id)
    policy = policy or KeyPolicy()
    if policy.budget_action not in BUDGET_ACTIONS:
        raise InvalidField("budget_action", "must be one of block, downgrade, warn")
    if policy.budget_action == "downgrade" and not policy.downgrade_model:
        raise InvalidField("downgrade_model", "is required when budget_action is 'downgrade'")
    if (policy.route_small_to is None) != (policy.route_small_max_input_tokens is None):
        raise InvalidField(
            "route_small_to", "and route_small_max_input_tokens must be given together"
        )
    for field_name, model in (
        ("downgrade_model", policy.downgrade_model),
        ("route_small_to", policy.route_small_to),
    ):
        if model is not None:
            clean_text(model, field_name)
    for pattern in policy.allowed_models or ():
        clean_text(pattern, "allowed_models")
    plaintext = generate_key()
    row = CustomerKey(
        customer_id=customer_id,
        name=_name(name) if name is not None else "default",
        prefix=plaintext[: len(KEY_PREFIX) + 6],
        key_hash=hash_key(plaintext),
        **policy.columns(),
    )
    session.add(row)
    await session.flush()
    return row, plaintext


async def list_keys(
    session: AsyncSession, customer_id: str, *, after_id: str | None, limit: int
) -> list[CustomerKey]:
    await get_customer(session, customer_id)
    query = sa.select(CustomerKey).where(CustomerKey.customer_id == customer_id)  # type: ignore[arg-type]
    if after_id:
        query = query.where(CustomerKey.id > after_id)  # type: ignore[arg-type]
    result = await session.execute(query.order_by(CustomerKey.id).limit(limit))
    return list(result.scalars())


async def revoke_key(session: AsyncSession, key_id: str) -> CustomerKey:
    row = await session.get(CustomerKey, key_id)
    if row is None:
        raise KeyNotFound(key_id)
    if row.status != "revoked":
        row.status = "revoked"
        row.revoked_at = utcnow()
        session.add(row)
        await session.flush()
    return row


@dataclass(frozen=True, slots=True)
class KeyContext:
    """What the relay needs to know about an authenticated key (cached briefly per process)."""

    key_id: str
    customer_id: str
    key_status: str
    customer_status: str
    expires_at: datetime | None
    price_multiplier: Decimal
    policy: KeyPolicy


async def lookup_key(session: AsyncSession, plaintext: str) -> KeyContext | None:
    result = await session.execute(
        sa.select(CustomerKey, _customers.c.status, _customers.c.price_multiplier)
        .join(_customers, _customers.c.id == _keys.c.customer_id)
        .where(_keys.c.key_hash == hash_key(plaintext))
    )
    row = result.first()
    if row is None:
        return None
    key, customer_status, multiplier = row
    return KeyContext(
        key_id=key.id,
        customer_id=key.customer_id,
        key_status=key.status,
        customer_status=customer_status,
        expires_at=key.expires_at,
        price_multiplier=Decimal(multiplier),
        policy=KeyPolicy.of(key),
    )


async def touch_key(session: AsyncSession, key_id: str) -> None:
    await session.execute(
        sa.update(_keys).where(_keys.c.id == key_id).values(last_used_at=utcnow())
    )
