"""seed list prices (spec §6, late 2026)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

The rows are literal so that this migration means the same thing forever; later price changes
are made with PUT /admin/prices/{model} (or a later migration).
Rates are integer micro-USD per million tokens: 3_000_000 = $3 per MTok.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    "model",
    "input_micros",
    "output_micros",
    "cache_write_5m_micros",
    "cache_write_1h_micros",
    "cache_read_micros",
    "batch_discount_pct",
    "long_context_threshold",
    "long_context_input_pct",
    "long_context_output_pct",
    "inference_geo_us_pct",
    "fast_mode_pct",
)
ROWS = [
    (
        "claude-fable-5",
        10000000,
        50000000,
        12500000,
        20000000,
        1000000,
        50,
        None,
        200,
        150,
        100,
        100,
    ),
    (
        "claude-mythos-5",
        10000000,
        50000000,
        12500000,
        20000000,
        1000000,
        50,
        None,
        200,
        150,
        100,
        100,
    ),
    ("claude-opus-5", 5000000, 25000000, 6250000, 10000000, 500000, 50, None, 200, 150, 110, 100),
    ("claude-opus-4-8", 5000000, 25000000, 6250000, 10000000, 500000, 50, None, 200, 150, 110, 200),
    ("claude-opus-4-7", 5000000, 25000000, 6250000, 10000000, 500000, 50, None, 200, 150, 110, 100),
    ("claude-opus-4-6", 5000000, 25000000, 6250000, 10000000, 500000, 50, None, 200, 150, 110, 600),
    ("claude-opus-4-5", 5000000, 25000000, 6250000, 10000000, 500000, 50, None, 200, 150, 100, 100),
    (
        "claude-opus-4-1",
        15000000,
        75000000,
        18750000,
        30000000,
        1500000,
        50,
        None,
        200,
        150,
        100,
        100,
    ),
    (
        "claude-opus-4-0",
        15000000,
        75000000,
        18750000,
        30000000,
        1500000,
        50,
        None,
        200,
        150,
        100,
        100,
    ),
    (
        "claude-opus-4",
        15000000,
        75000000,
        18750000,
        30000000,
        1500000,
        50,
        None,
        200,
        150,
        100,
        100,
    ),
    ("claude-sonnet-5", 3000000, 15000000, 3750000, 6000000, 300000, 50, None, 200, 150, 100, 100),
    (
        "claude-sonnet-4-6",
        3000000,
        15000000,
        3750000,
        6000000,
        300000,
        50,
        None,
        200,
        150,
        100,
        100,
    ),
    (
        "claude-sonnet-4-5",
        3000000,
        15000000,
        3750000,
        6000000,
        300000,
        50,
        200000,
        200,
        150,
        100,
        100,
    ),
    (
        "claude-sonnet-4-0",
        3000000,
        15000000,
        3750000,
        6000000,
        300000,
        50,
        200000,
        200,
        150,
        100,
        100,
    ),
    (
        "claude-sonnet-4",
        3000000,
        15000000,
        3750000,
        6000000,
        300000,
        50,
        200000,
        200,
        150,
        100,
        100,
    ),
    (
        "claude-3-7-sonnet",
        3000000,
        15000000,
        3750000,
        6000000,
        300000,
        50,
        None,
        200,
        150,
        100,
        100,
    ),
    ("claude-haiku-4-5", 1000000, 5000000, 1250000, 2000000, 100000, 50, None, 200, 150, 100, 100),
    ("claude-3-5-haiku", 800000, 4000000, 1000000, 1600000, 80000, 50, None, 200, 150, 100, 100),
    ("claude-3-haiku", 250000, 1250000, 300000, 500000, 30000, 50, None, 200, 150, 100, 100),
]


def upgrade() -> None:
    prices = sa.table(
        "prices",
        *(sa.column(name) for name in COLUMNS),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    now = datetime.now(UTC)
    op.bulk_insert(
        prices, [{**dict(zip(COLUMNS, row, strict=True)), "updated_at": now} for row in ROWS]
    )


def downgrade() -> None:
    prices = sa.table("prices", sa.column("model"))
    op.execute(prices.delete().where(prices.c.model.in_([row[0] for row in ROWS])))
