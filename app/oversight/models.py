"""Tables of admin tokens, the audit log, webhooks and their outbox (migration 0011)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import JSON, Column, Field, SQLModel

from billing.ids import new_id
from billing.models import BigInt, utcnow


def _ts(**kw: Any) -> Any:
    return Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), **kw)


class AdminToken(SQLModel, table=True):
    """A bearer token for ``/admin/*``, stored as its SHA-256. ``role``: admin | readonly."""

    __tablename__ = "admin_tokens"

    id: str = Field(default_factory=lambda: new_id("adt"), primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    role: str = Field(default="admin", max_length=20)
    token_hash: str = Field(unique=True, max_length=64)
    prefix: str = Field(max_length=20)
    status: str = Field(default="active", max_length=20)
    created_at: datetime = _ts()
    revoked_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class AuditEntry(SQLModel, table=True):
    """Append-only: one row per admin API or CLI write, in the write's own transaction."""

    __tablename__ = "audit_log"
    __table_args__ = (
        sa.Index("ix_audit_log_actor_id", "actor", "id"),
        sa.Index("ix_audit_log_action_id", "action", "id"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigInt, primary_key=True, autoincrement=True)
    )
    actor: str = Field(max_length=200)
    action: str = Field(max_length=100)
    target: str | None = Field(default=None, max_length=300)
    before: Any = Field(default=None, sa_column=Column(JSON, nullable=True))
    after: Any = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = _ts()


class Webhook(SQLModel, table=True):
    """An operator's URL for events; the signing secret is stored encrypted (Fernet)."""

    __tablename__ = "webhooks"

    id: str = Field(default_factory=lambda: new_id("whk"), primary_key=True, max_length=40)
    url: str = Field(max_length=2000)
    events: list[str] = Field(sa_column=Column(JSON, nullable=False))
    secret_encrypted: str = Field(sa_type=sa.Text)
    status: str = Field(default="active", max_length=20)
    created_at: datetime = _ts()
    deleted_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class WebhookEvent(SQLModel, table=True):
    """The outbox: one row per event, unique per transition (``dedupe_key``)."""

    __tablename__ = "webhook_events"

    id: str = Field(default_factory=lambda: new_id("evt"), primary_key=True, max_length=40)
    type: str = Field(max_length=60)
    dedupe_key: str = Field(unique=True, max_length=300)
    data: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = _ts()


class WebhookDelivery(SQLModel, table=True):
    """One event to one webhook: pending until a 2xx (delivered) or a day of tries (failed)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.UniqueConstraint("event_id", "webhook_id", name="uq_webhook_delivery"),
        sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    id: str = Field(default_factory=lambda: new_id("whd"), primary_key=True, max_length=40)
    event_id: str = Field(max_length=40)
    webhook_id: str = Field(max_length=40)
    status: str = Field(default="pending", max_length=20)
    attempts: int = 0
    next_attempt_at: datetime = _ts()
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=500)
    created_at: datetime = _ts()
    finished_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class WebhookAttempt(SQLModel, table=True):
    """Every try of a delivery, as ``GET /admin/webhooks/{id}/deliveries`` lists it."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (sa.Index("ix_webhook_attempts_webhook_id", "webhook_id", "id"),)

    id: int | None = Field(
        default=None, sa_column=Column(BigInt, primary_key=True, autoincrement=True)
    )
    delivery_id: str = Field(max_length=40)
    webhook_id: str = Field(max_length=40)
    event_id: str = Field(max_length=40)
    event_type: str = Field(max_length=60)
    attempt: int
    status_code: int | None = None
    error: str | None = Field(default=None, max_length=500)
    duration_ms: int | None = None
    created_at: datetime = _ts()


class NotifyState(SQLModel, table=True):
    """ "Already notified" flags: a condition (an account quarantined, a balance low) raises its
    event when its flag turns on, and only then; the flag turns off when the condition clears.
    ``version`` counts the transitions and makes each event's dedupe key."""

    __tablename__ = "notify_state"

    subject: str = Field(primary_key=True, max_length=300)
    active: bool = False
    version: int = 0
    updated_at: datetime = _ts()
