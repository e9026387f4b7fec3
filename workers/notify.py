"""Webhook jobs: ``notify_transitions`` looks for events (accounts quarantined or restored,
balances below their threshold, budgets the relay saw exhausted) and writes them to the
outbox; ``deliver_webhooks`` sends what is due. Both idempotent: several workers (or the
embedded server's timers) may run them side by side."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from app.oversight import delivery, events
from app.oversight.events import ACCOUNT
from app.state import Services
from billing.models import iso
from pool import accounts as account_repo


def _iso(epoch: float | None) -> str | None:
    return iso(datetime.fromtimestamp(epoch, UTC)) if epoch else None


async def sync_accounts(services: Services) -> list[str]:
    """``account.quarantined`` / ``account.restored`` from the pool's live state (Redis)."""
    async with services.db.transaction() as session:
        rows = await account_repo.list_accounts(session, include_removed=True)
    states = await services.scheduler.states([r.id for r in rows], time.time())
    quarantined: dict[str, dict[str, Any]] = {}
    restored: dict[str, dict[str, Any]] = {}
    leave: list[str] = []
    for row in rows:
        state = states.get(row.id)
        if row.status != "active" or row.removed_at is not None:
            # disabled or removed by the operator: neither quarantined nor back in service
            leave.append(row.id)
            continue
        base = {"account_id": row.id, "name": row.name, "group": row.group}
        if state is not None and state.quarantined:
            quarantined[row.id] = {
                **base,
                "reason": state.reason,
                "quarantined_until": _iso(state.until),
            }
        else:
            restored[row.id] = base
    async with services.db.transaction() as session:
        return await events.sync(session, ACCOUNT, quarantined, off_data=restored, leave=leave)


async def notify_transitions(ctx: dict[str, Any]) -> dict[str, Any]:
    services: Services = ctx["services"]
    raised = await sync_accounts(services)
    async with services.db.transaction() as session:
        raised += await events.sync_balances(session)
    members = await events.budget_signals(services.redis)
    if members:
        async with services.db.transaction() as session:
            raised += await events.raise_budget_events(session, members)
        await events.forget_budget_signals(services.redis, members)
    return {"events": len(raised)}


async def deliver_webhooks(ctx: dict[str, Any]) -> dict[str, Any]:
    services: Services = ctx["services"]
    return await delivery.deliver_due(services.db, services.cipher)
