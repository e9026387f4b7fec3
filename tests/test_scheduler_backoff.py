"""No invented concurrency caps, and the 529 backoff (issue 13, items 1 and 3; contract §7).

- An account without ``max_concurrency`` takes any number of requests at once: its headroom
  and the upstream's own 429s govern.
- After a 529 the account is passed over for a short backoff — 2 s, doubling while 529s
  continue, at most 60 s — without a quarantine (no probe, no operator action), shown as
  ``backoff_until``; a running backoff is not lengthened by the 529s of requests sent before
  it began, and a quarantine is never shortened or replaced by it.
"""

from __future__ import annotations

import pytest

from pool.errors import NoAccount
from pool.scheduler import Candidate, Scheduler
from tests.test_scheduler import NOW, Env, env, headers  # noqa: F401  (env is a fixture)


def test_an_account_without_a_cap_takes_any_number_of_requests(env: Env) -> None:  # noqa: F811
    async def body(s: Scheduler) -> None:
        pool = (Candidate("a"), Candidate("b", 2))
        await s.record_headers("a", headers(0.5), NOW)
        await s.record_headers("b", headers(0.99), NOW)
        leases = [await s.acquire(pool, expected_tokens=10, now=NOW) for _ in range(500)]
        chosen = [lease.account_id for lease in leases]
        assert chosen.count("b") == 2  # its cap
        assert chosen.count("a") == 498
        states = await s.states(["a", "b"], now=NOW)
        assert states["a"].in_flight == 498 and states["b"].in_flight == 2

    env.run(body)


def test_a_529_backs_the_account_off_doubling_up_to_a_minute(env: Env) -> None:  # noqa: F811
    async def body(s: Scheduler) -> None:
        pool = (Candidate("a"), Candidate("b"))
        await s.record_headers("a", headers(0.99), NOW)
        await s.record_headers("b", headers(0.5), NOW)
        assert (await s.acquire(pool, expected_tokens=1, now=NOW)).account_id == "a"

        until = await s.back_off("a", "529 overloaded_error", now=NOW)
        assert until == NOW + 2
        # passed over while it lasts: every request goes to b, with no failed round trip
        for _ in range(5):
            assert (await s.acquire(pool, expected_tokens=1, now=NOW + 1)).account_id == "b"
        state = (await s.states(["a"], now=NOW + 1))["a"]
        assert state.backoff_until == NOW + 2
        assert not state.quarantined and state.reason is None and state.last_error
        assert await s.quarantined(NOW + 1) == []  # the health job has nothing to probe
        # a 529 of a request sent before the backoff began does not lengthen it
        assert await s.back_off("a", now=NOW + 1.5) == NOW + 2
        # over by itself: a is chosen again
        assert (await s.acquire(pool, expected_tokens=1, now=NOW + 2.1)).account_id == "a"
        # 529s continue: 4 s, 8 s, ... at most 60 s
        t, expected = NOW + 2.5, 4.0
        for _ in range(8):
            until = await s.back_off("a", now=t)
            assert until == pytest.approx(t + expected)
            t = until + 0.5
            expected = min(60.0, expected * 2)
        assert expected == 60.0
        # after a quiet spell the backoff starts small again
        assert await s.back_off("a", now=t + 1000) == pytest.approx(t + 1000 + 2)

    env.run(body)


def test_every_account_backed_off_is_no_account(env: Env) -> None:  # noqa: F811
    async def body(s: Scheduler) -> None:
        pool = (Candidate("a"),)
        await s.back_off("a", now=NOW)
        with pytest.raises(NoAccount):  # the relay answers 529, as the upstream did
            await s.acquire(pool, expected_tokens=1, now=NOW + 1)
        assert (await s.acquire(pool, expected_tokens=1, now=NOW + 3)).account_id == "a"

    env.run(body)


def test_a_backoff_never_replaces_a_quarantine(env: Env) -> None:  # noqa: F811
    async def body(s: Scheduler) -> None:
        await s.quarantine("a", "credential_invalid", None, "401", now=NOW)
        assert await s.back_off("a", now=NOW) is None
        state = (await s.states(["a"], now=NOW + 100))["a"]
        assert state.quarantined and state.reason == "credential_invalid"
        assert state.backoff_until is None
        # and a quarantine replaces a backoff
        await s.back_off("b", now=NOW)
        await s.quarantine("b", "permission_denied", None, "403", now=NOW + 1)
        state = (await s.states(["b"], now=NOW + 100))["b"]
        assert state.quarantined and state.reason == "permission_denied"
        await s.forget("b")
        assert (await s.states(["b"], now=NOW))["b"].backoff_until is None

    env.run(body)
