"""A key's ``max_concurrency``: its requests in flight at once, across every relay process.

Each key with a cap has, in Redis (all under the key's hash tag ``{key_id}``)::

    poolrelay:kc:{<key>}:h        ZSET  slot holder id -> expiry (epoch seconds)
    poolrelay:kc:{<key>}:wq       ZSET  "<holder id>|<deadline>|<ttl>" scored by arrival
    poolrelay:kc:{<key>}:seq      STRING arrival counter
    poolrelay:kc:{<key>}:g:<id>   STRING expiry of a slot handed to a waiter (5 minutes)

Taking a slot, giving it back and renewing it are one script call each. A request that finds
every slot taken waits in the queue (first come, first served, like the pool's queue in
:mod:`pool.scheduler`): the script that gives a slot back hands it to the oldest live waiter and
publishes ``key|<holder id>|<expiry>`` on the waiter's process channel
(``poolrelay:wake:<owner>``, :class:`pool.waiters.Waiters`). Slots expire (``ttl``), so a crashed
process cannot leak them; a stream renews its slot while it runs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis

from app import redis_keys
from pool.errors import NoCapacity

SLOT_TTL = 900.0

_PRELUDE = """
local K_H, K_WQ, K_SEQ = KEYS[1], KEYS[2], KEYS[3]
local G = string.sub(K_H, 1, -2) .. 'g:'
local function fmt(x) return string.format('%.17g', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', K_H, '-inf', fmt(now))

-- hand free slots to the oldest live waiters
local function serve(cap)
  while redis.call('ZCARD', K_H) < cap do
    local head = redis.call('ZRANGE', K_WQ, 0, 0)[1]
    if not head then return end
    redis.call('ZREM', K_WQ, head)
    local id, dl, ttl = string.match(head, '^([^|]+)|([^|]+)|(.+)$')
    if id and tonumber(dl) > now then
      local expires = now + tonumber(ttl)
      redis.call('ZADD', K_H, fmt(expires), id)
      redis.call('SET', G .. id, fmt(expires), 'EX', 300)
      redis.call('PUBLISH', 'poolrelay:wake:' .. string.sub(id, 1, 16), 'key|' .. id .. '|' .. fmt(expires))
    end
  end
end
"""

_TAKE = """
local cap, id, ttl, wait = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
serve(cap)
if redis.call('ZCARD', K_H) < cap and redis.call('ZCARD', K_WQ) == 0 then
  redis.call('ZADD', K_H, fmt(now + ttl), id)
  redis.call('PEXPIRE', K_H, math.ceil((ttl + 60) * 1000))
  return {'OK', fmt(now + ttl)}
end
if wait > 0 then
  local ticket = id .. '|' .. fmt(now + wait) .. '|' .. fmt(ttl)
  redis.call('ZADD', K_WQ, redis.call('INCR', K_SEQ), ticket)
  redis.call('PEXPIRE', K_WQ, math.ceil((wait + 60) * 1000))
  redis.call('PEXPIRE', K_SEQ, math.ceil((wait + 60) * 1000))
  return {'QUEUED', ticket}
end
return {'FULL'}
"""

_GIVE_BACK = """
local cap, id = tonumber(ARGV[1]), ARGV[2]
redis.call('ZREM', K_H, id)
serve(cap)
return 1
"""

_UNWAIT = """
local ticket, id = ARGV[1], ARGV[2]
if redis.call('ZREM', K_WQ, ticket) == 1 then return '' end
local g = redis.call('GET', G .. id)
if g then redis.call('DEL', G .. id) return g end
return ''
"""

_RENEW = """
local id, ttl = ARGV[1], tonumber(ARGV[2])
redis.call('ZADD', K_H, fmt(now + ttl), id)
redis.call('PEXPIRE', K_H, math.ceil((ttl + 60) * 1000))
return 1
"""


@dataclass(frozen=True, slots=True)
class KeySlot:
    """One of a key's concurrency slots, held by one request."""

    key_id: str
    holder: str
    cap: int


@dataclass(frozen=True, slots=True)
class KeyQueued:
    """A request waiting for one of its key's slots (the queue's ticket)."""

    slot: KeySlot
    ticket: str

    @property
    def lease_id(self) -> str:  # the name pool.waiters uses for a waiter's id
        return self.slot.holder


class KeySlots:
    """Takes and gives back keys' concurrency slots for one relay process (``owner``)."""

    def __init__(self, redis: aioredis.Redis, owner: str, *, ttl: float = SLOT_TTL) -> None:
        self._redis = redis
        self._owner = owner
        self.ttl = ttl
        self._take = redis.register_script(_PRELUDE + _TAKE)
        self._give_back = redis.register_script(_PRELUDE + _GIVE_BACK)
        self._unwait = redis.register_script(_PRELUDE + _UNWAIT)
        self._renew = redis.register_script(_PRELUDE + _RENEW)

    @staticmethod
    def _keys(key_id: str) -> list[str]:
        base = redis_keys.key_slots_base(key_id)
        return [base + "h", base + "wq", base + "seq"]

    async def take(self, key_id: str, cap: int, *, wait: float = 0.0) -> KeySlot | KeyQueued:
        """A slot, or a place in the queue (``wait`` > 0); :class:`NoCapacity` when full."""
        slot = KeySlot(key_id, self._owner + secrets.token_hex(8), cap)
        reply = await self._take(
            keys=self._keys(key_id), args=[cap, slot.holder, repr(self.ttl), repr(float(wait))]
        )
        status = _str(reply[0])
        if status == "OK":
            return slot
        if status == "QUEUED":
            return KeyQueued(slot, _str(reply[1]))
        raise NoCapacity(1.0, concurrency=True)

    async def give_back(self, slot: KeySlot) -> None:
        """Idempotent; the slot goes to the oldest waiter, if any."""
        await self._give_back(keys=self._keys(slot.key_id), args=[slot.cap, slot.holder])

    async def renew(self, slot: KeySlot) -> None:
        await self._renew(keys=self._keys(slot.key_id), args=[slot.holder, repr(self.ttl)])

    # the interface pool.waiters.wait_for_slot drives
    async def grant_of(self, queued: KeyQueued) -> KeySlot | None:
        raw = await self._redis.get(self._keys(queued.slot.key_id)[0][:-1] + "g:" + queued.lease_id)
        return queued.slot if raw is not None else None

    async def unwait(self, queued: KeyQueued) -> KeySlot | None:
        reply = await self._unwait(
            keys=self._keys(queued.slot.key_id), args=[queued.ticket, queued.lease_id]
        )
        return queued.slot if _str(reply) else None

    @staticmethod
    def granted(queued: KeyQueued, message: str) -> KeySlot | None:
        kind, holder, _ = message.split("|", 2)
        return queued.slot if kind == "key" and holder == queued.lease_id else None

    async def release(self, slot: KeySlot) -> None:
        await self.give_back(slot)


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
