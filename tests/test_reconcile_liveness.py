"""Reconciliation never finishes the hold of a relay that may be alive, and gives back the
slots of relays that are dead (issue 12, items 1 and 6).

- Right after Redis came back empty (restart without persistence, eviction, flush) every live
  relay's heartbeat is missing until its next beat: reconciliation detects the fresh memory
  (app/instances.py's epoch) and keeps those holds.
- A hold is finished by age alone only once it is older than the longest request the relay
  allows (``MAX_REQUEST_SECONDS``) and the settlement margin.
- The leases of a relay that stopped heart-beating are dropped at once, not when they expire.
- ``poolrelay reconcile`` reports delivered-but-uncharged requests (request log vs ledger).

The worker's view is tested through ``reconcile_billing`` with a Services object whose Redis
is a fakeredis server standing in for a real one (so it runs on the embedded defaults too).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import fakeredis
import pytest
import sqlalchemy as sa

from app import instances
from app.state import Services, build_services
from billing import holds
from billing.holds import HoldRequest
from billing.models import Hold, RequestRecord, utcnow
from pool.scheduler import Candidate
from tests import harness
from tests.harness import RelayServer
from tests.test_worker import age_redis_memory
from workers import tasks

MODEL = "claude-haiku-4-5"
LIVE = "inst_" + "ab" * 8
DEAD = "inst_" + "cd" * 8


@pytest.fixture
def worker_services(relay: RelayServer, settings_env: dict[str, str]) -> AsyncIterator[Services]:
    """A worker's Services on the relay's database, with its own Redis (fakeredis standing
    in for a real server: ``REDIS_URL`` is not ``memory://``)."""
    settings = harness.test_settings(
        settings_env, redis_url="redis://127.0.0.1:1/0", max_request_seconds=60
    )
    redis: Any = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(version=(7,)))
    services = build_services(settings, redis=redis)
    yield services
    relay.call(services.aclose)


def reconcile(relay: RelayServer, services: Services) -> dict[str, Any]:
    """The worker's reconciliation run, with ``services`` (its own Redis)."""
    report: dict[str, Any] = relay.call(
        lambda: tasks.reconcile_billing({"services": services, "worker": True})
    )
    return report


def place_hold(relay: RelayServer, customer_id: str, request_id: str, instance_id: str) -> None:
    services = relay.services

    async def place() -> None:
        async with services.db.transaction() as session:
            key_id = (
                await session.execute(
                    sa.text("SELECT id FROM customer_keys WHERE customer_id = :c"),
                    {"c": customer_id},
                )
            ).scalar_one()
            await holds.place(
                session,
                HoldRequest(
                    request_id=request_id,
                    customer_id=customer_id,
                    key_id=key_id,
                    amount_micros=100_000,
                    instance_id=instance_id,
                    requested_model=MODEL,
                ),
            )

    relay.call(place)


def open_holds(relay: RelayServer) -> list[str]:
    services = relay.services

    async def read() -> list[str]:
        async with services.db.transaction() as session:
            return sorted((await session.execute(sa.select(Hold.request_id))).scalars())  # type: ignore[call-overload]

    return relay.call(read)


def test_redis_that_came_back_empty_keeps_the_holds_of_live_relays(
    relay: RelayServer, worker_services: Services
) -> None:
    customer_id, _ = relay.create_customer(balance_usd="1")
    place_hold(relay, customer_id, "req_live000000000000000001", LIVE)
    redis = worker_services.redis

    # Redis just came back empty: no epoch, no heartbeat of the live relay
    report = reconcile(relay, worker_services)
    assert report["heartbeats_trusted"] is False
    assert report["holds_released"] == 0 and report["holds_settled"] == 0
    assert open_holds(relay) == ["req_live000000000000000001"]

    # the live relay beats again within the grace period: its hold stays for good
    relay.call(lambda: instances.heartbeat(redis, LIVE, 30))
    relay.call(lambda: age_redis_memory(redis))
    report = reconcile(relay, worker_services)
    assert report["heartbeats_trusted"] is True
    assert report["holds_released"] == 0
    assert open_holds(relay) == ["req_live000000000000000001"]

    # a relay that never beat again after the grace period is dead: its hold is finished
    place_hold(relay, customer_id, "req_dead000000000000000001", DEAD)
    report = reconcile(relay, worker_services)
    assert report["holds_released"] == 1
    assert open_holds(relay) == ["req_live000000000000000001"]
    assert relay.customer(customer_id)["held_usd"] == "0.100000"


