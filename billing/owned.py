"""Tables of what customers own at an upstream account: message batches and files.

A batch or a file lives on the upstream account that accepted it (wire spec §5: upstream
objects are scoped to the organization, or workspace, of the credential). The relay records,
for each, the customer and key that created it and the account (and that account's group, the
upstream workspace) holding it: every later call goes to that account, a customer sees only its
own, and a Messages request naming a file goes only to the file's group.

``batch_line_charges`` makes the settlement of a batch idempotent as a database fact: one row
per ``(batch_id, custom_id)``, written in the same transaction as the line's ledger debit, so
two workers racing over the same results charge each line once.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from billing.models import utcnow


def _ts() -> datetime:
    return Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))  # type: ignore[no-any-return]


def _opt_ts() -> datetime | None:
    return Field(default=None, sa_type=sa.DateTime(timezone=True))  # type: ignore[no-any-return]


class MessageBatch(SQLModel, table=True):
    """A customer's batch on an upstream account, and its hold until it is settled."""

    __tablename__ = "message_batches"
    __table_args__ = (
        sa.Index("ix_message_batches_customer_created", "customer_id", "created_at", "id"),
        sa.Index(
            "ix_message_batches_unsettled",
            "created_at",
            sqlite_where=sa.text("settled_at IS NULL"),
            postgresql_where=sa.text("settled_at IS NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=200)
    """The upstream's batch id (``msgbatch_…``)."""
    customer_id: str = Field(max_length=40)
    key_id: str = Field(max_length=40)
    account_id: str = Field(max_length=40)
    account_group: str | None = Field(default=None, max_length=200)
    request_id: str = Field(max_length=40, index=True)
    """The relay request that created the batch: the id of its hold and request-log row."""
    hold_micros: int = Field(default=0, sa_type=sa.BigInteger)
    """What was held at creation (the batch's worst case at the batch rate)."""
    request_count: int = 0
    processing_status: str = Field(default="in_progress", max_length=20)
    snapshot: str | None = Field(default=None, sa_type=sa.Text)
    """The last batch object the upstream returned (JSON, ``results_url`` as the upstream
    wrote it)."""
    created_at: datetime = _ts()
    ended_at: datetime | None = _opt_ts()
    settled_at: datetime | None = _opt_ts()
    """When its succeeded lines were charged and the rest of the hold released."""
    charged_micros: int = Field(default=0, sa_type=sa.BigInteger)
    deleted_at: datetime | None = _opt_ts()


class BatchLineCharge(SQLModel, table=True):
    """One charged ``succeeded`` line of a batch (the primary key is the idempotency fact)."""

    __tablename__ = "batch_line_charges"

    batch_id: str = Field(primary_key=True, max_length=200)
    custom_id: str = Field(primary_key=True, max_length=64)
    request_id: str = Field(max_length=40, index=True)
    """The line's usage record and ledger debit (``request_log.id``, ``ledger.request_id``)."""
    cost_micros: int = Field(default=0, sa_type=sa.BigInteger)
    created_at: datetime = _ts()


class UpstreamFile(SQLModel, table=True):
    """A customer's file on an upstream account (Files API)."""

    __tablename__ = "upstream_files"
    __table_args__ = (
        sa.Index("ix_upstream_files_customer_created", "customer_id", "created_at", "id"),
    )

    id: str = Field(primary_key=True, max_length=200)
    customer_id: str = Field(max_length=40)
    key_id: str = Field(max_length=40)
    account_id: str = Field(max_length=40)
    account_group: str | None = Field(default=None, max_length=200)
    filename: str | None = Field(default=None, max_length=1000)
    size_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    snapshot: str | None = Field(default=None, sa_type=sa.Text)
    """The file's metadata as the upstream returned it at upload (JSON)."""
    created_at: datetime = _ts()
    deleted_at: datetime | None = _opt_ts()
