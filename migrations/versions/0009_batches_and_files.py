"""batches and files: which customer, key and account own each upstream batch and file, and
the idempotency of batch line charges

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "message_batches",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("customer_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("account_group", sa.String(length=200), nullable=True),
        sa.Column("request_id", sa.String(length=40), nullable=False),
        sa.Column("hold_micros", sa.BigInteger(), nullable=False),
        sa.Column("request_count", sa.Integer(), nullable=False),
        sa.Column("processing_status", sa.String(length=20), nullable=False),
        sa.Column("snapshot", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("ended_at", True),
        _ts("settled_at", True),
        sa.Column("charged_micros", sa.BigInteger(), nullable=False),
        _ts("deleted_at", True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_message_batches_customer_created",
        "message_batches",
        ["customer_id", "created_at", "id"],
    )
    op.create_index("ix_message_batches_request_id", "message_batches", ["request_id"])
    op.create_index(
        "ix_message_batches_unsettled",
        "message_batches",
        ["created_at"],
        sqlite_where=sa.text("settled_at IS NULL"),
        postgresql_where=sa.text("settled_at IS NULL"),
    )
    op.create_table(
        "batch_line_charges",
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("custom_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=40), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("batch_id", "custom_id"),
    )
    op.create_index("ix_batch_line_charges_request_id", "batch_line_charges", ["request_id"])
    op.create_table(
        "upstream_files",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("customer_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("account_group", sa.String(length=200), nullable=True),
        sa.Column("filename", sa.String(length=1000), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("snapshot", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("deleted_at", True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_upstream_files_customer_created",
        "upstream_files",
        ["customer_id", "created_at", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_upstream_files_customer_created", table_name="upstream_files")
    op.drop_table("upstream_files")
    op.drop_index("ix_batch_line_charges_request_id", table_name="batch_line_charges")
    op.drop_table("batch_line_charges")
    op.drop_index("ix_message_batches_unsettled", table_name="message_batches")
    op.drop_index("ix_message_batches_request_id", table_name="message_batches")
    op.drop_index("ix_message_batches_customer_created", table_name="message_batches")
    op.drop_table("message_batches")
