"""Waiting for a concurrency slot, first come first served, woken rather than polling
(issue 13, item 2; contract §7), at the pool level: pool.scheduler's queue and pool.waiters.

On fakeredis, and on a real Redis when POOLRELAY_TEST_REDIS_URL is set (database 14).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pool.errors import NoCapacity, Queued
from pool.scheduler import Candidate, Lease, Scheduler
from pool.waiters import Waiters, wait_for_slot
from tests.test_scheduler import BACKENDS, _client

OWNER_A = "a" * 16
OWNER_B = "b" * 16
POOL = (Candidate("x", 1),)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(backend: str, body: Any) -> None:
    async def main() -> None:
        client = await _client(backend)
        try:
            await body(client)
        finally:
            if backend != "fake":
                await client.flushdb()
            await client.aclose()

    asyncio.run(main())


async def queued(s: Scheduler, wait: float = 5.0) -> Queued:
    with pytest.raises(Queued) as caught:
        await s.acquire(POOL, expected_tokens=10, wait=wait)
    return caught.value


def test_a_waiter_is_handed_the_slot_when_it_frees(backend: str) -> None:
    async def body(client: Any) -> None:
        a, b = Scheduler(client, owner=OWNER_A), Scheduler(client, owner=OWNER_B)
        waiters_b = Waiters(client, b.wake_channel)
        await waiters_b.start()
        first = await a.acquire(POOL, expected_tokens=10)
        ticket = await queued(b)  # another process's request waits
        waiting = asyncio.create_task(wait_for_slot(b, waiters_b, ticket, 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        started = time.monotonic()
        await a.release(first)  # the slot goes straight to the waiter
        lease = await asyncio.wait_for(waiting, 2)
        assert isinstance(lease, Lease) and lease.account_id == "x"
        assert time.monotonic() - started < 1.0  # woken, not found by a poll
        assert (await a.states(["x"]))["x"].in_flight == 1
        # the handed-over lease is a normal one: releasing it frees the slot
        await b.release(lease)
        assert (await a.states(["x"]))["x"].in_flight == 0
        await waiters_b.aclose()

    run(backend, body)


def test_first_come_first_served_and_no_overtaking(backend: str) -> None:
    async def body(client: Any) -> None:
        s = Scheduler(client, owner=OWNER_A)
        waiters = Waiters(client, s.wake_channel)
        await waiters.start()
        holder = await s.acquire(POOL, expected_tokens=10)
        tickets = [await queued(s) for _ in range(3)]
        tasks = [asyncio.create_task(wait_for_slot(s, waiters, t, 5.0)) for t in tickets]
        order: list[int] = []
        current = holder
        for _ in range(3):
            await s.release(current)
            # a newcomer arriving now finds no free slot: it queues behind the waiters
            late = await queued(s, wait=0.2)
            done, _ = await asyncio.wait(tasks, timeout=2, return_when="FIRST_COMPLETED")
            assert len(done) == 1
            task = done.pop()
            order.append(tasks.index(task))
            current = task.result()
            tasks = [
                t if t is not task else asyncio.create_task(asyncio.sleep(3600)) for t in tasks
            ]
            assert await s.unwait(late) is None
        assert order == [0, 1, 2]
        for t in tasks:
            t.cancel()
        await waiters.aclose()

    run(backend, body)


def test_the_wait_ends_in_a_concurrency_429(backend: str) -> None:
    async def body(client: Any) -> None:
        s = Scheduler(client, owner=OWNER_A)
        waiters = Waiters(client, s.wake_channel)
        await waiters.start()
        holder = await s.acquire(POOL, expected_tokens=10)
        ticket = await queued(s, wait=0.3)
        started = time.monotonic()
        with pytest.raises(NoCapacity) as caught:
            await wait_for_slot(s, waiters, ticket, 0.3)
        assert caught.value.concurrency
        assert 0.25 < time.monotonic() - started < 2
        await s.release(holder)  # nobody is waiting any more: the slot stays free
        assert (await s.states(["x"]))["x"].in_flight == 0
        await waiters.aclose()

    run(backend, body)


def test_a_waiter_whose_client_leaves_leaves_the_queue_at_once(backend: str) -> None:
    async def body(client: Any) -> None:
        s = Scheduler(client, owner=OWNER_A)
        waiters = Waiters(client, s.wake_channel)
        await waiters.start()
        holder = await s.acquire(POOL, expected_tokens=10)
        ticket = await queued(s)
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = asyncio.create_task(wait_for_slot(s, waiters, ticket, 5.0, gone))
        await asyncio.sleep(0.05)
        gone.set_result(None)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 1)
        assert waiters.waiting == 0
        await s.release(holder)
        assert (await s.states(["x"]))["x"].in_flight == 0  # nobody was handed the slot
        await waiters.aclose()

    run(backend, body)


def test_a_cancelled_waiter_leaves_the_queue_and_gives_back_a_slot_handed_over(
    backend: str,
) -> None:
    """The relay's ClientWatch cancels the waiting task when the client goes away."""

    async def body(client: Any) -> None:
        s = Scheduler(client, owner=OWNER_A)
        waiters = Waiters(client, s.wake_channel)
        await waiters.start()
        holder = await s.acquire(POOL, expected_tokens=10)
        first, second = await queued(s), await queued(s)
        leaving = asyncio.create_task(wait_for_slot(s, waiters, first, 5.0))
        staying = asyncio.create_task(wait_for_slot(s, waiters, second, 5.0))
        await asyncio.sleep(0.05)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert waiters.waiting == 1
        await s.release(holder)  # the first in line left: the slot goes to the second
        lease = await asyncio.wait_for(staying, 2)
        assert lease.lease_id == second.lease_id
        # handed over, then cancelled before the waiter took it: the slot goes back
        third = await queued(s)
        taking = asyncio.create_task(wait_for_slot(s, waiters, third, 5.0))
        await asyncio.sleep(0.05)
        await s.release(lease)
        taking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taking
        assert (await s.states(["x"]))["x"].in_flight == 0
        assert await s.grant_of(third) is None
        await waiters.aclose()

    run(backend, body)


def test_a_lost_wake_up_is_found_on_the_recheck(backend: str) -> None:
    async def body(client: Any) -> None:
        s = Scheduler(client, owner=OWNER_A)
        holder = await s.acquire(POOL, expected_tokens=10)
        ticket = await queued(s)
        await s.release(holder)  # handed over while nobody listened
        waiters = Waiters(client, s.wake_channel)
        await waiters.start()
        lease = await asyncio.wait_for(wait_for_slot(s, waiters, ticket, 5.0), 2)
        assert lease.lease_id == ticket.lease_id
        await waiters.aclose()

    run(backend, body)


def test_without_wait_or_owner_a_full_pool_is_refused_at_once(backend: str) -> None:
    async def body(client: Any) -> None:
        anonymous = Scheduler(client)
        await anonymous.acquire(POOL, expected_tokens=10)
        with pytest.raises(NoCapacity) as caught:
            await anonymous.acquire(POOL, expected_tokens=10, wait=5)
        assert caught.value.concurrency
        owned = Scheduler(client, owner=OWNER_A)
        with pytest.raises(NoCapacity):
            await owned.acquire(POOL, expected_tokens=10)

    run(backend, body)
