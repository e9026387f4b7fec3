"""Usage totals and the per-request log, read from ``request_log``.

A settled row is a request's usage record. Totals count the requests that used the upstream
(``ok``, ``client_disconnect``, ``upstream_error``, ``crashed``); rejected and failed requests
appear in the request log but are never usage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from billing.errors import InvalidField
from billing.models import RequestRecord, UsageDaily, iso
from billing.money import format_usd
from billing.owned import BatchLineCharge

USAGE_STATUSES = ("ok", "client_disconnect", "upstream_error", "crashed")
GROUPS = ("model", "key", "account", "day", "customer", "session", "batch")

_log = RequestRecord.__table__  # type: ignore[attr-defined]
_daily = UsageDaily.__table__  # type: ignore[attr-defined]
_lines = BatchLineCharge.__table__  # type: ignore[attr-defined]


def parse_time(value: str | None, field_name: str, *, end: bool = False) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return moment + timedelta(days=1) if end else moment
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise InvalidField(field_name, "must be an ISO 8601 date or date-time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class UsageQuery:
    customer_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    account_id: str | None = None
    session_id: str | None = None
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
            session_id=params.get("session_id") or None,
            start=parse_time(params.get("from"), "from"),
            end=parse_time(params.get("to"), "to", end=True),
            group_by=groups,
        )


MEASURES = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_read_tokens",
    "cost_micros",
)
GROUP_FIELDS = {
    "model": "model",
    "key": "key_id",
    "account": "account_id",
    "day": "day",
    "customer": "customer_id",
    "session": "session_id",
    "batch": "batch_id",
}
"""``batch``: the batch a line's usage record belongs to (null for other requests), through
``batch_line_charges``; daily roll-ups keep no batch."""


def _filters(query: UsageQuery) -> list[sa.ColumnElement[bool]]:
    conds: list[sa.ColumnElement[bool]] = []
    for column, value in (
        (_log.c.customer_id, query.customer_id),
        (_log.c.key_id, query.key_id),
        (_log.c.model, query.model),
        (_log.c.account_id, query.account_id),
        (_log.c.session_id, query.session_id),
    ):
        if value:
            conds.append(column == value)
    if query.start:
        conds.append(_log.c.started_at >= query.start)
    if query.end:
        conds.append(_log.c.started_at < query.end)
    return conds


def _day_of_log(dialect: str) -> sa.ColumnElement[Any]:
    if dialect == "sqlite":
        return sa.func.substr(_log.c.started_at, 1, 10)
    return sa.func.to_char(sa.func.timezone("UTC", _log.c.started_at), "YYYY-MM-DD")


def _log_source(query: UsageQuery, dialect: str) -> tuple[dict[str, Any], list[Any], list[Any]]:
    """Columns, measures and filters over the request log (recent, exact per request)."""
    columns: dict[str, Any] = {
        "model": _log.c.model,
        "key_id": _log.c.key_id,
        "account_id": _log.c.account_id,
        "customer_id": _log.c.customer_id,
        "session_id": _log.c.session_id,
        "day": _day_of_log(dialect),
    }
    if "batch" in query.group_by:
        columns["batch_id"] = _lines.c.batch_id
    measures = [
        sa.func.count().label("requests"),
        *(sa.func.sum(getattr(_log.c, m)).label(m) for m in MEASURES[1:]),
    ]
    conds: list[Any] = [_log.c.status.in_(USAGE_STATUSES)]
    if query.start:
        conds.append(_log.c.started_at >= query.start)
    if query.end:
        conds.append(_log.c.started_at < query.end)
    return columns, measures, conds


def _daily_source(query: UsageQuery) -> tuple[dict[str, Any], list[Any], list[Any]]:
    """The same over the daily roll-ups of requests older than the log's retention."""
    columns: dict[str, Any] = {
        "model": _daily.c.model,
        "key_id": _daily.c.key_id,
        "account_id": _daily.c.account_id,
        "customer_id": _daily.c.customer_id,
        "session_id": None,  # the roll-ups keep no session
        "day": _daily.c.day,
    }
    measures = [sa.func.sum(getattr(_daily.c, m)).label(m) for m in MEASURES]
    conds: list[Any] = []
    if query.start:
        conds.append(_daily.c.day >= query.start.date().isoformat())
    if query.end:
        conds.append(_daily.c.day < query.end.date().isoformat())
    return columns, measures, conds


RATIO_PLACES = Decimal("0.0001")


def cache_hit_ratio(
    input_tokens: int, cache_write_tokens: int, cache_read_tokens: int
) -> str | None:
    """Cache reads ÷ all input tokens (uncached input + cache writes + cache reads), as a
    decimal string with 4 places (``"0.8125"``), rounded half to even; None without input."""
    total = input_tokens + cache_write_tokens + cache_read_tokens
    if total <= 0:
        return None
    ratio = (Decimal(cache_read_tokens) / Decimal(total)).quantize(RATIO_PLACES, ROUND_HALF_EVEN)
    return str(ratio)


