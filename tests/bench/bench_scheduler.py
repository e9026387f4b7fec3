"""Benchmark of the scheduler: decision time and how picks follow headroom.

    python tests/bench/bench_scheduler.py [--redis-url redis://127.0.0.1:6379/14] [--quick]

Prints, for 10, 100 and 1,000 accounts, on a real Redis (FLUSHDB of the given database, 14 by
default; skipped with a note when unreachable) and on fakeredis:

* ``acquire`` latency as the caller sees it (p50/p99, µs), without and with affinity, and the
  server-side time per script call (Redis ``INFO commandstats``, real Redis only);
* the share of 10,000 picks each of 4 accounts gets against its headroom (100 %, 50 %, 10 %,
  1 %), one request at a time and with 128 and 300 requests in flight (each expected to use
  0.5 % of an output-token bucket; the oldest is released when the window is full).

No figure here is asserted anywhere; this is for reading.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter, deque
from datetime import UTC, datetime
from typing import Any

import fakeredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from pool.scheduler import Candidate, Lease, Scheduler

_RESET_AHEAD = 3600.0  # resets an hour ahead: the headroom stays as set during the run


def _headers(fraction: float, reset: float) -> dict[str, str]:
    stamp = datetime.fromtimestamp(reset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    headers: dict[str, str] = {}
    for family, limit in (
        ("requests", 4_000),
        ("input-tokens", 400_000),
        ("output-tokens", 80_000),
    ):
        headers[f"anthropic-ratelimit-{family}-limit"] = str(limit)
        headers[f"anthropic-ratelimit-{family}-remaining"] = str(int(limit * fraction))
        headers[f"anthropic-ratelimit-{family}-reset"] = stamp
    return headers


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _evalsha(r: aioredis.Redis, real: bool) -> tuple[int, float]:
    if not real:
        return 0, 0.0
    stats: dict[str, Any] = await r.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(entry["calls"]), float(entry["usec"])


async def _decisions(r: aioredis.Redis, real: bool, n: int, picks: int) -> str:
    await r.flushdb()
    scheduler = Scheduler(r)
    rng = random.Random(n)
    reset = time.time() + _RESET_AHEAD
    candidates = tuple(Candidate(f"acct-{i:05d}", 1_000_000, 1.0, f"g{i % 10}") for i in range(n))
    for c in candidates:
        await scheduler.record_headers(c.account_id, _headers(rng.uniform(0.05, 1.0), reset))
    await scheduler.release(await scheduler.acquire(candidates, expected_tokens=2_000))
    line = f"{n:>8}"
    for label, affinity in (("plain", False), ("affinity", True)):
        times: list[float] = []
        calls, usec = 0, 0.0
        for _ in range(max(1, picks // 16)):
            leases: list[Lease] = []
            calls0, usec0 = await _evalsha(r, real)
            for _ in range(16):
                key = (f"session-{rng.randrange(200)}", 300) if affinity else None
                start = time.perf_counter()
                lease = await scheduler.acquire(candidates, expected_tokens=2_000, affinity=key)
                times.append((time.perf_counter() - start) * 1e6)
                leases.append(lease)
            calls1, usec1 = await _evalsha(r, real)
            calls, usec = calls + calls1 - calls0, usec + usec1 - usec0
            for lease in leases:  # untimed: keeps the in-flight count moderate
                await scheduler.release(lease)
        srv = f"{usec / calls:5.0f}" if calls else "    -"
        line += f"   {label:>8} p50 {_pct(times, 0.5):5.0f} p99 {_pct(times, 0.99):6.0f} srv {srv}"
    return line


async def _floor(r: aioredis.Redis) -> str:
    """What any one-script round trip costs here (client library, event loop, network)."""
    noop = r.register_script("return 1")
    times = []
    for _ in range(500):
        start = time.perf_counter()
        await noop(keys=["poolrelay:{pool}:noop"], args=[])
        times.append((time.perf_counter() - start) * 1e6)
    return f"  floor: an EVALSHA of 'return 1' takes p50 {_pct(times, 0.5):.0f} µs from here"


async def _shares(r: aioredis.Redis, in_flight: int, picks: int) -> str:
    await r.flushdb()
    scheduler = Scheduler(r)
    reset = time.time() + _RESET_AHEAD
    headroom = {"a-100": 1.0, "a-50": 0.5, "a-10": 0.1, "a-1": 0.01}
    candidates = tuple(Candidate(a, 1_000_000) for a in headroom)
    for account, fraction in headroom.items():
        await scheduler.record_headers(account, _headers(fraction, reset))
    counts: Counter[str] = Counter()
    window: deque[Lease] = deque()
    for _ in range(picks):
        # each request is expected to use 0.5 % of an output-token bucket
        lease = await scheduler.acquire(candidates, expected_tokens=400)
        counts[lease.account_id] += 1
        window.append(lease)
        if len(window) > in_flight:
            await scheduler.release(window.popleft())
    for lease in window:
        await scheduler.release(lease)
    cells = "  ".join(
        f"{a} ({int(f * 100)} %): {100 * counts[a] / picks:5.1f} %" for a, f in headroom.items()
    )
    label = "one at a time" if in_flight == 0 else f"{in_flight} in flight"
    return f"  {label:>13}: {cells}"


async def _backend(name: str, r: aioredis.Redis, real: bool, quick: bool) -> None:
    print(f"\n== {name}")
    print(await _floor(r))
    print("  accounts   acquire latency in µs (caller side; srv = server time per script call)")
    for n in (10, 100, 1_000):
        picks = 200 if quick else (2_000 if real else 400)
        print(await _decisions(r, real, n, picks))
    print("  share of 10,000 picks against headroom:")
    for in_flight in (0, 128, 300):
        print(await _shares(r, in_flight, 1_000 if quick else 10_000))
    await r.flushdb()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    real = aioredis.Redis.from_url(args.redis_url)
    try:
        await real.ping()
    except (OSError, RedisConnectionError) as exc:
        print(f"real Redis at {args.redis_url} unreachable ({exc}); fakeredis only")
    else:
        await _backend(f"Redis {args.redis_url}", real, True, args.quick)
    finally:
        await real.aclose()
    fake = fakeredis.FakeAsyncRedis()
    try:
        await _backend("fakeredis", fake, False, args.quick)
    finally:
        await fake.aclose()


if __name__ == "__main__":
    asyncio.run(main())
