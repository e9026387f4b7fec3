"""Holds and settlements on PostgreSQL: single statements, batched by group commit.

The session versions in :mod:`billing.holds` are the reference (and what SQLite runs). Here the
same two operations are data-modifying CTEs, each ONE statement and atomic on its own in
autocommit mode, with the same guarantees: the conditional update on the customer row, the hold
row deleted by exactly one settler.

:class:`PgHolds` puts concurrent holds (and, separately, concurrent settlements) into one
statement through :class:`~billing.group_commit.GroupCommit`:

- ``PLACE_MANY_SQL`` adds each customer's holds of the batch together and admits them with one
  conditional update of the customer row — ``held += Σh WHERE balance - held >= Σh`` — then
  inserts the hold and request-log rows of the admitted customers. A customer whose sum does
  not fit is retried hold by hold with ``PLACE_SQL``, in submission order, so the outcome is
  what one-at-a-time holds would give: admitted while the balance covers them, refused after.
- ``SETTLE_MANY_SQL`` deletes the batch's hold rows, then updates each customer row and each key
  budget period once with the sums, and writes one usage ledger entry per charged request with
  its running ``balance_after_micros`` (in submission order, so the ledger reads as if the
  charges had been made one by one).

The hot customer row is then written once per batch instead of once per request, which is
what a busy customer costs PostgreSQL. Every caller still waits for its batch's statement to
commit: nothing about money is kept only in memory. A deadlock between two batches (possible
only when a batch touches several customers, across relay processes) falls back to the single
statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg.errors import DeadlockDetected

from billing.errors import CustomerNotFound, CustomerSuspended, InsufficientBalance
from billing.group_commit import GroupCommit
from billing.holds import NO_BUDGET, HoldRequest, Outcome
from billing.models import utcnow
from billing.pricing import Usage

log = logging.getLogger("poolrelay.billing")

Connect = Callable[[], Awaitable[AsyncConnection[Any]]]

PLACE_TIMEOUT_SECONDS = 15
"""``statement_timeout`` of the connection that places holds. A hold whose connection broke
before its answer came back may still have committed; past this time its statement has
certainly ended (committed or rolled back), so the relay can look and release it if it is
there (:meth:`app.relay.service.Relay.resolve_hold_later`)."""
Executor = AsyncConnection[Any] | AsyncCursor[Any]
"""Where a statement runs: a connection, or a cursor kept open on one (saves making one)."""


PLACE_SQL = """
WITH c AS (
  UPDATE customers SET held_micros = held_micros + %(amount)s
  WHERE id = %(customer_id)s AND status = 'active' AND balance_micros - held_micros >= %(amount)s
  RETURNING id
), h AS (
  INSERT INTO holds (request_id, customer_id, key_id, amount_micros, instance_id, budget_micros,
    budget_day, budget_month, created_at)
  SELECT %(request_id)s, c.id, %(key_id)s, %(amount)s, %(instance_id)s, %(budget)s,
    %(budget_day)s, %(budget_month)s, %(now)s FROM c
), l AS (
  INSERT INTO request_log (id, customer_id, key_id, endpoint, requested_model, stream, status,
    hold_micros, cost_micros, input_tokens, output_tokens, cache_write_5m_tokens,
    cache_write_1h_tokens, cache_read_tokens, attempts, instance_id, started_at, request_body,
    session_id)
  SELECT %(request_id)s, c.id, %(key_id)s, %(endpoint)s, %(model)s, %(stream)s, 'in_flight',
    %(amount)s, 0, 0, 0, 0, 0, 0, 0, %(instance_id)s, %(now)s, %(body)s, %(session_id)s FROM c
)
SELECT count(*) FROM c
"""

REFUSAL_SQL = (
    "SELECT status, balance_micros - held_micros FROM customers WHERE id = %(customer_id)s"
)

SETTLE_SQL = """
WITH h AS (
  DELETE FROM holds WHERE request_id = %(request_id)s
  RETURNING customer_id, amount_micros, key_id, budget_micros, budget_day, budget_month
), k AS (
  UPDATE key_spend SET spent_micros = key_spend.spent_micros + %(cost)s,
    held_micros = key_spend.held_micros - h.budget_micros
  FROM h WHERE key_spend.key_id = h.key_id AND key_spend.period IN (h.budget_day, h.budget_month)
), c AS (
  UPDATE customers
  SET balance_micros = customers.balance_micros - %(cost)s,
      held_micros = customers.held_micros - h.amount_micros
  FROM h WHERE customers.id = h.customer_id
  RETURNING customers.id, customers.balance_micros
), l AS (
  INSERT INTO ledger_entries (customer_id, kind, amount_micros, balance_after_micros, request_id, created_at)
  SELECT c.id, 'usage', -%(cost)s, c.balance_micros, %(request_id)s, %(now)s FROM c WHERE %(cost)s > 0
), r AS (
  UPDATE request_log SET
    status = %(status)s, http_status = %(http_status)s, cost_micros = %(cost)s,
    model = COALESCE(%(model)s, model), account_id = %(account_id)s,
    upstream_request_id = %(upstream_request_id)s, attempts = %(attempts)s,
    accounts_tried = %(accounts_tried)s, error = %(error)s,
    ttfb_ms = %(ttfb_ms)s, duration_ms = %(duration_ms)s, queue_ms = %(queue_ms)s,
    finished_at = %(now)s,
    response_body = COALESCE(%(response_body)s, response_body),
    input_tokens = %(input_tokens)s, output_tokens = %(output_tokens)s,
    cache_write_5m_tokens = %(cache_write_5m)s, cache_write_1h_tokens = %(cache_write_1h)s,
    cache_read_tokens = %(cache_read)s
  WHERE id = %(request_id)s AND EXISTS (SELECT 1 FROM h)
)
SELECT count(*) FROM c
"""

PLACE_MANY_SQL = """
WITH i AS (
  SELECT * FROM unnest(
    %(request_id)s::text[], %(customer_id)s::text[], %(key_id)s::text[], %(amount)s::bigint[],
    %(instance_id)s::text[], %(budget)s::bigint[], %(budget_day)s::text[],
    %(budget_month)s::text[], %(now)s::timestamptz[], %(endpoint)s::text[], %(model)s::text[],
    %(stream)s::boolean[], %(body)s::text[], %(session_id)s::text[]
  ) AS t(request_id, customer_id, key_id, amount, instance_id, budget, budget_day, budget_month,
    now, endpoint, model, stream, body, session_id)
), s AS (
  SELECT customer_id, sum(amount)::bigint AS total FROM i GROUP BY customer_id
), c AS (
  UPDATE customers SET held_micros = customers.held_micros + s.total
  FROM s
  WHERE customers.id = s.customer_id AND customers.status = 'active'
    AND customers.balance_micros - customers.held_micros >= s.total
  RETURNING customers.id
), a AS (
  SELECT i.* FROM i JOIN c ON c.id = i.customer_id
), h AS (
  INSERT INTO holds (request_id, customer_id, key_id, amount_micros, instance_id, budget_micros,
    budget_day, budget_month, created_at)
  SELECT request_id, customer_id, key_id, amount, instance_id, budget, budget_day, budget_month,
    now FROM a
), l AS (
  INSERT INTO request_log (id, customer_id, key_id, endpoint, requested_model, stream, status,
    hold_micros, cost_micros, input_tokens, output_tokens, cache_write_5m_tokens,
    cache_write_1h_tokens, cache_read_tokens, attempts, instance_id, started_at, request_body,
    session_id)
  SELECT request_id, customer_id, key_id, endpoint, model, stream, 'in_flight', amount, 0, 0, 0,
    0, 0, 0, 0, instance_id, now, body, session_id FROM a
)
SELECT id FROM c
"""

SETTLE_MANY_SQL = """
WITH i AS (
  SELECT * FROM unnest(
    %(request_id)s::text[], %(cost)s::bigint[], %(status)s::text[], %(http_status)s::int[],
    %(model)s::text[], %(account_id)s::text[], %(upstream_request_id)s::text[],
    %(attempts)s::int[], %(error)s::text[], %(ttfb_ms)s::int[], %(duration_ms)s::int[],
    %(response_body)s::text[], %(input_tokens)s::bigint[], %(output_tokens)s::bigint[],
    %(cache_write_5m)s::bigint[], %(cache_write_1h)s::bigint[], %(cache_read)s::bigint[],
    %(accounts_tried)s::text[], %(queue_ms)s::int[]
  ) WITH ORDINALITY AS t(request_id, cost, status, http_status, model, account_id,
    upstream_request_id, attempts, error, ttfb_ms, duration_ms, response_body, input_tokens,
    output_tokens, cache_write_5m, cache_write_1h, cache_read, accounts_tried, queue_ms, ord)
), h AS (
  DELETE FROM holds USING i WHERE holds.request_id = i.request_id
  RETURNING holds.request_id, holds.customer_id, holds.amount_micros, holds.key_id,
    holds.budget_micros, holds.budget_day, holds.budget_month, i.cost, i.ord
), kp AS (
  SELECT key_id, period, sum(cost)::bigint AS cost, sum(budget_micros)::bigint AS held
  FROM (
    SELECT key_id, budget_day AS period, cost, budget_micros FROM h WHERE budget_day IS NOT NULL
    UNION ALL
    SELECT key_id, budget_month, cost, budget_micros FROM h WHERE budget_month IS NOT NULL
  ) p
  GROUP BY key_id, period
), k AS (
  UPDATE key_spend SET spent_micros = key_spend.spent_micros + kp.cost,
    held_micros = key_spend.held_micros - kp.held
  FROM kp WHERE key_spend.key_id = kp.key_id AND key_spend.period = kp.period
), cs AS (
  SELECT customer_id, sum(cost)::bigint AS cost, sum(amount_micros)::bigint AS held
  FROM h GROUP BY customer_id
), c AS (
  UPDATE customers SET balance_micros = customers.balance_micros - cs.cost,
    held_micros = customers.held_micros - cs.held
  FROM cs WHERE customers.id = cs.customer_id
  RETURNING customers.id, customers.balance_micros
), l AS (
  INSERT INTO ledger_entries (customer_id, kind, amount_micros, balance_after_micros, request_id,
    created_at)
  SELECT e.customer_id, 'usage', -e.cost, e.balance_after, e.request_id, %(now)s
  FROM (
    SELECT h.customer_id, h.cost, h.request_id, h.ord,
      (c.balance_micros + COALESCE(sum(h.cost) OVER (PARTITION BY h.customer_id ORDER BY h.ord
        ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING), 0))::bigint AS balance_after
    FROM h JOIN c ON c.id = h.customer_id
    WHERE h.cost > 0
  ) e
  ORDER BY e.ord
), r AS (
  UPDATE request_log SET
    status = i.status, http_status = i.http_status, cost_micros = i.cost,
    model = COALESCE(i.model, request_log.model), account_id = i.account_id,
    upstream_request_id = i.upstream_request_id, attempts = i.attempts,
    accounts_tried = i.accounts_tried, error = i.error,
    ttfb_ms = i.ttfb_ms, duration_ms = i.duration_ms, queue_ms = i.queue_ms,
    finished_at = %(now)s,
    response_body = COALESCE(i.response_body, request_log.response_body),
    input_tokens = i.input_tokens, output_tokens = i.output_tokens,
    cache_write_5m_tokens = i.cache_write_5m, cache_write_1h_tokens = i.cache_write_1h,
    cache_read_tokens = i.cache_read
  FROM i JOIN h ON h.request_id = i.request_id
  WHERE request_log.id = i.request_id
)
SELECT request_id FROM h
"""


EXTEND_SQL = """
WITH h AS (
  SELECT customer_id FROM holds WHERE request_id = %(request_id)s FOR UPDATE
), c AS (
  UPDATE customers SET held_micros = customers.held_micros + %(amount)s
  FROM h
  WHERE customers.id = h.customer_id
    AND customers.balance_micros - customers.held_micros >= %(amount)s
  RETURNING customers.id
), u AS (
  UPDATE holds SET amount_micros = amount_micros + %(amount)s
  WHERE request_id = %(request_id)s AND EXISTS (SELECT 1 FROM c)
), l AS (
  UPDATE request_log SET hold_micros = hold_micros + %(amount)s
  WHERE id = %(request_id)s AND EXISTS (SELECT 1 FROM c)
)
SELECT (SELECT count(*) FROM h), (SELECT count(*) FROM c),
  (SELECT balance_micros - held_micros FROM customers
   WHERE id = (SELECT customer_id FROM h))
