"""Holds: reserve the worst case before forwarding, turn it into the real charge afterwards.

``place`` is ONE conditional update — ``held += h WHERE balance - held >= h`` — so concurrent
requests can never reserve more than the balance, on SQLite or PostgreSQL. It inserts the hold
row and the request-log row (status ``in_flight``) in the same short transaction, so a crashed
process leaves a record of what was in flight.

``extend`` grows a placed hold (a stream's, slice by slice) with the same conditional update, and
only while the hold row is still there.

``settle`` deletes the hold row first: only the caller whose ``DELETE … RETURNING`` found it goes
on to debit, which makes settlement idempotent by request id (and the ledger's unique index on
usage request ids is a second guard). Actual cost above the hold is still charged in full; the
balance may then dip below zero, and the request log records it (``cost_micros > hold_micros``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from billing import budgets, ledger
from billing.budgets import Reservation
from billing.errors import CustomerNotFound, CustomerSuspended, InsufficientBalance
from billing.models import Customer, Hold, LedgerEntry, RequestRecord, utcnow
from billing.pricing import Usage

_customers = Customer.__table__  # type: ignore[attr-defined]
_holds = Hold.__table__  # type: ignore[attr-defined]
_log = RequestRecord.__table__  # type: ignore[attr-defined]
_ledger = LedgerEntry.__table__  # type: ignore[attr-defined]
NO_BUDGET = Reservation(0, None, None)


@dataclass(slots=True)
class HoldRequest:
    request_id: str
    customer_id: str
    key_id: str
    amount_micros: int
    instance_id: str
    endpoint: str = "messages"
    requested_model: str | None = None
    stream: bool = False
    request_body: str | None = None
    budget: Reservation | None = None
    session_id: str | None = None
    started_at: datetime = field(default_factory=utcnow)


async def place(session: AsyncSession, hold: HoldRequest) -> None:
    """Reserve ``hold.amount_micros``; raises InsufficientBalance / CustomerSuspended."""
    result = await session.execute(
        sa.update(_customers)
        .where(
            _customers.c.id == hold.customer_id,
            _customers.c.status == "active",
            _customers.c.balance_micros - _customers.c.held_micros >= hold.amount_micros,
        )
        .values(held_micros=_customers.c.held_micros + hold.amount_micros)
        .returning(_customers.c.id)
    )
    if result.scalar_one_or_none() is None:
        row = (
            await session.execute(
                sa.select(
                    _customers.c.status, _customers.c.balance_micros, _customers.c.held_micros
                ).where(_customers.c.id == hold.customer_id)
            )
        ).first()
        if row is None:
            raise CustomerNotFound(hold.customer_id)
        if row.status != "active":
            raise CustomerSuspended(hold.customer_id)
        raise InsufficientBalance(hold.amount_micros, int(row.balance_micros - row.held_micros))
    budget = hold.budget or NO_BUDGET
    await session.execute(
        sa.insert(_holds).values(
            request_id=hold.request_id,
            customer_id=hold.customer_id,
            key_id=hold.key_id,
            amount_micros=hold.amount_micros,
            instance_id=hold.instance_id,
            budget_micros=budget.amount_micros,
            budget_day=budget.day,
            budget_month=budget.month,
            created_at=hold.started_at,
        )
    )
    await session.execute(
        sa.insert(_log).values(
            id=hold.request_id,
            customer_id=hold.customer_id,
            key_id=hold.key_id,
            endpoint=hold.endpoint,
            requested_model=hold.requested_model,
            stream=hold.stream,
            status="in_flight",
            hold_micros=hold.amount_micros,
            instance_id=hold.instance_id,
            started_at=hold.started_at,
            request_body=hold.request_body,
            session_id=hold.session_id,
        )
    )


def _clip(text: str | None, limit: int = 1000) -> str | None:
    """Text from the upstream for the log: bounded by its column, and without NUL (PostgreSQL
    refuses it in text)."""
    return text.replace("\x00", "")[:limit] if text else None


@dataclass(slots=True)
class Outcome:
    """How a request ended, for the request log."""

    status: str  # ok | client_disconnect | upstream_error | failed | crashed
    http_status: int | None = None
    model: str | None = None
    account_id: str | None = None
    upstream_request_id: str | None = None
    attempts: int = 0
    accounts_tried: list[str] = field(default_factory=list)
    error: str | None = None
    ttfb_ms: int | None = None
    duration_ms: int | None = None
    queue_ms: int | None = None
    """Time waited for concurrency slots (the key's and the pool's), set at settlement."""
    response_body: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def log_values(self) -> dict[str, Any]:
        """The request-log columns every settlement writes from the outcome, by column name."""
        return {
            "status": self.status,
            "http_status": self.http_status,
            "account_id": self.account_id,
            "upstream_request_id": _clip(self.upstream_request_id, 200),
            "attempts": self.attempts,
            "accounts_tried": ",".join(self.accounts_tried)[:1000] or None,
            "error": _clip(self.error),
            "ttfb_ms": self.ttfb_ms,
            "duration_ms": self.duration_ms,
            "queue_ms": self.queue_ms,
        }


async def settle(
    session: AsyncSession, request_id: str, usage: Usage | None, cost_micros: int, outcome: Outcome
) -> bool:
    """Turn the hold into one usage debit (or release it when ``cost_micros`` is 0).

    Returns False when the hold was already settled or released (idempotent no-op).
    """
    removed = (
        await session.execute(
            sa.delete(_holds)
            .where(_holds.c.request_id == request_id)
            .returning(
                _holds.c.customer_id,
                _holds.c.amount_micros,
                _holds.c.key_id,
                _holds.c.budget_micros,
                _holds.c.budget_day,
                _holds.c.budget_month,
            )
        )
    ).first()
    if removed is None:
        return False
    customer_id, held = str(removed.customer_id), int(removed.amount_micros)
    if removed.budget_day is not None or removed.budget_month is not None:
        reservation = Reservation(
            int(removed.budget_micros), removed.budget_day, removed.budget_month
        )
        await budgets.settle(session, str(removed.key_id), reservation, cost_micros)
    if cost_micros > 0:
        await ledger.append(
            session,
            customer_id,
            "usage",
            -cost_micros,
            request_id=request_id,
            release_hold_micros=held,
        )
    else:
        await session.execute(
            sa.update(_customers)
            .where(_customers.c.id == customer_id)
            .values(held_micros=_customers.c.held_micros - held)
        )
    values: dict[str, Any] = {
        **outcome.log_values(),
        "cost_micros": cost_micros,
        "finished_at": utcnow(),
    }
    await _complete_log_row(session, request_id, usage, outcome, values)
    return True


async def _complete_log_row(
    session: AsyncSession,
    request_id: str,
    usage: Usage | None,
    outcome: Outcome,
    values: dict[str, Any],
) -> None:
    """Write a settled request's columns (``values``, plus its model, body and usage)."""
    if outcome.model is not None:
        values["model"] = outcome.model
    if outcome.response_body is not None:
        values["response_body"] = outcome.response_body
    if usage is not None:
        values.update(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_write_5m_tokens=usage.cache_write_5m_tokens,
            cache_write_1h_tokens=usage.cache_write_1h_tokens,
            cache_read_tokens=usage.cache_read_input_tokens,
        )
    await session.execute(sa.update(_log).where(_log.c.id == request_id).values(**values))


