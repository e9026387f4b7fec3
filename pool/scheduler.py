"""The scheduler: which upstream account serves the next request, decided atomically in Redis.

Every decision is ONE Lua script call (EVALSHA), so several relay processes share one view of
headroom, leases, quarantines and affinity. Nothing lives only in process memory.

Redis key schema (``P`` = ``{prefix}:{pool}:``; every key shares the ``{pool}`` hash tag, so
all of them live in one slot and the scripts run on Redis Cluster; the fixed keys, the
candidate list and the affinity key are passed in KEYS, the group indexes are named inside the
scripts)::

    P cfg          HASH  account -> "max_concurrency|weight|group"  (latest candidate list wins;
                                     max_concurrency 0 = no cap)
    P hr           HASH  account -> "family limit remaining reset ..."  (last rate-limit headers;
                                     reset in epoch seconds, "-" when absent)
    P inflight     HASH  account -> "leases|tokens": live leases and the sum of their expected
                                     tokens (field absent = none)
    P leases       ZSET  "<lease id>:<account>" scored by expiry (epoch seconds); a lease id is
                         "<16 hex>-<expected tokens>", or "<owner: 16 hex><16 hex>-<expected
                         tokens>" when the scheduler has an owner (the relay process's id), so
                         that the leases of a process declared dead can be dropped at once
    P q            HASH  account -> "reason|until|since"  (quarantine; until "" = until cleared;
                                     reason "overloaded" is a 529 backoff, not a quarantine)
    P bo           HASH  account -> "step|end" of its last 529 backoff (how long, when it ended)
    P err          HASH  account -> last upstream error (text)
    P cb           HASH  account -> "failures|window start|trips"  (circuit breaker)
    P rank         ZSET  account scored by its weighted headroom score; only accounts that are
                         configured, not quarantined and below their concurrency cap are in it
    P rank:g:<g>   ZSET  the same, for the accounts of group <g>
    P due          ZSET  account scored by the next time its score changes on its own (the next
                         rate-limit reset ahead, or the end of its quarantine)
    P cs:<digest>  HASH  account -> "1": one candidate list, registered on first use (expires
                         after a day unused); the digest is over the list's encoding
    P aff:<key>    STRING account, with the affinity TTL (key from ``pool.affinity``)
    P wq           ZSET  "<lease id>|<candidate digest>|<deadline>|<lease ttl>" scored by
                         arrival (``P wseq``): requests waiting for a concurrency slot
    P wg:<lease>   STRING "account|expiry": the slot a waiter was given (kept 5 minutes, for a
                         waiter whose wake-up message was lost or that gave up meanwhile)

Waiting (contract §7): when the only obstacle is a concurrency cap, the acquire script itself
queues the request (so no slot can free unseen between the refusal and the queueing). Whenever
an account's state is refreshed with a slot free and waiters queued, the script hands the slot
to the oldest waiter whose candidate list has the account — it creates that waiter's lease —
and PUBLISHes ``lease|<lease id>|<account>|<expiry>`` on ``poolrelay:wake:<owner>``, the
channel of the waiter's process (:class:`pool.waiters.Waiters`). Nobody polls; a newcomer
never overtakes a waiter, since a freed slot is taken in the same script that frees it.

Headroom (``pool.headroom.headroom_score``) counts what in-flight requests will use. Each lease
records the expected tokens of ITS request, so an account's in-flight token use is the sum over
its leases (= in-flight count × their mean expected tokens, the ``expected_tokens_per_request``
the scheduler feeds the scoring rule). The score therefore depends on the account's own state
only, never on the request being placed, and can be kept in the ``rank`` index: every change
(headers, a lease taken, released or expired, a quarantine, a new configuration, a reset or a
quarantine end passing, via ``due``) re-scores that one account. A decision reads the top of
``rank`` (or of ``rank:g:<group>`` for affinity's group fallback) and costs the same at 10 and
at 1,000 accounts. Ties are broken at random (a seed is passed in ARGV). A candidate list of at
most ``direct_scan_max`` accounts is instead scored through ``ZMSCORE`` on its members, which
stays cheap when the list is a small part of a large pool.

Time is the ``now`` argument when given (tests), else the Redis server's ``TIME``; use one or
the other consistently.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import redis.asyncio as aioredis

from pool.errors import NoAccount, NoCapacity, Queued
from pool.headroom import NEARLY_EXHAUSTED, FamilyState, parse_ratelimit_headers, rate_limit_until

__all__ = ["QUARANTINE_REASONS", "AccountState", "Candidate", "Lease", "Scheduler"]

#: Why an account may be out of service.
QUARANTINE_REASONS: Final = frozenset(
    {
        "rate_limited",
        "credential_invalid",
        "permission_denied",
        "upstream_billing",
        "upstream_errors",
    }
)

BACKOFF: Final = "overloaded"
"""The quarantine-hash reason of a 529 backoff (not a quarantine: see Scheduler.back_off)."""

_LEASE_ID_BYTES = 8  # 16 hex characters
_ERROR_MAX = 500
_FORBIDDEN = frozenset("\t\n\r|")


@dataclass(frozen=True, slots=True)
class Candidate:
    """An account the caller allows for this request (active, allows the model)."""

    account_id: str
    max_concurrency: int | None = None
    """In-flight requests at once; None: no cap (headroom and the upstream's 429s govern)."""
    weight: float = 1.0
    group: str | None = None

    def __post_init__(self) -> None:
        if not self.account_id or _FORBIDDEN.intersection(self.account_id):
            raise ValueError("account_id must be non-empty, without tabs, newlines or '|'")
        if self.group is not None and _FORBIDDEN.intersection(self.group):
            raise ValueError("group must not contain tabs, newlines or '|'")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 (or None: no cap)")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError("weight must be a finite number >= 0")


@dataclass(frozen=True, slots=True)
class Lease:
    """One in-flight slot on an account, released by :meth:`Scheduler.release`."""

    account_id: str
    lease_id: str
    affinity_hit: bool
    expires_at: float


@dataclass(frozen=True, slots=True)
class AccountState:
    """The live state of one account, for the operator view."""

    account_id: str
    quarantined: bool
    reason: str | None
    until: float | None
    in_flight: int
    headroom: Mapping[str, FamilyState]
    last_error: str | None
    score: float
    backoff_until: float | None = None
    """The end of a 529 backoff in force (the account is passed over until then)."""


# --------------------------------------------------------------------------------------------
# Lua. KEYS[1..9] are always the fixed keys below; scripts add their own after them.

_PRELUDE = """
local K_CFG, K_HR, K_INF, K_LEASES, K_Q, K_ERR, K_CB, K_RANK, K_DUE =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local NEARLY = %(nearly)r

local function fmt(x) return string.format('%%.17g', x) end

local function clock(a)
  if a ~= nil and a ~= '' then return tonumber(a) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- pool.headroom.headroom_score, unweighted, with inflight = k and
-- inflight * expected_tokens_per_request = tok; also returns the next reset still ahead
local function score(fams, now, k, tok)
  local s, nxt = 1.0, nil
  if fams then
    for name, l, r, t in string.gmatch(fams, '(%%S+) (%%S+) (%%S+) (%%S+)') do
      local lim, rem, rst = tonumber(l), tonumber(r), tonumber(t)
      if lim and rem and lim > 0 and (rst == nil or rst > now) then
        local use = tok
        if name == 'requests' then use = k end
        local ratio = (rem - use) / lim
        if ratio < s then s = ratio end
        if rst and (nxt == nil or rst < nxt) then nxt = rst end
      end
    end
  end
  if s < 0 then s = 0 end
  return s, nxt
end

local function cfg_parse(v)
  local m, w, g = string.match(v, '^(%%d+)|([^|]*)|(.*)$')
  if g == '' then g = nil end
  return tonumber(m), tonumber(w), g
end

local function q_parse(v)
  local r, u, s = string.match(v, '^([^|]*)|([^|]*)|(.*)$')
  return r, tonumber(u), tonumber(s)
end

local function inf_parse(v)  -- leases, sum of their expected tokens
  if not v then return 0, 0 end
  local k, tok = string.match(v, '^(%%d+)|(%%d+)$')
  return tonumber(k) or 0, tonumber(tok) or 0
end

local function lease_parse(m)  -- account, expected tokens of a lease member
  local e, acct = string.match(m, '^%%x+%%-(%%d+):(.*)$')
  return acct, tonumber(e)
end

local function grank(g) return K_RANK .. ':g:' .. g end

local K_BASE = string.sub(K_CFG, 1, -4)
local K_WQ = K_BASE .. 'wq'

-- hand free slots of acct (k leases of at most maxc) to the oldest waiters that may use it;
-- returns the new in-flight count and tokens
local function serve_waiters(acct, now, k, tok, maxc)
  if redis.call('EXISTS', K_WQ) == 0 then return k, tok end
  local granted = false
  while k < maxc do
    local items = redis.call('ZRANGE', K_WQ, 0, 63)
    local lid, ttl = nil, nil
    for i = 1, #items do
      local m = items[i]
      local l, dig, dl, t = string.match(m, '^([^|]+)|([^|]+)|([^|]+)|(.+)$')
      if not l or tonumber(dl) <= now then
        redis.call('ZREM', K_WQ, m)
      elseif redis.call('HEXISTS', K_BASE .. 'cs:' .. dig, acct) == 1 then
        redis.call('ZREM', K_WQ, m)
        lid, ttl = l, tonumber(t)
        break
      end
    end
    if not lid then break end
    local member = lid .. ':' .. acct
    local _, e = lease_parse(member)
    local expires = now + ttl
    redis.call('ZADD', K_LEASES, fmt(expires), member)
    k, tok = k + 1, tok + (e or 0)
    granted = true
    local grant = acct .. '|' .. fmt(expires)
    redis.call('SET', K_BASE .. 'wg:' .. lid, grant, 'EX', 300)
    redis.call('PUBLISH', 'poolrelay:wake:' .. string.sub(lid, 1, 16), 'lease|' .. lid .. '|' .. grant)
  end
  if granted then redis.call('HSET', K_INF, acct, string.format('%%d|%%d', k, tok)) end
  return k, tok
end

-- 'ok', raw, weighted | 'rl', until | 'full' | 'out'
local function judge(cv, qv, iv, hv, now)
  if not cv then return 'out' end
  local maxc, w = cfg_parse(cv)
  if qv then
    local r, u = q_parse(qv)
    if u == nil or u > now then
      if r == 'rate_limited' and u ~= nil then return 'rl', u end
      return 'out'
    end
  end
  local k, tok = inf_parse(iv)
  if maxc > 0 and k >= maxc then return 'full' end
  local raw = score(hv, now, k, tok)
  return 'ok', raw, raw * w
end

-- bring an account's rank and due entries up to date with its state, after adding dk leases
-- and dtok expected tokens (optional) to its in-flight count
local function refresh(acct, now, dk, dtok)
  local k, tok = inf_parse(redis.call('HGET', K_INF, acct))
  if dk and dk ~= 0 then
    k, tok = k + dk, math.max(0, tok + dtok)
    if k <= 0 then
      k, tok = 0, 0
      redis.call('HDEL', K_INF, acct)
    else
      redis.call('HSET', K_INF, acct, string.format('%%d|%%d', k, tok))
    end
  end
  local cv = redis.call('HGET', K_CFG, acct)
  if not cv then
    redis.call('ZREM', K_RANK, acct)
    redis.call('ZREM', K_DUE, acct)
    return
  end
  local maxc, w, g = cfg_parse(cv)
  local listed, weighted, due = true, 0, nil
  local qv = redis.call('HGET', K_Q, acct)
  if qv then
    local _, u = q_parse(qv)
    if u == nil or u > now then
      listed, due = false, u
    else
      redis.call('HDEL', K_Q, acct)
    end
  end
  if listed and maxc > 0 and k < maxc then k, tok = serve_waiters(acct, now, k, tok, maxc) end
  if listed then
    if maxc > 0 and k >= maxc then
      listed = false
    else
      local s, nxt = score(redis.call('HGET', K_HR, acct), now, k, tok)
      weighted, due = s * w, nxt
    end
  end
  if listed then
    redis.call('ZADD', K_RANK, fmt(weighted), acct)
    if g then redis.call('ZADD', grank(g), fmt(weighted), acct) end
  else
    redis.call('ZREM', K_RANK, acct)
    if g then redis.call('ZREM', grank(g), acct) end
  end
  if due then redis.call('ZADD', K_DUE, fmt(due), acct) else redis.call('ZREM', K_DUE, acct) end
end

-- drop expired leases and refresh accounts whose reset or quarantine end has come
local function sweep(now)
  local dk, dtok = {}, {}
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', fmt(now))
  for i = 1, #expired do
    local acct, e = lease_parse(expired[i])
    if acct then dk[acct], dtok[acct] = (dk[acct] or 0) - 1, (dtok[acct] or 0) - e end
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', K_LEASES, '-inf', fmt(now)) end
  local due = redis.call('ZRANGEBYSCORE', K_DUE, '-inf', fmt(now))
  for i = 1, #due do dk[due[i]], dtok[due[i]] = dk[due[i]] or 0, dtok[due[i]] or 0 end
  for acct, d in pairs(dk) do refresh(acct, now, d, dtok[acct]) end
end
"""

_ACQUIRE = """
local K_CS, K_AFF = KEYS[10], KEYS[11]
if redis.call('EXPIRE', K_CS, ARGV[8]) == 0 then return {'NOSET'} end
local now = clock(ARGV[1])
local e = tonumber(ARGV[2])
local rng = tonumber(ARGV[3]) % 2147483646 + 1
local lease_id, ttl, aff_ttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local direct = ARGV[7] == '1'
local wait = tonumber(ARGV[9])
local excluded = {}
for i = 10, #ARGV do excluded[ARGV[i]] = true end

local function rand(n)  -- Park-Miller; an integer in [0, n)
  rng = (rng * 16807) % 2147483647
  return rng % n
end

local function usable(acct) return not excluded[acct] end

sweep(now)

-- judge accounts ids[from..to] that are candidates; f(acct, status, a, b) may return true to stop
local function each(ids, from, to, f)
  local function get(key) return redis.call('HMGET', key, unpack(ids, from, to)) end
  local mem, c, q, inf, h = get(K_CS), get(K_CFG), get(K_Q), get(K_INF), get(K_HR)
  for j = 1, to - from + 1 do
    local acct = ids[from + j - 1]
    if mem[j] and usable(acct) then
      if f(acct, judge(c[j], q[j], inf[j], h[j], now)) then return end
    end
  end
end

local function raw_of(acct)  -- unweighted score when the account may serve, else nil
  local raw
  each({acct}, 1, 1, function(_, st, a) if st == 'ok' then raw = a end end)
  return raw
end

-- the best candidate of a rank index (its scores are exact once swept); ties at random
local function rank_scan(zkey)
  local pos, n = 0, 8
  while true do
    local items = redis.call('ZREVRANGE', zkey, pos, pos + n - 1, 'WITHSCORES')
    if #items == 0 then return nil end
    local ids = {}
    for i = 1, #items, 2 do ids[#ids + 1] = items[i] end
    local mem = redis.call('HMGET', K_CS, unpack(ids))
    for j = 1, #ids do
      if mem[j] and usable(ids[j]) then
        local best, chosen, cnt = items[2 * j], ids[j], 1
        if j == #ids or items[2 * j + 2] == best then cnt = redis.call('ZCOUNT', zkey, best, best) end
        if cnt > 1 then
          local start = redis.call('ZCOUNT', zkey, '(' .. best, '+inf')
          for _ = 1, 3 do
            local at = start + rand(cnt)
            local y = redis.call('ZREVRANGE', zkey, at, at)[1]
            if y and usable(y) and redis.call('HEXISTS', K_CS, y) == 1 then
              chosen = y
              break
            end
          end
        end
        return chosen
      end
    end
    if #ids < n then return nil end
    pos = pos + n
    if n < 256 then n = n * 2 end
  end
end

-- the best of the given candidates by their scores in a rank index; ties at random
local function direct_scan(ids, zkey)
  local best, chosen, ties = -1, nil, 0
  for from = 1, #ids, 256 do
    local to = math.min(from + 255, #ids)
    local scores = redis.call('ZMSCORE', zkey, unpack(ids, from, to))
    for j = 1, to - from + 1 do
      local s, acct = tonumber(scores[j]), ids[from + j - 1]
      if s and usable(acct) then
        if s > best then
          best, chosen, ties = s, acct, 1
        elseif s == best then
          ties = ties + 1
          if rand(ties) == 0 then chosen = acct end
        end
      end
    end
  end
  return chosen
end

local chosen, hit, group = nil, 0, nil
local sticky = false
if K_AFF then sticky = redis.call('GET', K_AFF) end
if sticky then
  local raw = raw_of(sticky)
  if raw and raw >= NEARLY then
    chosen, hit = sticky, 1
  else
    local cv = redis.call('HGET', K_CFG, sticky)
    if cv then
      local _, _, g = cfg_parse(cv)
      group = g
    end
  end
end

if not chosen then
  local ids = nil
  if direct then ids = redis.call('HKEYS', K_CS) end
  local function best_of(zkey)
    if ids then return direct_scan(ids, zkey) end
    return rank_scan(zkey)
  end
  if group then  -- another account of the sticky one's group (not the sticky one itself)
    local was = excluded[sticky]
    excluded[sticky] = true
    local ga = best_of(grank(group))
    excluded[sticky] = was
    if ga then
      local raw = raw_of(ga)
      if raw and raw >= NEARLY then chosen = ga end
    end
  end
  if not chosen then chosen = best_of(K_RANK) end
end

if not chosen then
  -- nobody can serve: why? (also a safety net, should the rank index ever miss someone)
  local ids = redis.call('HKEYS', K_CS)
  local retry, full = nil, {}
  local ok, okw = nil, -1
  for from = 1, #ids, 256 do
    each(ids, from, math.min(from + 255, #ids), function(acct, st, a, b)
      if st == 'ok' and b > okw then
        ok, okw = acct, b
      elseif st == 'rl' and (retry == nil or a - now < retry) then
        retry = a - now
      elseif st == 'full' then
        full[acct] = true
      end
    end)
  end
  if ok then
    chosen = ok
  else
    if next(full) then
      if wait and wait > 0 then
        -- only a concurrency cap stands in the way: queue (first come, first served)
        local digest = string.sub(K_CS, string.len(K_BASE) + 4)
        local until_ = now + wait
        local ticket = lease_id .. '|' .. digest .. '|' .. fmt(until_) .. '|' .. fmt(ttl)
        redis.call('ZADD', K_WQ, redis.call('INCR', K_BASE .. 'wseq'), ticket)
        return {'QUEUED', ticket, fmt(until_)}
      end
      -- A full account frees a slot as soon as any of its requests ends (usually seconds;
      -- the lease expiry is only the crash bound): ask the client to come back in a second.
      retry = 1
      return {'NOCAP', fmt(retry), 'full'}
    end
    if retry == nil then return {'NOACCT'} end
    if retry < 1 then retry = 1 end
    return {'NOCAP', fmt(retry)}
  end
end

local expires = now + ttl
redis.call('ZADD', K_LEASES, fmt(expires), lease_id .. ':' .. chosen)
refresh(chosen, now, 1, e)
if K_AFF then redis.call('SET', K_AFF, chosen, 'EX', aff_ttl) end
return {'OK', chosen, fmt(expires), hit}
"""

_REGISTER = """
local K_CS = KEYS[10]
local now = clock(ARGV[1])
local F = '([^\\t\\n]*)'
redis.call('DEL', K_CS)
for acct, m, w, g in string.gmatch(ARGV[2], F .. '\\t' .. F .. '\\t' .. F .. '\\t' .. F .. '\\n') do
  local old = redis.call('HGET', K_CFG, acct)
  if old then
    local _, _, og = cfg_parse(old)
    if og and og ~= g then redis.call('ZREM', grank(og), acct) end
  end
  redis.call('HSET', K_CFG, acct, m .. '|' .. w .. '|' .. g)
  redis.call('HSET', K_CS, acct, '1')
  refresh(acct, now)
end
redis.call('EXPIRE', K_CS, ARGV[3])
return 1
"""

_DROP_OWNER = """
local now, owner = clock(ARGV[1]), ARGV[2]
local n = string.len(owner)
local all = redis.call('ZRANGE', K_LEASES, 0, -1)
local dk, dtok, dropped = {}, {}, 0
for i = 1, #all do
  local m = all[i]
  local hex = string.match(m, '^(%x+)%-')
  if hex and string.len(hex) == 2 * n and string.sub(m, 1, n) == owner then
    local acct, e = lease_parse(m)
    if acct and redis.call('ZREM', K_LEASES, m) == 1 then
      dk[acct], dtok[acct] = (dk[acct] or 0) - 1, (dtok[acct] or 0) - e
      dropped = dropped + 1
    end
  end
end
for acct, d in pairs(dk) do refresh(acct, now, d, dtok[acct]) end
return dropped
"""

_UNWAIT = """
local ticket, lid = ARGV[1], ARGV[2]
if redis.call('ZREM', K_WQ, ticket) == 1 then return {'GONE'} end
local g = redis.call('GET', K_BASE .. 'wg:' .. lid)
if not g then return {'GONE'} end
redis.call('DEL', K_BASE .. 'wg:' .. lid)
local acct, expires = string.match(g, '^(.*)|([^|]+)$')
return {'GRANTED', acct, expires}
"""

_RELEASE = """
local now, member = clock(ARGV[1]), ARGV[2]
local acct, e = lease_parse(member)
if acct and redis.call('ZREM', K_LEASES, member) == 1 then
  refresh(acct, now, -1, -e)
  return 1
end
return 0
"""

_FINISH = """
local now = clock(ARGV[1])
for i = 2, #ARGV - 2, 3 do
  local member, hr, success = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local acct, e = lease_parse(member)
  if acct then
    if hr ~= '' then redis.call('HSET', K_HR, acct, hr) end
    if success == '1' then redis.call('HDEL', K_CB, acct) end
    if redis.call('ZREM', K_LEASES, member) == 1 then
      refresh(acct, now, -1, -e)
    elseif hr ~= '' then
      refresh(acct, now)
    end
  end
end
return 1
"""

_RENEW = """
local now, member, ttl = clock(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local acct, e = lease_parse(member)
local expires = now + ttl
if not acct then return fmt(expires) end
local known = redis.call('ZSCORE', K_LEASES, member)
redis.call('ZADD', K_LEASES, fmt(expires), member)
if not known then refresh(acct, now, 1, e) end
return fmt(expires)
"""

_RECORD_HEADERS = """
local now = clock(ARGV[1])
redis.call('HSET', K_HR, ARGV[2], ARGV[3])
refresh(ARGV[2], now)
return 1
"""

_QUARANTINE = """
local now, acct, reason = clock(ARGV[1]), ARGV[2], ARGV[3]
local untl, err, cap = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
if reason == 'rate_limited' then
  if untl == nil or untl > now + cap then untl = now + cap end
  if untl < now + 1 then untl = now + 1 end
end
if err ~= '' then redis.call('HSET', K_ERR, acct, err) end
local cur = redis.call('HGET', K_Q, acct)
if cur and untl ~= nil then
  local _, u = q_parse(cur)
  if u == nil then return 0 end  -- only clear_quarantine (or another indefinite one) replaces it
  if u > untl then untl = u end
end
local u = ''
if untl ~= nil then u = fmt(untl) end
redis.call('HSET', K_Q, acct, reason .. '|' .. u .. '|' .. fmt(now))
refresh(acct, now)
return 1
"""

_BACKOFF = """
local K_BO = KEYS[10]
local now, acct = clock(ARGV[1]), ARGV[2]
local base, longest, err = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
if err ~= '' then redis.call('HSET', K_ERR, acct, err) end
local qv = redis.call('HGET', K_Q, acct)
if qv then
  local r, u = q_parse(qv)
  if u == nil or u > now then
    -- already out: quarantined (nothing to add), or in a backoff that a request sent before it
    -- began must not lengthen
    if r == 'overloaded' then return fmt(u) end
    return ''
  end
end
local step = base
local bo = redis.call('HGET', K_BO, acct)
if bo then
  local s, e = string.match(bo, '^([^|]*)|(.*)$')
  s, e = tonumber(s), tonumber(e)
  -- 529s continue: the last backoff ended less than its own length ago
  if s and e and now < e + s then step = math.min(longest, s * 2) end
end
local untl = now + step
redis.call('HSET', K_BO, acct, fmt(step) .. '|' .. fmt(untl))
redis.call('HSET', K_Q, acct, 'overloaded|' .. fmt(untl) .. '|' .. fmt(now))
refresh(acct, now)
return fmt(untl)
"""

_CLEAR = """
local now = clock(ARGV[1])
redis.call('HDEL', K_Q, ARGV[2])
refresh(ARGV[2], now)
return 1
"""

_FAILURE = """
local now, acct, err = clock(ARGV[1]), ARGV[2], ARGV[3]
local threshold, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local base, longest = tonumber(ARGV[6]), tonumber(ARGV[7])
if err ~= '' then redis.call('HSET', K_ERR, acct, err) end
local qv = redis.call('HGET', K_Q, acct)
if qv then
  local _, u = q_parse(qv)
  if u == nil or u > now then return 0 end  -- already out of service
end
local count, start, trips = 0, now, 0
local cb = redis.call('HGET', K_CB, acct)
if cb then
  local c, s, t = string.match(cb, '^([^|]*)|([^|]*)|(.*)$')
  count, start, trips = tonumber(c), tonumber(s), tonumber(t)
end
if now - start > window then count, start = 0, now end
count = count + 1
if count >= threshold then
  local cool = math.min(base * 2 ^ trips, longest)
  redis.call('HSET', K_Q, acct, 'upstream_errors|' .. fmt(now + cool) .. '|' .. fmt(now))
  redis.call('HSET', K_CB, acct, '0|' .. fmt(now) .. '|' .. (trips + 1))
  refresh(acct, now)
  return 1
end
redis.call('HSET', K_CB, acct, count .. '|' .. fmt(start) .. '|' .. trips)
return 0
"""

_FORGET = """
local acct = ARGV[1]
local cv = redis.call('HGET', K_CFG, acct)
if cv then
  local _, _, g = cfg_parse(cv)
  if g then redis.call('ZREM', grank(g), acct) end
end
for _, k in ipairs({K_CFG, K_HR, K_INF, K_Q, K_ERR, K_CB, KEYS[10]}) do
  redis.call('HDEL', k, acct)
end
redis.call('ZREM', K_RANK, acct)
redis.call('ZREM', K_DUE, acct)
return 1
"""

_STATES = """
local now = clock(ARGV[1])
sweep(now)
local out = {fmt(now)}
for i = 2, #ARGV do
  local a = ARGV[i]
  local k, tok = inf_parse(redis.call('HGET', K_INF, a))
  local h = redis.call('HGET', K_HR, a)
  out[#out + 1] = {
    redis.call('HGET', K_Q, a) or '', tostring(k), h or '',
    redis.call('HGET', K_ERR, a) or '', fmt(score(h, now, k, tok)),
  }
end
return out
"""


@dataclass(frozen=True, slots=True)
class AcquireCall:
    """One prepared :meth:`Scheduler.acquire`: the script's keys and arguments."""

    keys: list[str]
    args: list[str | int]
    lease_id: str
    candidate_blob: str
    now: float | None


class LeaseEnd(NamedTuple):
    """One request's end for the finish script: lease member, encoded headroom, success flag."""

    member: str
    headroom: str
    success: str


def _lua(body: str) -> str:
    return _PRELUDE % {"nearly": NEARLY_EXHAUSTED} + body


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _time(now: float | None) -> str:
    return "" if now is None else repr(float(now))


def _encode_families(families: Mapping[str, FamilyState]) -> str:
    return " ".join(
        f"{name} {f.limit} {f.remaining} {'-' if f.reset is None else repr(f.reset)}"
        for name, f in families.items()
    )


def _decode_families(text: str) -> dict[str, FamilyState]:
    parts = text.split()
    families: dict[str, FamilyState] = {}
    for i in range(0, len(parts) - 3, 4):
        name, limit, remaining, reset = parts[i : i + 4]
        families[name] = FamilyState(
            int(limit), int(remaining), None if reset == "-" else float(reset)
        )
    return families


def _parse_quarantine(text: str) -> tuple[str, float | None]:
    reason, until, _since = text.split("|", 2)
    return reason, (float(until) if until else None)


@dataclass(frozen=True, slots=True)
class _CandidateSet:
    source: Sequence[Candidate]
    digest: str
    blob: str


class Scheduler:
    """Leases accounts to requests; see the module docstring for the design."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "poolrelay",
        lease_ttl: float = 900.0,
        rate_limit_cap: float = 300.0,
        failure_threshold: int = 3,
        failure_window: float = 30.0,
        failure_cooldown: float = 30.0,
        max_cooldown: float = 600.0,
        direct_scan_max: int = 64,
        candidate_set_ttl: int = 86400,
        owner: str = "",
        backoff_base: float = 2.0,
        backoff_max: float = 60.0,
    ) -> None:
        if owner and (len(owner) != _LEASE_ID_BYTES * 2 or not _is_hex(owner)):
            raise ValueError(f"owner must be {_LEASE_ID_BYTES * 2} hex characters")
        self._owner = owner
        self._backoff_base = float(backoff_base)
        self._backoff_max = float(backoff_max)
        self._redis = redis
        self._base = f"{prefix}:{{pool}}:"
        names = ("cfg", "hr", "inflight", "leases", "q", "err", "cb", "rank", "due")
        self._keys = [self._base + name for name in names]
        self._lease_ttl = float(lease_ttl)
        self._rate_limit_cap = float(rate_limit_cap)
        self._failure = (
            int(failure_threshold),
            float(failure_window),
            float(failure_cooldown),
            float(max_cooldown),
        )
        self._direct_scan_max = int(direct_scan_max)
        self._candidate_set_ttl = int(candidate_set_ttl)
        self._random = random.Random()
        self._sets: OrderedDict[int, _CandidateSet] = OrderedDict()
        register = redis.register_script
        self._acquire = register(_lua(_ACQUIRE))
        self._register = register(_lua(_REGISTER))
        self._release = register(_lua(_RELEASE))
        self._drop_owner = register(_lua(_DROP_OWNER))
        self._unwait = register(_lua(_UNWAIT))
        self._finish = register(_lua(_FINISH))
        self._renew = register(_lua(_RENEW))
        self._record_headers = register(_lua(_RECORD_HEADERS))
        self._quarantine = register(_lua(_QUARANTINE))
        self._clear = register(_lua(_CLEAR))
        self._backoff = register(_lua(_BACKOFF))
        self._failure_script = register(_lua(_FAILURE))
        self._forget = register(_lua(_FORGET))
        self._states = register(_lua(_STATES))

    # -- candidate lists ---------------------------------------------------------------------

    def _candidate_set(self, candidates: Sequence[Candidate]) -> _CandidateSet:
        """The encoding of a candidate list; cached for tuples (immutable), so a caller that
        keeps its candidate tuple pays the O(n) encoding once."""
        cacheable = type(candidates) is tuple
        if cacheable:
            found = self._sets.get(id(candidates))
            if found is not None and found.source is candidates:
                self._sets.move_to_end(id(candidates))
                return found
        blob = "".join(
            f"{c.account_id}\t{c.max_concurrency or 0}\t{c.weight!r}\t{c.group or ''}\n"
            for c in candidates
        )
        digest = hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()
        entry = _CandidateSet(candidates, digest, blob)
        if cacheable:
            self._sets[id(candidates)] = entry
            while len(self._sets) > 32:
                self._sets.popitem(last=False)
        return entry

    # -- leases ------------------------------------------------------------------------------

    def acquire_call(
        self,
        candidates: Sequence[Candidate],
        *,
        expected_tokens: int,
        affinity: tuple[str, int] | None = None,
        exclude: Collection[str] = (),
        now: float | None = None,
        wait: float = 0.0,
        only: Collection[str] | None = None,
    ) -> AcquireCall:
        """Everything one :meth:`acquire` sends, ready to run alone or in :meth:`acquire_many`.
        Raises :class:`NoAccount` when there are no candidates. With ``wait`` > 0 (seconds; a
        scheduler with an ``owner`` only), a request that only a concurrency cap keeps out is
        queued instead of refused: the call raises :class:`Queued`. ``only``: a hard
        constraint, stronger than affinity — no account outside it is chosen (a request that
        names a file goes only to the accounts of the file's group); none left: NoAccount."""
        if only is not None:
            candidates = [c for c in candidates if c.account_id in only]
        if not candidates:
            raise NoAccount()
        cset = self._candidate_set(candidates)
        keys = [*self._keys, self._base + "cs:" + cset.digest]
        aff_ttl = ""
        if affinity is not None:
            keys.append(self._base + "aff:" + affinity[0])
            aff_ttl = str(max(1, int(affinity[1])))
        expected = max(0, int(expected_tokens))
        lease_id = f"{self._owner}{self._random.getrandbits(_LEASE_ID_BYTES * 8):016x}-{expected}"
        args: list[str | int] = [
            _time(now),
            expected,
            self._random.getrandbits(31),
            lease_id,
            repr(self._lease_ttl),
            aff_ttl,
            "1" if len(candidates) <= self._direct_scan_max else "0",
            self._candidate_set_ttl,
            repr(float(wait)) if wait > 0 and self._owner else "",
            *exclude,
        ]
        return AcquireCall(keys, args, lease_id, cset.blob, now)

    async def acquire(
        self,
        candidates: Sequence[Candidate],
        *,
        expected_tokens: int,
        affinity: tuple[str, int] | None = None,
        exclude: Collection[str] = (),
        now: float | None = None,
        wait: float = 0.0,
        only: Collection[str] | None = None,
    ) -> Lease:
        """Lease the best account among ``candidates`` for one request.

        The sticky account of ``affinity`` when it may serve and is not nearly exhausted; else
        the best account of its group; else the account with the most (weighted) headroom.
        ``exclude`` removes accounts that already failed this request. Raises
        :class:`NoCapacity` when the candidates are only rate limited or full, and
        :class:`NoAccount` when none can serve at all.
        """
        call = self.acquire_call(
            candidates,
            expected_tokens=expected_tokens,
            affinity=affinity,
            exclude=exclude,
            now=now,
            wait=wait,
            only=only,
        )
        return await self.run_acquire(call)

    async def run_acquire(self, call: AcquireCall) -> Lease:
        """Run one prepared acquire (registering its candidate list first when Redis has
        forgotten it)."""
        reply = await self._acquire(keys=call.keys, args=call.args)
        if _str(reply[0]) == "NOSET":
            await self._register(
                keys=call.keys[:10],
                args=[_time(call.now), call.candidate_blob, self._candidate_set_ttl],
            )
            reply = await self._acquire(keys=call.keys, args=call.args)
        return self._lease(call, reply)

    async def acquire_many(self, calls: Sequence[AcquireCall]) -> list[Lease | Exception]:
        """Run many prepared acquires in ONE round trip (a pipeline of the same script; each
        is its own atomic decision, in order). Each result is a lease, or the
        :class:`NoCapacity` / :class:`NoAccount` (or error) that call would have raised."""
        if len(calls) == 1:
            try:
                return [await self.run_acquire(calls[0])]
            except Exception as exc:
                return [exc]
        pipe = self._redis.pipeline(transaction=False)
        sha = self._acquire.sha
        for call in calls:
            pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
        replies = await pipe.execute(raise_on_error=False)
        results: list[Lease | Exception] = []
        for call, reply in zip(calls, replies, strict=True):
            try:
                if isinstance(reply, Exception) or _str(reply[0]) == "NOSET":
                    # NOSCRIPT (Redis restarted) or a forgotten candidate list: on its own
                    results.append(await self.run_acquire(call))
                else:
                    results.append(self._lease(call, reply))
            except Exception as exc:
                results.append(exc)
        return results

    @staticmethod
    def _lease(call: AcquireCall, reply: Any) -> Lease:
        status = _str(reply[0])
        if status == "OK":
            return Lease(
                account_id=_str(reply[1]),
                lease_id=call.lease_id,
                affinity_hit=int(reply[3]) == 1,
                expires_at=float(_str(reply[2])),
            )
        if status == "NOCAP":
            raise NoCapacity(float(_str(reply[1])), concurrency=len(reply) > 2)
        if status == "QUEUED":
            raise Queued(_str(reply[1]), call.lease_id, float(_str(reply[2])))
        if status == "NOACCT":
            raise NoAccount()
        raise RuntimeError(f"unexpected scheduler reply {status!r}")  # pragma: no cover

    @property
    def wake_channel(self) -> str:
        """The Pub/Sub channel on which this scheduler's waiters are handed their slots."""
        return f"poolrelay:wake:{self._owner}"

    async def unwait(self, queued: Queued) -> Lease | None:
        """Leave the queue (the wait timed out, or the client went away). Returns the lease
        when a slot was handed over meanwhile (the caller uses or releases it), else None."""
        reply = await self._unwait(keys=self._keys, args=[queued.ticket, queued.lease_id])
        if _str(reply[0]) != "GRANTED":
            return None
        return Lease(_str(reply[1]), queued.lease_id, False, float(_str(reply[2])))

    async def grant_of(self, queued: Queued) -> Lease | None:
        """The slot handed to a waiter, if any (for a waiter whose wake-up may be lost)."""
        raw = await self._redis.get(self._base + "wg:" + queued.lease_id)
        if raw is None:
            return None
        account_id, _, expires = _str(raw).rpartition("|")
        return Lease(account_id, queued.lease_id, False, float(expires))

    @staticmethod
    def granted(queued: Queued, message: str) -> Lease | None:
        """The lease in a wake-up message (``lease|<lease id>|<account>|<expiry>``) when it is
        this waiter's."""
        kind, lease_id, rest = message.split("|", 2)
        if kind != "lease" or lease_id != queued.lease_id:
            return None
        account_id, _, expires = rest.rpartition("|")
        return Lease(account_id, lease_id, False, float(expires))

    async def release(self, lease: Lease, now: float | None = None) -> None:
        """Give the lease's slot back (idempotent: a second release does nothing)."""
        await self._release(keys=self._keys, args=[_time(now), self._member(lease)])

    async def lease_owners(self) -> set[str]:
        """The owners (relay process ids, 16 hex) that hold at least one lease."""
        members = await self._redis.zrange(self._keys[3], 0, -1)
        owners: set[str] = set()
        width = _LEASE_ID_BYTES * 2
        for raw in members:
            hex_part = _str(raw).partition("-")[0]
            if len(hex_part) == 2 * width:
                owners.add(hex_part[:width])
        return owners

    async def drop_owner(self, owner: str, now: float | None = None) -> int:
        """Drop every lease of ``owner`` (a process declared dead); returns how many. Their
        slots and in-flight tokens come back at once instead of when the leases expire."""
        if len(owner) != _LEASE_ID_BYTES * 2 or not _is_hex(owner):
            raise ValueError("not a lease owner")
        return int(await self._drop_owner(keys=self._keys, args=[_time(now), owner]))

    async def finish(
        self,
        lease: Lease,
        *,
        headers: Mapping[str, str] | None = None,
        success: bool = False,
        now: float | None = None,
    ) -> None:
        """End a request in one round trip: release its lease, store the rate-limit families of
        its response (if any), and on ``success`` reset the account's circuit breaker."""
        await self.finish_many([self.ending(lease, headers=headers, success=success)], now)

    def ending(
        self, lease: Lease, *, headers: Mapping[str, str] | None = None, success: bool = False
    ) -> LeaseEnd:
        """What :meth:`finish_many` needs to end one request (headers parsed here, at once)."""
        families = parse_ratelimit_headers(headers) if headers is not None else {}
        return LeaseEnd(
            self._member(lease),
            _encode_families(families) if families else "",
            "1" if success else "0",
        )

    async def finish_many(self, ends: Sequence[LeaseEnd], now: float | None = None) -> None:
        """:meth:`finish` for many requests in ONE script call (callers batch their ends)."""
        if not ends:
            return
        args: list[str] = [_time(now)]
        for end in ends:
            args.extend(end)
        await self._finish(keys=self._keys, args=args)

    @property
    def lease_ttl(self) -> float:
        """Seconds a lease lives unless renewed (:meth:`renew`) or ended."""
        return self._lease_ttl

    async def renew(self, lease: Lease, now: float | None = None) -> Lease:
        """Extend a long stream's lease by ``lease_ttl`` from now. A lease that had already
        expired takes its slot back (the request is still running). Returns the new lease."""
        reply = await self._renew(
            keys=self._keys, args=[_time(now), self._member(lease), repr(self._lease_ttl)]
        )
        return Lease(lease.account_id, lease.lease_id, lease.affinity_hit, float(_str(reply)))

    @staticmethod
    def _member(lease: Lease) -> str:
        return f"{lease.lease_id}:{lease.account_id}"

    # -- headroom ----------------------------------------------------------------------------

    async def record_headers(
        self, account_id: str, headers: Mapping[str, str], now: float | None = None
    ) -> None:
        """Store the rate-limit families of a response (nothing when it carries none)."""
        families = parse_ratelimit_headers(headers)
        if families:
            await self._record_headers(
                keys=self._keys, args=[_time(now), account_id, _encode_families(families)]
            )

    # -- quarantine and circuit breaker ------------------------------------------------------

    async def quarantine(
        self,
        account_id: str,
        reason: str,
        until: float | None,
        error: str | None = None,
        now: float | None = None,
    ) -> None:
        """Take an account out of service until ``until`` (epoch seconds), or until
        :meth:`clear_quarantine` when ``until`` is None.

        ``rate_limited`` always has an end: ``until`` is capped at ``rate_limit_cap`` seconds
        from now (and None means the cap), at least 1 s. A quarantine with an end lifts by
        itself when its time comes. A timed quarantine never shortens a running one and never
        replaces one without an end.
        """
        if reason not in QUARANTINE_REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        await self._quarantine(
            keys=self._keys,
            args=[
                _time(now),
                account_id,
                reason,
                "" if until is None else repr(float(until)),
                (error or "")[:_ERROR_MAX],
                repr(self._rate_limit_cap),
            ],
        )

    async def quarantine_rate_limited(
        self,
        account_id: str,
        headers: Mapping[str, str],
        now: float,
        error: str | None = None,
    ) -> None:
        """Quarantine after a 429: until ``retry-after``, else the reset time (capped)."""
        until = rate_limit_until(headers, now)
        await self.quarantine(account_id, "rate_limited", until, error, now)

    async def back_off(
        self, account_id: str, error: str | None = None, now: float | None = None
    ) -> float | None:
        """After a 529: pass the account over for ``backoff_base`` seconds, doubling while 529s
        continue (one arriving less than the last backoff's length after it ended), at most
        ``backoff_max``. Not a quarantine: no probe, no operator action, and it ends by itself.
        Returns when the backoff ends (None when the account is quarantined anyway)."""
        reply = await self._backoff(
            keys=[*self._keys, self._base + "bo"],
            args=[
                _time(now),
                account_id,
                repr(self._backoff_base),
                repr(self._backoff_max),
                (error or "")[:_ERROR_MAX],
            ],
        )
        text = _str(reply)
        return float(text) if text else None

    async def clear_quarantine(self, account_id: str, now: float | None = None) -> None:
        """Return an account to service (the health job, after a successful probe)."""
        await self._clear(keys=self._keys, args=[_time(now), account_id])

    async def record_failure(self, account_id: str, error: str, now: float | None = None) -> bool:
        """Count a 5xx, timeout or connection error. ``failure_threshold`` of them within
        ``failure_window`` seconds quarantine the account (``upstream_errors``) for
        ``failure_cooldown`` seconds, doubling on each further trip without a success in
        between, up to ``max_cooldown``. Returns True when this failure tripped it."""
        threshold, window, cooldown, longest = self._failure
        tripped = await self._failure_script(
            keys=self._keys,
            args=[
                _time(now),
                account_id,
                error[:_ERROR_MAX],
                threshold,
                repr(window),
                repr(cooldown),
                repr(longest),
            ],
        )
        return int(tripped) == 1

    async def record_success(self, account_id: str) -> None:
        """Reset the circuit breaker (a no-op, with no write, when it is already clear)."""
        await self._redis.hdel(self._keys[6], account_id)  # type: ignore[misc]

    async def forget(self, account_id: str) -> None:
        """Drop every trace of an account (it was removed from the pool)."""
        await self._forget(keys=[*self._keys, self._base + "bo"], args=[account_id])

    # -- views -------------------------------------------------------------------------------

    async def states(
        self, account_ids: Sequence[str], now: float | None = None
    ) -> dict[str, AccountState]:
        """The live state of each account; ``score`` is its unweighted headroom score, as the
        scheduler computes it."""
        if not account_ids:
            return {}
        reply = await self._states(keys=self._keys, args=[_time(now), *account_ids])
        clock = float(_str(reply[0]))
        result: dict[str, AccountState] = {}
        for account_id, row in zip(account_ids, reply[1:], strict=True):
            qtext, inflight, hr, err, score = (_str(v) for v in row)
            reason: str | None = None
            until: float | None = None
            backoff: float | None = None
            if qtext:
                reason, until = _parse_quarantine(qtext)
                if until is not None and until <= clock:
                    reason, until = None, None
                elif reason == BACKOFF:
                    reason, until, backoff = None, None, until
            result[account_id] = AccountState(
                account_id=account_id,
                quarantined=reason is not None,
                reason=reason,
                until=until,
                in_flight=int(inflight),
                headroom=_decode_families(hr),
                last_error=err or None,
                score=float(score),
                backoff_until=backoff,
            )
        return result

    async def quarantined(self, now: float | None = None) -> list[tuple[str, str, float | None]]:
        """``(account_id, reason, until)`` of every quarantine in force, for the health job."""
        raw: dict[Any, Any] = await self._redis.hgetall(self._keys[4])  # type: ignore[misc]
        if now is None:
            seconds, micros = await self._redis.time()
            now = seconds + micros / 1_000_000
        found: list[tuple[str, str, float | None]] = []
        for account_id, text in raw.items():
            reason, until = _parse_quarantine(_str(text))
            if reason == BACKOFF:
                continue
            if until is None or until > now:
                found.append((_str(account_id), reason, until))
        return sorted(found)
