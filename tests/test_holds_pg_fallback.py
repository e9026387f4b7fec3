"""PgHolds' fallbacks, without a database: a deadlocked batch statement is replaced by one
statement per item, each item keeping its own outcome, and the placing connection is set up
with its statement timeout (what lets the relay resolve a hold whose answer was lost)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from psycopg.errors import DeadlockDetected

from billing import holds_pg
from billing.errors import InsufficientBalance
from billing.holds import HoldRequest, Outcome
from billing.holds_pg import PLACE_TIMEOUT_SECONDS, PgHolds, Settlement


class FakeConnection:
    """Just enough of psycopg's AsyncConnection for PgHolds' lines."""

    def __init__(self) -> None:
        self.closed = False
        self.executed: list[str] = []

    async def execute(self, query: str, *args: Any) -> None:
        self.executed.append(query)

    def cursor(self) -> str:
        return "cursor"

    async def close(self) -> None:
        self.closed = True


def hold(request_id: str, amount: int) -> HoldRequest:
    return HoldRequest(
        request_id=request_id,
        customer_id="cus_x",
        key_id="key_x",
        amount_micros=amount,
        instance_id="inst_x",
    )


def test_a_deadlocked_hold_batch_is_placed_hold_by_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    placed: list[str] = []
    connections: list[FakeConnection] = []

    async def place_many(cur: Any, batch: Any) -> set[str]:
        raise DeadlockDetected("deadlock detected")

    async def place_fast(cur: Any, request: HoldRequest) -> None:
        if request.amount_micros > 100:
            raise InsufficientBalance(request.amount_micros, 100)
        placed.append(request.request_id)

    async def connect() -> Any:
        connections.append(FakeConnection())
        return connections[-1]

    monkeypatch.setattr(holds_pg, "place_many", place_many)
    monkeypatch.setattr(holds_pg, "place_fast", place_fast)

    async def main() -> list[BaseException | None]:
        pg = PgHolds(connect)
        return await pg._place_batch([hold("a", 10), hold("b", 500), hold("c", 20)])

    results = asyncio.run(main())
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], InsufficientBalance)
    assert placed == ["a", "c"]  # in submission order, the refused one left out
    assert connections[0].executed == [f"SET statement_timeout = {PLACE_TIMEOUT_SECONDS * 1000}"]


def test_a_deadlocked_settlement_batch_is_settled_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settled: list[str] = []

    async def settle_many(cur: Any, batch: Any) -> set[str]:
        raise DeadlockDetected("deadlock detected")

    async def settle_fast(cur: Any, request_id: str, *args: Any) -> bool:
        if request_id == "gone":
            return False  # already settled elsewhere
        if request_id == "broken":
            raise OSError("connection lost")
        settled.append(request_id)
        return True

    async def connect() -> Any:
        return FakeConnection()

    monkeypatch.setattr(holds_pg, "settle_many", settle_many)
    monkeypatch.setattr(holds_pg, "settle_fast", settle_fast)
    batch = [
        Settlement(request_id, None, 0, Outcome(status="ok"))
        for request_id in ("a", "gone", "broken", "b")
    ]

    results = asyncio.run(PgHolds(connect)._settle_batch(batch))
    assert results[:2] == [True, False] and results[3] is True
    assert isinstance(results[2], OSError)
    assert settled == ["a", "b"]
