"""Events: a durable outbox, one row per transition, fanned out to the webhooks that want it.

An event is raised once per transition, not once per request or per process. Conditions that
come and go (an account quarantined, a balance below its threshold, a reconciliation
discrepancy) keep an "already notified" flag in ``notify_state``: the flag turns on with a
conditional update, and only the transaction that turned it on inserts the event (dedupe key
``subject:version``, unique); it turns off when the condition clears (``account.restored`` is
raised then). A budget exhausted is raised once per key, budget and period (its dedupe key).
The workers detect transitions by looking (:func:`scan`), so the request path never waits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.oversight import signals
from app.oversight.models import NotifyState, Webhook, WebhookDelivery, WebhookEvent
from billing.ids import new_id
from billing.models import Customer, CustomerKey
from billing.money import format_usd

log = logging.getLogger("poolrelay.webhooks")

_events = WebhookEvent.__table__  # type: ignore[attr-defined]
_deliveries = WebhookDelivery.__table__  # type: ignore[attr-defined]
_state = NotifyState.__table__  # type: ignore[attr-defined]
_customers = Customer.__table__  # type: ignore[attr-defined]


def _insert(session: AsyncSession, table: sa.Table) -> Any:
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


async def emit(
    session: AsyncSession,
    event_type: str,
    dedupe_key: str,
    data: Mapping[str, Any],
    now: datetime | None = None,
) -> str | None:
    """Insert the event unless its dedupe key exists, and one pending delivery per webhook that
    wants it. Returns the new event's id, or None when it was raised before."""
    now = now or datetime.now(UTC)
    event_id = new_id("evt")
    result = await session.execute(
        _insert(session, _events)
        .values(
            id=event_id, type=event_type, dedupe_key=dedupe_key, data=dict(data), created_at=now
        )
        .on_conflict_do_nothing()
        .returning(_events.c.id)
    )
    if result.first() is None:  # raised before (RETURNING: exact on both databases)
        return None
    hooks = (
        await session.execute(
            sa.select(Webhook.id, Webhook.events).where(Webhook.status == "active")  # type: ignore[call-overload]
        )
    ).all()
    rows = [
        {
            "id": new_id("whd"),
            "event_id": event_id,
            "webhook_id": hook_id,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for hook_id, wanted in hooks
        if event_type in (wanted or ())
    ]
    if rows:
        await session.execute(sa.insert(_deliveries), rows)
    log.info(
        "event %s %s (%d webhook deliveries)",
        event_type,
        event_id,
        len(rows),
        extra={"event": "webhook_event", "type": event_type, "event_id": event_id},
    )
    return event_id


@dataclass(frozen=True, slots=True)
class Flag:
    """A condition watched under ``prefix`` (``account:``, ``customer.balance_low:``…): the
    event raised when it turns on, and the one (if any) when it turns off."""

    prefix: str
    on: str
    off: str | None = None


ACCOUNT = Flag("account:", "account.quarantined", "account.restored")
BALANCE_LOW = Flag("customer.balance_low:", "customer.balance_low")
DISCREPANCY = Flag("reconciliation:", "reconciliation.discrepancy")


async def _flip(session: AsyncSession, subject: str, active: bool) -> int | None:
    """Turn the flag to ``active``; the new version if this transaction did it, else None."""
    now = datetime.now(UTC)
    row = (
        await session.execute(
            sa.select(_state.c.active, _state.c.version).where(_state.c.subject == subject)
        )
    ).first()
    if row is None:
        if not active:
            return None
        result = await session.execute(
            _insert(session, _state)
            .values(subject=subject, active=True, version=1, updated_at=now)
            .on_conflict_do_nothing()
            .returning(_state.c.subject)
        )
        return 1 if result.first() is not None else None
    if bool(row.active) == active:
        return None
    result = await session.execute(
        sa.update(_state)
        .where(_state.c.subject == subject, _state.c.version == row.version)
        .values(active=active, version=row.version + 1, updated_at=now)
    )
    return int(row.version) + 1 if getattr(result, "rowcount", 0) else None


async def sync(
    session: AsyncSession,
    flag: Flag,
    current: Mapping[str, Mapping[str, Any]],
    *,
    off_data: Mapping[str, Mapping[str, Any]] | None = None,
    leave: Iterable[str] = (),
) -> list[str]:
    """Bring the flags under ``flag.prefix`` to ``current`` (suffix → event data of the
    conditions that hold now): raise ``flag.on`` for each new one and ``flag.off`` for each
    that cleared. ``leave``: suffixes whose flag stays as it is (an account disabled by the
    operator is neither quarantined nor restored). Returns the ids of the events raised."""
    active = {
        str(s)[len(flag.prefix) :]
        for (s,) in (
            await session.execute(
                sa.select(_state.c.subject).where(
                    _state.c.subject.startswith(flag.prefix, autoescape=True),
                    _state.c.active.is_(True),
                )
            )
        ).all()
    }
    raised: list[str] = []
    skip = set(leave)
    for suffix in sorted(set(current) - active):
        subject = flag.prefix + suffix
        version = await _flip(session, subject, True)
        if version is not None:
            event = await emit(session, flag.on, f"{subject}:{version}", current[suffix])
            if event:
                raised.append(event)
    for suffix in sorted(active - set(current) - skip):
        subject = flag.prefix + suffix
        version = await _flip(session, subject, False)
        if version is not None and flag.off is not None:
            data = (off_data or {}).get(suffix, {})
            event = await emit(session, flag.off, f"{subject}:{version}", data)
            if event:
                raised.append(event)
    return raised


async def sync_balances(session: AsyncSession) -> list[str]:
    """``customer.balance_low`` for every customer whose balance is below its threshold."""
    rows = (
        await session.execute(
            sa.select(
                _customers.c.id,
                _customers.c.name,
                _customers.c.balance_micros,
                _customers.c.held_micros,
                _customers.c.low_balance_micros,
            ).where(
                _customers.c.low_balance_micros.is_not(None),
                _customers.c.balance_micros < _customers.c.low_balance_micros,
            )
        )
    ).all()
    current = {
        r.id: {
            "customer_id": r.id,
            "name": r.name,
            "balance_usd": format_usd(int(r.balance_micros)),
            "available_usd": format_usd(int(r.balance_micros) - int(r.held_micros)),
            "low_balance_usd": format_usd(int(r.low_balance_micros)),
        }
        for r in rows
    }
    return await sync(session, BALANCE_LOW, current)


async def sync_discrepancies(
    session: AsyncSession, found: Iterable[tuple[str, str, Mapping[str, Any]]]
) -> list[str]:
    """``reconciliation.discrepancy`` for each (kind, customer id, detail) newly found."""
    current = {
        f"{kind}:{customer_id}": {"kind": kind, "customer_id": customer_id, **dict(detail)}
        for kind, customer_id, detail in found
    }
    return await sync(session, DISCREPANCY, current)


async def budget_signals(redis: aioredis.Redis) -> list[str]:
    """The relay's notes of exhausted budgets (:mod:`app.oversight.signals`)."""
    raw = await redis.smembers(signals.BUDGET_EXHAUSTED)  # type: ignore[misc]
    return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw)


async def raise_budget_events(session: AsyncSession, members: Iterable[str]) -> list[str]:
    """``key.budget_exhausted`` for each note, once per key, budget and period (the dedupe
    key); the caller drops the notes (:func:`forget_budget_signals`) once this committed."""
    raised: list[str] = []
    for member in members:
        parts = member.split("|")
        if len(parts) != 4 or not parts[3].isdigit():
            continue
        key_id, scope, period, limit = parts
        key = await session.get(CustomerKey, key_id)
        if key is None:
            continue
        event = await emit(
            session,
            "key.budget_exhausted",
            f"key.budget_exhausted:{key_id}:{scope}:{period}",
            {
                "key_id": key_id,
                "customer_id": key.customer_id,
                "key_name": key.name,
                "budget": scope,
                "period": period,
                "budget_usd": format_usd(int(limit)),
                "budget_action": key.budget_action,
            },
        )
        if event:
            raised.append(event)
    return raised


async def forget_budget_signals(redis: aioredis.Redis, members: Iterable[str]) -> None:
    items = list(members)
    if items:
        await redis.srem(signals.BUDGET_EXHAUSTED, *items)  # type: ignore[misc]
