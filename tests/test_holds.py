"""Holds and settlement at the service level, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import sqlalchemy as sa

from app.db import Database
from app.migrate import upgrade
from billing import customers, holds, holds_pg, ledger, reconcile
from billing.errors import CustomerSuspended, InsufficientBalance
from billing.holds import HoldRequest, Outcome
from billing.holds_pg import PgHolds
from billing.ids import new_id
from billing.pricing import Usage
from tests.conftest import needs_postgres

T = TypeVar("T")


def run(database_url: str, body: Callable[[Database], Awaitable[T]]) -> T:
    if database_url.startswith("sqlite"):
        upgrade(database_url)

    async def main() -> T:
        db = Database(database_url)
        try:
            return await body(db)
        finally:
            if db in _writers:
                await _writers.pop(db).aclose()
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


PATHS = (
    ["session", "fast", "batch"] if os.environ.get("POOLRELAY_TEST_DATABASE_URL") else ["session"]
)
_writers: weakref.WeakKeyDictionary[Database, PgHolds] = weakref.WeakKeyDictionary()


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    """The session (multi-statement) path; on PostgreSQL also the single statements ("fast")
    and the group-committed batches the relay uses ("batch")."""
    return str(request.param)


def writer(db: Database) -> PgHolds:
    if db not in _writers:
        _writers[db] = PgHolds(db.connect_raw)
    return _writers[db]


async def place(db: Database, path: str, request: HoldRequest) -> None:
    if path == "batch":
        await writer(db).place(request)
    elif path == "fast":
        async with db.raw() as conn:
            await holds_pg.place_fast(conn, request)
    else:
        async with db.transaction() as session:
            await holds.place(session, request)


async def settle(
    db: Database, path: str, request_id: str, usage: Usage | None, cost: int, outcome: Outcome
) -> bool:
    if path == "batch":
        return await writer(db).settle(request_id, usage, cost, outcome)
    if path == "fast":
        async with db.raw() as conn:
            return await holds_pg.settle_fast(conn, request_id, usage, cost, outcome)
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
        await place(db, path, request)
        usage = Usage(input_tokens=10, output_tokens=20)
        for expected in (True, False):  # the second settlement is a no-op
            settled = await settle(db, path, request.request_id, usage, 1_234, Outcome("ok"))
            assert settled is expected
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
        await place(db, path, request)
        await settle(db, path, request.request_id, Usage(output_tokens=1), 1_500, Outcome("ok"))
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


def test_concurrent_settlements_keep_every_book_exact(database_url: str, path: str) -> None:
    """Many holds and settlements in flight at once, over two customers and budgeted keys: on
    PostgreSQL's "batch" path they share statements, and every book must read as if they had
    been made one by one — one debit per charge, a running balance_after, budgets settled."""
    from billing import budgets
    from billing.budgets import Budget
    from billing.models import KeySpend, RequestRecord

    async def body(db: Database) -> None:
        a = await new_customer(db, 1_000_000)
        b = await new_customer(db, 1_000_000)
        requests: list[tuple[HoldRequest, int]] = []
        for n in range(60):
            customer, key = (a, "key_a") if n % 3 else (b, f"key_b{n % 2}")
            async with db.transaction() as session:
                reservation = await budgets.reserve(session, key, Budget(500_000, None), 5_000)
            request = hold_request(customer, 5_000)
            request.key_id, request.budget = key, reservation
            requests.append((request, 0 if n % 10 == 0 else 100 + n))
        await asyncio.gather(*(place(db, path, r) for r, _ in requests))
        outcomes = await asyncio.gather(
            *(
                settle(db, path, r.request_id, Usage(output_tokens=cost), cost, Outcome("ok"))
                for r, cost in requests
            )
        )
        assert all(outcomes)
        if path == "batch":
            assert writer(db).settling.batches < len(requests)  # some settlements shared one
        charged = {r.request_id: cost for r, cost in requests}
        async with db.transaction() as session:
            assert await reconcile.verify_books(session) == []
            for customer in (a, b):
                entries = await ledger.entries(session, customer, before_id=None, limit=100)
                running = None
                for entry in reversed(entries):  # oldest first
                    if entry.kind == "topup":
                        running = entry.balance_after_micros
                        continue
                    assert running is not None
                    running += entry.amount_micros
                    assert entry.balance_after_micros == running
                    assert entry.amount_micros == -charged[str(entry.request_id)]
                mine = [c for r, c in requests if r.customer_id == customer]
                assert sum(e.kind == "usage" for e in entries) == sum(c > 0 for c in mine)
                assert running == 1_000_000 - sum(mine)
            spend = {
                row.key_id: (row.spent_micros, row.held_micros)
                for row in (await session.execute(sa.select(KeySpend))).scalars()
                if len(row.period) == 10
            }
            for key in ("key_a", "key_b0", "key_b1"):
                expected = sum(c for r, c in requests if r.key_id == key)
                assert spend[key] == (expected, 0)
            logged = {
                row.id: (row.status, row.cost_micros, row.output_tokens)
                for row in (await session.execute(sa.select(RequestRecord))).scalars()
            }
            assert logged == {rid: ("ok", cost, cost) for rid, cost in charged.items()}
        assert await balances(db, a) == (
            1_000_000 - sum(c for r, c in requests if r.customer_id == a),
            0,
            1_000_000 - sum(c for r, c in requests if r.customer_id == a),
        )

    run(database_url, body)


@needs_postgres  # group commit runs on PostgreSQL
def test_a_poisoned_batch_fails_only_its_poisoned_items(database_url: str) -> None:
    """Holds and settlements the database refuses (a NUL byte, a value longer than its
    column) fail alone; the other customers' items of the same group-commit batch go through
    (issue 12, item 3: 10 % of valid requests got 500 while one customer sent bad ones)."""

    async def body(db: Database) -> None:
        good = [await new_customer(db, 1_000_000) for _ in range(6)]
        bad = await new_customer(db, 1_000_000)
        requests = [hold_request(c, 1_000) for c in good]
        poisoned = [
            dataclasses.replace(hold_request(bad, 1_000), requested_model="claude\x00haiku"),
            dataclasses.replace(hold_request(bad, 1_000), session_id="s" * 300),
        ]
        pg = writer(db)
        mixed = [requests[0], poisoned[0], *requests[1:4], poisoned[1], *requests[4:]]
        results = await asyncio.gather(*(pg.place(r) for r in mixed), return_exceptions=True)
        by_id = dict(zip((r.request_id for r in mixed), results, strict=True))
        assert all(by_id[r.request_id] is None for r in requests), results
        assert all(isinstance(by_id[r.request_id], Exception) for r in poisoned), results
        assert pg.placing.batches < len(mixed)  # they really shared batches
        outcome = Outcome(status="ok", upstream_request_id="r" * 300, error="bad\x00text")
        settled = await asyncio.gather(
            *(pg.settle(r.request_id, Usage(input_tokens=5), 500, outcome) for r in requests)
        )
        assert settled == [True] * len(requests)
        for customer_id in good:
            assert await balances(db, customer_id) == (999_500, 0, 999_500)
        assert await balances(db, bad) == (1_000_000, 0, 1_000_000)

    run(database_url, body)
