"""Admin tokens with roles: ``admin`` (every endpoint) and ``readonly`` (reads only).

Tokens are ``pra-`` + 43 URL-safe characters, shown once and stored as their SHA-256. The token
from ``ADMIN_TOKEN`` (or the one printed on first start) is the ``admin`` token ``bootstrap``
(row id ``adt_bootstrap``). Every admin request looks its token up in the request's own
transaction: nothing is cached, so a revocation holds on every process at once.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors
from app.meta import AppMeta
from app.oversight.models import AdminToken
from billing.models import iso

ROLES = ("admin", "readonly")
BOOTSTRAP_ID = "adt_bootstrap"
BOOTSTRAP_NAME = "bootstrap"
LEGACY_META = "admin_token_sha256"
"""Where installs before migration 0011 kept the first-start token's digest."""

_tokens = AdminToken.__table__  # type: ignore[attr-defined]


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def generate() -> str:
    return "pra-" + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who makes an admin request: the token's id, name (the audit log's actor) and role."""

    id: str
    name: str
    role: str

    @property
    def readonly(self) -> bool:
        return self.role != "admin"


def token_view(row: AdminToken) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "prefix": row.prefix,
        "status": row.status,
        "created_at": iso(row.created_at),
        "revoked_at": iso(row.revoked_at),
    }


def _prefix(token: str) -> str:
    return token[:8]


async def authenticate(session: AsyncSession, token: str) -> Principal | None:
    row = (
        await session.execute(
            sa.select(_tokens.c.id, _tokens.c.name, _tokens.c.role).where(
                _tokens.c.token_hash == digest(token), _tokens.c.status == "active"
            )
        )
    ).first()
    return Principal(row.id, row.name, row.role) if row is not None else None


async def create_token(
    session: AsyncSession, role: str, name: str | None = None
) -> tuple[AdminToken, str]:
    """A new token (returned once in plain text) with ``role``; names are unique."""
    if role not in ROLES:
        raise errors.invalid_request("role: must be 'admin' or 'readonly'")
    plaintext = generate()
    if name is None:
        name = f"{role}-{plaintext[4:10]}"
    name = name.strip()
    if not name or len(name) > 200:
        raise errors.invalid_request("name: must be 1 to 200 characters")
    taken = await session.execute(sa.select(_tokens.c.id).where(_tokens.c.name == name))
    if taken.first() is not None:
        raise errors.invalid_request(f"name: an admin token named {name!r} exists already")
    row = AdminToken(name=name, role=role, token_hash=digest(plaintext), prefix=_prefix(plaintext))
    session.add(row)
    await session.flush()
    return row, plaintext


async def list_tokens(
    session: AsyncSession, *, after_id: str | None = None, limit: int = 100
) -> list[AdminToken]:
    query = sa.select(AdminToken).order_by(AdminToken.id)
    if after_id:
        query = query.where(AdminToken.id > after_id)  # type: ignore[arg-type]
    return list((await session.execute(query.limit(limit))).scalars())


async def find_token(session: AsyncSession, ref: str) -> AdminToken:
    """By id, or by name."""
    row = await session.get(AdminToken, ref)
    if row is None:
        found = await session.execute(sa.select(AdminToken).where(AdminToken.name == ref))  # type: ignore[arg-type]
        row = found.scalars().first()
    if row is None:
        raise errors.not_found(f"admin token {ref!r} not found")
    return row


async def revoke_token(session: AsyncSession, ref: str) -> AdminToken:
    row = await find_token(session, ref)
    if row.status != "revoked":
        row.status = "revoked"
        row.revoked_at = datetime.now(UTC)
        session.add(row)
        await session.flush()
    return row


async def ensure_bootstrap(session: AsyncSession, configured: str | None) -> str | None:
    """Make sure the ``bootstrap`` admin token exists; returns a new token to print, or None.

    A configured ``ADMIN_TOKEN`` is the bootstrap token (a new value replaces the old one and
    is active; the same value, once revoked, stays revoked). Without one, the token generated
    on first start (or the digest kept by an install from before migration 0011) is used.
    """
    row = await session.get(AdminToken, BOOTSTRAP_ID)
    if configured:
        wanted = digest(configured)
        if row is None:
            await _insert_bootstrap(session, wanted, _prefix(configured))
        elif row.token_hash != wanted:
            row.token_hash = wanted
            row.prefix = _prefix(configured)
            row.status = "active"
            row.revoked_at = None
            session.add(row)
            await session.flush()
        return None
    if row is not None:
        return None
    legacy = await session.get(AppMeta, LEGACY_META)
    if legacy is not None:
        await _insert_bootstrap(session, legacy.value, "pra-")
        return None
    token = generate()
    return token if await _insert_bootstrap(session, digest(token), _prefix(token)) else None


async def _insert_bootstrap(session: AsyncSession, token_hash: str, prefix: str) -> bool:
    """Insert the bootstrap row unless another process just did (False then)."""
    values = {
        "id": BOOTSTRAP_ID,
        "name": BOOTSTRAP_NAME,
        "role": "admin",
        "token_hash": token_hash,
        "prefix": prefix,
        "status": "active",
        "created_at": datetime.now(UTC),
    }
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    result = await session.execute(
        dialect.insert(_tokens).values(values).on_conflict_do_nothing().returning(_tokens.c.id)
    )
    return result.first() is not None
