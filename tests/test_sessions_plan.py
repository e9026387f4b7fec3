"""The sessions listing reads one customer's rows through its index, never the whole log.

A request log of many customers is generated in the database (300,000 rows of 200 customers on PostgreSQL, where
``EXPLAIN (ANALYZE, BUFFERS)`` is printed; 30,000 rows of 20 on SQLite, ``EXPLAIN QUERY PLAN``), and the
plan of the very statement ``billing.sessions`` runs is checked: an index scan on
``ix_request_log_customer_session`` (migration 0010) and no sequential scan of ``request_log``.
Run with ``-s`` to see the plans.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from app.db import sync_url
from app.migrate import upgrade
from billing import sessions

INDEX = "ix_request_log_customer_session"
PER_SESSION = 20  # requests per session
WITHOUT_SESSION = 5  # one request in this many carries no session

PG_FILL = """
INSERT INTO request_log (id, customer_id, key_id, endpoint, stream, status, hold_micros,
  cost_micros, input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens,
  cache_read_tokens, attempts, session_id, started_at)
SELECT 'req_' || lpad(n::text, 26, '0'),
       'cus_' || lpad((n % :customers)::text, 5, '0'),
       'key_' || lpad((n % :customers)::text, 5, '0'),
       'messages', false, CASE WHEN n % 50 = 0 THEN 'refused' ELSE 'ok' END, 1000,
       (n % 997) * 7, 100 + n % 300, 50 + n % 100, n % 40, 0, n % 1000, 1,
       CASE WHEN n % :without = 0 THEN NULL
            ELSE 'ses-' || ((n / :customers) / :per_session)::text END,
       timestamptz '2026-11-01 00:00:00+00' + (n || ' seconds')::interval
FROM generate_series(1, :rows) AS n
"""


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    if database_url.startswith("sqlite"):
        upgrade(database_url)
    made = sa.create_engine(sync_url(database_url))
    yield made
    made.dispose()


def fill(engine: sa.Engine, rows: int, customers: int) -> None:
    params = {"customers": customers, "without": WITHOUT_SESSION, "per_session": PER_SESSION}
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(PG_FILL), {**params, "rows": rows})
            conn.execute(sa.text("ANALYZE request_log"))
            return
        base = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
        batch = [
            {
                "id": f"req_{n:026d}",
                "customer_id": f"cus_{n % customers:05d}",
                "key_id": f"key_{n % customers:05d}",
                "status": "refused" if n % 50 == 0 else "ok",
                "cost": (n % 997) * 7,
                "session_id": None
                if n % WITHOUT_SESSION == 0
                else f"ses-{(n // customers) // PER_SESSION}",
                "started_at": datetime.fromtimestamp(base + n, UTC).replace(tzinfo=None),
            }
            for n in range(1, rows + 1)
        ]
        conn.execute(
            sa.text(
                "INSERT INTO request_log (id, customer_id, key_id, endpoint, stream, status,"
                " hold_micros, cost_micros, input_tokens, output_tokens, cache_write_5m_tokens,"
                " cache_write_1h_tokens, cache_read_tokens, attempts, session_id, started_at)"
                " VALUES (:id, :customer_id, :key_id, 'messages', 0, :status, 1000, :cost,"
                " 100, 50, 0, 0, 10, 1, :session_id, :started_at)"
            ),
            batch,
        )
        conn.execute(sa.text("ANALYZE"))


def plans(engine: sa.Engine) -> list[tuple[str, str, float, int]]:
    """(what, plan, seconds, rows) for the customer listing, a later page and a two-hour window."""
    first = sessions.SessionQuery(customer_id="cus_00007", limit=50)
    found = []
    cases: list[tuple[str, sessions.SessionQuery]] = [("first page", first)]
    with engine.connect() as conn:
        page = conn.execute(sessions._statement(first)).all()
        assert len(page) == 50
        last = page[-1]
        moment = last.last_seen
        if isinstance(moment, str):
            moment = datetime.fromisoformat(moment)
        cursor = sessions.Cursor(moment.replace(tzinfo=UTC), last.customer_id, last.session_id)
        cases.append(
            ("next page", sessions.SessionQuery(customer_id="cus_00007", cursor=cursor, limit=50))
        )
        cases.append(
            (
                "two hours",
                sessions.SessionQuery(
                    customer_id="cus_00007",
                    start=datetime(2026, 11, 1, 2, tzinfo=UTC),
                    end=datetime(2026, 11, 1, 4, tzinfo=UTC),
                ),
            )
        )
        for what, query in cases:
            stmt = sessions._statement(query)
            compiled = stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
            prefix = (
                "EXPLAIN (ANALYZE, BUFFERS) "
                if engine.dialect.name == "postgresql"
                else "EXPLAIN QUERY PLAN "
            )
            explained = conn.exec_driver_sql(prefix + str(compiled)).all()
            plan = "\n".join(" | ".join(str(c) for c in row) for row in explained)
            started = time.perf_counter()
            result = conn.execute(stmt).all()
            found.append((what, plan, time.perf_counter() - started, len(result)))
    return found


def test_listing_a_customer_s_sessions_uses_the_index(engine: sa.Engine) -> None:
    postgres = engine.dialect.name == "postgresql"
    rows, customers = (300_000, 200) if postgres else (30_000, 20)  # 1,500 rows a customer
    fill(engine, rows, customers)
    for what, plan, seconds, count in plans(engine):
        print(
            f"\n--- {engine.dialect.name}, {rows:,} rows, {what}: {count} sessions, "
            f"{seconds * 1000:.1f} ms\n{plan}"
        )
        assert count > 0
        # A narrow time window may rather go by (customer_id, started_at): as good.
        assert INDEX in plan or (what == "two hours" and "ix_request_log_customer_started" in plan)
        if postgres:
            assert "Seq Scan on request_log" not in plan, plan
        else:
            assert "SCAN request_log\n" not in plan + "\n", plan
