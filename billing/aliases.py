"""Model aliases: names customers may send (``fast``, ``smart``, a retired id) for a model."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from billing.errors import InvalidField
from billing.models import ModelAlias, iso
from billing.text import clean_text


def _name(value: str, field: str) -> str:
    value = clean_text(value, field)
    if any(c.isspace() for c in value):
        raise InvalidField(field, "must be a name without spaces")
    return value


async def list_aliases(session: AsyncSession) -> list[ModelAlias]:
    result = await session.execute(sa.select(ModelAlias).order_by(ModelAlias.alias))
    return list(result.scalars())


async def put_alias(session: AsyncSession, alias: str, model: str) -> ModelAlias:
    alias, model = _name(alias, "alias"), _name(model, "model")
    if alias == model:
        raise InvalidField("model", "an alias cannot point to itself")
    row = await session.get(ModelAlias, alias)
    if row is None:
        row = ModelAlias(alias=alias, model=model)
    else:
        row.model = model
    session.add(row)
    await session.flush()
    return row


async def delete_alias(session: AsyncSession, alias: str) -> bool:
    row = await session.get(ModelAlias, alias)
    if row is None:
        return False
    await session.delete(row)
    await session.flush()
    return True


async def load_aliases(session: AsyncSession) -> dict[str, str]:
    return {row.alias: row.model for row in await list_aliases(session)}


def alias_view(row: ModelAlias) -> dict[str, object]:
    return {"alias": row.alias, "model": row.model, "created_at": iso(row.created_at)}
