"""The composition root's object graph: one :class:`Services` per process.

Built by ``create_app`` (server) and by the CLI and the worker, from one :class:`Settings`.
Nothing here is created at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import redis.asyncio as aioredis
from cryptography.fernet import Fernet

from app.auth import KeyAuthenticator
from app.db import Database
from app.instances import INSTANCE_PREFIX
from app.keyslots import KeySlots
from app.metrics import Metrics
from app.redis import Command, make_redis, pipelined
from app.settings import Settings
from billing import aliases as alias_repo
from billing import prices as price_repo
from billing.group_commit import GroupCommit
from billing.hold_store import HoldStore, SessionHolds
from billing.holds_pg import PgHolds
from billing.pricing import PriceBook
from pool import accounts as account_repo
from pool.accounts import AccountDirectory
from pool.crypto import CredentialCipher, parse_keys
from pool.models import UpstreamAccount
from pool.scheduler import AcquireCall, Lease, LeaseEnd, Scheduler
from pool.upstream import UpstreamClient, make_client
from pool.waiters import Waiters

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")
log = logging.getLogger("poolrelay")


def load_encryption_keys(settings: Settings) -> list[bytes]:
    """``ENCRYPTION_KEYS`` if set; else the key file, created (mode 0600) on first use."""
    if settings.encryption_keys is not None and settings.encryption_keys.get_secret_value():
        return parse_keys(settings.encryption_keys.get_secret_value())
    path = settings.key_file
    if not path.exists():
        key = Fernet.generate_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key + b"\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
    return parse_keys(path.read_text())


class Reloading(Generic[T]):
    """A value loaded from the database and reloaded every few seconds, so that an edit made
    through any process (admin API, CLI) reaches every process; ``invalidate`` makes this
    process reload at once.

    Past half its age the value is refreshed in the background while callers keep the current
    one (stale-while-revalidate): under traffic a reload never stalls a request, and a value is
    never older than ``refresh_seconds`` plus one load. Only the first load, a load after
    ``invalidate`` and one after a long idle spell are waited for."""

    def __init__(
        self, load: Callable[[], Awaitable[T]], initial: T, *, refresh_seconds: float = 5.0
    ) -> None:
        self._load = load
        self._value = initial
        self._refresh = refresh_seconds
        self._loaded_at = -1e9
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def get(self) -> T:
        age = time.monotonic() - self._loaded_at
        if age >= self._refresh:
            async with self._lock:
                if time.monotonic() - self._loaded_at >= self._refresh:
                    await self._reload()
        elif age >= self._refresh / 2 and self._background is None:
            self._background = asyncio.create_task(self._reload_in_background())
        return self._value

    async def _reload(self) -> None:
        started = time.monotonic()  # the value is as old as the moment its load began
        self._value = await self._load()
        self._loaded_at = started

    async def _reload_in_background(self) -> None:
        try:
            async with self._lock:
                if time.monotonic() - self._loaded_at >= self._refresh / 2:
                    await self._reload()
        except Exception:  # keep serving the current value; get() retries (and raises) later
            log.warning("background reload failed", exc_info=True)
        finally:
            self._background = None

    def invalidate(self) -> None:
        self._loaded_at = -1e9


@dataclass
class Services:
    settings: Settings
    db: Database
    redis: aioredis.Redis
    cipher: CredentialCipher
    scheduler: Scheduler
    directory: AccountDirectory
    keys: KeyAuthenticator
    prices: Reloading[PriceBook]
    aliases: Reloading[dict[str, str]]
    lease_starts: GroupCommit[AcquireCall, Lease]
    """Scheduling decisions of concurrent requests, many per Redis round trip (a pipeline)."""
    lease_ends: GroupCommit[LeaseEnd, None]
    """Ends of requests (lease release + headroom), many per Redis call (group commit)."""
    redis_commands: GroupCommit[Command, Any]
    """Plain Redis commands of concurrent requests, one pipeline per batch."""
    holds: HoldStore
    """Holds, extensions and settlements: group-committed statements on PostgreSQL
    (:class:`~billing.holds_pg.PgHolds`), a transaction each elsewhere."""
    waiters: Waiters
    """The process's wake-up channel for requests waiting for a concurrency slot (one Pub/Sub
    subscription, started by the first wait: :mod:`app.relay.queueing`)."""
    key_slots: KeySlots
    """Keys' ``max_concurrency`` slots, shared by every relay process."""
    instance_id: str = field(default_factory=lambda: INSTANCE_PREFIX + secrets.token_hex(8))
    """``inst_`` + 16 hex; the hex part owns the process's leases (``Scheduler(owner=)``)."""
    metrics: Metrics = field(default_factory=Metrics)
    _http: httpx.AsyncClient | None = None
    _upstream: UpstreamClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = make_client(
                connect_timeout=self.settings.upstream_connect_timeout,
                read_timeout=self.settings.upstream_read_timeout,
            )
        return self._http

    @property
    def upstream(self) -> UpstreamClient:
        """The relay's hot-path client (aiohttp)."""
        if self._upstream is None:
            self._upstream = UpstreamClient(
                connect_timeout=self.settings.upstream_connect_timeout,
                read_timeout=self.settings.upstream_read_timeout,
            )
        return self._upstream

    async def aclose(self) -> None:
        await self.waiters.aclose()
        if self._http is not None:
            await self._http.aclose()
        if self._upstream is not None:
            await self._upstream.aclose()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        await self.holds.aclose()
        await self.db.dispose()


def build_services(settings: Settings, *, redis: aioredis.Redis | None = None) -> Services:
    """``redis``: a client to use instead of one for ``REDIS_URL`` (the CLI passes the running
    embedded server's, see :mod:`app.embedded_redis`)."""
    db = Database(settings.database_url, pool_size=settings.db_pool_size)
    cipher = CredentialCipher(load_encryption_keys(settings))
    if redis is None:
        redis = make_redis(settings.redis_url)

    async def load_accounts() -> list[UpstreamAccount]:
        async with db.transaction() as session:
            return await account_repo.list_accounts(session)

    async def load_prices() -> PriceBook:
        async with db.transaction() as session:
            return PriceBook(await price_repo.load_prices(session))

    async def load_aliases() -> dict[str, str]:
        async with db.transaction() as session:
            return await alias_repo.load_aliases(session)

    instance_hex = secrets.token_hex(8)
    # The process's leases carry its id, so reconciliation can drop them when it dies.
    scheduler = Scheduler(redis, owner=instance_hex)

    async def end_leases(ends: list[LeaseEnd]) -> list[None]:
        await scheduler.finish_many(ends)
        return [None] * len(ends)

    return Services(
        settings=settings,
        db=db,
        redis=redis,
        cipher=cipher,
        scheduler=scheduler,
        directory=AccountDirectory(
            load_accounts,
            cipher,
            refresh_seconds=settings.accounts_refresh_seconds,
            on_operator_change=scheduler.clear_quarantine,
        ),
        keys=KeyAuthenticator(db, cache_seconds=settings.auth_cache_seconds),
        prices=Reloading(load_prices, PriceBook({})),
        aliases=Reloading(load_aliases, {}),
        holds=PgHolds(db.connect_raw) if db.has_fast_path else SessionHolds(db.transaction),
        lease_starts=GroupCommit(scheduler.acquire_many),
        lease_ends=GroupCommit(end_leases),
        redis_commands=pipelined(redis),
        waiters=Waiters(redis, scheduler.wake_channel),
        key_slots=KeySlots(redis, owner=instance_hex),
        instance_id=INSTANCE_PREFIX + instance_hex,
    )
