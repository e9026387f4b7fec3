"""no invented concurrency caps: an account's max_concurrency is null unless the operator set
one (the old implicit 16 becomes null), and keys may set their own max_concurrency

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_DEFAULT = 16


def upgrade() -> None:
    with op.batch_alter_table("upstream_accounts", schema=None) as batch_op:
        batch_op.alter_column("max_concurrency", existing_type=sa.Integer(), nullable=True)
    # 16 was what every account got when the operator said nothing; the operator who meant it
    # adds the account again with --max-concurrency 16 (README, "Upgrading")
    op.execute(
        sa.text(
            "UPDATE upstream_accounts SET max_concurrency = NULL WHERE max_concurrency = :d"
        ).bindparams(d=OLD_DEFAULT)
    )
    with op.batch_alter_table("customer_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_concurrency", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("customer_keys", schema=None) as batch_op:
        batch_op.drop_column("max_concurrency")
    op.execute(
        sa.text(
            "UPDATE upstream_accounts SET max_concurrency = :d WHERE max_concurrency IS NULL"
        ).bindparams(d=OLD_DEFAULT)
    )
    with op.batch_alter_table("upstream_accounts", schema=None) as batch_op:
        batch_op.alter_column("max_concurrency", existing_type=sa.Integer(), nullable=False)