def test_epoch_is_set_by_heartbeats_and_judged_against_the_grace_period() -> None:
    redis: Any = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(version=(7,)))

    async def run() -> None:
        now = time.time()
        assert await instances.memory_age(redis, now) == 0.0  # none: it starts now
        assert await instances.memory_is_fresh(redis, 30, now + 59)
        assert not await instances.memory_is_fresh(redis, 30, now + 61)
        await redis.flushall()
        await instances.heartbeat(redis, LIVE, 30)
        assert await instances.is_alive(redis, LIVE)
        assert await instances.memory_is_fresh(redis, 30)
        first = await redis.get(instances.EPOCH_KEY)
        await instances.heartbeat(redis, LIVE, 30)  # never moves an existing epoch
        assert await redis.get(instances.EPOCH_KEY) == first

    import asyncio

    asyncio.run(run())


def test_a_hold_is_finished_by_age_only_past_the_longest_request(
    relay: RelayServer, worker_services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer_id, _ = relay.create_customer(balance_usd="1")
    place_hold(relay, customer_id, "req_long000000000000000001", LIVE)
    redis = worker_services.redis
    relay.call(lambda: age_redis_memory(redis))
    relay.call(lambda: instances.heartbeat(redis, LIVE, 30))
    assert tasks.max_hold_age(worker_services) == timedelta(seconds=60) + tasks.SETTLEMENT_MARGIN

    report = reconcile(relay, worker_services)
    assert report["holds_released"] == 0  # alive, and younger than the longest request

    services = relay.services

    async def backdate() -> None:
        async with services.db.transaction() as session:
            await session.execute(
                sa.update(Hold).values(created_at=utcnow() - timedelta(seconds=61))  # type: ignore[arg-type]
            )

    relay.call(backdate)
    report = reconcile(relay, worker_services)
    assert report["holds_released"] == 0  # within the settlement margin still
    monkeypatch.setattr(tasks, "SETTLEMENT_MARGIN", timedelta(0))
    report = reconcile(relay, worker_services)
    assert report["holds_released"] == 1
    assert open_holds(relay) == []


def test_leases_of_a_dead_relay_are_dropped_at_once(
    relay: RelayServer, worker_services: Services
) -> None:
    redis = worker_services.redis
    from pool.scheduler import Scheduler

    live = Scheduler(redis, owner=instances.owner_of(LIVE))
    dead = Scheduler(redis, owner=instances.owner_of(DEAD))
    anonymous = Scheduler(redis)
    accounts = (Candidate("acct_1", 4), Candidate("acct_2", 4))

    async def lease_some() -> None:
        for scheduler in (live, dead, dead, anonymous):
            await scheduler.acquire(accounts, expected_tokens=100)

    relay.call(lease_some)
    relay.call(lambda: age_redis_memory(redis))
    relay.call(lambda: instances.heartbeat(redis, LIVE, 30))

    def in_flight() -> int:
        states = relay.call(lambda: live.states(["acct_1", "acct_2"]))
        return sum(s.in_flight for s in states.values())

    assert in_flight() == 4
    assert relay.call(live.lease_owners) == {instances.owner_of(LIVE), instances.owner_of(DEAD)}
    result = relay.call(
        lambda: tasks.drop_dead_leases({"services": worker_services, "worker": True})
    )
    assert result == {"leases_dropped": 2}
    assert in_flight() == 2  # the live relay's lease and the anonymous one stay
    assert relay.call(live.lease_owners) == {instances.owner_of(LIVE)}
    # and the reconciliation does it too (nothing left to drop now)
    report = reconcile(relay, worker_services)
    assert report["leases_dropped"] == 0


def test_drop_owner_refuses_what_is_not_an_owner(worker_services: Services) -> None:
    with pytest.raises(ValueError):
        from pool.scheduler import Scheduler

        Scheduler(worker_services.redis, owner="not-hex")


def test_reconcile_reports_delivered_but_uncharged_requests(
    relay: RelayServer, worker_services: Services
) -> None:
    customer_id, _ = relay.create_customer(balance_usd="1")
    place_hold(relay, customer_id, "req_lost000000000000000001", LIVE)
    services = relay.services

    async def lose_the_charge() -> None:
        # the state the issue found: the hold released, the log showing what was delivered,
        # and no usage debit
        async with services.db.transaction() as session:
            await holds.settle(
                session,
                "req_lost000000000000000001",
                None,
                0,
                holds.Outcome(status="crashed", model=MODEL),
            )
            await session.execute(
                sa.update(RequestRecord)  # type: ignore[arg-type]
                .where(RequestRecord.id == "req_lost000000000000000001")  # type: ignore[arg-type]
                .values(input_tokens=120, output_tokens=40, model=MODEL)
            )

    relay.call(lose_the_charge)
    report = reconcile(relay, worker_services)
    kinds = [(d["kind"], d.get("request_id")) for d in report["discrepancies"]]
    assert ("delivered_uncharged", "req_lost000000000000000001") in kinds
    lost = next(d for d in report["discrepancies"] if d["kind"] == "delivered_uncharged")
    assert lost["tokens"] == 160 and lost["model"] == MODEL and lost["customer_id"] == customer_id