"""
"""Grow a hold (:func:`billing.holds.extend`) in one statement: the hold row is locked first,
so a settlement racing the extension either finds the grown hold or none was grown."""


@dataclass(slots=True)
class Extension:
    request_id: str
    amount_micros: int


@dataclass(slots=True)
class Settlement:
    request_id: str
    usage: Usage | None
    cost_micros: int
    outcome: Outcome


def _place_params(hold: HoldRequest) -> dict[str, Any]:
    budget = hold.budget or NO_BUDGET
    return {
        "amount": hold.amount_micros,
        "customer_id": hold.customer_id,
        "request_id": hold.request_id,
        "key_id": hold.key_id,
        "instance_id": hold.instance_id,
        "now": hold.started_at,
        "endpoint": hold.endpoint,
        "model": hold.requested_model,
        "stream": hold.stream,
        "body": hold.request_body,
        "session_id": hold.session_id,
        "budget": budget.amount_micros,
        "budget_day": budget.day,
        "budget_month": budget.month,
    }


def _settle_params(item: Settlement) -> dict[str, Any]:
    u = item.usage or Usage()
    outcome = item.outcome
    return {
        **outcome.log_values(),
        "request_id": item.request_id,
        "cost": item.cost_micros,
        "model": outcome.model,
        "response_body": outcome.response_body,
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_write_5m": u.cache_write_5m_tokens,
        "cache_write_1h": u.cache_write_1h_tokens,
        "cache_read": u.cache_read_input_tokens,
    }


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Row dicts → one list per column (the arrays ``unnest`` takes apart again)."""
    return {name: [row[name] for row in rows] for name in rows[0]}


