"""Reconciliation: finish what a crashed process left, and check that the books add up.

It never rewrites history. A hold left behind is settled (charged the usage its stream had
recorded) or released; differences between a balance and its ledger are reported, not fixed —
an operator corrects them with an adjustment.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from billing import holds
from billing.batch_billing import BATCH_HOLD_INSTANCE
from billing.holds import Outcome
from billing.models import Customer, Hold, LedgerEntry, RequestRecord, utcnow
from billing.owned import MessageBatch
from billing.pricing import Price, Usage, cost_micros

_customers = Customer.__table__  # type: ignore[attr-defined]
_ledger = LedgerEntry.__table__  # type: ignore[attr-defined]
_holds = Hold.__table__  # type: ignore[attr-defined]
_log = RequestRecord.__table__  # type: ignore[attr-defined]
_batches = MessageBatch.__table__  # type: ignore[attr-defined]
BATCH_ORPHAN_AGE = timedelta(hours=1)
"""A batch hold this old without its batch recorded was left behind (see stale_holds)."""


@dataclass
class Discrepancy:
    kind: str
    """balance_mismatch | held_mismatch | usage_without_debit | debit_differs_from_usage |
    delivered_uncharged"""
    customer_id: str
    detail: dict[str, Any]


@dataclass
class Report:
    holds_settled: int = 0
    holds_released: int = 0
    leases_dropped: int = 0
    heartbeats_trusted: bool = True
    """False right after Redis came back empty: no hold was finished on a missing heartbeat."""
    discrepancies: list[Discrepancy] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "holds_settled": self.holds_settled,
            "holds_released": self.holds_released,
            "leases_dropped": self.leases_dropped,
            "heartbeats_trusted": self.heartbeats_trusted,
            "discrepancies": [
                {"kind": d.kind, "customer_id": d.customer_id, **d.detail}
                for d in self.discrepancies
            ],
        }


@dataclass(frozen=True, slots=True)
class Progress:
    """What a stream had used when its process stopped (recorded at ``message_start``)."""

    model: str | None
    usage: Usage


async def stale_holds(
    session: AsyncSession,
    *,
    is_alive: Callable[[str], Awaitable[bool]],
    max_age: timedelta,
    now: datetime | None = None,
) -> list[Hold]:
    """Holds whose process no longer heart-beats, or that are older than any request can be.
    A batch's hold (``instance_id`` :data:`~billing.batch_billing.BATCH_HOLD_INSTANCE`) is
    not one while its batch is recorded: it lives until the batch settles (a day or more,
    ``app.batch_settlement``). Only a batch hold that has had no batch for
    :data:`BATCH_ORPHAN_AGE` (the relay stopped, or lost its database, between placing the
    hold and recording the batch the upstream accepted) is left behind."""
    now = now or utcnow()
    recorded = sa.exists().where(_batches.c.request_id == _holds.c.request_id)
    orphaned = sa.and_(
        _holds.c.instance_id == BATCH_HOLD_INSTANCE,
        _holds.c.created_at < now - BATCH_ORPHAN_AGE,
        ~recorded,
    )
    query = (
        sa.select(Hold)
        .where(sa.or_(_holds.c.instance_id != BATCH_HOLD_INSTANCE, orphaned))
        .order_by(Hold.created_at)  # type: ignore[arg-type]
    )
    rows = list((await session.execute(query)).scalars())
    stale: list[Hold] = []
    alive: dict[str, bool] = {}
    for hold in rows:
        created = (
            hold.created_at
            if hold.created_at.tzinfo
            else hold.created_at.replace(tzinfo=now.tzinfo)
        )
        if now - created > max_age:
            stale.append(hold)
            continue
        if hold.instance_id not in alive:
            alive[hold.instance_id] = await is_alive(hold.instance_id)
        if not alive[hold.instance_id]:
            stale.append(hold)
    return stale


async def finish_hold(
    session: AsyncSession,
    hold: Hold,
    progress: Progress | None,
    price_for: Callable[[str], Price | None],
) -> bool:
    """Settle a left-behind hold from its recorded progress, or release it. True if charged.
    The charge is an estimate (what the stream had used when it was last recorded), so it
    never exceeds the hold — a stream's hold as far as it had grown."""
    customer = await session.get(Customer, hold.customer_id)
    record = await session.get(RequestRecord, hold.request_id)
    model = (progress.model if progress else None) or (record.requested_model if record else None)
    price = price_for(model) if model else None
    cost = 0
    usage = progress.usage if progress else None
    if usage is not None and price is not None and customer is not None:
        cost = min(
            cost_micros(usage, price, Decimal(customer.price_multiplier)), hold.amount_micros
        )
    outcome = Outcome(
        status="crashed",
        error="the relay process stopped while the request was in flight",
        model=model,
    )
    await holds.settle(session, hold.request_id, usage if cost else None, cost, outcome)
    return cost > 0


