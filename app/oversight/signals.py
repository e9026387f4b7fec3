"""What the request path tells the workers about events, cheaply: Redis names both import.

The relay never waits for a webhook. When a key's budget refuses (or flags) a request, the relay
adds one member to a Redis set (:func:`budget_exhausted`, one ``SADD``, errors swallowed); the
workers' transition job turns each member into at most one ``key.budget_exhausted`` event per
key, budget and period (the event's unique dedupe key), whichever process saw it first.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from app import redis_keys
from billing.budgets import periods

BUDGET_EXHAUSTED = redis_keys.BUDGET_EXHAUSTED
"""SET of ``key_id|scope|period|limit_micros``."""

log = logging.getLogger("poolrelay.webhooks")


def budget_member(key_id: str, scope: str, limit_micros: int) -> str:
    day, month = periods()
    period = day if scope == "daily" else month
    return f"{key_id}|{scope}|{period}|{limit_micros}"


async def budget_exhausted(
    redis: aioredis.Redis, key_id: str, scope: str, limit_micros: int
) -> None:
    """Note (best effort: never an error for the request) that ``key_id``'s budget ran out."""
    try:
        await redis.sadd(BUDGET_EXHAUSTED, budget_member(key_id, scope, limit_micros))  # type: ignore[misc]
    except Exception:
        log.warning("could not note the exhausted budget of key %s", key_id, exc_info=True)
