"""Holds: reserve the worst case before forwarding, turn it into the real charge afterwards.

``place`` is ONE conditional update — ``held += h WHERE balance - held >= h`` — so concurrent
requests can never reserve more than the balance, on SQLite or PostgreSQL. It inserts the hold
row and the request-log row (status ``in_flight``) in the same short transaction, so a crashed
process leaves a record of what was in flight.

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
from psycopg import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncSession

from billing import budgets, ledger
from billing.budgets import Reservation
from billing.errors import CustomerNotFound, CustomerSuspended, InsufficientBalance
from billing.models import Customer, Hold, RequestRecord, utcnow
from billing.pricing import Usage

_customers = Customer.__table__  # type: ignore[attr-defined]
_holds = Hold.__table__  # type: ignore[attr-defined]
_log = RequestRecord.__table__  # type: ignore[attr-defined]
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
        )
    )


def _clip(text: str | None) -> str | None:
    """Error text for the log: bounded, and without NUL (PostgreSQL refuses it in text)."""
    return text.replace("\x00", "")[:1000] if text else None


@dataclass(slots=True)
class Outcome:
    """How a request ended, for the request log."""

    status: str  # ok | client_disconnect | upstream_error | failed | crashed
    http_status: int | None = None
    model: str | None = None
    account_id: str | None = None
    upstream_request_id: str | None = None
    attempts: int = 0
    error: str | None = None
    ttfb_ms: int | None = None
    duration_ms: int | None = None
    response_body: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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
        "status": outcome.status,
        "http_status": outcome.http_status,
        "cost_micros": cost_micros,
        "account_id": outcome.account_id,
        "upstream_request_id": outcome.upstream_request_id,
        "attempts": outcome.attempts,
        "error": _clip(outcome.error),
        "ttfb_ms": outcome.ttfb_ms,
        "duration_ms": outcome.duration_ms,
        "finished_at": utcnow(),
    }
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


# --- PostgreSQL: the same two operations as single statements ---------------------------------
#
# Data-modifying CTEs run as ONE statement, atomic on its own in autocommit mode: one round trip
# per hold and one per settlement, with the same guarantees as the session versions above (the
# conditional update on the customer row, the hold row deleted by exactly one settler). SQLite has
# no data-modifying CTEs, so it uses the session versions; the test suite runs both.

PLACE_SQL = """
WITH c AS (
  UPDATE customers SET held_micros = held_micros + %(amount)s
  WHERE id = %(customer_id)s AND status = 'active' AND balance_micros - held_micros >= %(amount)s
  RETURNING id
), h AS (
  INSERT INTO holds (request_id, customer_id, key_id, amount_micros, instance_id, budget_micros,
    budget_day, budget_month, created_at)
  SELECT %(request_id)s, c.id, %(key_id)s, %(amount)s, %(instance_id)s, %(budget)s,
    %(budget_day)s, %(budget_month)s, %(now)s FROM c
), l AS (
  INSERT INTO request_log (id, customer_id, key_id, endpoint, requested_model, stream, status,
    hold_micros, cost_micros, input_tokens, output_tokens, cache_write_5m_tokens,
    cache_write_1h_tokens, cache_read_tokens, attempts, instance_id, started_at, request_body)
  SELECT %(request_id)s, c.id, %(key_id)s, %(endpoint)s, %(model)s, %(stream)s, 'in_flight',
    %(amount)s, 0, 0, 0, 0, 0, 0, 0, %(instance_id)s, %(now)s, %(body)s FROM c
)
SELECT count(*) FROM c
"""

REFUSAL_SQL = (
    "SELECT status, balance_micros - held_micros FROM customers WHERE id = %(customer_id)s"
)

SETTLE_SQL = """
WITH h AS (
  DELETE FROM holds WHERE request_id = %(request_id)s
  RETURNING customer_id, amount_micros, key_id, budget_micros, budget_day, budget_month
), k AS (
  UPDATE key_spend SET spent_micros = key_spend.spent_micros + %(cost)s,
    held_micros = key_spend.held_micros - h.budget_micros
  FROM h WHERE key_spend.key_id = h.key_id AND key_spend.period IN (h.budget_day, h.budget_month)
), c AS (
  UPDATE customers
  SET balance_micros = customers.balance_micros - %(cost)s,
      held_micros = customers.held_micros - h.amount_micros
  FROM h WHERE customers.id = h.customer_id
  RETURNING customers.id, customers.balance_micros
), l AS (
  INSERT INTO ledger_entries (customer_id, kind, amount_micros, balance_after_micros, request_id, created_at)
  SELECT c.id, 'usage', -%(cost)s, c.balance_micros, %(request_id)s, %(now)s FROM c WHERE %(cost)s > 0
), r AS (
  UPDATE request_log SET
    status = %(status)s, http_status = %(http_status)s, cost_micros = %(cost)s,
    model = COALESCE(%(model)s, model), account_id = %(account_id)s,
    upstream_request_id = %(upstream_request_id)s, attempts = %(attempts)s, error = %(error)s,
    ttfb_ms = %(ttfb_ms)s, duration_ms = %(duration_ms)s, finished_at = %(now)s,
    response_body = COALESCE(%(response_body)s, response_body),
    input_tokens = %(input_tokens)s, output_tokens = %(output_tokens)s,
    cache_write_5m_tokens = %(cache_write_5m)s, cache_write_1h_tokens = %(cache_write_1h)s,
    cache_read_tokens = %(cache_read)s
  WHERE id = %(request_id)s AND EXISTS (SELECT 1 FROM h)
)
SELECT count(*) FROM c
"""


async def place_fast(conn: AsyncConnection[Any], hold: HoldRequest) -> None:
    params = {
        "amount": hold.amount_micros,
        "customer_id": hold.customer_id,
        "request_id": hold.request_id,
        "key_id": hold.key_id,
        "instance_id": hold.instance_id,
        "now": hold.started_at,
        "endpoint": hold.endpoint,
        "model": hold.requested_model,
        "stream": hold.stream,
        "body": hold.request_body,
        "budget": (hold.budget or NO_BUDGET).amount_micros,
        "budget_day": (hold.budget or NO_BUDGET).day,
        "budget_month": (hold.budget or NO_BUDGET).month,
    }
    row = await (await conn.execute(PLACE_SQL, params)).fetchone()
    if row is not None and row[0] == 1:
        return
    refusal = await (await conn.execute(REFUSAL_SQL, params)).fetchone()
    if refusal is None:
        raise CustomerNotFound(hold.customer_id)
    if refusal[0] != "active":
        raise CustomerSuspended(hold.customer_id)
    raise InsufficientBalance(hold.amount_micros, int(refusal[1]))


async def settle_fast(
    conn: AsyncConnection[Any],
    request_id: str,
    usage: Usage | None,
    cost_micros: int,
    outcome: Outcome,
) -> bool:
    u = usage or Usage()
    params = {
        "request_id": request_id,
        "cost": cost_micros,
        "now": utcnow(),
        "status": outcome.status,
        "http_status": outcome.http_status,
        "model": outcome.model,
        "account_id": outcome.account_id,
        "upstream_request_id": outcome.upstream_request_id,
        "attempts": outcome.attempts,
        "error": _clip(outcome.error),
        "ttfb_ms": outcome.ttfb_ms,
        "duration_ms": outcome.duration_ms,
        "response_body": outcome.response_body,
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_write_5m": u.cache_write_5m_tokens,
        "cache_write_1h": u.cache_write_1h_tokens,
        "cache_read": u.cache_read_input_tokens,
    }
    row = await (await conn.execute(SETTLE_SQL, params)).fetchone()
    return row is not None and row[0] == 1
