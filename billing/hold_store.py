"""Where placed holds live: one interface, one implementation per database, chosen once.

The relay never asks which database it runs on: the services (``app.state``) are built with a
:class:`HoldStore`:

- :class:`SessionHolds` runs :mod:`billing.holds` in a short transaction of its own per
  operation (SQLite, and any database without a fast path);
- :class:`billing.holds_pg.PgHolds` runs the same operations as single statements, batched by
  group commit (PostgreSQL).

Both keep the same guarantees: a hold, an extension and a settlement are each one conditional,
idempotent write that is durable before the caller goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from billing import holds
from billing.holds import HoldRequest, Outcome
from billing.pricing import Usage

Transaction = Callable[[], AbstractAsyncContextManager[AsyncSession]]


class HoldStore(Protocol):
    place_timeout: float
    """Seconds after a placement failed without an answer by which its statement has surely
    ended (committed or rolled back), so that the hold can be looked for and released."""

    async def begin(self, hold: HoldRequest) -> asyncio.Future[None]:
        """Start placing ``hold``. The future resolves once it is placed, or raises its
        refusal (:class:`~billing.errors.InsufficientBalance`, …) or the failure that left it
        uncertain. A store may also raise at once. Nothing may be sent upstream before the
        future has resolved."""
        ...

    async def extend(self, request_id: str, amount_micros: int) -> bool:
        """Grow a placed hold (:func:`billing.holds.extend`): True when grown, False when the
        hold is gone; raises :class:`~billing.errors.InsufficientBalance` when it does not
        fit."""
        ...

    async def settle(
        self, request_id: str, usage: Usage | None, cost_micros: int, outcome: Outcome
    ) -> bool:
        """Turn the hold into its charge, or release it (``cost_micros`` 0): whether this
        call found the hold (:func:`billing.holds.settle`)."""
        ...

    async def aclose(self) -> None: ...


class SessionHolds:
    """Each operation in a transaction of its own, through the ORM session."""

    place_timeout = 0.0  # a placement that raised has rolled back by then

    def __init__(self, transaction: Transaction) -> None:
        self._transaction = transaction

    async def begin(self, hold: HoldRequest) -> asyncio.Future[None]:
        async with self._transaction() as session:
            await holds.place(session, hold)
        placed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        placed.set_result(None)
        return placed

    async def extend(self, request_id: str, amount_micros: int) -> bool:
        async with self._transaction() as session:
            return await holds.extend(session, request_id, amount_micros)

    async def settle(
        self, request_id: str, usage: Usage | None, cost_micros: int, outcome: Outcome
    ) -> bool:
        async with self._transaction() as session:
            return await holds.settle(session, request_id, usage, cost_micros, outcome)

    async def aclose(self) -> None:
        return None
