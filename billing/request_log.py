"""Request-log rows of requests that hold nothing: refusals and free calls.

A billed request's row is written with its hold (:mod:`billing.holds`) and completed by its
settlement. Every other request that passed authentication gets its row here, whole, in one
insert: a request refused before anything was held (its status code and reason), a
count_tokens call (cost 0), a models listing. A row already written under the same request id
(a hold whose placement failed uncertainly may have committed its own) is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from billing.holds import Outcome
from billing.models import RequestRecord, utcnow

_log = RequestRecord.__table__  # type: ignore[attr-defined]


def _clean(text: str | None, limit: int) -> str | None:
    """A client-supplied string as the database can take it (bounded, no NUL)."""
    return text.replace("\x00", "")[:limit] if text else None


@dataclass(slots=True)
class Entry:
    request_id: str
    customer_id: str
    key_id: str
    endpoint: str
    outcome: Outcome
    requested_model: str | None = None
    stream: bool = False
    instance_id: str | None = None
    session_id: str | None = None
    started_at: datetime = field(default_factory=utcnow)


async def record(session: AsyncSession, entry: Entry) -> bool:
    """Insert the row; False when one with this request id exists already."""
    outcome = entry.outcome
    values = {
        **outcome.log_values(),
        "id": entry.request_id,
        "customer_id": entry.customer_id,
        "key_id": entry.key_id,
        "endpoint": entry.endpoint,
        "requested_model": _clean(entry.requested_model, 200),
        "model": _clean(outcome.model, 200),
        "stream": entry.stream,
        "hold_micros": 0,
        "cost_micros": 0,
        "instance_id": entry.instance_id,
        "session_id": entry.session_id,
        "started_at": entry.started_at,
        "finished_at": utcnow(),
    }
    exists = await session.execute(sa.select(_log.c.id).where(_log.c.id == entry.request_id))
    if exists.first() is not None:
        return False
    await session.execute(sa.insert(_log).values(**values))
    return True
