"""Background jobs: plain ``async def job(ctx)`` functions, idempotent, run by arq workers in
production and on a timer inside ``poolrelay serve`` in embedded mode. ``ctx["services"]`` is the
process's :class:`app.state.Services`.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from app import batch_settlement, instances, redis_keys
from app.redis_keys import progress as progress_key
from app.state import Services
from billing import reconcile, usage
from billing.models import Hold
from billing.pricing import Usage
from pool import accounts as account_repo
from pool.health import probe

log = logging.getLogger("poolrelay.jobs")

PROBE_BACKOFF_MIN = 5.0
PROBE_BACKOFF_MAX = 600.0
BILLING_FIRST_PROBE = 900.0
SETTLEMENT_MARGIN = timedelta(minutes=15)
"""Beyond the longest request: time a live relay's settlement may still take (retries)."""


def instance_key(instance_id: str) -> str:
    return instances.instance_key(instance_id)


async def heartbeat(services: Services) -> None:
    await instances.heartbeat(
        services.redis, services.instance_id, services.settings.heartbeat_seconds
    )


def max_hold_age(services: Services) -> timedelta:
    """A hold older than this outlived the longest request the relay allows (and the time its
    settlement may take): its process cannot still be serving it."""
    return timedelta(seconds=services.settings.max_request_seconds) + SETTLEMENT_MARGIN


async def _liveness(ctx: dict[str, Any]) -> tuple[bool, Any]:
    """Whether heartbeats can be trusted now (Redis did not just come back empty), and an
    ``is_alive(instance_id)`` that answers True for any process that may be alive."""
    services: Services = ctx["services"]
    own = None if ctx.get("worker") else services.instance_id
    settings = services.settings
    # An in-process Redis began with this process: it cannot have forgotten a live relay.
    fresh = not settings.is_memory_redis and await instances.memory_is_fresh(
        services.redis, settings.heartbeat_seconds
    )

    async def is_alive(instance_id: str) -> bool:
        if instance_id == own or fresh:
            return True
        return await instances.is_alive(services.redis, instance_id)

    return not fresh, is_alive


async def reconcile_billing(ctx: dict[str, Any]) -> dict[str, Any]:
    """Finish the holds of relays that died, drop their leases, and check the books."""
    services: Services = ctx["services"]
    report = reconcile.Report()
    book = await services.prices.get()
    stale: list[Hold] = []
    if not (ctx.get("worker") and services.settings.is_memory_redis):
        # A separate process with an in-memory Redis cannot see the server's heartbeats: it
        # only checks the books; the embedded server finishes its own left-behind holds.
        trusted, is_alive = await _liveness(ctx)
        report.heartbeats_trusted = trusted
        if not trusted:
            log.warning(
                "Redis came back empty less than %.0f s ago: holds of relays without a "
                "heartbeat are kept until the live ones have beaten again",
                instances.grace_seconds(services.settings.heartbeat_seconds),
                extra={"event": "redis_memory_fresh"},
            )
        async with services.db.transaction() as session:
            stale = await reconcile.stale_holds(
                session, is_alive=is_alive, max_age=max_hold_age(services)
            )
        report.leases_dropped = await _drop_dead_leases(services, is_alive)
    for hold in stale:
        raw = await services.redis.get(progress_key(hold.request_id))
        progress = None
        if raw:
            data = orjson.loads(raw)
            progress = reconcile.Progress(
                model=data.get("model"), usage=Usage.from_api(data.get("usage"))
            )
        async with services.db.transaction() as session:
            charged = await reconcile.finish_hold(session, hold, progress, book.match)
        if charged:
            report.holds_settled += 1
        else:
            report.holds_released += 1
        await services.redis.delete(progress_key(hold.request_id))
    async with services.db.transaction() as session:
        report.discrepancies = await reconcile.verify_books(session, book.match)
    from app.oversight import events  # issue 15B (local: keeps this module's imports as they were)

    async with services.db.transaction() as session:  # reconciliation.discrepancy, once each
        await events.sync_discrepancies(
            session, [(d.kind, d.customer_id, d.detail) for d in report.discrepancies]
        )
    metrics = services.metrics
    metrics.discrepancies.set(len(report.discrepancies))
    if report.holds_settled:
        metrics.holds_settled.labels("charged").inc(report.holds_settled)
    if report.holds_released:
        metrics.holds_settled.labels("released").inc(report.holds_released)
    for d in report.discrepancies:
        log.error(
            "reconciliation discrepancy %s for %s: %s",
            d.kind,
            d.customer_id,
            d.detail,
            extra={
                "event": "reconciliation_discrepancy",
                "kind": d.kind,
                "customer_id": d.customer_id,
            },
        )
    if stale:
        log.info("reconciliation finished %d left-behind holds", len(stale))
    return report.as_dict()


