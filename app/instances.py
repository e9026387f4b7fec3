"""Which relay processes are alive, as Redis sees it — and whether Redis may have forgotten.

Every ``serve`` process heart-beats ``poolrelay:instance:<id>`` with a TTL of
``HEARTBEAT_SECONDS`` (renewed every third of it). Reconciliation takes a missing heartbeat as
the sign that a process died and finishes the holds it left behind. That sign is only good while
Redis remembers: after a restart without persistence, an eviction or a flush, every live relay's
heartbeat is missing until its next beat, and releasing their holds then would turn delivered
streams into uncharged ones.

So Redis carries an *epoch*: ``poolrelay:epoch``, the time its current memory began, set (only
if absent) by every heartbeat and by every reconciliation. An epoch younger than a grace period
(two heartbeat lifetimes, :func:`memory_is_fresh`) means "Redis came back empty recently": a
missing heartbeat proves nothing yet, and reconciliation leaves heart-beat-based finishing
alone until the live relays have had time to beat again.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from app import redis_keys

INSTANCE_PREFIX = "inst_"
EPOCH_KEY = redis_keys.EPOCH
instance_key = redis_keys.instance


def owner_of(instance_id: str) -> str:
    """The lease owner (16 hex) of a process id ``inst_<16 hex>``."""
    return instance_id.removeprefix(INSTANCE_PREFIX)


def instance_of(owner: str) -> str:
    return INSTANCE_PREFIX + owner


async def heartbeat(redis: aioredis.Redis, instance_id: str, ttl_seconds: int) -> None:
    """One beat: this process is alive for ``ttl_seconds``; and Redis's epoch, if it has none."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(instance_key(instance_id), b"1", ex=ttl_seconds)
        pipe.set(EPOCH_KEY, repr(time.time()).encode(), nx=True)
        await pipe.execute()


async def stop(redis: aioredis.Redis, instance_id: str) -> None:
    """A clean shutdown: the process is gone at once (its holds are all settled by then)."""
    await redis.delete(instance_key(instance_id))


async def is_alive(redis: aioredis.Redis, instance_id: str) -> bool:
    return bool(await redis.exists(instance_key(instance_id)))


async def memory_age(redis: aioredis.Redis, now: float | None = None) -> float:
    """Seconds since Redis's memory began (0 when it has no epoch: it was just emptied, and
    the epoch starts now)."""
    now = time.time() if now is None else now
    raw = await redis.get(EPOCH_KEY)
    if raw is None:
        await redis.set(EPOCH_KEY, repr(now).encode(), nx=True)
        return 0.0
    try:
        return max(0.0, now - float(raw))
    except ValueError:
        await redis.set(EPOCH_KEY, repr(now).encode())
        return 0.0


def grace_seconds(heartbeat_seconds: int) -> float:
    """How long after Redis came back empty a missing heartbeat is no proof of death."""
    return 2.0 * heartbeat_seconds


async def memory_is_fresh(
    redis: aioredis.Redis, heartbeat_seconds: int, now: float | None = None
) -> bool:
    """True while Redis may not yet have heard from every live relay since it came back."""
    return await memory_age(redis, now) < grace_seconds(heartbeat_seconds)
