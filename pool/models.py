"""Pool tables: upstream accounts (credential encrypted at rest, fingerprint kept for display).

Live pool state (headroom, leases, quarantine) lives in Redis so that every relay process sees
it at once; ``quarantine_reason``/``quarantined_until``/``last_error`` here are a durable copy for
the operator, written when the state changes.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlmodel import JSON, Column, Field, SQLModel


def _utcnow() -> datetime:
    return datetime.now(UTC)


def new_account_id() -> str:
    return "acc_" + secrets.token_hex(12)


class UpstreamAccount(SQLModel, table=True):
    __tablename__ = "upstream_accounts"
    __table_args__ = (
        sa.Index(
            "uq_upstream_accounts_name_live",
            "name",
            unique=True,
            sqlite_where=sa.text("removed_at IS NULL"),
            postgresql_where=sa.text("removed_at IS NULL"),
        ),
    )

    id: str = Field(default_factory=new_account_id, primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    base_url: str = Field(default="https://api.anthropic.com", max_length=500)
    group: str | None = Field(default=None, max_length=200)
    models: list[str] | None = Field(default=None, sa_column=Column(JSON))
    max_concurrency: int | None = None
    """In-flight requests at once; None (the default): no cap."""
    weight: float = 1.0
    status: str = Field(default="active", max_length=20)
    credential_ciphertext: str = Field(sa_type=sa.Text)
    fingerprint: str = Field(max_length=40)
    quarantine_reason: str | None = Field(default=None, max_length=40)
    quarantined_until: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    last_error: str | None = Field(default=None, max_length=1000)
    created_at: datetime = Field(default_factory=_utcnow, sa_type=sa.DateTime(timezone=True))
    updated_at: datetime = Field(default_factory=_utcnow, sa_type=sa.DateTime(timezone=True))
    removed_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))

    def __repr__(self) -> str:  # never show the ciphertext
        return f"UpstreamAccount(id={self.id!r}, name={self.name!r}, status={self.status!r})"

    def __str__(self) -> str:
        return self.__repr__()
