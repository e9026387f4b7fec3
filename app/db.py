"""Database engines and sessions.

One async engine per process (aiosqlite for SQLite, psycopg 3 for PostgreSQL). Services flush,
the caller commits: ``Database.transaction()`` is the unit of work. On SQLite every transaction
starts with ``BEGIN IMMEDIATE`` under an in-process lock, so concurrent writers queue instead of
failing with "database is locked"; other processes (the CLI) wait through ``busy_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def async_url(url: str) -> str:
    """The SQLAlchemy async URL for a contract-style database URL."""
    if url.startswith("sqlite+aiosqlite://"):
        return url
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")


def sync_url(url: str) -> str:
    """The SQLAlchemy sync URL (Alembic runs synchronously)."""
    url = async_url(url)
    if url.startswith("sqlite+aiosqlite://"):
        return "sqlite://" + url[len("sqlite+aiosqlite://") :]
    return url


CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
"""libpq parameters of every PostgreSQL connection: a server that does not answer the connection
in 5 s counts as down (a refused one fails at once), and TCP keepalives find a connection whose
server vanished without a word in ~25 s rather than never."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    aurl = async_url(url)
    if aurl.startswith("sqlite"):
        engine = create_async_engine(aurl)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    # The ORM engine serves the admin API, auth lookups and jobs; the relay's hot statements
    # use the raw pool (``Database.raw``). Together at most ~3 × pool_size connections.
    # ``pool_pre_ping``: a pooled connection that an outage (or a PostgreSQL restart) broke is
    # replaced when it is checked out, instead of failing the first statement sent on it.
    return create_async_engine(
        aurl,
        pool_size=max(2, pool_size // 2),
        max_overflow=pool_size // 2,
        pool_pre_ping=True,
        connect_args=dict(CONNECT_OPTIONS),
    )


def libpq_url(url: str) -> str:
    """The plain ``postgresql://`` URL that psycopg understands."""
    return "postgresql://" + async_url(url)[len("postgresql+psycopg://") :]


class Database:
    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._lock = asyncio.Lock() if self.is_sqlite else None
        self._pool_size = pool_size
        self._raw_pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._raw_lock = asyncio.Lock()

    @property
    def has_fast_path(self) -> bool:
        """PostgreSQL runs the hot billing statements as single statements on raw connections."""
        return not self.is_sqlite

    @contextlib.asynccontextmanager
    async def raw(self) -> AsyncIterator[AsyncConnection[Any]]:
        """An autocommit psycopg connection (PostgreSQL only) for single-statement hot paths.

        The relay's hold and settlement are one statement each on PostgreSQL (data-modifying
        CTEs), so they need no transaction block and no ORM: one round trip, prepared once per
        connection.
        """
        if self._raw_pool is None:
            async with self._raw_lock:
                if self._raw_pool is None:
                    pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
                        libpq_url(self.url),
                        min_size=2,
                        max_size=self._pool_size * 2,
                        kwargs={"autocommit": True, "prepare_threshold": 0, **CONNECT_OPTIONS},
                        open=False,
                        # a connection broken while idle (an outage) is replaced, not handed out
                        check=AsyncConnectionPool.check_connection,
                        timeout=10,
                    )
                    await pool.open()
                    self._raw_pool = pool
        async with self._raw_pool.connection() as conn:
            yield conn

    async def connect_raw(self) -> AsyncConnection[Any]:
        """A new autocommit psycopg connection of its own (PostgreSQL only), for a caller that
        keeps it (the group-committed holds keep one per batch queue)."""
        return await AsyncConnection.connect(
            libpq_url(self.url), autocommit=True, prepare_threshold=0, **CONNECT_OPTIONS
        )

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        if self._lock is None:
            async with self._sessions() as session, session.begin():
                yield session
            return
        async with self._lock, self._sessions() as session, session.begin():
            yield session

    async def ping(self) -> None:
        from sqlalchemy import text

        async with self.transaction() as session:
            await session.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        if self._raw_pool is not None:
            await self._raw_pool.close()
            self._raw_pool = None
        await self.engine.dispose()
