"""Client sessions, read from the request log: what each conversation used and cost.

A session is the client's own id for a conversation (Claude Code's ``x-claude-code-session-id``
header, or the session part of ``metadata.user_id``), recorded on every request-log row by the
relay. Session ids come from clients, so a session is always one customer's: two customers who
send the same id have two sessions.

A session's figures are sums over its request-log rows that used the upstream (the statuses
that usage totals count), so ``cost_micros`` is exactly the sum of the ledger's usage debits
of those requests. Rows older than the request log's retention are folded into daily roll-ups
that keep no session, so sessions are listed as far back as the log goes.

Listing is one aggregate over the partial index ``(customer_id, session_id, started_at) WHERE
session_id IS NOT NULL``: it reads only this customer's rows that carry a session (in the time
window), already in session order, never the whole log. Pages are newest first by
``last_seen``, with a keyset cursor on ``(last_seen, customer_id, session_id)``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from billing.errors import InvalidField
from billing.models import RequestRecord, iso
from billing.money import format_usd
from billing.usage import USAGE_STATUSES, cache_hit_ratio

_log = RequestRecord.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the previous page ended: its last session's ``last_seen`` and ids."""

    last_seen: datetime
    customer_id: str
    session_id: str

    def encode(self) -> str:
        raw = orjson.dumps([iso(self.last_seen), self.customer_id, self.session_id])
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            last_seen, customer_id, session_id = orjson.loads(raw)
            moment = datetime.fromisoformat(str(last_seen).replace("Z", "+00:00"))
        except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
            raise InvalidField("cursor", "is not a cursor this list returned") from None
        if not isinstance(customer_id, str) or not isinstance(session_id, str):
            raise InvalidField("cursor", "is not a cursor this list returned")
        return cls(moment if moment.tzinfo else moment.replace(tzinfo=UTC), customer_id, session_id)


@dataclass(slots=True)
class SessionQuery:
    customer_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    cursor: Cursor | None = None
    limit: int = 50


def _aware(value: Any) -> datetime:
    """SQLite hands back naive UTC datetimes (or, for an aggregate, their text)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _statement(query: SessionQuery) -> sa.Select[Any]:
    conds: list[sa.ColumnElement[bool]] = [_log.c.session_id.is_not(None)]
    if query.customer_id is not None:
        conds.append(_log.c.customer_id == query.customer_id)
    if query.start is not None:
        conds.append(_log.c.started_at >= query.start)
    if query.end is not None:
        conds.append(_log.c.started_at < query.end)
    conds.append(_log.c.status.in_(USAGE_STATUSES))
    last_seen = sa.func.max(_log.c.started_at)
    stmt = (
        sa.select(
            _log.c.customer_id,
            _log.c.session_id,
            sa.func.min(_log.c.started_at).label("first_seen"),
            last_seen.label("last_seen"),
            sa.func.count().label("requests"),
            sa.func.sum(_log.c.input_tokens).label("input_tokens"),
            sa.func.sum(_log.c.output_tokens).label("output_tokens"),
            sa.func.sum(_log.c.cache_write_5m_tokens).label("cache_write_5m_tokens"),
            sa.func.sum(_log.c.cache_write_1h_tokens).label("cache_write_1h_tokens"),
            sa.func.sum(_log.c.cache_read_tokens).label("cache_read_tokens"),
            sa.func.sum(_log.c.cost_micros).label("cost_micros"),
        )
        .where(*conds)
        .group_by(_log.c.customer_id, _log.c.session_id)
    )
    cursor = query.cursor
    if cursor is not None:
        stmt = stmt.having(
            sa.or_(
                last_seen < cursor.last_seen,
                sa.and_(
                    last_seen == cursor.last_seen,
                    sa.tuple_(_log.c.customer_id, _log.c.session_id)
                    < sa.tuple_(sa.literal(cursor.customer_id), sa.literal(cursor.session_id)),
                ),
            )
        )
    return stmt.order_by(
        last_seen.desc(), _log.c.customer_id.desc(), _log.c.session_id.desc()
    ).limit(query.limit)


def session_view(row: Any, *, with_customer: bool) -> dict[str, Any]:
    input_tokens = int(row.input_tokens or 0)
    cache_write_5m = int(row.cache_write_5m_tokens or 0)
    cache_write_1h = int(row.cache_write_1h_tokens or 0)
    cache_read = int(row.cache_read_tokens or 0)
    view: dict[str, Any] = {"session_id": row.session_id}
    if with_customer:
        view["customer_id"] = row.customer_id
    view.update(
        first_seen=iso(_aware(row.first_seen)),
        last_seen=iso(_aware(row.last_seen)),
        requests=int(row.requests),
        input_tokens=input_tokens,
        output_tokens=int(row.output_tokens or 0),
        cache_write_tokens=cache_write_5m + cache_write_1h,
        cache_write_5m_tokens=cache_write_5m,
        cache_write_1h_tokens=cache_write_1h,
        cache_read_tokens=cache_read,
        cost_usd=format_usd(int(row.cost_micros or 0)),
        cache_hit_ratio=cache_hit_ratio(input_tokens, cache_write_5m + cache_write_1h, cache_read),
    )
    return view


async def list_sessions(
    session: AsyncSession, query: SessionQuery, *, with_customer: bool
) -> dict[str, Any]:
    """One page of sessions, newest first: ``{items, next_cursor}``."""
    rows = (await session.execute(_statement(query))).all()
    items = [session_view(row, with_customer=with_customer) for row in rows]
    next_cursor = None
    if len(rows) == query.limit:
        last = rows[-1]
        next_cursor = Cursor(_aware(last.last_seen), last.customer_id, last.session_id).encode()
    return {"items": items, "next_cursor": next_cursor}
