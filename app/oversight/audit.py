"""The audit log: one append-only row per admin API or CLI write, in the write's transaction.

The admin API's auth dependency (``app.admin.deps.require_admin``) names the actor of the
request's session (the admin token's name); a CLI command names it ``cli``. A write then calls
:func:`record` with the same session, so the row commits, or rolls back, with the write it
records. ``before`` and ``after`` are the JSON views the API shows, scrubbed of anything secret
(:func:`scrub`): the log never holds a credential, a customer key, a token or a webhook secret.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors
from app.oversight.models import AuditEntry
from billing.models import iso
from pool.models import UpstreamAccount

CLI = "cli"
_ACTOR = "poolrelay.audit.actor"
SECRET_FIELDS = frozenset(
    {
        "key",
        "secret",
        "token",
        "credential",
        "api_key",
        "password",
        "key_hash",
        "token_hash",
        "secret_encrypted",
        "credential_encrypted",
    }
)
"""Fields dropped from ``before`` and ``after`` wherever they appear."""
_SECRET_TEXT = re.compile(r"(sk-pr-|sk-ant-|pra-|whsec_)[A-Za-z0-9_\-]{16,}")
"""Anything that looks like a whole key, token or secret, wherever it hides in a value."""
REDACTED = "[redacted]"


def act_as(session: AsyncSession, actor: str) -> None:
    """Name who makes the writes of this session's transaction."""
    session.info[_ACTOR] = actor


def actor_of(session: AsyncSession) -> str:
    actor = session.info.get(_ACTOR)
    if not isinstance(actor, str):
        raise RuntimeError("an audited write in a session without an actor (audit.act_as)")
    return actor


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): scrub(v) for k, v in value.items() if str(k).lower() not in SECRET_FIELDS}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return _SECRET_TEXT.sub(REDACTED, value)
    return value


async def record(
    session: AsyncSession,
    action: str,
    target: str | None,
    *,
    before: Any = None,
    after: Any = None,
) -> AuditEntry:
    """Append one row (flushed, committed by the caller with the write it records)."""
    entry = AuditEntry(
        actor=actor_of(session),
        action=action,
        target=target,
        before=scrub(before),
        after=scrub(after),
    )
    session.add(entry)
    await session.flush()
    return entry


def entry_view(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "before": entry.before,
        "after": entry.after,
        "created_at": iso(entry.created_at),
    }


async def entries(
    session: AsyncSession,
    *,
    before_id: int | None = None,
    limit: int = 50,
    actor: str | None = None,
    action: str | None = None,
) -> list[AuditEntry]:
    """Newest first. ``action`` is exact, or a prefix when it ends in ``.*`` (``key.*``)."""
    col = AuditEntry.__table__.c  # type: ignore[attr-defined]
    query = sa.select(AuditEntry).order_by(col.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(col.id < before_id)
    if actor is not None:
        query = query.where(col.actor == actor)
    if action is not None:
        if action.endswith(".*"):
            query = query.where(col.action.startswith(action[:-1], autoescape=True))
        else:
            query = query.where(col.action == action)
    return list((await session.execute(query)).scalars())


def parse_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        value = int(cursor)
    except ValueError:
        raise errors.invalid_request("cursor: is not a cursor this API returned") from None
    if not 0 < value < 2**63:
        raise errors.invalid_request("cursor: is not a cursor this API returned")
    return value


def account_view(row: UpstreamAccount) -> dict[str, Any]:
    """What the audit log keeps of an account: its configuration, never its credential (the
    fingerprint, ``sk-ant-…wxyz``, tells a replaced credential from the old one)."""
    return {
        "id": row.id,
        "name": row.name,
        "group": row.group,
        "base_url": row.base_url,
        "models": row.models,
        "max_concurrency": row.max_concurrency,
        "weight": row.weight,
        "status": row.status,
        "fingerprint": row.fingerprint,
        "removed": row.removed_at is not None,
    }
