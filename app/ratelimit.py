"""Per-key request and token rate limits (``rpm``, ``tpm``): sliding one-minute windows in Redis.

Shared by every relay process. One Lua call per admitted request checks both windows and
records the request; after settlement the request's entry is corrected to the tokens it really
used (input + cache writes + output; cache reads are free, as in Anthropic's ITPM). A refusal
is a 429 ``rate_limit_error`` with ``retry-after`` (seconds until the oldest request leaves the
window, at most 60) and the key's own ``anthropic-ratelimit-*`` headers, so clients can pace
themselves; admitted responses carry the same headers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from app import redis_keys

WINDOW = 60

_ADMIT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local rid = ARGV[5]
local est = tonumber(ARGV[6])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window)
for i = 1, #expired, 500 do
  redis.call('HDEL', KEYS[2], unpack(expired, i, math.min(i + 499, #expired)))
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window) end
local count = redis.call('ZCARD', KEYS[1])
local used = 0
if tpm > 0 then
  local vals = redis.call('HVALS', KEYS[2])
  for i = 1, #vals do used = used + tonumber(vals[i]) end
end
local reset = now + window
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #oldest > 0 then reset = tonumber(oldest[2]) + window end
if rpm > 0 and count >= rpm then return {0, 'rpm', count, used, tostring(reset)} end
if tpm > 0 and count > 0 and used + est > tpm then return {0, 'tpm', count, used, tostring(reset)} end
redis.call('ZADD', KEYS[1], now, rid)
redis.call('HSET', KEYS[2], rid, est)
redis.call('EXPIRE', KEYS[1], window * 2)
redis.call('EXPIRE', KEYS[2], window * 2)
return {1, 'ok', count + 1, used + est, tostring(reset)}
"""

_CORRECT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # ok | rpm | tpm
    requests_used: int
    tokens_used: int
    reset: float
    rpm: int | None
    tpm: int | None
    now: float

    @property
    def retry_after(self) -> int:
        return max(1, min(WINDOW, math.ceil(self.reset - self.now)))

    def headers(self) -> dict[str, str]:
        reset = datetime.fromtimestamp(self.reset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        out: dict[str, str] = {}
        if self.rpm is not None:
            out["anthropic-ratelimit-requests-limit"] = str(self.rpm)
            out["anthropic-ratelimit-requests-remaining"] = str(
                max(0, self.rpm - self.requests_used)
            )
            out["anthropic-ratelimit-requests-reset"] = reset
        if self.tpm is not None:
            out["anthropic-ratelimit-tokens-limit"] = str(self.tpm)
            out["anthropic-ratelimit-tokens-remaining"] = str(max(0, self.tpm - self.tokens_used))
            out["anthropic-ratelimit-tokens-reset"] = reset
        return out


_keys = redis_keys.rate_windows


class KeyRateLimiter:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._admit: Any = redis.register_script(_ADMIT)
        self._correct: Any = redis.register_script(_CORRECT)

    async def admit(
        self,
        key_id: str,
        request_id: str,
        *,
        rpm: int | None,
        tpm: int | None,
        estimated_tokens: int,
        now: float,
    ) -> Decision:
        result = await self._admit(
            keys=_keys(key_id),
            args=[f"{now:.6f}", WINDOW, rpm or 0, tpm or 0, request_id, max(0, estimated_tokens)],
        )
        allowed, reason, count, used, reset = result
        return Decision(
            allowed=bool(int(allowed)),
            reason=reason.decode() if isinstance(reason, bytes) else str(reason),
            requests_used=int(count),
            tokens_used=int(used),
            reset=float(reset),
            rpm=rpm,
            tpm=tpm,
            now=now,
        )

    async def record_tokens(self, key_id: str, request_id: str, tokens: int) -> None:
        await self._correct(keys=_keys(key_id)[1:], args=[request_id, max(0, tokens)])