async def charge_without_hold(
    session: AsyncSession,
    request_id: str,
    customer_id: str,
    usage: Usage | None,
    cost_micros: int,
    outcome: Outcome,
) -> bool:
    """Charge a delivered answer whose hold is gone (released by a reconciliation that took
    this process for dead, e.g. after Redis lost its heartbeats): the answer was delivered, so
    the charge stands even though the balance may dip below zero. Idempotent by request id: a
    usage entry already in the ledger for it (a settlement or reconciliation that did charge)
    makes this a no-op. Returns whether it charged."""
    charged = await session.execute(
        sa.select(_ledger.c.id).where(_ledger.c.request_id == request_id, _ledger.c.kind == "usage")
    )
    if charged.first() is not None or cost_micros <= 0:
        return False
    await ledger.append(session, customer_id, "usage", -cost_micros, request_id=request_id)
    values: dict[str, Any] = {
        **outcome.log_values(),
        "cost_micros": cost_micros,
        "finished_at": utcnow(),
        "error": _clip(
            "charged without its hold (the hold had been released)"
            + (f"; {outcome.error}" if outcome.error else "")
        ),
    }
    await _complete_log_row(session, request_id, usage, outcome, values)
    return True


async def extend(session: AsyncSession, request_id: str, amount_micros: int) -> bool:
    """Grow the hold of ``request_id`` by ``amount_micros`` if the balance covers it — the
    same conditional update as :func:`place`, so concurrent streams cannot overdraw a balance
    by growing either. Returns False when the hold is gone (settled, or released by a
    reconciliation); raises :class:`InsufficientBalance` when the balance does not cover it.
    A suspended customer's open stream may still grow (revocation and suspension leave open
    streams to finish), but never beyond the balance."""
    hold = (
        await session.execute(
            sa.select(_holds.c.customer_id)
            .where(_holds.c.request_id == request_id)
            .with_for_update()
        )
    ).first()
    if hold is None:
        return False
    customer_id = str(hold.customer_id)
    result = await session.execute(
        sa.update(_customers)
        .where(
            _customers.c.id == customer_id,
            _customers.c.balance_micros - _customers.c.held_micros >= amount_micros,
        )
        .values(held_micros=_customers.c.held_micros + amount_micros)
        .returning(_customers.c.balance_micros - _customers.c.held_micros)
    )
    if result.first() is None:
        available = (
            await session.execute(
                sa.select(_customers.c.balance_micros - _customers.c.held_micros).where(
                    _customers.c.id == customer_id
                )
            )
        ).scalar_one()
        raise InsufficientBalance(amount_micros, int(available))
    await session.execute(
        sa.update(_holds)
        .where(_holds.c.request_id == request_id)
        .values(amount_micros=_holds.c.amount_micros + amount_micros)
    )
    await session.execute(
        sa.update(_log)
        .where(_log.c.id == request_id)
        .values(hold_micros=_log.c.hold_micros + amount_micros)
    )
    return True


async def release(session: AsyncSession, request_id: str, outcome: Outcome) -> bool:
    """Give the hold back without charging (nothing reached the customer)."""
    return await settle(session, request_id, None, 0, outcome)


async def holds_summary(session: AsyncSession) -> tuple[int, int]:
    """(open holds, micro-USD they hold), across all customers."""
    row = (
        await session.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(_holds.c.amount_micros), 0))
        )
    ).one()
    return int(row[0]), int(row[1])


async def held_sum(session: AsyncSession, customer_id: str) -> int:
    result = await session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(_holds.c.amount_micros), 0)).where(
            _holds.c.customer_id == customer_id
        )
    )
    return int(result.scalar_one())
