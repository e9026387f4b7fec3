"""request log: an index for listing a customer's sessions

``(customer_id, session_id, started_at) WHERE session_id IS NOT NULL``: the sessions listings
(``/v1/me/sessions``, ``/admin/sessions``) and ``group_by=session`` read one customer's rows that
carry a session, already in session order, never the whole log. Partial, and on columns that a
settlement never updates.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 20:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_request_log_customer_session"
WHERE = sa.text("session_id IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        INDEX,
        "request_log",
        ["customer_id", "session_id", "started_at"],
        unique=False,
        sqlite_where=WHERE,
        postgresql_where=WHERE,
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="request_log")
