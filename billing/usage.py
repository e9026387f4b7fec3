"""Usage totals and the per-request log, read from ``request_log``.

A settled row is a request's usage record. Totals count the requests that used the upstream
(``ok``, ``client_disconnect``, ``upstream_error``, ``crashed``); rejected and failed requests
appear in the request log but are never usage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from billing.errors import InvalidField
from billing.models import RequestRecord, iso
from billing.money import format_usd

USAGE_STATUSES = ("ok", "client_disconnect", "upstream_error", "crashed")
GROUPS = ("model", "key", "account", "day", "customer")

_log = RequestRecord.__table__  # type: ignore[attr-defined]


def parse_time(value: str | None, field_name: str, *, end: bool = False) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return moment + timedelta(days=1) if end else moment
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidField(field_name, "must be an ISO 8601 date or date-time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class UsageQuery:
    customer_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    account_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    group_by: list[str] = field(default_factory=list)

    @classmethod
    def from_params(
        cls, params: Mapping[str, str], *, allowed_groups: Sequence[str] = GROUPS
    ) -> UsageQuery:
        groups = [g.strip() for g in (params.get("group_by") or "").split(",") if g.strip()]
        for group in groups:
            if group not in allowed_groups:
                raise InvalidField("group_by", f"must be one of {', '.join(allowed_groups)}")
        return cls(
            customer_id=params.get("customer_id") or None,
            key_id=params.get("key_id") or None,
            model=params.get("model") or None,
            account_id=params.get("account_id") or None,
            start=parse_time(params.get("from"), "from"),
            end=parse_time(params.get("to"), "to", end=True),
            group_by=groups,
        )


def _filters(query: UsageQuery) -> list[sa.ColumnElement[bool]]:
    conds: list[sa.ColumnElement[bool]] = []
    if query.customer_id:
        conds.append(_log.c.customer_id == query.customer_id)
    if query.key_id:
        conds.append(_log.c.key_id == query.key_id)
    if query.model:
        conds.append(_log.c.model == query.model)
    if query.account_id:
        conds.append(_log.c.account_id == query.account_id)
    if query.start:
        conds.append(_log.c.started_at >= query.start)
    if query.end:
        conds.append(_log.c.started_at < query.end)
    return conds


def _group_column(group: str, dialect: str) -> sa.ColumnElement[Any]:
    if group == "day":
        if dialect == "sqlite":
            return sa.func.substr(_log.c.started_at, 1, 10).label("day")
        return sa.func.to_char(sa.func.timezone("UTC", _log.c.started_at), "YYYY-MM-DD").label(
            "day"
        )
    column = {
        "model": _log.c.model,
        "key": _log.c.key_id,
        "account": _log.c.account_id,
        "customer": _log.c.customer_id,
    }[group]
    return column.label(  # type: ignore[no-any-return]
        {"key": "key_id", "account": "account_id", "customer": "customer_id"}.get(group, group)
    )


def _totals_view(row: Any) -> dict[str, Any]:
    return {
        "requests": int(row.requests or 0),
        "input_tokens": int(row.input_tokens or 0),
        "output_tokens": int(row.output_tokens or 0),
        "cache_write_tokens": int(row.cache_write_tokens or 0),
        "cache_write_5m_tokens": int(row.cache_write_5m_tokens or 0),
        "cache_write_1h_tokens": int(row.cache_write_1h_tokens or 0),
        "cache_read_tokens": int(row.cache_read_tokens or 0),
        "cost_usd": format_usd(int(row.cost or 0)),
    }


async def totals(session: AsyncSession, query: UsageQuery) -> dict[str, Any]:
    dialect = session.bind.dialect.name
    measures = [
        sa.func.count().label("requests"),
        sa.func.sum(_log.c.input_tokens).label("input_tokens"),
        sa.func.sum(_log.c.output_tokens).label("output_tokens"),
        sa.func.sum(_log.c.cache_write_5m_tokens + _log.c.cache_write_1h_tokens).label(
            "cache_write_tokens"
        ),
        sa.func.sum(_log.c.cache_write_5m_tokens).label("cache_write_5m_tokens"),
        sa.func.sum(_log.c.cache_write_1h_tokens).label("cache_write_1h_tokens"),
        sa.func.sum(_log.c.cache_read_tokens).label("cache_read_tokens"),
        sa.func.sum(_log.c.cost_micros).label("cost"),
    ]
    conds = [_log.c.status.in_(USAGE_STATUSES), *_filters(query)]
    overall = (await session.execute(sa.select(*measures).where(*conds))).one()
    items: list[dict[str, Any]] = []
    if query.group_by:
        columns = [_group_column(g, dialect) for g in query.group_by]
        stmt = sa.select(*columns, *measures).where(*conds).group_by(*columns).order_by(*columns)
        for row in await session.execute(stmt):
            item = {col.name: getattr(row, col.name) for col in columns}
            item.update(_totals_view(row))
            items.append(item)
    else:
        items.append(_totals_view(overall))
    return {"group_by": query.group_by, "items": items, "totals": _totals_view(overall)}


def request_view(row: RequestRecord, *, with_bodies: bool) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": row.id,
        "customer_id": row.customer_id,
        "key_id": row.key_id,
        "account_id": row.account_id,
        "endpoint": row.endpoint,
        "requested_model": row.requested_model,
        "model": row.model,
        "stream": row.stream,
        "status": row.status,
        "http_status": row.http_status,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cache_write_5m_tokens": row.cache_write_5m_tokens,
        "cache_write_1h_tokens": row.cache_write_1h_tokens,
        "cache_read_tokens": row.cache_read_tokens,
        "hold_usd": format_usd(row.hold_micros),
        "cost_usd": format_usd(row.cost_micros),
        "upstream_request_id": row.upstream_request_id,
        "attempts": row.attempts,
        "error": row.error,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "ttfb_ms": row.ttfb_ms,
        "duration_ms": row.duration_ms,
    }
    if with_bodies:
        view["request_body"] = row.request_body
        view["response_body"] = row.response_body
    return view


async def list_requests(
    session: AsyncSession,
    query: UsageQuery,
    *,
    status: str | None,
    before_id: str | None,
    limit: int,
) -> list[RequestRecord]:
    stmt = sa.select(RequestRecord).where(*_filters(query))
    if status:
        stmt = stmt.where(RequestRecord.status == status)  # type: ignore[arg-type]
    if before_id:
        stmt = stmt.where(RequestRecord.id < before_id)  # type: ignore[arg-type]
    result = await session.execute(stmt.order_by(RequestRecord.id.desc()).limit(limit))  # type: ignore[attr-defined]
    return list(result.scalars())


async def get_request(session: AsyncSession, request_id: str) -> RequestRecord | None:
    return await session.get(RequestRecord, request_id)
