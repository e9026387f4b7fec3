"""Webhook registrations and the signature of what is sent to them.

A webhook is a URL (any host: the operator's choice), the event types it wants and a signing
secret (``whsec_`` + 32 URL-safe random bytes when the operator gives none), stored encrypted
under the credential keys and shown only in the create response. Every POST carries
``x-poolrelay-signature: sha256=<hex HMAC-SHA256 of the raw body with the secret>``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors
from app.oversight.models import Webhook, WebhookAttempt, WebhookDelivery
from billing.models import iso
from pool.crypto import CredentialCipher, Secret

EVENT_TYPES = (
    "account.quarantined",
    "account.restored",
    "customer.balance_low",
    "key.budget_exhausted",
    "reconciliation.discrepancy",
)
SIGNATURE_HEADER = "x-poolrelay-signature"
MAX_WEBHOOKS = 100


def signature(secret: str, body: bytes) -> str:
    """The ``x-poolrelay-signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def generate_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def _check_url(url: str) -> str:
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        raise errors.invalid_request("url: is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.invalid_request("url: must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise errors.invalid_request("url: must not carry credentials (user:password@)")
    if len(url) > 2000 or any(c.isspace() or ord(c) < 32 for c in url):
        raise errors.invalid_request("url: must be at most 2000 characters, without spaces")
    return url


def _check_events(events: list[str]) -> list[str]:
    if not events:
        raise errors.invalid_request(f"events: name at least one of {', '.join(EVENT_TYPES)}")
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown:
        raise errors.invalid_request(
            f"events: unknown event type {unknown[0]!r} (one of {', '.join(EVENT_TYPES)})"
        )
    return sorted(set(events), key=EVENT_TYPES.index)


def webhook_view(row: Webhook) -> dict[str, Any]:
    return {
        "id": row.id,
        "url": row.url,
        "events": row.events,
        "status": row.status,
        "created_at": iso(row.created_at),
    }


async def create_webhook(
    session: AsyncSession,
    cipher: CredentialCipher,
    url: str,
    events: list[str],
    secret: str | None = None,
) -> tuple[Webhook, str]:
    """A new webhook and its secret (given, or generated), to be shown this once."""
    if secret is not None and not 16 <= len(secret) <= 200:
        raise errors.invalid_request("secret: must be 16 to 200 characters")
    count = await session.scalar(
        sa.select(sa.func.count()).select_from(Webhook).where(Webhook.status == "active")  # type: ignore[arg-type]
    )
    if (count or 0) >= MAX_WEBHOOKS:
        raise errors.invalid_request(f"at most {MAX_WEBHOOKS} webhooks")
    secret = secret or generate_secret()
    row = Webhook(
        url=_check_url(url),
        events=_check_events(events),
        secret_encrypted=cipher.encrypt(Secret(secret)),
    )
    session.add(row)
    await session.flush()
    return row, secret


async def list_webhooks(
    session: AsyncSession, *, after_id: str | None = None, limit: int = 100
) -> list[Webhook]:
    query = sa.select(Webhook).where(Webhook.status == "active").order_by(Webhook.id)  # type: ignore[arg-type]
    if after_id:
        query = query.where(Webhook.id > after_id)  # type: ignore[arg-type]
    return list((await session.execute(query.limit(limit))).scalars())


async def get_webhook(session: AsyncSession, webhook_id: str) -> Webhook:
    """A webhook, deleted ones too (their deliveries stay readable)."""
    row = await session.get(Webhook, webhook_id)
    if row is None:
        raise errors.not_found(f"webhook {webhook_id!r} not found")
    return row


async def delete_webhook(session: AsyncSession, webhook_id: str) -> Webhook:
    """Soft delete: nothing more is sent to it (pending deliveries stop), its history stays."""
    row = await get_webhook(session, webhook_id)
    if row.status != "deleted":
        row.status = "deleted"
        row.deleted_at = datetime.now(UTC)
        session.add(row)
        await session.execute(
            sa.update(WebhookDelivery)
            .where(
                WebhookDelivery.webhook_id == webhook_id,  # type: ignore[arg-type]
                WebhookDelivery.status == "pending",  # type: ignore[arg-type]
            )
            .values(status="canceled", finished_at=datetime.now(UTC))
        )
        await session.flush()
    return row


def attempt_view(row: WebhookAttempt) -> dict[str, Any]:
    return {
        "id": row.id,
        "delivery_id": row.delivery_id,
        "event_id": row.event_id,
        "event_type": row.event_type,
        "attempt": row.attempt,
        "status_code": row.status_code,
        "error": row.error,
        "ok": row.status_code is not None and 200 <= row.status_code < 300,
        "duration_ms": row.duration_ms,
        "created_at": iso(row.created_at),
    }


async def attempts(
    session: AsyncSession,
    *,
    webhook_id: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
    failed_only: bool = False,
) -> list[WebhookAttempt]:
    """Tries, newest first (of one webhook, or of all)."""
    col = WebhookAttempt.__table__.c  # type: ignore[attr-defined]
    query = sa.select(WebhookAttempt).order_by(col.id.desc()).limit(limit)
    if webhook_id is not None:
        query = query.where(col.webhook_id == webhook_id)
    if before_id is not None:
        query = query.where(col.id < before_id)
    if failed_only:
        query = query.where(
            sa.or_(col.status_code.is_(None), col.status_code < 200, col.status_code >= 300)
        )
    return list((await session.execute(query)).scalars())


async def rotate_secrets(session: AsyncSession, cipher: CredentialCipher) -> int:
    """Re-encrypt every webhook secret under the newest key (``encryption rotate``)."""
    rows = list((await session.execute(sa.select(Webhook))).scalars())
    for row in rows:
        row.secret_encrypted = cipher.rotate(row.secret_encrypted)
        session.add(row)
    await session.flush()
    return len(rows)
