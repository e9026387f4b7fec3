"""Holds that grow (contract §6, issue 13 item 4) at the level of the hold store: for any
interleaving of concurrent streams placing, extending and settling their holds on one balance,
no hold or extension is admitted beyond the balance, Σ charges ≤ Σ top-ups, the balance never
goes below zero through a hold's fault, the balance equals its ledger, and held returns to 0.

Runs on the session store (SQLite; and PostgreSQL's ORM path) and, on PostgreSQL, on the
group-committed store the relay uses there."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.db import Database
from billing import customers, ledger
from billing.errors import InsufficientBalance
from billing.hold_store import HoldStore, SessionHolds
from billing.holds import Outcome
from billing.holds_pg import PgHolds
from tests.test_holds import PATHS, hold_request, new_customer, run


@dataclass(frozen=True)
class Plan:
    first: int
    extensions: tuple[int, ...]
    charge_share: float  # of the final hold: what the stream turns out to cost


plans = st.builds(
    Plan,
    first=st.integers(1, 1_500),
    extensions=st.lists(st.integers(1, 900), max_size=5).map(tuple),
    charge_share=st.floats(0, 1),
)


def store_for(db: Database, path: str) -> HoldStore:
    if path == "session":
        return SessionHolds(db.transaction)
    return PgHolds(db.connect_raw)


async def check_available(db: Database, customer_id: str) -> None:
    async with db.transaction() as session:
        customer = await customers.get_customer(session, customer_id)
    assert customer.balance_micros >= 0
    assert customer.balance_micros - customer.held_micros >= 0, "held beyond the balance"


async def one_stream(
    db: Database, store: HoldStore, customer_id: str, plan: Plan, rng: random.Random
) -> int:
    """Place, grow and settle one stream's hold as the relay does; returns what it charged."""
    request = hold_request(customer_id, plan.first)
    try:
        await (await store.begin(request))
    except InsufficientBalance:
        return 0
    held = plan.first
    for amount in plan.extensions:
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
        await check_available(db, customer_id)
        try:
            assert await store.extend(request.request_id, amount)
        except InsufficientBalance:
            break  # the stream is cut here: what was delivered is charged, within the hold
        held += amount
    cost = int(held * plan.charge_share)
    assert await store.settle(request.request_id, None, cost, Outcome(status="ok"))
    return cost


@pytest.mark.parametrize("path", [p for p in PATHS if p != "fast"])
def test_growing_holds_never_overdraw(database_url: str, path: str) -> None:
    async def scenario(db: Database) -> None:
        store = store_for(db, path)

        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(
            balance=st.integers(0, 4_000),
            streams=st.lists(plans, min_size=1, max_size=6),
            seed=st.integers(0, 2**32),
        )
        def example(balance: int, streams: list[Plan], seed: int) -> None:
            future = asyncio.run_coroutine_threadsafe(go(balance, streams, seed), loop)
            future.result(timeout=60)

        async def go(balance: int, streams: list[Plan], seed: int) -> None:
            rng = random.Random(seed)
            customer_id = await new_customer(db, balance)
            charges = await asyncio.gather(
                *(one_stream(db, store, customer_id, plan, rng) for plan in streams)
            )
            async with db.transaction() as session:
                customer = await customers.get_customer(session, customer_id)
                total = await ledger.ledger_sum(session, customer_id)
            assert customer.held_micros == 0
            assert sum(charges) <= balance
            assert customer.balance_micros == balance - sum(charges) == total
            assert customer.balance_micros >= 0

        loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(example)
        finally:
            await store.aclose()

    run(database_url, scenario)


def test_an_extension_of_a_hold_that_is_gone_grows_nothing(database_url: str) -> None:
    """A hold released meanwhile (a reconciliation that took its process for dead): extending
    it answers False and leaves the balance's held amount alone."""

    async def scenario(db: Database) -> None:
        for path in [p for p in PATHS if p != "fast"]:
            store = store_for(db, path)
            try:
                customer_id = await new_customer(db, 10_000)
                request = hold_request(customer_id, 1_000)
                await (await store.begin(request))
                assert await store.settle(request.request_id, None, 0, Outcome(status="crashed"))
                assert not await store.extend(request.request_id, 500)
                async with db.transaction() as session:
                    customer = await customers.get_customer(session, customer_id)
                assert (customer.balance_micros, customer.held_micros) == (10_000, 0)
            finally:
                await store.aclose()

    run(database_url, scenario)


def test_an_extension_that_does_not_fit_changes_nothing(database_url: str) -> None:
    async def scenario(db: Database) -> None:
        for path in [p for p in PATHS if p != "fast"]:
            store = store_for(db, path)
            try:
                customer_id = await new_customer(db, 1_500)
                request = hold_request(customer_id, 1_000)
                await (await store.begin(request))
                with pytest.raises(InsufficientBalance):
                    await store.extend(request.request_id, 501)
                assert await store.extend(request.request_id, 500)
                async with db.transaction() as session:
                    customer = await customers.get_customer(session, customer_id)
                assert customer.held_micros == 1_500
                assert await store.settle(request.request_id, None, 1_200, Outcome(status="ok"))
                async with db.transaction() as session:
                    customer = await customers.get_customer(session, customer_id)
                assert (customer.balance_micros, customer.held_micros) == (300, 0)
            finally:
                await store.aclose()

    run(database_url, scenario)