async def verify_books(
    session: AsyncSession, price_for: Callable[[str], Price | None] | None = None
) -> list[Discrepancy]:
    """balance = Σ ledger, held = Σ open holds, one debit per charged usage record, and no
    delivered answer without its debit (:func:`delivered_uncharged`)."""
    found: list[Discrepancy] = []
    sums = (
        sa.select(_ledger.c.customer_id, sa.func.sum(_ledger.c.amount_micros).label("total"))
        .group_by(_ledger.c.customer_id)
        .subquery()
    )
    held = (
        sa.select(_holds.c.customer_id, sa.func.sum(_holds.c.amount_micros).label("total"))
        .group_by(_holds.c.customer_id)
        .subquery()
    )
    rows = await session.execute(
        sa.select(
            _customers.c.id,
            _customers.c.balance_micros,
            _customers.c.held_micros,
            sa.func.coalesce(sums.c.total, 0).label("ledger_total"),
            sa.func.coalesce(held.c.total, 0).label("held_total"),
        )
        .outerjoin(sums, sums.c.customer_id == _customers.c.id)
        .outerjoin(held, held.c.customer_id == _customers.c.id)
    )
    for row in rows:
        if int(row.balance_micros) != int(row.ledger_total):
            found.append(
                Discrepancy(
                    "balance_mismatch",
                    row.id,
                    {
                        "balance_micros": int(row.balance_micros),
                        "ledger_sum_micros": int(row.ledger_total),
                    },
                )
            )
        if int(row.held_micros) != int(row.held_total):
            found.append(
                Discrepancy(
                    "held_mismatch",
                    row.id,
                    {"held_micros": int(row.held_micros), "open_holds_micros": int(row.held_total)},
                )
            )
    missing = await session.execute(
        sa.select(_log.c.id, _log.c.customer_id, _log.c.cost_micros)
        .outerjoin(_ledger, sa.and_(_ledger.c.request_id == _log.c.id, _ledger.c.kind == "usage"))
        .where(_log.c.cost_micros > 0, _ledger.c.id.is_(None))
        .limit(1000)
    )
    for row in missing:
        found.append(
            Discrepancy(
                "usage_without_debit",
                row.customer_id,
                {"request_id": row.id, "cost_micros": int(row.cost_micros)},
            )
        )
    mismatched = await session.execute(
        sa.select(_log.c.id, _log.c.customer_id, _log.c.cost_micros, _ledger.c.amount_micros)
        .join(_ledger, sa.and_(_ledger.c.request_id == _log.c.id, _ledger.c.kind == "usage"))
        .where(_ledger.c.amount_micros != -_log.c.cost_micros)
        .limit(1000)
    )
    for row in mismatched:
        found.append(
            Discrepancy(
                "debit_differs_from_usage",
                row.customer_id,
                {
                    "request_id": row.id,
                    "cost_micros": int(row.cost_micros),
                    "debit_micros": int(row.amount_micros),
                },
            )
        )
    found.extend(await delivered_uncharged(session, price_for))
    return found


BILLED_ENDPOINTS = ("messages", "chat_completions")


async def delivered_uncharged(
    session: AsyncSession,
    price_for: Callable[[str], Price | None] | None = None,
    limit: int = 1000,
) -> list[Discrepancy]:
    """Finished requests whose log shows tokens the upstream produced but that have no usage
    debit (and no open hold that could still bring one): answers delivered and not charged.
    With ``price_for``, a request whose tokens cost nothing at its model's price is not one."""
    tokens = (
        _log.c.input_tokens
        + _log.c.output_tokens
        + _log.c.cache_write_5m_tokens
        + _log.c.cache_write_1h_tokens
        + _log.c.cache_read_tokens
    )
    rows = await session.execute(
        sa.select(
            _log.c.id,
            _log.c.customer_id,
            _log.c.status,
            sa.func.coalesce(_log.c.model, _log.c.requested_model).label("model"),
            _log.c.input_tokens,
            _log.c.output_tokens,
            _log.c.cache_write_5m_tokens,
            _log.c.cache_write_1h_tokens,
            _log.c.cache_read_tokens,
            tokens.label("tokens"),
        )
        .outerjoin(_ledger, sa.and_(_ledger.c.request_id == _log.c.id, _ledger.c.kind == "usage"))
        .outerjoin(_holds, _holds.c.request_id == _log.c.id)
        .where(
            _log.c.endpoint.in_(BILLED_ENDPOINTS),
            _log.c.status != "in_flight",
            tokens > 0,
            _ledger.c.id.is_(None),
            _holds.c.request_id.is_(None),
        )
        .limit(limit)
    )
    found: list[Discrepancy] = []
    for row in rows:
        if price_for is not None:
            price = price_for(row.model) if row.model else None
            used = Usage(
                input_tokens=int(row.input_tokens),
                output_tokens=int(row.output_tokens),
                cache_write_5m_tokens=int(row.cache_write_5m_tokens),
                cache_write_1h_tokens=int(row.cache_write_1h_tokens),
                cache_read_input_tokens=int(row.cache_read_tokens),
            )
            if price is not None and cost_micros(used, price, Decimal(1)) <= 0:
                continue
        found.append(
            Discrepancy(
                "delivered_uncharged",
                row.customer_id,
                {
                    "request_id": row.id,
                    "status": row.status,
                    "model": row.model,
                    "tokens": int(row.tokens),
                },
            )
        )
    return found