async def place_fast(conn: Executor, hold: HoldRequest) -> None:
    """One hold in one statement; raises InsufficientBalance / CustomerSuspended /
    CustomerNotFound like :func:`billing.holds.place`."""
    params = _place_params(hold)
    row = await (await conn.execute(PLACE_SQL, params)).fetchone()
    if row is not None and row[0] == 1:
        return
    refusal = await (await conn.execute(REFUSAL_SQL, params)).fetchone()
    if refusal is None:
        raise CustomerNotFound(hold.customer_id)
    if refusal[0] != "active":
        raise CustomerSuspended(hold.customer_id)
    raise InsufficientBalance(hold.amount_micros, int(refusal[1]))


async def place_many(conn: Executor, batch: Sequence[HoldRequest]) -> set[str]:
    """Place every hold of each customer whose holds in ``batch`` fit together; returns the ids
    of those customers (the others' holds are untouched, for :func:`place_fast`)."""
    params = _columns([_place_params(hold) for hold in batch])
    rows = await (await conn.execute(PLACE_MANY_SQL, params)).fetchall()
    return {str(row[0]) for row in rows}


async def settle_fast(
    conn: Executor,
    request_id: str,
    usage: Usage | None,
    cost_micros: int,
    outcome: Outcome,
) -> bool:
    """One settlement in one statement, like :func:`billing.holds.settle`."""
    params = _settle_params(Settlement(request_id, usage, cost_micros, outcome))
    params["now"] = utcnow()
    row = await (await conn.execute(SETTLE_SQL, params)).fetchone()
    return row is not None and row[0] == 1


