"""Upstream accounts: the operator's registry (database) and the relay's live snapshot of it.

The CLI and the admin API change accounts in the database; every relay process keeps an
:class:`AccountDirectory` snapshot (credentials decrypted in memory only) that it reloads every
few seconds, so a CLI change reaches running servers within ``accounts_refresh_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from pool import patterns
from pool.crypto import CredentialCipher, Secret, fingerprint
from pool.errors import AccountExists, AccountNotFound, CredentialError
from pool.models import UpstreamAccount, _utcnow
from pool.scheduler import Candidate

_accounts = UpstreamAccount.__table__  # type: ignore[attr-defined]

DEFAULT_BASE_URL = "https://api.anthropic.com"
STATUSES = ("active", "disabled")
QUARANTINE_REASONS = (
    "rate_limited",
    "credential_invalid",
    "permission_denied",
    "upstream_billing",
    "upstream_errors",
)


def _validate_base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not (url.startswith("http://") or url.startswith("https://")) or len(url) > 500:
        raise CredentialError("--base-url must be an http(s) URL (the API root, without /v1)")
    if url.endswith("/v1"):
        raise CredentialError("--base-url is the API root: drop the trailing /v1")
    return url


def parse_models(raw: str | Sequence[str] | None) -> list[str] | None:
    if raw is None:
        return None
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    patterns = [p.strip() for p in items if p.strip()]
    return patterns or None


async def add_account(
    session: AsyncSession,
    cipher: CredentialCipher,
    *,
    name: str,
    credential: Secret,
    base_url: str = DEFAULT_BASE_URL,
    group: str | None = None,
    models: list[str] | None = None,
    max_concurrency: int | None = None,
    weight: float = 1.0,
) -> UpstreamAccount:
    name = name.strip()
    if not name or len(name) > 200:
        raise CredentialError("--name must be 1 to 200 characters")
    if max_concurrency is not None and not 1 <= max_concurrency <= 10_000:
        raise CredentialError("--max-concurrency must be between 1 and 10000")
    if not 0 < weight <= 1000:
        raise CredentialError("--weight must be greater than 0 and at most 1000")
    existing = await session.execute(
        sa.select(_accounts.c.id).where(_accounts.c.name == name, _accounts.c.removed_at.is_(None))
    )
    if existing.first() is not None:
        raise AccountExists(name)
    account = UpstreamAccount(
        name=name,
        base_url=_validate_base_url(base_url),
        group=group or None,
        models=models,
        max_concurrency=max_concurrency,
        weight=weight,
        credential_ciphertext=cipher.encrypt(credential),
        fingerprint=fingerprint(credential),
    )
    session.add(account)
    await session.flush()
    return account


async def list_accounts(
    session: AsyncSession, *, include_removed: bool = False
) -> list[UpstreamAccount]:
    query = sa.select(UpstreamAccount).order_by(UpstreamAccount.name)
    if not include_removed:
        query = query.where(UpstreamAccount.removed_at.is_(None))  # type: ignore[union-attr]
    return list((await session.execute(query)).scalars())


async def find_account(session: AsyncSession, ref: str) -> UpstreamAccount:
    """A live account by id or name."""
    result = await session.execute(
        sa.select(UpstreamAccount).where(
            sa.or_(UpstreamAccount.id == ref, UpstreamAccount.name == ref),  # type: ignore[arg-type]
            UpstreamAccount.removed_at.is_(None),  # type: ignore[union-attr]
        )
    )
    account = result.scalars().first()
    if account is None:
        raise AccountNotFound(ref)
    return account


async def set_status(session: AsyncSession, ref: str, status: str) -> UpstreamAccount:
    if status not in STATUSES:
        raise CredentialError(f"unknown status {status!r}")
    account = await find_account(session, ref)
    account.status = status
    if status == "active":
        account.quarantine_reason = None
        account.quarantined_until = None
    account.updated_at = _utcnow()
    session.add(account)
    await session.flush()
    return account


async def remove_account(session: AsyncSession, ref: str) -> UpstreamAccount:
    """Soft delete: the row (and the request log's references to it) stay for history."""
    account = await find_account(session, ref)
    account.removed_at = _utcnow()
    account.status = "disabled"
    account.updated_at = account.removed_at
    session.add(account)
    await session.flush()
    return account


async def set_credential(
    session: AsyncSession, cipher: CredentialCipher, ref: str, credential: Secret
) -> UpstreamAccount:
    account = await find_account(session, ref)
    account.credential_ciphertext = cipher.encrypt(credential)
    account.fingerprint = fingerprint(credential)
    account.quarantine_reason = None
    account.quarantined_until = None
    account.last_error = None
    account.updated_at = _utcnow()
    session.add(account)
    await session.flush()
    return account


async def rotate_encryption(session: AsyncSession, cipher: CredentialCipher) -> int:
    """Re-encrypt every credential (removed accounts too) under the newest key."""
    accounts = await list_accounts(session, include_removed=True)
    for account in accounts:
        account.credential_ciphertext = cipher.rotate(account.credential_ciphertext)
        session.add(account)
    await session.flush()
    return len(accounts)


async def record_quarantine(
    session: AsyncSession,
    account_id: str,
    reason: str | None,
    until: datetime | None,
    error: str | None,
) -> None:
    """Keep a durable copy of the live (Redis) quarantine state, for the operator."""
    values: dict[str, object] = {
        "quarantine_reason": reason,
        "quarantined_until": until,
        "updated_at": _utcnow(),
    }
    if error is not None:
        values["last_error"] = error[:1000]
    await session.execute(
        sa.update(UpstreamAccount.__table__)  # type: ignore[attr-defined]
        .where(UpstreamAccount.__table__.c.id == account_id)  # type: ignore[attr-defined]
        .values(**values)
    )


log = logging.getLogger("poolrelay.pool")


@dataclass(frozen=True, slots=True)
class LiveAccount:
    """An account as the relay uses it: credential decrypted, in memory only."""

    id: str
    name: str
    base_url: str
    group: str | None
    models: tuple[str, ...] | None
    max_concurrency: int | None
    weight: float
    credential: Secret

    @classmethod
    def of(cls, row: UpstreamAccount, credential: Secret) -> LiveAccount:
        """The account a row describes, with its decrypted credential."""
        return cls(
            id=row.id,
            name=row.name,
            base_url=row.base_url.rstrip("/"),
            group=row.group,
            models=tuple(row.models) if row.models else None,
            max_concurrency=row.max_concurrency,
            weight=row.weight,
            credential=credential,
        )

    def allows(self, model: str) -> bool:
        return patterns.allows(self.models, model)


class AccountDirectory:
    """A snapshot of the active accounts, reloaded when older than ``refresh_seconds``."""

    def __init__(
        self,
        load: Callable[[], Awaitable[list[UpstreamAccount]]],
        cipher: CredentialCipher,
        *,
        refresh_seconds: float = 2.0,
        on_operator_change: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._load = load
        self._cipher = cipher
        self._refresh = refresh_seconds
        self._on_change = on_operator_change
        self._accounts: dict[str, LiveAccount] = {}
        self._versions: dict[str, datetime] | None = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        self._reloading: asyncio.Task[None] | None = None
        self._candidates: dict[str | None, tuple[Candidate, ...]] = {}
        self._candidates_of: dict[str, LiveAccount] | None = None

    def candidates(self, model: str | None) -> tuple[Candidate, ...]:
        """The scheduler's candidates among the current snapshot's accounts that may serve
        ``model`` (all of them for None): built once per snapshot and model, and a tuple, so
        the scheduler reuses its encoding too."""
        if self._candidates_of is not self._accounts or len(self._candidates) > 64:
            self._candidates, self._candidates_of = {}, self._accounts
        found = self._candidates.get(model)
        if found is None:
            found = self._candidates[model] = tuple(
                Candidate(a.id, a.max_concurrency, a.weight, a.group)
                for a in self._accounts.values()
                if model is None or a.allows(model)
            )
        return found

    async def accounts(self) -> dict[str, LiveAccount]:
        """The current snapshot. Past half its age it is reloaded in the background while
        callers keep it (no request waits for a reload under traffic, and no snapshot is older
        than ``refresh_seconds`` plus one reload); a snapshot older than that is waited for."""
        age = time.monotonic() - self._loaded_at
        if age >= self._refresh:
            async with self._lock:
                if time.monotonic() - self._loaded_at >= self._refresh:
                    await self.reload()
        elif age >= self._refresh / 2 and self._reloading is None:
            self._reloading = asyncio.create_task(self._reload_in_background())
        return self._accounts

    async def _reload_in_background(self) -> None:
        try:
            async with self._lock:
                if time.monotonic() - self._loaded_at >= self._refresh / 2:
                    await self.reload()
        except Exception:  # keep the snapshot; accounts() waits for (and raises) a late reload
            log.warning("background reload of the accounts failed", exc_info=True)
        finally:
            self._reloading = None

    async def reload(self) -> None:
        started = time.monotonic()  # the snapshot is as old as the moment its load began
        rows = await self._load()
        live: dict[str, LiveAccount] = {}
        versions = {row.id: row.updated_at for row in rows}
        if self._versions is not None and self._on_change is not None:
            # An operator enabled an account or replaced its credential (the CLI clears the
            # durable quarantine copy): lift the live quarantine too, on every process.
            for row in rows:
                if self._versions.get(row.id) != row.updated_at and row.quarantine_reason is None:
                    await self._on_change(row.id)
        self._versions = versions
        for row in rows:
            if row.status != "active" or row.removed_at is not None:
                continue
            try:
                credential = self._cipher.decrypt(row.credential_ciphertext)
            except CredentialError:
                continue  # reported by the health view; never served
            live[row.id] = LiveAccount.of(row, credential)
        self._accounts = live
        self._loaded_at = started

    def invalidate(self) -> None:
        self._loaded_at = 0.0
