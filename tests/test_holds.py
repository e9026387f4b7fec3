"""Holds and settlement at the service level, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from app.db import Database
from app.migrate import upgrade
from billing import customers, holds, ledger, reconcile
from billing.errors import CustomerSuspended, InsufficientBalance
from billing.holds import HoldRequest, Outcome
from billing.ids import new_id
from billing.pricing import Usage

T = TypeVar("T")


def run(database_url: str, body: Callable[[Database], Awaitable[T]]) -> T:
    if database_url.startswith("sqlite"):
        upgrade(database_url)

    async def main() -> T:
        db = Database(database_url)
        try:
            return await body(db)
        finally:
            await db.dispose()

    return asyncio.run(main())


async def new_customer(db: Database, balance_micros: int) -> str:
    async with db.transaction() as session:
        customer = await customers.create_customer(session, "c")
        if balance_micros:
            await ledger.credit(
                session, customer.id, "topup", balance_micros, memo=None, idempotency_key=None
            )
        return customer.id


PATHS = ["session", "fast"] if os.environ.get("POOLRELAY_TEST_DATABASE_URL") else ["session"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    """The session (multi-statement) path, and on PostgreSQL the single-statement fast path."""
    return str(request.param)


async def place(db: Database, path: str, request: HoldRequest) -> None:
    if path == "fast":
        async with db.raw() as conn:
            await holds.place_fast(conn, request)
    else:
        async with db.transaction() as session:
            await holds.place(session, request)


async def settle(
    db: Database, path: str, request_id: str, usage: Usage | None, cost: int, outcome: Outcome
) -> bool:
    if path == "fast":
        async with db.raw() as conn:
            return await holds.settle_fast(conn, request_id, usage, cost, outcome)
    async with db.transaction() as session:
        return await holds.settle(session, request_id, usage, cost, outcome)


def hold_request(customer_id: str, amount: int) -> HoldRequest:
    return HoldRequest(
        request_id=new_id("req"),
        customer_id=customer_id,
        key_id="key_x",
        amount_micros=amount,
        instance_id="i",
    )


async def balances(db: Database, customer_id: str) -> tuple[int, int, int]:
    async with db.transaction() as session:
        customer = await customers.get_customer(session, customer_id)
        total = await ledger.ledger_sum(session, customer_id)
        return customer.balance_micros, customer.held_micros, total


def test_concurrent_holds_never_exceed_the_balance(database_url: str, path: str) -> None:
    async def body(db: Database) -> None:
        customer_id = await new_customer(db, 20 * 1_000)

        async def attempt() -> bool:
            try:
                await place(db, path, hold_request(customer_id, 1_000))
                return True
            except InsufficientBalance:
                return False

        results = await asyncio.gather(*(attempt() for _ in range(200)))
        assert sum(results) == 20
        balance, held, total = await balances(db, customer_id)
        assert (balance, held, total) == (20_000, 20_000, 20_000)
        async with db.transaction() as session:
            assert await holds.held_sum(session, customer_id) == 20_000

    run(database_url, body)


def test_settle_charges_once_and_releases_the_rest(database_url: str, path: str) -> None:
    async def body(db: Database) -> None:
        customer_id = await new_customer(db, 10_000)
        request = hold_request(customer_id, 4_000)
        async with db.transaction() as session:
            await holds.place(session, request)
        usage = Usage(input_tokens=10, output_tokens=20)
        for expected in (True, False):  # the second settlement is a no-op
            async with db.transaction() as session:
                assert (
                    await holds.settle(
                        session, request.request_id, usage, 1_234, Outcome(status="ok")
                    )
                    is expected
                )
        balance, held, total = await balances(db, customer_id)
        assert (balance, held, total) == (10_000 - 1_234, 0, 10_000 - 1_234)
        async with db.transaction() as session:
            entries = await ledger.entries(session, customer_id, before_id=None, limit=10)
            assert [e.kind for e in entries] == ["usage", "topup"]
            assert entries[0].request_id == request.request_id
            assert entries[0].amount_micros == -1_234
            assert entries[0].balance_after_micros == 10_000 - 1_234
            assert await reconcile.verify_books(session) == []

    run(database_url, body)


def test_cost_above_the_hold_is_charged_in_full(database_url: str, path: str) -> None:
    async def body(db: Database) -> None:
        customer_id = await new_customer(db, 1_000)
        request = hold_request(customer_id, 1_000)
        async with db.transaction() as session:
            await holds.place(session, request)
        async with db.transaction() as session:
            await holds.settle(
                session, request.request_id, Usage(output_tokens=1), 1_500, Outcome(status="ok")
            )
        balance, held, total = await balances(db, customer_id)
        assert (balance, held, total) == (-500, 0, -500)

    run(database_url, body)


def test_release_charges_nothing_and_refusals_change_nothing(database_url: str, path: str) -> None:
    async def body(db: Database) -> None:
        customer_id = await new_customer(db, 5_000)
        request = hold_request(customer_id, 5_000)
        await place(db, path, request)
        with pytest.raises(InsufficientBalance) as info:
            await place(db, path, hold_request(customer_id, 1))
        assert info.value.available_micros == 0
        assert await settle(db, path, request.request_id, None, 0, Outcome(status="failed"))
        assert await balances(db, customer_id) == (5_000, 0, 5_000)
        async with db.transaction() as session:
            await customers.update_customer(session, customer_id, status="suspended")
        with pytest.raises(CustomerSuspended):
            await place(db, path, hold_request(customer_id, 1))
        assert await balances(db, customer_id) == (5_000, 0, 5_000)

    run(database_url, body)


def test_reconciliation_reports_a_balance_that_does_not_match_its_ledger(database_url: str) -> None:
    import sqlalchemy as sa

    from billing.models import Customer

    async def body(db: Database) -> None:
        customer_id = await new_customer(db, 5_000)
        async with db.transaction() as session:
            await session.execute(
                sa.update(Customer.__table__)
                .where(Customer.__table__.c.id == customer_id)
                .values(balance_micros=9)  # type: ignore[attr-defined]
            )
        async with db.transaction() as session:
            found = await reconcile.verify_books(session)
        assert [(d.kind, d.customer_id) for d in found] == [("balance_mismatch", customer_id)]
        assert found[0].detail == {"balance_micros": 9, "ledger_sum_micros": 5_000}

    run(database_url, body)