def _view(values: dict[str, int]) -> dict[str, Any]:
    cache_write = values["cache_write_5m_tokens"] + values["cache_write_1h_tokens"]
    return {
        "requests": values["requests"],
        "input_tokens": values["input_tokens"],
        "output_tokens": values["output_tokens"],
        "cache_write_tokens": values["cache_write_5m_tokens"] + values["cache_write_1h_tokens"],
        "cache_write_5m_tokens": values["cache_write_5m_tokens"],
        "cache_write_1h_tokens": values["cache_write_1h_tokens"],
        "cache_read_tokens": values["cache_read_tokens"],
        "cost_usd": format_usd(values["cost_micros"]),
        "cache_hit_ratio": cache_hit_ratio(
            values["input_tokens"], cache_write, values["cache_read_tokens"]
        ),
    }


async def totals(session: AsyncSession, query: UsageQuery) -> dict[str, Any]:
    """Totals, grouped as asked: the request log plus the daily roll-ups, added exactly."""
    dialect = session.bind.dialect.name
    fields = [GROUP_FIELDS[g] for g in query.group_by]
    grouped: dict[tuple[Any, ...], dict[str, int]] = {}
    overall = dict.fromkeys(MEASURES, 0)
    for columns, measures, conds in (_log_source(query, dialect), _daily_source(query)):
        filters = {
            "customer_id": query.customer_id,
            "key_id": query.key_id,
            "model": query.model,
            "account_id": query.account_id,
            "session_id": query.session_id,
        }
        if query.session_id and columns["session_id"] is None:
            continue  # a source without sessions has nothing of one session
        conds = conds + [columns[name] == value for name, value in filters.items() if value]
        keys = [columns[f].label(f) for f in fields if columns.get(f) is not None]
        stmt = sa.select(*keys, *measures).where(*conds)
        if "batch_id" in columns:
            stmt = stmt.select_from(_log.outerjoin(_lines, _lines.c.request_id == _log.c.id))
        if keys:
            stmt = stmt.group_by(*keys)
        for row in await session.execute(stmt):
            values = {m: int(getattr(row, m) or 0) for m in MEASURES}
            if not values["requests"]:
                continue
            group = tuple(row._mapping.get(f) or None for f in fields)
            bucket = grouped.setdefault(group, dict.fromkeys(MEASURES, 0))
            for m in MEASURES:
                bucket[m] += values[m]
                overall[m] += values[m]
    if fields:
        items = [
            {**dict(zip(fields, group, strict=True)), **_view(values)}
            for group, values in sorted(
                grouped.items(), key=lambda kv: tuple(str(v) for v in kv[0])
            )
        ]
    else:
        items = [_view(overall)]
    return {"group_by": query.group_by, "items": items, "totals": _view(overall)}


async def roll_up(session: AsyncSession, *, before: datetime) -> int:
    """Fold finished request-log rows older than ``before`` into ``usage_daily`` and delete them.

    One transaction: a row leaves the log exactly when its usage lands in the roll-up, so
    totals never change. Idempotent (a second run finds nothing to move). Returns rows moved.
    """
    dialect = session.bind.dialect.name
    old = [_log.c.started_at < before, _log.c.status != "in_flight"]
    day = _day_of_log(dialect)
    dims = [day.label("day"), _log.c.customer_id, _log.c.key_id, _log.c.account_id, _log.c.model]
    rows = (
        await session.execute(
            sa.select(
                *dims,
                sa.func.count().label("requests"),
                *(sa.func.sum(getattr(_log.c, m)).label(m) for m in MEASURES[1:]),
            )
            .where(*old, _log.c.status.in_(USAGE_STATUSES))
            .group_by(*dims)
        )
    ).all()
    for row in rows:
        key = {
            "day": row.day,
            "customer_id": row.customer_id,
            "key_id": row.key_id,
            "account_id": row.account_id or "",
            "model": row.model or "",
        }
        values = {m: int(getattr(row, m) or 0) for m in MEASURES}
        updated = await session.execute(
            sa.update(_daily)
            .where(*(getattr(_daily.c, k) == v for k, v in key.items()))
            .values(**{m: getattr(_daily.c, m) + values[m] for m in MEASURES})
        )
        if updated.rowcount == 0:  # type: ignore[attr-defined]
            await session.execute(sa.insert(_daily).values(**key, **values))
    moved = await session.execute(sa.delete(_log).where(*old))
    return int(moved.rowcount)  # type: ignore[attr-defined]


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
        "accounts_tried": row.accounts_tried.split(",") if row.accounts_tried else [],
        "session_id": row.session_id,
        "error": row.error,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "ttfb_ms": row.ttfb_ms,
        "duration_ms": row.duration_ms,
        "queue_ms": row.queue_ms,
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
