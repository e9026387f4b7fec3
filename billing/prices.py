"""The price table in the database, and the in-process price book built from it."""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from billing.errors import InvalidField
from billing.models import PriceRow, iso, utcnow
from billing.money import format_price_per_mtok, parse_price_per_mtok
from billing.pricing import Price
from billing.text import clean_text

PRICE_FIELDS = {
    "input_usd_per_mtok": "input_micros",
    "output_usd_per_mtok": "output_micros",
    "cache_write_5m_usd_per_mtok": "cache_write_5m_micros",
    "cache_write_1h_usd_per_mtok": "cache_write_1h_micros",
    "cache_read_usd_per_mtok": "cache_read_micros",
}


def to_price(row: PriceRow) -> Price:
    return Price(
        model=row.model,
        input=row.input_micros,
        output=row.output_micros,
        cache_write_5m=row.cache_write_5m_micros,
        cache_write_1h=row.cache_write_1h_micros,
        cache_read=row.cache_read_micros,
        batch_discount_pct=row.batch_discount_pct,
        long_context_threshold=row.long_context_threshold,
        long_context_input_pct=row.long_context_input_pct,
        long_context_output_pct=row.long_context_output_pct,
        inference_geo_us_pct=row.inference_geo_us_pct,
        fast_mode_pct=row.fast_mode_pct,
    )


def price_view(row: PriceRow) -> dict[str, object]:
    view: dict[str, object] = {"model": row.model}
    for api_name, column in PRICE_FIELDS.items():
        view[api_name] = format_price_per_mtok(getattr(row, column))
    view["updated_at"] = iso(row.updated_at)
    return view


async def list_prices(session: AsyncSession) -> list[PriceRow]:
    result = await session.execute(sa.select(PriceRow).order_by(PriceRow.model))
    return list(result.scalars())


def _valid_model(model: str) -> str:
    model = clean_text(model, "model")
    if any(c.isspace() for c in model):
        raise InvalidField("model", "must be a model id without spaces")
    return model


async def upsert_price(session: AsyncSession, model: str, body: Mapping[str, object]) -> PriceRow:
    """Create or replace a row. Input and output are required; cache rates default to the
    standard multipliers of the input rate (5m ×1.25, 1h ×2, read ×0.1)."""
    model = _valid_model(model)
    values: dict[str, int] = {}
    for api_name, column in PRICE_FIELDS.items():
        raw = body.get(api_name)
        if raw is None:
            continue
        values[column] = parse_price_per_mtok(raw)  # type: ignore[arg-type]
    for required in ("input_micros", "output_micros"):
        if required not in values:
            api = next(k for k, v in PRICE_FIELDS.items() if v == required)
            raise InvalidField(api, "is required")
    base = values["input_micros"]
    values.setdefault("cache_write_5m_micros", base * 125 // 100)
    values.setdefault("cache_write_1h_micros", base * 2)
    values.setdefault("cache_read_micros", base // 10)
    row = await session.get(PriceRow, model)
    if row is None:
        row = PriceRow(model=model, **values)  # type: ignore[arg-type]
    else:
        for column, value in values.items():
            setattr(row, column, value)
        row.updated_at = utcnow()
    session.add(row)
    await session.flush()
    return row


async def load_prices(session: AsyncSession) -> dict[str, Price]:
    return {row.model: to_price(row) for row in await list_prices(session)}
