"""Alembic migrations: upgrade, downgrade, upgrade again; the models and migrations agree.

Runs on a fresh SQLite file always, and on a fresh PostgreSQL database (created and dropped
here) when ``POOLRELAY_TEST_DATABASE_URL`` is set.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import app.meta
import app.oversight.models
import billing.models
import billing.owned
import pool.models
from app.db import sync_url
from app.migrate import alembic_config, downgrade, upgrade
from tests.harness import pg_drop

PG_URL = os.environ.get("POOLRELAY_TEST_DATABASE_URL")
TABLES = {
    "app_meta",
    "customers",
    "customer_keys",
    "prices",
    "ledger_entries",
    "holds",
    "request_log",
    "upstream_accounts",
}
_ = (
    app.meta,
    app.oversight.models,
    billing.models,
    billing.owned,
    pool.models,
)  # every table registered on SQLModel.metadata


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture(params=["sqlite", "postgresql"] if PG_URL else ["sqlite"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    assert PG_URL
    import psycopg

    name = "pr_migr_" + secrets.token_hex(6)
    admin_url = _with_db(PG_URL, "postgres").replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(PG_URL, name)
    finally:
        pg_drop(PG_URL, name)


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)


def _tables(url: str) -> set[str]:
    engine = _engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _prices(url: str) -> dict[str, tuple[int, ...]]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT model, input_micros, output_micros, cache_write_5m_micros,"
                    " cache_write_1h_micros, cache_read_micros FROM prices"
                )
            )
            return {row[0]: tuple(int(v) for v in row[1:]) for row in rows}
    finally:
        engine.dispose()


def _diff(url: str) -> list[Any]:
    """Alembic's autogenerate comparison of the database against ``SQLModel.metadata``."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": False}
            )
            return list(compare_metadata(context, SQLModel.metadata))
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(fresh_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(fresh_url)).get_current_head()
    assert head is not None
    assert _revision(fresh_url) is None

    upgrade(fresh_url)
    assert _revision(fresh_url) == head
    assert _tables(fresh_url) >= TABLES
    assert set(SQLModel.metadata.tables) <= _tables(fresh_url)
    prices = _prices(fresh_url)
    # seeded list prices, micro-USD per million tokens: input, output, 5m, 1h, read
    assert prices["claude-haiku-4-5"] == (1_000_000, 5_000_000, 1_250_000, 2_000_000, 100_000)
    assert prices["claude-sonnet-4-6"][:2] == (3_000_000, 15_000_000)
    assert prices["claude-opus-4-1"][:2] == (15_000_000, 75_000_000)
    assert len(prices) >= 10
    # the models and the migrations agree
    assert _diff(fresh_url) == []
    upgrade(fresh_url)  # idempotent at head
    assert _revision(fresh_url) == head

    downgrade(fresh_url, "base")
    assert _revision(fresh_url) is None
    assert not (_tables(fresh_url) & TABLES), _tables(fresh_url)

    upgrade(fresh_url)
    assert _revision(fresh_url) == head
    assert _tables(fresh_url) >= TABLES
    assert _prices(fresh_url) == prices
    assert _diff(fresh_url) == []

    # one step at a time, down and up again
    script = ScriptDirectory.from_config(alembic_config(fresh_url))
    revisions = [rev.revision for rev in script.walk_revisions("base", "heads")]
    assert len(revisions) >= 2
    for revision in revisions[1:]:
        downgrade(fresh_url, "-1")
        assert _revision(fresh_url) == revision
    downgrade(fresh_url, "-1")
    assert _revision(fresh_url) is None
    upgrade(fresh_url)
    assert _revision(fresh_url) == head
    assert _prices(fresh_url) == prices
