"""Money for Message Batches: one hold for the whole batch, one charge per succeeded line.

- **The hold** (:func:`batch_hold_micros`): Σ over the batch's requests of each request's worst
  case (:func:`billing.estimate.worst_case_usage`) at the batch rate — 50 % of every category,
  the price row's ``batch_discount_pct`` — × the customer's multiplier, rounded up once. It is
  placed like a message's hold (:func:`billing.holds.place`: the same conditional update), with
  ``instance_id`` :data:`BATCH_HOLD_INSTANCE`, which tells reconciliation that this hold is not
  a request in flight on some relay process: it lives until its batch is settled (a day or more)
  and reconciliation never releases it.
- **Settlement** (:func:`charge_lines`, :func:`finish`): each ``succeeded`` result line becomes
  one usage record (a ``request_log`` row, endpoint ``batch``) and one ledger debit, both with
  the line's id :func:`line_request_id`, at the batch rate (cache rates on top, the model the
  line names). The line's ``(batch_id, custom_id)`` row in ``batch_line_charges`` is inserted in
  the same transaction, ``ON CONFLICT DO NOTHING``: only the transaction that inserted it
  charges, so two workers racing over one batch (or a worker re-reading results after a crash)
  charge each line once. What a charge costs is released from the hold as it is charged; when
  every line is read, :func:`finish` releases the rest of the hold, once, and moves the key's
  budget reservation (if it has budgets) into its spend by what the batch cost.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from billing import budgets, ledger
from billing.budgets import Reservation
from billing.estimate import worst_case_usage
from billing.models import Customer, Hold, RequestRecord, utcnow
from billing.owned import BatchLineCharge, MessageBatch
from billing.pricing import Price, Usage, total_cost_micros

BATCH_HOLD_INSTANCE: Final = "batch"
"""The ``instance_id`` of a batch's hold: no relay process owns it; reconciliation skips it."""
BATCH_ENDPOINT: Final = "batch"

_customers = Customer.__table__  # type: ignore[attr-defined]
_holds = Hold.__table__  # type: ignore[attr-defined]
_log = RequestRecord.__table__  # type: ignore[attr-defined]
_lines = BatchLineCharge.__table__  # type: ignore[attr-defined]
_batches = MessageBatch.__table__  # type: ignore[attr-defined]


def at_batch_rate(usage: Usage) -> Usage:
    """``usage`` billed at the batch tier (every category at the price's batch discount)."""
    return dataclasses.replace(usage, service_tier="batch")


def batch_hold_micros(requests: Iterable[tuple[dict[str, Any], Price]], multiplier: Decimal) -> int:
    """The hold of a batch: Σ of each request's worst case at the batch rate, rounded up once."""
    return total_cost_micros(
        ((at_batch_rate(worst_case_usage(params, price)), price) for params, price in requests),
        multiplier,
    )


def line_request_id(batch_id: str, custom_id: str) -> str:
    """The id of a line's usage record and ledger debit: the same for every worker."""
    digest = hashlib.blake2b(f"{batch_id}\x00{custom_id}".encode(), digest_size=16).hexdigest()
    return "bl_" + digest


@dataclass(frozen=True, slots=True)
class LineCharge:
    """A ``succeeded`` result line, priced."""

    custom_id: str
    model: str | None
    usage: Usage
    cost_micros: int
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class BatchOwner:
    batch_id: str
    request_id: str  # the batch's hold
    customer_id: str
    key_id: str
    account_id: str


def _insert_ignoring_conflicts(session: AsyncSession) -> Any:
    if session.bind.dialect.name == "postgresql":
        return postgresql.insert(_lines).on_conflict_do_nothing()
    return sqlite.insert(_lines).on_conflict_do_nothing()


