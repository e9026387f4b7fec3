"""Per-key daily and monthly budgets, enforced with holds like the balance.

A key's spend lives in ``key_spend`` rows per period (``2026-11-22``, ``2026-11``): what was
settled and what is held right now. Admission reserves the request's hold against each budget
with one conditional update — ``held += h WHERE spent + held + h <= budget`` — so concurrent
requests cannot overshoot a budget any more than they can overdraw a balance. Settlement moves
the reservation into ``spent`` (by the real cost) in the same transaction as the ledger debit.

What happens when a budget is exhausted is the key's ``budget_action``: ``block`` (403),
``downgrade`` (the relay retries admission with the key's cheaper model, which is then not
capped by the budget but still counted), or ``warn`` (a response header; the request proceeds
and is counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from billing.errors import BudgetExceeded
from billing.models import KeySpend

_spend = KeySpend.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Budget:
    daily_micros: int | None = None
    monthly_micros: int | None = None

    @property
    def active(self) -> bool:
        return self.daily_micros is not None or self.monthly_micros is not None


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a hold reserved: recorded on the hold row, undone or settled with it."""

    amount_micros: int
    day: str | None
    month: str | None


def periods(now: datetime | None = None) -> tuple[str, str]:
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")


async def _ensure_rows(session: AsyncSession, key_id: str, *period_names: str) -> None:
    rows = [
        {"key_id": key_id, "period": p, "spent_micros": 0, "held_micros": 0} for p in period_names
    ]
    if not rows:
        return
    if session.bind.dialect.name == "postgresql":
        await session.execute(postgresql.insert(_spend).values(rows).on_conflict_do_nothing())
    else:
        await session.execute(sqlite.insert(_spend).values(rows).on_conflict_do_nothing())


async def reserve(
    session: AsyncSession,
    key_id: str,
    budget: Budget,
    amount_micros: int,
    *,
    enforce: bool = True,
    now: datetime | None = None,
) -> Reservation:
    """Reserve ``amount_micros`` against each budget (or only track the periods when not
    ``enforce``). Raises :class:`BudgetExceeded` naming the first exhausted budget."""
    day, month = periods(now)
    await _ensure_rows(session, key_id, day, month)
    if not enforce:
        return Reservation(0, day, month)
    for scope, period, limit in (
        ("daily", day, budget.daily_micros),
        ("monthly", month, budget.monthly_micros),
    ):
        values: dict[str, object] = {"held_micros": _spend.c.held_micros + amount_micros}
        conds = [_spend.c.key_id == key_id, _spend.c.period == period]
        if limit is not None:
            conds.append(_spend.c.spent_micros + _spend.c.held_micros + amount_micros <= limit)
        result = await session.execute(
            sa.update(_spend).where(*conds).values(**values).returning(_spend.c.key_id)
        )
        if result.first() is None:
            raise BudgetExceeded(scope, int(limit or 0))
    return Reservation(amount_micros, day, month)


async def settle(
    session: AsyncSession, key_id: str, reservation: Reservation, cost_micros: int
) -> None:
    """Move the reservation into ``spent`` by the real cost (0 for a release)."""
    for period in (reservation.day, reservation.month):
        if period is None:
            continue
        await session.execute(
            sa.update(_spend)
            .where(_spend.c.key_id == key_id, _spend.c.period == period)
            .values(
                spent_micros=_spend.c.spent_micros + cost_micros,
                held_micros=_spend.c.held_micros - reservation.amount_micros,
            )
        )


async def spend(session: AsyncSession, key_id: str, now: datetime | None = None) -> dict[str, int]:
    """Settled spend of the current day and month (for ``/v1/me``)."""
    day, month = periods(now)
    rows = await session.execute(
        sa.select(_spend.c.period, _spend.c.spent_micros).where(
            _spend.c.key_id == key_id, _spend.c.period.in_((day, month))
        )
    )
    found = {str(r.period): int(r.spent_micros) for r in rows}
    return {"daily": found.get(day, 0), "monthly": found.get(month, 0)}
