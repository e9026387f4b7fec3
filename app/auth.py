"""Authentication: customer keys for ``/v1/*`` and the admin token for ``/admin/*``.

Customer keys come in ``x-api-key`` or ``Authorization: Bearer`` (Claude Code uses either). A
lookup is cached per process for ``auth_cache_seconds`` (≤ 1 s), so a revocation or a suspension
reaches every relay process within a second without a database read per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from app import errors
from app.db import Database
from app.oversight import tokens as admin_tokens
from billing import customers
from billing.customers import KeyContext


def credential_from(headers: Mapping[str, str]) -> str | None:
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None


log = logging.getLogger("poolrelay.auth")


class KeyAuthenticator:
    def __init__(self, db: Database, *, cache_seconds: float) -> None:
        self._db = db
        self._ttl = cache_seconds
        self._cache: dict[str, tuple[float, KeyContext | None]] = {}
        self._pending: dict[str, asyncio.Future[KeyContext | None]] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def authenticate(self, headers: Mapping[str, str]) -> KeyContext:
        """The key's context, or ApiError 401/403."""
        plaintext = credential_from(headers)
        if not plaintext:
            raise errors.authentication("x-api-key header is required")
        if not customers.looks_like_key(plaintext):
            raise errors.authentication("invalid x-api-key")
        ctx = await self._lookup(plaintext)
        if ctx is None or ctx.key_status != "active":
            raise errors.authentication("invalid x-api-key")
        if ctx.expires_at is not None and _aware(ctx.expires_at) <= datetime.now(UTC):
            raise errors.authentication("this API key has expired")
        if ctx.customer_status != "active":
            raise errors.ApiError(
                403,
                "permission_error",
                "This customer account is suspended.",
                {"x-should-retry": "false"},
            )
        return ctx

    async def _lookup(self, plaintext: str) -> KeyContext | None:
        now = time.monotonic()
        cached = self._cache.get(plaintext)
        if cached is not None and now - cached[0] < self._ttl:
            if now - cached[0] >= self._ttl / 2 and plaintext not in self._pending:
                # Past half its age: refresh in the background, keep answering from the cache
                # (no request waits under traffic; nothing is older than the TTL + one lookup).
                task = asyncio.create_task(self._refresh(plaintext))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return cached[1]
        pending = self._pending.get(plaintext)
        if pending is not None:  # one lookup per key at a time, however many requests wait
            return await asyncio.shield(pending)
        return await self._load(plaintext)

    async def _refresh(self, plaintext: str) -> None:
        if plaintext in self._pending:
            return
        try:
            await self._load(plaintext)
        except Exception:  # the next request past the TTL looks it up (and sees the error)
            log.warning("background key lookup failed", exc_info=True)

    async def _load(self, plaintext: str) -> KeyContext | None:
        now = time.monotonic()
        future: asyncio.Future[KeyContext | None] = asyncio.get_running_loop().create_future()
        self._pending[plaintext] = future
        try:
            async with self._db.transaction() as session:
                ctx = await customers.lookup_key(session, plaintext)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as unhandled
            raise
        finally:
            del self._pending[plaintext]
        future.set_result(ctx)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[plaintext] = (now, ctx)
        return ctx


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# --- admin tokens (app/oversight/tokens.py keeps them) ----------------------------------------


def admin_token_from(headers: Mapping[str, str]) -> str:
    """The bearer token of an admin request (``Authorization: Bearer``, or ``x-admin-token``)."""
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-admin-token", "")


async def ensure_admin_token(db: Database, configured: str | None) -> str | None:
    """Make sure the ``bootstrap`` admin token exists; returns a generated token to print once
    (first start without ``ADMIN_TOKEN``), else None."""
    async with db.transaction() as session:
        return await admin_tokens.ensure_bootstrap(session, configured)