async def drop_dead_leases(ctx: dict[str, Any]) -> dict[str, Any]:
    """Give back at once the concurrency slots of relay processes that stopped heart-beating
    (their leases would otherwise keep the slots until they expire)."""
    services: Services = ctx["services"]
    if ctx.get("worker") and services.settings.is_memory_redis:
        return {"leases_dropped": 0}
    _trusted, is_alive = await _liveness(ctx)
    return {"leases_dropped": await _drop_dead_leases(services, is_alive)}


async def _drop_dead_leases(services: Services, is_alive: Any) -> int:
    dropped = 0
    for owner in await services.scheduler.lease_owners():
        instance_id = instances.instance_of(owner)
        if await is_alive(instance_id):
            continue
        n = await services.scheduler.drop_owner(owner)
        if n:
            dropped += n
            log.info(
                "dropped %d leases of relay %s, which stopped heart-beating",
                n,
                instance_id,
                extra={"event": "leases_dropped", "instance_id": instance_id},
            )
    return dropped


_probe_key = redis_keys.probe


async def probe_accounts(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Probe quarantined accounts (not rate-limited ones: those come back when their time is up)."""
    services: Services = ctx["services"]
    now = time.time()
    results: list[dict[str, Any]] = []
    live = await services.directory.accounts()
    for account_id, reason, _until in await services.scheduler.quarantined(now):
        if reason == "rate_limited":
            continue
        account = live.get(account_id)
        if account is None:
            continue
        state_raw = await services.redis.get(_probe_key(account_id))
        if state_raw is None and reason == "upstream_billing":
            # A free probe cannot see credit: wait before the first one, so that an account
            # out of credit does not bounce back into service on every health cycle.
            await services.redis.set(
                _probe_key(account_id),
                orjson.dumps({"next": now + BILLING_FIRST_PROBE, "backoff": BILLING_FIRST_PROBE}),
                ex=int(PROBE_BACKOFF_MAX * 4),
            )
            continue
        state = (
            orjson.loads(state_raw) if state_raw else {"next": 0.0, "backoff": PROBE_BACKOFF_MIN}
        )
        if now < state["next"]:
            continue
        result = await probe(services.http, account.base_url, account.credential)
        if result.ok:
            await services.scheduler.clear_quarantine(account_id)
            await services.redis.delete(_probe_key(account_id))
            async with services.db.transaction() as session:
                await account_repo.record_quarantine(session, account_id, None, None, None)
            log.info("account %s passed its health probe and is back in service", account.name)
        else:
            backoff = min(PROBE_BACKOFF_MAX, state["backoff"] * 2)
            await services.redis.set(
                _probe_key(account_id),
                orjson.dumps({"next": now + state["backoff"], "backoff": backoff}),
                ex=int(PROBE_BACKOFF_MAX * 2),
            )
            async with services.db.transaction() as session:
                await account_repo.record_quarantine(
                    session,
                    account_id,
                    reason,
                    None,
                    f"probe failed: {result.detail}",
                )
        results.append({"account_id": account_id, "ok": result.ok, "detail": result.detail})
    return results


async def rollup_usage(ctx: dict[str, Any]) -> dict[str, Any]:
    """Fold request-log rows past ``REQUEST_LOG_RETENTION_DAYS`` into daily usage roll-ups."""
    services: Services = ctx["services"]
    days = services.settings.request_log_retention_days
    if days <= 0:
        return {"moved": 0}
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    async with services.db.transaction() as session:
        moved = await usage.roll_up(session, before=today - timedelta(days=days))
    if moved:
        log.info("rolled %d request-log rows into daily usage", moved)
    return {"moved": moved}


async def settle_batches(ctx: dict[str, Any]) -> dict[str, Any]:
    """Look at the batches in progress; charge the succeeded lines of those that ended and
    release the rest of their holds (:mod:`app.batch_settlement`). Idempotent: a line is
    charged once whoever settles it, however often."""
    services: Services = ctx["services"]
    return dict(await batch_settlement.settle_due(services))