async def extend_fast(conn: Executor, item: Extension) -> bool:
    """One extension in one statement, like :func:`billing.holds.extend`."""
    params = {"request_id": item.request_id, "amount": item.amount_micros}
    row = await (await conn.execute(EXTEND_SQL, params)).fetchone()
    if row is None or not row[0]:
        return False
    if not row[1]:
        raise InsufficientBalance(item.amount_micros, int(row[2] or 0))
    return True


async def settle_many(conn: Executor, batch: Sequence[Settlement]) -> set[str]:
    """Settle every hold of ``batch`` that is still open; returns the request ids settled."""
    params: dict[str, Any] = _columns([_settle_params(item) for item in batch])
    params["now"] = utcnow()
    rows = await (await conn.execute(SETTLE_MANY_SQL, params)).fetchall()
    return {str(row[0]) for row in rows}


def _one_by_one_or_raise(cur: AsyncCursor[Any], exc: psycopg.Error, what: str, size: int) -> None:
    """A batch statement the database refused: one item's data (a value it cannot store, a
    constraint), a deadlock, a timeout. Each item then goes alone, so that the refusal reaches
    only the caller whose item caused it. A broken connection fails the whole batch instead."""
    conn = cur.connection
    if conn.closed or conn.broken or isinstance(exc, psycopg.InterfaceError):
        raise exc
    if isinstance(exc, DeadlockDetected):
        log.info("%s batch of %d deadlocked; going one by one", what, size)
    else:
        log.warning("%s batch of %d refused (%s); going one by one", what, size, type(exc).__name__)


class _Line:
    """One dedicated autocommit connection and cursor. A :class:`GroupCommit` runs one batch
    at a time, so each needs exactly one connection: no pool to go through per batch."""

    def __init__(self, connect: Connect, *, statement_timeout: float | None = None) -> None:
        self._connect = connect
        self._timeout_ms = int(statement_timeout * 1000) if statement_timeout else None
        self._conn: AsyncConnection[Any] | None = None
        self._cursor: AsyncCursor[Any] | None = None

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[AsyncCursor[Any]]:
        if self._conn is None or self._cursor is None or self._conn.closed:
            conn = await self._connect()
            if self._timeout_ms is not None:
                try:
                    await conn.execute(f"SET statement_timeout = {self._timeout_ms}")
                except BaseException:
                    await conn.close()
                    raise
            self._conn, self._cursor = conn, conn.cursor()
        try:
            yield self._cursor
        except BaseException:  # the connection may be broken: the next batch opens a new one
            await self.aclose()
            raise

    async def aclose(self) -> None:
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


