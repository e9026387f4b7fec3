"""A key's max_concurrency across relay processes (app/keyslots.py): slots, the FCFS queue
and its wake-ups through pool.waiters. On fakeredis, and on a real Redis when
POOLRELAY_TEST_REDIS_URL is set."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.keyslots import KeyQueued, KeySlot, KeySlots
from pool.errors import NoCapacity
from pool.waiters import Waiters, wait_for_slot
from tests.test_wait_queue import backend, run  # noqa: F401  (backend is a fixture)

OWNER_A = "a" * 16
OWNER_B = "b" * 16


def test_a_key_holds_at_most_its_cap_and_waiters_go_in_order(backend: str) -> None:  # noqa: F811
    async def body(client: Any) -> None:
        a, b = KeySlots(client, OWNER_A), KeySlots(client, OWNER_B)
        waiters = Waiters(client, f"poolrelay:wake:{OWNER_B}")
        await waiters.start()
        held = [await a.take("key_1", 2), await a.take("key_1", 2)]
        assert all(isinstance(s, KeySlot) for s in held)
        with pytest.raises(NoCapacity) as caught:
            await a.take("key_1", 2)
        assert caught.value.concurrency
        assert isinstance(await a.take("key_2", 2), KeySlot)  # other keys are not affected
        first, second = await b.take("key_1", 2, wait=5), await b.take("key_1", 2, wait=5)
        assert isinstance(first, KeyQueued) and isinstance(second, KeyQueued)
        w1 = asyncio.create_task(wait_for_slot(b, waiters, first, 5))
        w2 = asyncio.create_task(wait_for_slot(b, waiters, second, 5))
        await asyncio.sleep(0.05)
        # a newcomer does not overtake them
        assert isinstance(await a.take("key_1", 2, wait=0.1), KeyQueued)
        await a.give_back(held[0])
        got = await asyncio.wait_for(w1, 2)
        assert got == first.slot and not w2.done()
        await a.give_back(held[1])
        assert await asyncio.wait_for(w2, 2) == second.slot
        await b.give_back(first.slot)
        await b.give_back(first.slot)  # idempotent
        await waiters.aclose()

    run(backend, body)


def test_a_key_wait_times_out_and_a_departed_waiter_takes_nothing(backend: str) -> None:  # noqa: F811
    async def body(client: Any) -> None:
        slots = KeySlots(client, OWNER_A)
        waiters = Waiters(client, f"poolrelay:wake:{OWNER_A}")
        await waiters.start()
        holder = await slots.take("key_1", 1)
        assert isinstance(holder, KeySlot)
        queued = await slots.take("key_1", 1, wait=0.2)
        assert isinstance(queued, KeyQueued)
        with pytest.raises(NoCapacity):
            await wait_for_slot(slots, waiters, queued, 0.2)
        queued = await slots.take("key_1", 1, wait=5)
        assert isinstance(queued, KeyQueued)
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(wait_for_slot(slots, waiters, queued, 5, gone))
        await asyncio.sleep(0.05)
        gone.set_result(None)
        with pytest.raises(asyncio.CancelledError):
            await task
        await slots.give_back(holder)
        assert isinstance(await slots.take("key_1", 1), KeySlot)  # the slot was free
        await waiters.aclose()

    run(backend, body)
