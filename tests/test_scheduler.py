"""pool.scheduler against fakeredis, and against a real Redis when POOLRELAY_TEST_REDIS_URL is set.

Every test runs with both decision paths: ``rank`` (walk the rank index, used for large
candidate lists) and ``direct`` (score the whole candidate list, used for small ones).
Tests pass ``now`` explicitly; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool.errors import NoAccount, NoCapacity
from pool.headroom import FamilyState, headroom_score, parse_ratelimit_headers
from pool.scheduler import Candidate, Lease, Scheduler

REAL_URL = os.environ.get("POOLRELAY_TEST_REDIS_URL")
BACKENDS = ["fake", "real-if-env"] if REAL_URL else ["fake"]
MODES = ["rank", "direct"]
NOW = 1_800_000_000.0


def _real_url() -> str:
    """The env URL with database 14 (the tests FLUSHDB it)."""
    assert REAL_URL is not None
    parts = urlsplit(REAL_URL)
    return urlunsplit((parts.scheme, parts.netloc, "/14", parts.query, parts.fragment))


async def _client(backend: str) -> Any:
    if backend == "fake":
        return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    client = aioredis.Redis.from_url(_real_url())
    await client.flushdb()
    return client


Body = Callable[[Scheduler], Awaitable[None]]


@dataclass
class Env:
    backend: str
    mode: str
    client: Any = None

    def run(self, body: Body, **kwargs: Any) -> None:
        async def main() -> None:
            client = self.client = await _client(self.backend)
            try:
                kwargs.setdefault("direct_scan_max", 0 if self.mode == "rank" else 1_000_000)
                await body(Scheduler(client, **kwargs))
            finally:
                if self.backend != "fake":
                    await client.flushdb()
                await client.aclose()

        asyncio.run(main())


@pytest.fixture(params=[(b, m) for b in BACKENDS for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    backend, mode = request.param
    yield Env(backend, mode)


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def headers(fraction: float, *, reset: float = NOW + 60, limit: int = 1000) -> dict[str, str]:
    """Rate-limit headers with ``fraction`` left on a requests and a tokens family."""
    out: dict[str, str] = {}
    for family, lim in (("requests", limit), ("tokens", limit * 100)):
        out[f"anthropic-ratelimit-{family}-limit"] = str(lim)
        out[f"anthropic-ratelimit-{family}-remaining"] = str(round(lim * fraction))
        out[f"anthropic-ratelimit-{family}-reset"] = rfc3339(reset)
    return out


async def seed(s: Scheduler, fractions: dict[str, float], now: float = NOW) -> None:
    for account, fraction in fractions.items():
        await s.record_headers(account, headers(fraction), now)


def cands(*ids: str, cap: int = 100, group: str | None = None) -> tuple[Candidate, ...]:
    return tuple(Candidate(i, cap, 1.0, group) for i in ids)


# -- choosing by headroom ---------------------------------------------------------------------


def test_picks_the_most_headroom(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.2, "b": 0.9, "c": 0.5})
        pool = cands("a", "b", "c")
        for _ in range(5):
            lease = await s.acquire(pool, expected_tokens=10, now=NOW)
            assert lease.account_id == "b"
            assert lease.expires_at == NOW + 900
            assert not lease.affinity_hit
            await s.release(lease, NOW)
        # after fresh headers the order changes
        await s.record_headers("c", headers(0.95), NOW)
        assert (await s.acquire(pool, expected_tokens=10, now=NOW)).account_id == "c"

    env.run(body)


def test_weight_scales_the_score(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.8, "b": 0.5})
        pool = (Candidate("a", 10, 0.5), Candidate("b", 10, 1.0))
        assert (await s.acquire(pool, expected_tokens=0, now=NOW)).account_id == "b"
        pool = (Candidate("a", 10, 1.0), Candidate("b", 10, 1.0))  # a new list: new weights
        assert (await s.acquire(pool, expected_tokens=0, now=NOW)).account_id == "a"

    env.run(body)


def test_little_headroom_gets_a_small_share(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"rich": 1.0, "poor": 0.05})
        pool = cands("rich", "poor", cap=1000)
        counts: Counter[str] = Counter()
        window: list[Lease] = []
        for _ in range(300):
            lease = await s.acquire(pool, expected_tokens=1000, now=NOW)  # 1 % of the bucket
            counts[lease.account_id] += 1
            window.append(lease)
            if len(window) > 40:
                await s.release(window.pop(0), NOW)
        assert counts["poor"] < 0.05 * 300
        assert counts["rich"] > 0.9 * 300

    env.run(body)


def test_in_flight_requests_spread_the_load(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.6, "b": 0.5})
        pool = cands("a", "b", cap=1000)
        picks = [
            (await s.acquire(pool, expected_tokens=2000, now=NOW)).account_id for _ in range(20)
        ]
        # each lease on a costs 2 % of its token bucket: a is chosen until it falls below b
        assert picks[:5] == ["a"] * 5
        assert set(picks[5:]) == {"a", "b"}
        states = await s.states(["a", "b"], NOW)
        assert abs(states["a"].score - states["b"].score) <= 0.02 + 1e-9

    env.run(body)


def test_ties_are_broken_at_random(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        pool = cands("a", "b", "c", "d")  # never seen: all score 1.0
        counts: Counter[str] = Counter()
        for _ in range(200):
            lease = await s.acquire(pool, expected_tokens=0, now=NOW)
            counts[lease.account_id] += 1
            await s.release(lease, NOW)
        assert set(counts) == {"a", "b", "c", "d"}
        assert min(counts.values()) >= 20

    env.run(body)


def test_a_reset_restores_headroom_without_new_headers(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await s.record_headers("a", headers(0.0, reset=NOW + 10), NOW)
        await s.record_headers("b", headers(0.5, reset=NOW + 100), NOW)
        pool = cands("a", "b")
        lease = await s.acquire(pool, expected_tokens=0, now=NOW)
        assert lease.account_id == "b"
        await s.release(lease, NOW)
        assert (await s.acquire(pool, expected_tokens=0, now=NOW + 11)).account_id == "a"

    env.run(body)


def test_only_candidates_are_chosen(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        everyone = {f"acct{i:02d}": 0.1 + i / 100 for i in range(30)}
        await seed(s, everyone)
        await s.release(await s.acquire(cands(*everyone), expected_tokens=0, now=NOW), NOW)
        subset = cands("acct03", "acct07")
        for _ in range(3):
            lease = await s.acquire(subset, expected_tokens=0, now=NOW)
            assert lease.account_id == "acct07"
            await s.release(lease, NOW)

    env.run(body)


# -- leases -----------------------------------------------------------------------------------


def test_concurrency_cap_and_lease_expiry(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        pool = cands("a", cap=2)
        first = await s.acquire(pool, expected_tokens=0, now=NOW)
        await s.acquire(pool, expected_tokens=0, now=NOW + 5)
        with pytest.raises(NoCapacity) as caught:
            await s.acquire(pool, expected_tokens=0, now=NOW + 10)
        assert caught.value.retry_after == 1.0  # a slot frees when any request ends
        assert (await s.states(["a"], NOW + 10))["a"].in_flight == 2
        # a release frees a slot; a second release of the same lease changes nothing
        await s.release(first, NOW + 10)
        await s.release(first, NOW + 10)
        third = await s.acquire(pool, expected_tokens=0, now=NOW + 10)
        with pytest.raises(NoCapacity):
            await s.acquire(pool, expected_tokens=0, now=NOW + 10)
        # leases expire on their own: a crashed process cannot leak slots
        assert (await s.states(["a"], NOW + 100))["a"].in_flight == 0
        assert (await s.acquire(pool, expected_tokens=0, now=NOW + 100)).account_id == "a"
        await s.release(third, NOW + 100)  # already expired: harmless
        assert (await s.states(["a"], NOW + 100))["a"].in_flight == 1

    env.run(body, lease_ttl=60.0)


def test_acquire_many_decides_in_order_in_one_round_trip(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.9, "b": 0.5})
        pool = cands("a", "b", cap=2)
        calls = [s.acquire_call(pool, expected_tokens=0, now=NOW) for _ in range(5)]
        calls.append(s.acquire_call(cands("c", cap=1), expected_tokens=0, now=NOW))  # new list
        results = await s.acquire_many(calls)
        leases = [r for r in results if isinstance(r, Lease)]
        assert [lease.account_id for lease in leases] == ["a", "a", "b", "b", "c"]
        assert isinstance(results[4], NoCapacity)  # both accounts full by then
        assert [lease.lease_id for lease in leases] == [
            c.lease_id for c, r in zip(calls, results, strict=True) if isinstance(r, Lease)
        ]
        states = await s.states(["a", "b", "c"], NOW)
        assert [states[x].in_flight for x in "abc"] == [2, 2, 1]
        # Redis forgot the scripts (a restart): each call falls back to loading them
        await env.client.script_flush()
        for lease in leases:
            await s.release(lease, NOW)
        again = await s.acquire_many(
            [s.acquire_call(pool, expected_tokens=0, now=NOW) for _ in range(2)]
        )
        assert [r.account_id for r in again if isinstance(r, Lease)] == ["a", "a"]
        assert await s.acquire_many([s.acquire_call(pool, expected_tokens=0, now=NOW)]) != []
        with pytest.raises(NoAccount):
            s.acquire_call((), expected_tokens=0)

    env.run(body)


def test_finish_many_ends_every_lease_in_one_call(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        pool = cands("a", "b", cap=10)
        await seed(s, {"a": 0.9, "b": 0.1})
        leases = [await s.acquire(pool, expected_tokens=0, now=NOW) for _ in range(4)]
        assert {lease.account_id for lease in leases} == {"a"}
        fail = [await s.record_failure("b", "boom", NOW) for _ in range(2)]
        assert fail == [False, False]
        b = await s.acquire(cands("b", cap=10), expected_tokens=0, now=NOW)
        ends = [s.ending(lease) for lease in leases[:3]]
        ends.append(s.ending(b, headers=headers(0.8), success=True))
        ends.append(s.ending(leases[0]))  # ended twice in one call: the second does nothing
        await s.finish_many(ends, NOW)
        states = await s.states(["a", "b"], NOW)
        assert (states["a"].in_flight, states["b"].in_flight) == (1, 0)
        assert states["b"].headroom["requests"].remaining == 800  # b's new headers stored
        assert not await s.record_failure("b", "boom", NOW)  # success reset b's breaker
        await s.finish_many([], NOW)
        await s.finish(leases[3], now=NOW)
        assert (await s.states(["a"], NOW))["a"].in_flight == 0

    env.run(body)


def test_full_accounts_are_skipped(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.9, "b": 0.3})
        pool = (Candidate("a", 1), Candidate("b", 5))
        assert (await s.acquire(pool, expected_tokens=0, now=NOW)).account_id == "a"
        assert (await s.acquire(pool, expected_tokens=0, now=NOW)).account_id == "b"

    env.run(body)


def test_renew_extends_a_long_stream(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        pool = cands("a", cap=1)
        lease = await s.acquire(pool, expected_tokens=0, now=NOW)
        renewed = await s.renew(lease, NOW + 50)
        assert renewed.expires_at == NOW + 110
        assert renewed.lease_id == lease.lease_id
        with pytest.raises(NoCapacity) as caught:
            await s.acquire(pool, expected_tokens=0, now=NOW + 70)  # would have expired at +60
        assert caught.value.retry_after == 1.0
        # a renewal after expiry takes the slot back: the stream is still running
        assert (await s.states(["a"], NOW + 200))["a"].in_flight == 0
        late = await s.renew(renewed, NOW + 200)
        assert late.expires_at == NOW + 260
        assert (await s.states(["a"], NOW + 200))["a"].in_flight == 1
        await s.release(late, NOW + 201)
        assert (await s.states(["a"], NOW + 201))["a"].in_flight == 0

    env.run(body, lease_ttl=60.0)


# -- quarantine -------------------------------------------------------------------------------


def test_quarantine_excludes_and_rate_limited_expires_by_itself(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.9, "b": 0.3})
        pool = cands("a", "b")
        await s.quarantine("a", "rate_limited", NOW + 30, "429 rate_limit_error", NOW)
        assert (await s.acquire(pool, expected_tokens=0, now=NOW)).account_id == "b"
        assert await s.quarantined(NOW) == [("a", "rate_limited", NOW + 30)]
        state = (await s.states(["a"], NOW))["a"]
        assert (state.quarantined, state.reason, state.until) == (True, "rate_limited", NOW + 30)
        assert state.last_error == "429 rate_limit_error"
        # no job needed: at NOW+30 the account is back
        assert (await s.acquire(pool, expected_tokens=0, now=NOW + 30)).account_id == "a"
        assert await s.quarantined(NOW + 30) == []
        assert not (await s.states(["a"], NOW + 30))["a"].quarantined

    env.run(body)


def test_rate_limited_quarantine_is_capped(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await s.quarantine("a", "rate_limited", NOW + 10_000, None, NOW)
        await s.quarantine("b", "rate_limited", None, None, NOW)
        await s.quarantine("c", "rate_limited", NOW - 5, None, NOW)
        assert await s.quarantined(NOW) == [
            ("a", "rate_limited", NOW + 120),
            ("b", "rate_limited", NOW + 120),
            ("c", "rate_limited", NOW + 1),
        ]

    env.run(body, rate_limit_cap=120.0)


def test_quarantine_rate_limited_reads_retry_after(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await s.quarantine_rate_limited("a", {"retry-after": "7"}, NOW)
        await s.quarantine_rate_limited("b", headers(0.0, reset=NOW + 40), NOW)
        assert await s.quarantined(NOW) == [
            ("a", "rate_limited", NOW + 7),
            ("b", "rate_limited", NOW + 40),
        ]

    env.run(body)


def test_indefinite_quarantine_waits_for_a_probe(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        pool = cands("a")
        await s.quarantine("a", "credential_invalid", None, "401 authentication_error", NOW)
        with pytest.raises(NoAccount):
            await s.acquire(pool, expected_tokens=0, now=NOW + 10_000)
        # a timed quarantine (a late 429) does not shorten it
        await s.quarantine("a", "rate_limited", NOW + 5, None, NOW)
        assert await s.quarantined(NOW + 10) == [("a", "credential_invalid", None)]
        await s.clear_quarantine("a", NOW + 10)
        assert (await s.acquire(pool, expected_tokens=0, now=NOW + 10)).account_id == "a"
        with pytest.raises(ValueError):
            await s.quarantine("a", "bored", None)

    env.run(body)


def test_no_capacity_retry_after(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await s.quarantine("a", "rate_limited", NOW + 20, None, NOW)
        await s.acquire(cands("b", cap=1), expected_tokens=0, now=NOW)  # b now full until +60
        await s.quarantine("c", "credential_invalid", None, None, NOW)
        with pytest.raises(NoCapacity) as caught:  # b frees a slot when its request ends
            await s.acquire(cands("a", "b", "c", cap=1), expected_tokens=0, now=NOW)
        assert caught.value.retry_after == 1.0
        with pytest.raises(NoCapacity) as caught:  # only a rate limit: until it ends
            await s.acquire(cands("a", "c", cap=1), expected_tokens=0, now=NOW)
        assert caught.value.retry_after == pytest.approx(20.0)
        with pytest.raises(NoCapacity) as caught:  # never less than 1 s
            await s.acquire(cands("a", cap=1), expected_tokens=0, now=NOW + 19.5)
        assert caught.value.retry_after == 1.0
        with pytest.raises(NoCapacity) as caught:
            await s.acquire(cands("b", "c", cap=1), expected_tokens=0, now=NOW + 30)
        assert caught.value.retry_after == 1.0

    env.run(body, lease_ttl=60.0)


def test_no_account(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        with pytest.raises(NoAccount):
            await s.acquire((), expected_tokens=0, now=NOW)
        await s.quarantine("a", "credential_invalid", None, None, NOW)
        await s.quarantine("b", "upstream_billing", None, None, NOW)
        await s.quarantine("c", "upstream_errors", NOW + 30, None, NOW)
        with pytest.raises(NoAccount):
            await s.acquire(cands("a", "b", "c"), expected_tokens=0, now=NOW)
        with pytest.raises(NoAccount):  # the only other one is excluded (failover)
            await s.acquire(cands("a", "d"), expected_tokens=0, exclude={"d"}, now=NOW)

    env.run(body)


def test_exclude_fails_over_to_the_next_best(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.9, "b": 0.6, "c": 0.3})
        pool = cands("a", "b", "c")
        assert (await s.acquire(pool, expected_tokens=0, exclude={"a"}, now=NOW)).account_id == "b"
        lease = await s.acquire(pool, expected_tokens=0, exclude=["a", "b"], now=NOW)
        assert lease.account_id == "c"

    env.run(body)


# -- circuit breaker --------------------------------------------------------------------------


def test_circuit_breaker(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        pool = cands("a")
        assert not await s.record_failure("a", "502 bad gateway", NOW)
        assert not await s.record_failure("a", "timeout", NOW + 1)
        assert await s.record_failure("a", "connection reset", NOW + 2)
        assert await s.quarantined(NOW + 2) == [("a", "upstream_errors", NOW + 32)]
        assert (await s.states(["a"], NOW + 2))["a"].last_error == "connection reset"
        with pytest.raises(NoAccount):
            await s.acquire(pool, expected_tokens=0, now=NOW + 3)
        # failures while out of service do not count
        assert not await s.record_failure("a", "late failure", NOW + 4)
        # the cool-down ends by itself; tripping again doubles it
        assert (await s.acquire(pool, expected_tokens=0, now=NOW + 32)).account_id == "a"
        for t in (33, 34):
            assert not await s.record_failure("a", "503", NOW + t)
        assert await s.record_failure("a", "503", NOW + 35)
        assert await s.quarantined(NOW + 35) == [("a", "upstream_errors", NOW + 95)]
        # a success resets the breaker: the next trip is back to the base cool-down
        await s.record_success("a")
        await s.record_success("a")
        for t in (100, 101):
            assert not await s.record_failure("a", "500", NOW + t)
        assert await s.record_failure("a", "500", NOW + 102)
        assert await s.quarantined(NOW + 102) == [("a", "upstream_errors", NOW + 132)]

    env.run(body)


def test_failures_outside_the_window_do_not_add_up(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        for t in (0, 20, 40, 60, 80):
            assert not await s.record_failure("a", "500", NOW + t)
        assert await s.quarantined(NOW + 80) == []

    env.run(body)


def test_cool_down_doubles_up_to_a_cap(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        cool_downs = []
        t = NOW
        for _ in range(5):
            for _ in range(3):
                t += 1
                tripped = await s.record_failure("a", "500", t)
            assert tripped
            until = (await s.quarantined(t))[0][2]
            assert until is not None
            cool_downs.append(until - t)
            t = until
        assert cool_downs == [10, 20, 40, 40, 40]

    env.run(body, failure_cooldown=10.0, max_cooldown=40.0)


# -- affinity ---------------------------------------------------------------------------------


def test_affinity_sticks(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.5, "b": 0.4})
        pool = cands("a", "b")
        first = await s.acquire(pool, expected_tokens=0, affinity=("k1", 300), now=NOW)
        assert (first.account_id, first.affinity_hit) == ("a", False)
        await s.record_headers("b", headers(0.99), NOW)
        again = await s.acquire(pool, expected_tokens=0, affinity=("k1", 300), now=NOW)
        assert (again.account_id, again.affinity_hit) == ("a", True)
        plain = await s.acquire(pool, expected_tokens=0, now=NOW)
        assert plain.account_id == "b"
        other = await s.acquire(pool, expected_tokens=0, affinity=("k2", 300), now=NOW)
        assert (other.account_id, other.affinity_hit) == ("b", False)

    env.run(body)


def test_affinity_falls_back_to_the_group(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.9, "b": 0.3, "c": 0.2, "x": 0.8})
        pool = (*cands("a", "b", "c", group="east"), *cands("x", group="west"))
        first = await s.acquire(pool, expected_tokens=0, affinity=("k", 300), now=NOW)
        assert first.account_id == "a"
        await s.quarantine("a", "permission_denied", None, None, NOW)
        moved = await s.acquire(pool, expected_tokens=0, affinity=("k", 300), now=NOW)
        assert (moved.account_id, moved.affinity_hit) == ("b", False)  # not x: same group first
        # the key now points at b
        back = await s.acquire(pool, expected_tokens=0, affinity=("k", 300), now=NOW)
        assert (back.account_id, back.affinity_hit) == ("b", True)
        # failover: the sticky one excluded -> the next of its group
        failover = await s.acquire(
            pool, expected_tokens=0, affinity=("k", 300), exclude={"b"}, now=NOW
        )
        assert (failover.account_id, failover.affinity_hit) == ("c", False)

    env.run(body)


def test_affinity_moves_when_nearly_exhausted(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.9, "b": 0.02, "x": 0.5})
        pool = (*cands("a", "b", group="g"), *cands("x"))
        assert (
            await s.acquire(pool, expected_tokens=0, affinity=("k", 60), now=NOW)
        ).account_id == "a"
        await s.record_headers("a", headers(0.01), NOW)
        # a is nearly exhausted; b (its group) too: the best account overall takes over
        moved = await s.acquire(pool, expected_tokens=0, affinity=("k", 60), now=NOW)
        assert (moved.account_id, moved.affinity_hit) == ("x", False)

    env.run(body)


def test_affinity_leaves_a_nearly_exhausted_account_for_its_group(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.9, "b": 0.3, "x": 0.5})
        pool = (*cands("a", "b", group="g"), *cands("x"))
        assert (
            await s.acquire(pool, expected_tokens=0, affinity=("k", 60), now=NOW)
        ).account_id == "a"
        await s.record_headers("a", headers(0.04), NOW)
        moved = await s.acquire(pool, expected_tokens=0, affinity=("k", 60), now=NOW)
        assert (moved.account_id, moved.affinity_hit) == ("b", False)

    env.run(body)


def test_affinity_ttl_is_set_and_renewed(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        pool = cands("a", "b")
        key = "poolrelay:{pool}:aff:k"
        await s.acquire(pool, expected_tokens=0, affinity=("k", 300), now=NOW)
        assert 290 <= await env.client.ttl(key) <= 300
        hit = await s.acquire(pool, expected_tokens=0, affinity=("k", 3600), now=NOW)
        assert hit.affinity_hit
        assert 3590 <= await env.client.ttl(key) <= 3600
        await env.client.delete(key)  # what expiry does
        assert not (
            await s.acquire(pool, expected_tokens=0, affinity=("k", 300), now=NOW)
        ).affinity_hit

    env.run(body)


# -- state and bookkeeping --------------------------------------------------------------------


def test_states_and_server_time(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        lease = await s.acquire(cands("a"), expected_tokens=500)  # server TIME
        assert abs(lease.expires_at - (time.time() + 900)) < 5
        await s.record_headers("a", headers(0.5, reset=time.time() + 60))
        state = (await s.states(["a", "unknown"]))["a"]
        assert state.in_flight == 1
        assert state.headroom["requests"].limit == 1000
        assert state.headroom["tokens"].remaining == 50_000
        assert state.score == pytest.approx(min(499 / 1000, 49_500 / 100_000))
        unknown = (await s.states(["unknown"]))["unknown"]
        assert (unknown.in_flight, unknown.score, unknown.headroom) == (0, 1.0, {})
        assert await s.states([]) == {}
        await s.release(lease)
        assert (await s.states(["a"]))["a"].in_flight == 0

    env.run(body)


def test_a_new_candidate_list_updates_the_configuration(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await s.acquire((Candidate("a", 1, 1.0, "g1"),), expected_tokens=0, now=NOW)
        with pytest.raises(NoCapacity):
            await s.acquire((Candidate("a", 1, 1.0, "g1"),), expected_tokens=0, now=NOW)
        await s.acquire([Candidate("a", 2, 1.0, "g2")], expected_tokens=0, now=NOW)
        with pytest.raises(NoCapacity):
            await s.acquire([Candidate("a", 2, 1.0, "g2")], expected_tokens=0, now=NOW)

    env.run(body)


def test_forget(env: Env) -> None:
    async def body(s: Scheduler) -> None:
        await seed(s, {"a": 0.4})
        await s.quarantine("a", "credential_invalid", None, "401", NOW)
        await s.forget("a")
        assert await s.quarantined(NOW) == []
        state = (await s.states(["a"], NOW))["a"]
        assert (state.headroom, state.last_error, state.quarantined) == ({}, None, False)

    env.run(body)


@pytest.mark.parametrize(
    "args",
    [("", 1), ("a|b", 1), ("a", 0), ("a", 1, -1.0), ("a", 1, float("nan")), ("a", 1, 1.0, "g\n")],
)
def test_candidate_validation(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        Candidate(*args)


# -- the Lua rule is the Python rule ----------------------------------------------------------

family_st = st.builds(
    lambda limit, left, reset_in: (limit, min(left, limit + 500), reset_in),
    st.integers(1, 10**7),
    st.integers(0, 10**7),
    st.one_of(st.none(), st.integers(-120, 120)),
)
families_st = st.dictionaries(
    st.sampled_from(
        ["requests", "tokens", "input-tokens", "output-tokens", "priority-input-tokens"]
    ),
    family_st,
    max_size=5,
)


def to_headers(families: dict[str, tuple[int, int, int | None]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, (limit, remaining, reset_in) in families.items():
        prefix = "anthropic-priority-" if name.startswith("priority-") else "anthropic-ratelimit-"
        base = prefix + name.removeprefix("priority-")
        out[f"{base}-limit"] = str(limit)
        out[f"{base}-remaining"] = str(remaining)
        if reset_in is not None:
            out[f"{base}-reset"] = rfc3339(NOW + reset_in)
    return out


def python_score(
    families: dict[str, tuple[int, int, int | None]], inflight: int, expected: int, weight: float
) -> float:
    parsed: dict[str, FamilyState] = parse_ratelimit_headers(to_headers(families))
    return headroom_score(
        parsed, now=NOW, inflight=inflight, expected_tokens_per_request=expected, weight=weight
    )


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    families=families_st,
    inflight=st.integers(0, 3),
    expected=st.integers(0, 200_000),
)
def test_lua_score_agrees_with_headroom_score(
    backend: str, families: dict[str, tuple[int, int, int | None]], inflight: int, expected: int
) -> None:
    async def body(s: Scheduler) -> None:
        await s.record_headers("a", to_headers(families), NOW)
        for _ in range(inflight):
            await s.acquire(cands("a"), expected_tokens=expected, now=NOW)
        state = (await s.states(["a"], NOW))["a"]
        assert state.score == python_score(families, inflight, expected, 1.0)

    Env(backend, "rank").run(body)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    accounts=st.lists(
        st.tuples(families_st, st.integers(0, 2), st.sampled_from([0.0, 0.5, 1.0, 1.5])),
        min_size=1,
        max_size=6,
    ),
    expected=st.integers(0, 50_000),
)
def test_acquire_picks_a_best_python_score(
    backend: str,
    mode: str,
    accounts: list[tuple[dict[str, tuple[int, int, int | None]], int, float]],
    expected: int,
) -> None:
    pool = tuple(Candidate(f"acct{i}", 10, w) for i, (_, _, w) in enumerate(accounts))

    async def body(s: Scheduler) -> None:
        for i, (families, inflight, weight) in enumerate(accounts):
            await s.record_headers(f"acct{i}", to_headers(families), NOW)
            for _ in range(inflight):
                await s.acquire(
                    (Candidate(f"acct{i}", 10, weight),), expected_tokens=expected, now=NOW
                )
        scores = {
            f"acct{i}": python_score(families, inflight, expected, weight)
            for i, (families, inflight, weight) in enumerate(accounts)
        }
        lease = await s.acquire(pool, expected_tokens=expected, now=NOW)
        assert scores[lease.account_id] == max(scores.values())

    Env(backend, mode).run(body)