class PgHolds:
    """Holds and settlements for the relay on PostgreSQL, group-committed (module docstring).

    ``connect`` opens an autocommit connection (``Database.connect_raw``); one is kept for
    placing and one for settling.
    """

    def __init__(self, connect: Connect, *, max_batch: int = 256) -> None:
        self._placing_line = _Line(connect, statement_timeout=PLACE_TIMEOUT_SECONDS)
        self._settling_line = _Line(connect)
        self._extending_line = _Line(connect)
        self.placing: GroupCommit[HoldRequest, None] = GroupCommit(
            self._place_batch, max_batch=max_batch
        )
        self.settling: GroupCommit[Settlement, bool] = GroupCommit(
            self._settle_batch, max_batch=max_batch
        )
        self.extending: GroupCommit[Extension, bool] = GroupCommit(
            self._extend_batch, max_batch=max_batch
        )

    place_timeout = float(PLACE_TIMEOUT_SECONDS)

    async def aclose(self) -> None:
        await self._placing_line.aclose()
        await self._settling_line.aclose()
        await self._extending_line.aclose()

    async def place(self, hold: HoldRequest) -> None:
        await self.placing.submit(hold)

    async def begin(self, hold: HoldRequest) -> asyncio.Future[None]:
        """Start placing ``hold`` (group commit) and return its future, which says whether it
        was admitted (or raises the refusal): the caller overlaps it with its next round trip
        (the scheduler's lease) and sends nothing upstream before it has resolved. A lone hold
        is let go first — its commit being the longer of the two round trips — while under
        load it waits for the next batch anyway (yielding would only queue the caller behind
        all the others)."""
        future = self.placing.submit_nowait(hold)
        if self.placing.queued == 1:
            await asyncio.sleep(0)
        return future

    async def extend(self, request_id: str, amount_micros: int) -> bool:
        return await self.extending.submit(Extension(request_id, amount_micros))

    async def settle(
        self, request_id: str, usage: Usage | None, cost_micros: int, outcome: Outcome
    ) -> bool:
        return await self.settling.submit(Settlement(request_id, usage, cost_micros, outcome))

    async def _place_batch(self, batch: list[HoldRequest]) -> list[BaseException | None]:
        async with self._placing_line.use() as cur:
            admitted: set[str] = set()
            if len(batch) > 1:
                try:
                    admitted = await place_many(cur, batch)
                except psycopg.Error as exc:
                    _one_by_one_or_raise(cur, exc, "hold", len(batch))
            results: list[BaseException | None] = []
            for hold in batch:
                if hold.customer_id in admitted:
                    results.append(None)
                    continue
                try:
                    await place_fast(cur, hold)
                    results.append(None)
                except Exception as exc:  # this hold's own refusal or failure, for its caller
                    results.append(exc)
            return results

    async def _extend_batch(self, batch: list[Extension]) -> list[bool | BaseException]:
        """The batch's extensions in one transaction (one commit), each its own statement;
        a refused extension is an answer, not an error, so it does not undo the others."""
        async with self._extending_line.use() as cur:
            results: list[bool | BaseException] = []
            if len(batch) > 1:
                try:
                    async with cur.connection.transaction():
                        for item in batch:
                            try:
                                results.append(await extend_fast(cur, item))
                            except InsufficientBalance as exc:
                                results.append(exc)
                    return results
                except psycopg.Error as exc:
                    _one_by_one_or_raise(cur, exc, "extension", len(batch))
                    results = []
            for item in batch:
                try:
                    results.append(await extend_fast(cur, item))
                except Exception as exc:
                    results.append(exc)
            return results

    async def _settle_batch(self, batch: list[Settlement]) -> list[bool | BaseException]:
        async with self._settling_line.use() as cur:
            if len(batch) > 1:
                try:
                    settled = await settle_many(cur, batch)
                    return [item.request_id in settled for item in batch]
                except psycopg.Error as exc:
                    _one_by_one_or_raise(cur, exc, "settlement", len(batch))
            results: list[bool | BaseException] = []
            for item in batch:
                try:
                    results.append(
                        await settle_fast(
                            cur, item.request_id, item.usage, item.cost_micros, item.outcome
                        )
                    )
                except Exception as exc:
                    results.append(exc)
            return results
