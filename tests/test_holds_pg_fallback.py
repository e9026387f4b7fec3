"""PgHolds' fallbacks, without a database: a batch statement the database refuses (a deadlock,
a value it cannot store, a constraint) is replaced by one statement per item, each item keeping its own outcome, and the placing connection is set up
with its statement timeout (what lets the relay resolve a hold whose answer was lost)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from psycopg.errors import DeadlockDetected

from billing import holds_pg
from billing.errors import InsufficientBalance
from billing.holds import HoldRequest, Outcome
from billing.holds_pg import PLACE_TIMEOUT_SECONDS, PgHolds, Settlement


class FakeCursor:
    def __init__(self, connection: FakeConnection) -> None:
        self.connection = connection


class FakeConnection:
    """Just enough of psycopg's AsyncConnection for PgHolds' lines."""

    def __init__(self) -> None:
        self.closed = False
        self.broken = False
        self.executed: list[str] = []

    async def execute(self, query: str, *args: Any) -> None:
        self.executed.append(query)

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

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


@pytest.mark.parametrize(
    "refusal",
    [
        psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),
        psycopg.errors.StringDataRightTruncation("value too long for type character varying"),
        psycopg.errors.ForeignKeyViolation("insert or update violates foreign key constraint"),
        psycopg.errors.UniqueViolation("duplicate key value violates unique constraint"),
    ],
    ids=["nul", "too_long", "foreign_key", "unique"],
)
def test_one_poisoned_item_fails_alone(
    monkeypatch: pytest.MonkeyPatch, refusal: psycopg.Error
) -> None:
    """A hold or settlement the database refuses fails only its own caller (issue 12, item 3):
    before, only a deadlock fell back to one by one and every other item of the batch failed."""
    placed: list[str] = []
    settled: list[str] = []

    async def place_many(cur: Any, batch: Any) -> set[str]:
        raise refusal

    async def place_fast(cur: Any, request: HoldRequest) -> None:
        if request.request_id == "poison":
            raise refusal
        placed.append(request.request_id)

    async def settle_many(cur: Any, batch: Any) -> set[str]:
        raise refusal

    async def settle_fast(cur: Any, request_id: str, *args: Any) -> bool:
        if request_id == "poison":
            raise refusal
        settled.append(request_id)
        return True

    async def connect() -> Any:
        return FakeConnection()

    for name, fn in [
        ("place_many", place_many),
        ("place_fast", place_fast),
        ("settle_many", settle_many),
        ("settle_fast", settle_fast),
    ]:
        monkeypatch.setattr(holds_pg, name, fn)

    async def main() -> tuple[list[BaseException | None], list[bool | BaseException]]:
        pg = PgHolds(connect)
        placing = await pg._place_batch([hold("a", 1), hold("poison", 1), hold("b", 1)])
        settling = await pg._settle_batch(
            [Settlement(r, None, 0, Outcome(status="ok")) for r in ("a", "poison", "b")]
        )
        return placing, settling

    placing, settling = asyncio.run(main())
    assert placing[0] is None and placing[2] is None and placing[1] is refusal
    assert settling[0] is True and settling[2] is True and settling[1] is refusal
    assert placed == ["a", "b"] and settled == ["a", "b"]


def test_a_broken_connection_fails_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Going one by one on a dead connection would only repeat the failure per item."""
    connections: list[FakeConnection] = []

    async def place_many(cur: Any, batch: Any) -> set[str]:
        cur.connection.broken = True
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    async def place_fast(cur: Any, request: HoldRequest) -> None:  # pragma: no cover
        raise AssertionError("not on a broken connection")

    async def connect() -> Any:
        connections.append(FakeConnection())
        return connections[-1]

    monkeypatch.setattr(holds_pg, "place_many", place_many)
    monkeypatch.setattr(holds_pg, "place_fast", place_fast)
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(PgHolds(connect)._place_batch([hold("a", 1), hold("b", 1)]))
    assert connections[0].closed  # the next batch opens a new connection