async def charge_lines(
    session: AsyncSession, owner: BatchOwner, lines: Sequence[LineCharge]
) -> int:
    """Charge the lines of this chunk that no one has charged yet (one transaction: the
    caller's). Returns the micro-USD this call charged."""
    if not lines:
        return 0
    now = utcnow()
    rows = [
        {
            "batch_id": owner.batch_id,
            "custom_id": line.custom_id,
            "request_id": line_request_id(owner.batch_id, line.custom_id),
            "cost_micros": line.cost_micros,
            "created_at": now,
        }
        for line in sorted(lines, key=lambda line: line.custom_id)  # one lock order for all
    ]
    inserted = await session.execute(
        _insert_ignoring_conflicts(session).values(rows).returning(_lines.c.custom_id)
    )
    fresh = {str(row[0]) for row in inserted}
    total = 0
    for line in lines:
        if line.custom_id not in fresh:
            continue
        request_id = line_request_id(owner.batch_id, line.custom_id)
        usage = line.usage
        await session.execute(
            sa.insert(_log).values(
                id=request_id,
                customer_id=owner.customer_id,
                key_id=owner.key_id,
                account_id=owner.account_id,
                endpoint=BATCH_ENDPOINT,
                requested_model=line.model,
                model=line.model,
                stream=False,
                status="ok",
                http_status=200,
                hold_micros=0,
                cost_micros=line.cost_micros,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_write_5m_tokens=usage.cache_write_5m_tokens,
                cache_write_1h_tokens=usage.cache_write_1h_tokens,
                cache_read_tokens=usage.cache_read_input_tokens,
                upstream_request_id=(line.message_id or "")[:200] or None,
                attempts=1,
                accounts_tried=owner.account_id,
                started_at=now,
                finished_at=now,
            )
        )
        if line.cost_micros > 0:
            await ledger.append(
                session,
                owner.customer_id,
                "usage",
                -line.cost_micros,
                request_id=request_id,
                memo=f"batch {owner.batch_id} {line.custom_id}"[:500],
            )
        total += line.cost_micros
    if total:
        await _release(session, owner, total)
        await session.execute(
            sa.update(_batches)
            .where(_batches.c.id == owner.batch_id)
            .values(charged_micros=_batches.c.charged_micros + total)
        )
    return total


async def _release(session: AsyncSession, owner: BatchOwner, amount: int) -> int:
    """Release up to ``amount`` from the batch's hold (what was just charged). Returns what
    was released (less when the hold is smaller, or gone)."""
    held = (
        await session.execute(
            sa.select(_holds.c.amount_micros)
            .where(_holds.c.request_id == owner.request_id)
            .with_for_update()
        )
    ).scalar_one_or_none()
    if held is None:
        return 0
    released = min(int(held), amount)
    if released <= 0:
        return 0
    await session.execute(
        sa.update(_holds)
        .where(_holds.c.request_id == owner.request_id)
        .values(amount_micros=_holds.c.amount_micros - released)
    )
    await session.execute(
        sa.update(_customers)
        .where(_customers.c.id == owner.customer_id)
        .values(held_micros=_customers.c.held_micros - released)
    )
    return released


async def finish(session: AsyncSession, owner: BatchOwner, status: str = "settled") -> bool:
    """Release what is left of the batch's hold and mark the batch settled. Idempotent: only
    the call that deletes the hold row moves the customer's ``held``. Returns whether it did."""
    removed = (
        await session.execute(
            sa.delete(_holds)
            .where(_holds.c.request_id == owner.request_id)
            .returning(
                _holds.c.customer_id,
                _holds.c.amount_micros,
                _holds.c.budget_micros,
                _holds.c.budget_day,
                _holds.c.budget_month,
            )
        )
    ).first()
    now = utcnow()
    if removed is not None:
        if removed.budget_day is not None or removed.budget_month is not None:
            charged = (
                await session.execute(
                    sa.select(_batches.c.charged_micros).where(_batches.c.id == owner.batch_id)
                )
            ).scalar_one_or_none()
            reservation = Reservation(
                int(removed.budget_micros), removed.budget_day, removed.budget_month
            )
            await budgets.settle(session, owner.key_id, reservation, int(charged or 0))
        await session.execute(
            sa.update(_customers)
            .where(_customers.c.id == removed.customer_id)
            .values(held_micros=_customers.c.held_micros - int(removed.amount_micros))
        )
        await session.execute(
            sa.update(_log)
            .where(_log.c.id == owner.request_id)
            .values(status=status, finished_at=now)
        )
    await session.execute(
        sa.update(_batches)
        .where(_batches.c.id == owner.batch_id, _batches.c.settled_at.is_(None))
        .values(settled_at=now)
    )
    return removed is not None


async def record_batch(
    session: AsyncSession,
    batch: MessageBatch,
    *,
    upstream_request_id: str | None,
    attempts: int,
    accounts_tried: Sequence[str],
    ttfb_ms: int | None,
    duration_ms: int | None,
) -> None:
    """The upstream accepted the batch: record who owns it, and its creation in the request
    log (status ``accepted`` until it is settled; it is never usage itself)."""
    session.add(batch)
    await session.flush()
    await session.execute(
        sa.update(_log)
        .where(_log.c.id == batch.request_id)
        .values(
            status="accepted",
            http_status=200,
            account_id=batch.account_id,
            upstream_request_id=(upstream_request_id or "")[:200] or None,
            attempts=attempts,
            accounts_tried=",".join(accounts_tried)[:1000] or None,
            ttfb_ms=ttfb_ms,
            duration_ms=duration_ms,
        )
    )
