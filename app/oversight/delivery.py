"""Delivering events: a signed POST per pending delivery, retried with backoff for a day.

Each try is one ``webhook_attempts`` row; the body (``{id, type, created_at, data}``) and its
event id are the same on every try. A delivery is claimed before its POST (its next try moved
past the POST's timeout by a conditional update), so several workers never send one try twice.
The client follows no redirects, reads no proxy or netrc settings, and sends no credentials and
no cookies: only the body, ``content-type``, ``user-agent`` and the signature.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import sqlalchemy as sa

from app.db import Database
from app.oversight.models import Webhook, WebhookAttempt, WebhookDelivery, WebhookEvent
from app.oversight.webhooks import SIGNATURE_HEADER, signature
from billing.models import iso
from pool.crypto import CredentialCipher

log = logging.getLogger("poolrelay.webhooks")

TIMEOUT_SECONDS = 10.0
CLAIM = timedelta(seconds=60)
"""A claimed delivery is not tried by another worker for this long (past the POST's timeout)."""
GIVE_UP_AFTER = timedelta(days=1)
FIRST_RETRY_SECONDS = 2.0
MAX_RETRY_SECONDS = 3600.0
BATCH = 20
USER_AGENT = "poolrelay-webhooks/1"

_d = WebhookDelivery.__table__.c  # type: ignore[attr-defined]


def retry_delay(attempts: int) -> timedelta:
    """After the ``attempts``-th failed try: 2 s, 6 s, 18 s, … tripling, at most an hour."""
    return timedelta(seconds=min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 3 ** (attempts - 1)))


def event_body(event: WebhookEvent) -> bytes:
    return orjson.dumps(
        {
            "id": event.id,
            "type": event.type,
            "created_at": iso(event.created_at),
            "data": event.data,
        }
    )


def make_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(TIMEOUT_SECONDS),
        headers={"user-agent": USER_AGENT},
    )


@dataclass(frozen=True, slots=True)
class _Job:
    delivery_id: str
    attempt: int
    created_at: datetime
    webhook_id: str
    url: str
    secret: str
    event_id: str
    event_type: str
    body: bytes


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def _claim(db: Database, cipher: CredentialCipher, now: datetime) -> list[_Job]:
    jobs: list[_Job] = []
    async with db.transaction() as session:
        due = (
            await session.execute(
                sa.select(_d.id, _d.next_attempt_at)
                .where(_d.status == "pending", _d.next_attempt_at <= now)
                .order_by(_d.next_attempt_at)
                .limit(BATCH)
            )
        ).all()
        for delivery_id, next_at in due:
            claimed = await session.execute(
                sa.update(WebhookDelivery.__table__)  # type: ignore[attr-defined]
                .where(_d.id == delivery_id, _d.status == "pending", _d.next_attempt_at == next_at)
                .values(next_attempt_at=now + CLAIM)
            )
            if not getattr(claimed, "rowcount", 0):
                continue
            delivery = await session.get(WebhookDelivery, delivery_id)
            assert delivery is not None
            event = await session.get(WebhookEvent, delivery.event_id)
            hook = await session.get(Webhook, delivery.webhook_id)
            if event is None or hook is None or hook.status != "active":
                delivery.status = "canceled"
                delivery.finished_at = now
                session.add(delivery)
                continue
            jobs.append(
                _Job(
                    delivery_id=delivery.id,
                    attempt=delivery.attempts + 1,
                    created_at=_aware(delivery.created_at),
                    webhook_id=hook.id,
                    url=hook.url,
                    secret=cipher.decrypt(hook.secret_encrypted).reveal(),
                    event_id=event.id,
                    event_type=event.type,
                    body=event_body(event),
                )
            )
    return jobs


async def _post(client: httpx.AsyncClient, job: _Job) -> tuple[int | None, str | None, int]:
    started = time.monotonic()
    client.cookies.clear()  # nothing a receiver set goes to the next one
    try:
        response = await client.post(
            job.url,
            content=job.body,
            headers={
                "content-type": "application/json",
                SIGNATURE_HEADER: signature(job.secret, job.body),
                "x-poolrelay-event-id": job.event_id,
                "x-poolrelay-event-type": job.event_type,
            },
        )
        await response.aclose()
    except httpx.HTTPError as exc:
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        return None, f"{type(exc).__name__}: {detail}".rstrip(": "), _ms(started)
    error = None
    if not 200 <= response.status_code < 300:
        error = f"HTTP {response.status_code}"
        if 300 <= response.status_code < 400:
            error += " (redirects are not followed)"
    return response.status_code, error, _ms(started)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


async def _record(
    db: Database, job: _Job, status: int | None, error: str | None, ms: int, now: datetime
) -> str:
    ok = error is None
    if ok:
        state, next_at = "delivered", now
    elif now + retry_delay(job.attempt) - job.created_at > GIVE_UP_AFTER:
        state, next_at = "failed", now
    else:
        state, next_at = "pending", now + retry_delay(job.attempt)
    async with db.transaction() as session:
        session.add(
            WebhookAttempt(
                delivery_id=job.delivery_id,
                webhook_id=job.webhook_id,
                event_id=job.event_id,
                event_type=job.event_type,
                attempt=job.attempt,
                status_code=status,
                error=error,
                duration_ms=ms,
                created_at=now,
            )
        )
        await session.execute(
            sa.update(WebhookDelivery.__table__)  # type: ignore[attr-defined]
            .where(_d.id == job.delivery_id)
            .values(
                status=state,
                attempts=job.attempt,
                next_attempt_at=next_at,
                last_status_code=status,
                last_error=error,
                finished_at=None if state == "pending" else now,
            )
        )
    if not ok:
        log.warning(
            "webhook %s: event %s try %d failed (%s); %s",
            job.webhook_id,
            job.event_id,
            job.attempt,
            error,
            "retrying" if state == "pending" else "giving up after a day",
            extra={"event": "webhook_failed", "webhook_id": job.webhook_id},
        )
    return state


async def deliver_due(
    db: Database,
    cipher: CredentialCipher,
    *,
    client: httpx.AsyncClient | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Try every delivery that is due (a batch at a time, the POSTs concurrently)."""
    counts = {"delivered": 0, "pending": 0, "failed": 0}
    own = client is None
    http = client or make_client()
    try:
        while True:
            started = now or datetime.now(UTC)
            jobs = await _claim(db, cipher, started)
            if not jobs:
                break
            results = await asyncio.gather(*(_post(http, job) for job in jobs))
            for job, (status, error, ms) in zip(jobs, results, strict=True):
                finished = now or datetime.now(UTC)
                counts[await _record(db, job, status, error, ms, finished)] += 1
            if len(jobs) < BATCH:
                break
    finally:
        if own:
            await http.aclose()
    return counts
