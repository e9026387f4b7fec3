"""The ledger: append-only signed entries; the customer's balance is their running sum.

Every entry is appended by :func:`append`, which moves ``customers.balance_micros`` by the same
amount in the same statement sequence and records ``balance_after``. Services flush; the caller
owns the transaction (``Database.transaction()``), so an entry and its balance move commit together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from billing.errors import CustomerNotFound, IdempotencyConflict, InvalidAmount
from billing.models import Customer, LedgerEntry, utcnow
from billing.text import clean_text

KINDS = ("topup", "adjustment", "usage")

_customers = Customer.__table__  # type: ignore[attr-defined]
_ledger = LedgerEntry.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    customer_id: str
    kind: str
    amount_micros: int
    balance_after_micros: int
    request_id: str | None
    memo: str | None
    created_at: datetime


def _entry(row: Any) -> Entry:
    return Entry(
        id=int(row.id),
        customer_id=str(row.customer_id),
        kind=str(row.kind),
        amount_micros=int(row.amount_micros),
        balance_after_micros=int(row.balance_after_micros),
        request_id=row.request_id,
        memo=row.memo,
        created_at=row.created_at,
    )


async def append(
    session: AsyncSession,
    customer_id: str,
    kind: str,
    amount_micros: int,
    *,
    request_id: str | None = None,
    idempotency_key: str | None = None,
    request_fingerprint: str | None = None,
    memo: str | None = None,
    release_hold_micros: int = 0,
) -> Entry:
    """Append one entry and move the balance by ``amount_micros`` (and release a hold, if any)."""
    if kind not in KINDS:
        raise ValueError(f"unknown ledger kind {kind!r}")
    values: dict[str, object] = {"balance_micros": _customers.c.balance_micros + amount_micros}
    if release_hold_micros:
        values["held_micros"] = _customers.c.held_micros - release_hold_micros
    result = await session.execute(
        sa.update(_customers)
        .where(_customers.c.id == customer_id)
        .values(**values)
        .returning(_customers.c.balance_micros)
    )
    balance_after = result.scalar_one_or_none()
    if balance_after is None:
        raise CustomerNotFound(customer_id)
    now = utcnow()
    inserted = await session.execute(
        sa.insert(_ledger)
        .values(
            customer_id=customer_id,
            kind=kind,
            amount_micros=amount_micros,
            balance_after_micros=int(balance_after),
            request_id=request_id,
            idempotency_key=idempotency_key,
            request_fingerprint=request_fingerprint,
            memo=memo,
            created_at=now,
        )
        .returning(_ledger.c.id)
    )
    return Entry(
        id=int(inserted.scalar_one()),
        customer_id=customer_id,
        kind=kind,
        amount_micros=amount_micros,
        balance_after_micros=int(balance_after),
        request_id=request_id,
        memo=memo,
        created_at=now,
    )


def fingerprint_request(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


async def find_idempotent(session: AsyncSession, customer_id: str, key: str) -> LedgerEntry | None:
    result = await session.execute(
        sa.select(LedgerEntry).where(
            LedgerEntry.customer_id == customer_id,  # type: ignore[arg-type]
            LedgerEntry.idempotency_key == key,  # type: ignore[arg-type]
        )
    )
    return result.scalar_one_or_none()


async def credit(
    session: AsyncSession,
    customer_id: str,
    kind: str,
    amount_micros: int,
    *,
    memo: str | None,
    idempotency_key: str | None,
) -> tuple[Entry, bool]:
    """A top-up or adjustment, idempotent by key. Returns (entry, created).

    A replay with the same key and the same amount and memo returns the first entry; the same key
    with different parameters is an :class:`IdempotencyConflict`. The uniqueness of the key is a
    unique index, so two concurrent first attempts cannot both credit.
    """
    if kind == "topup" and amount_micros <= 0:
        raise InvalidAmount("amount_usd", "a top-up must be positive")
    if kind == "adjustment" and amount_micros == 0:
        raise InvalidAmount("amount_usd", "an adjustment must not be zero")
    if memo is not None:
        memo = clean_text(memo, "memo", max_length=500, allow_empty=True) or None
    fp = fingerprint_request(kind, amount_micros, memo or "")
    if idempotency_key is not None:
        existing = await find_idempotent(session, customer_id, idempotency_key)
        if existing is not None:
            if existing.request_fingerprint != fp:
                raise IdempotencyConflict(idempotency_key)
            return _entry(existing), False
    try:
        async with session.begin_nested():
            entry = await append(
                session,
                customer_id,
                kind,
                amount_micros,
                idempotency_key=idempotency_key,
                request_fingerprint=fp if idempotency_key else None,
                memo=memo,
            )
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = await find_idempotent(session, customer_id, idempotency_key)
        if existing is None:
            raise
        if existing.request_fingerprint != fp:
            raise IdempotencyConflict(idempotency_key) from None
        return _entry(existing), False
    return entry, True


async def entries(
    session: AsyncSession, customer_id: str, *, before_id: int | None, limit: int
) -> list[Entry]:
    """Newest first."""
    query = sa.select(_ledger).where(_ledger.c.customer_id == customer_id)
    if before_id is not None:
        query = query.where(_ledger.c.id < before_id)
    result = await session.execute(query.order_by(_ledger.c.id.desc()).limit(limit))
    return [_entry(row) for row in result]


async def ledger_sum(session: AsyncSession, customer_id: str) -> int:
    result = await session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(_ledger.c.amount_micros), 0)).where(
            _ledger.c.customer_id == customer_id
        )
    )
    return int(result.scalar_one())
