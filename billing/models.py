"""Billing tables: customers, customer keys, prices, the ledger, holds and the request log.

Money columns are integer micro-USD (``*_micros``). ``customers.balance_micros`` is a cached sum of
the customer's ledger entries, updated in the same transaction as every entry is appended;
``customers.held_micros`` is the sum of the customer's open ``holds`` rows. Idempotency is a
database fact: a top-up's ``(customer_id, idempotency_key)`` and a usage debit's ``request_id``
are unique.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import JSON, Column, Field, SQLModel

from billing.ids import new_id

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """RFC 3339 in UTC (``2026-11-22T10:00:00.123456Z``); SQLite hands back naive UTC values."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _ts(**kw: Any) -> Any:
    return Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), **kw)


def _micros(default: int = 0) -> Any:
    return Field(default=default, sa_type=sa.BigInteger)


class Customer(SQLModel, table=True):
    __tablename__ = "customers"

    id: str = Field(default_factory=lambda: new_id("cus"), primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    status: str = Field(default="active", max_length=20)
    price_multiplier: str = Field(default="1", max_length=40)
    balance_micros: int = _micros()
    held_micros: int = _micros()
    created_at: datetime = _ts()
    low_balance_micros: int | None = Field(default=None, sa_type=sa.BigInteger)
    """``customer.balance_low`` is raised when the balance falls below this (None: never)."""


class CustomerKey(SQLModel, table=True):
    __tablename__ = "customer_keys"

    id: str = Field(default_factory=lambda: new_id("key"), primary_key=True, max_length=40)
    customer_id: str = Field(foreign_key="customers.id", index=True, max_length=40)
    name: str = Field(default="default", max_length=200)
    prefix: str = Field(max_length=20)
    key_hash: str = Field(unique=True, max_length=64)
    status: str = Field(default="active", max_length=20)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    """Requests of this key in flight at once, across every relay process (None: no cap)."""
    daily_budget_micros: int | None = Field(default=None, sa_type=sa.BigInteger)
    monthly_budget_micros: int | None = Field(default=None, sa_type=sa.BigInteger)
    budget_action: str = Field(default="block", max_length=20)
    downgrade_model: str | None = Field(default=None, max_length=200)
    allowed_models: list[str] | None = Field(default=None, sa_column=Column(JSON))
    route_small_to: str | None = Field(default=None, max_length=200)
    """Routing rule: requests with few input tokens and no tools go to this (cheaper) model."""
    route_small_max_input_tokens: int | None = None
    expires_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    created_at: datetime = _ts()
    last_used_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    revoked_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class PriceRow(SQLModel, table=True):
    """USD prices per million tokens, stored as integer micro-USD per million tokens."""

    __tablename__ = "prices"

    model: str = Field(primary_key=True, max_length=200)
    input_micros: int = _micros()
    output_micros: int = _micros()
    cache_write_5m_micros: int = _micros()
    cache_write_1h_micros: int = _micros()
    cache_read_micros: int = _micros()
    batch_discount_pct: int = 50
    long_context_threshold: int | None = None
    long_context_input_pct: int = 200
    long_context_output_pct: int = 150
    inference_geo_us_pct: int = 100
    fast_mode_pct: int = 100
    updated_at: datetime = _ts()


class LedgerEntry(SQLModel, table=True):
    """Append-only. ``amount_micros`` is signed: credits positive, debits negative."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        sa.Index(
            "uq_ledger_usage_request",
            "request_id",
            unique=True,
            sqlite_where=sa.text("kind = 'usage'"),
            postgresql_where=sa.text("kind = 'usage'"),
        ),
        sa.Index(
            "uq_ledger_idempotency",
            "customer_id",
            "idempotency_key",
            unique=True,
            sqlite_where=sa.text("idempotency_key IS NOT NULL"),
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        ),
        sa.Index("ix_ledger_customer_id_id", "customer_id", "id"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigInt, primary_key=True, autoincrement=True)
    )
    customer_id: str = Field(foreign_key="customers.id", max_length=40)
    kind: str = Field(max_length=20)
    amount_micros: int = Field(sa_type=sa.BigInteger)
    balance_after_micros: int = Field(sa_type=sa.BigInteger)
    request_id: str | None = Field(default=None, max_length=40)
    idempotency_key: str | None = Field(default=None, max_length=200)
    request_fingerprint: str | None = Field(default=None, max_length=64)
    memo: str | None = Field(default=None, max_length=500)
    created_at: datetime = _ts()


class Hold(SQLModel, table=True):
    """An open reservation against a balance. The row exists only while the request is in flight."""

    __tablename__ = "holds"

    request_id: str = Field(primary_key=True, max_length=40)
    customer_id: str = Field(foreign_key="customers.id", max_length=40)
    key_id: str = Field(max_length=40)
    amount_micros: int = Field(sa_type=sa.BigInteger)
    instance_id: str = Field(max_length=64)
    budget_micros: int = Field(default=0, sa_type=sa.BigInteger)
    """What this hold reserved against the key's budgets (0 when the key has none)."""
    budget_day: str | None = Field(default=None, max_length=10)
    budget_month: str | None = Field(default=None, max_length=7)
    created_at: datetime = _ts()


class KeySpend(SQLModel, table=True):
    """A key's spend per period (``2026-11-22`` or ``2026-11``): settled plus currently held.

    Budget holds are the same conditional update as balance holds —
    ``held += h WHERE spent + held + h <= budget`` — so concurrency cannot overshoot a budget.
    """

    __tablename__ = "key_spend"

    key_id: str = Field(primary_key=True, max_length=40)
    period: str = Field(primary_key=True, max_length=10)
    spent_micros: int = _micros()
    held_micros: int = _micros()


class ModelAlias(SQLModel, table=True):
    """``fast`` → ``claude-haiku-4-5``: a name customers may send for a model."""

    __tablename__ = "model_aliases"

    alias: str = Field(primary_key=True, max_length=200)
    model: str = Field(max_length=200)
    created_at: datetime = _ts()


class UsageDaily(SQLModel, table=True):
    """Usage of request-log rows past their retention, per day, customer, key, account and model."""

    __tablename__ = "usage_daily"

    day: str = Field(primary_key=True, max_length=10)
    customer_id: str = Field(primary_key=True, max_length=40)
    key_id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(primary_key=True, max_length=40)
    model: str = Field(primary_key=True, max_length=200)
    requests: int = Field(default=0, sa_type=sa.BigInteger)
    input_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    output_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    cache_write_5m_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    cache_write_1h_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    cache_read_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    cost_micros: int = _micros()


class RequestRecord(SQLModel, table=True):
    """The per-request log; a settled row is the request's usage record."""

    __tablename__ = "request_log"
    __table_args__ = (
        sa.Index("ix_request_log_customer_started", "customer_id", "started_at"),
        # Sessions (billing.sessions): a customer's rows that carry a session, in session order.
        # Partial, and on columns a settlement never updates (its update stays HOT on PostgreSQL).
        sa.Index(
            "ix_request_log_customer_session",
            "customer_id",
            "session_id",
            "started_at",
            sqlite_where=sa.text("session_id IS NOT NULL"),
            postgresql_where=sa.text("session_id IS NOT NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    customer_id: str = Field(max_length=40)
    key_id: str = Field(index=True, max_length=40)
    account_id: str | None = Field(default=None, max_length=40)
    endpoint: str = Field(default="messages", max_length=40)
    requested_model: str | None = Field(default=None, max_length=200)
    model: str | None = Field(default=None, max_length=200)
    stream: bool = False
    status: str = Field(default="in_flight", max_length=30)
    http_status: int | None = None
    hold_micros: int = _micros()
    cost_micros: int = _micros()
    input_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    output_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    cache_write_5m_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    cache_write_1h_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    cache_read_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    upstream_request_id: str | None = Field(default=None, max_length=200)
    attempts: int = 0
    accounts_tried: str | None = Field(default=None, max_length=1000)
    session_id: str | None = Field(default=None, max_length=200)
    """The client's session (Claude Code's ``x-claude-code-session-id``, or the session part
    of ``metadata.user_id``)."""
    """Every account an attempt went to, in order, comma-separated (the last one answered)."""
    error: str | None = Field(default=None, max_length=1000)
    instance_id: str | None = Field(default=None, max_length=64)
    started_at: datetime = _ts()
    finished_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    ttfb_ms: int | None = None
    duration_ms: int | None = None
    queue_ms: int | None = None
    """Time the request waited for a concurrency slot (its key's and the pool's)."""
    request_body: str | None = Field(default=None, sa_type=sa.Text)
    response_body: str | None = Field(default=None, sa_type=sa.Text)
