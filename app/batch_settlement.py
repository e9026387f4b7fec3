"""Settling batches: once a batch has ended, its succeeded lines are charged and the rest of
its hold is released (contract §6; the money rules are in :mod:`billing.batch_billing`).

:func:`settle_due` is the workers' job body (every ``BATCH_POLL_SECONDS``, and on a timer in
embedded mode): it looks at every batch not yet settled, asks its account how it stands, and
settles the ended ones. :func:`settle_batch` settles one (also called by the customer API
before it deletes a batch, whose results would be gone afterwards).

The results are read as a stream, line by line, and charged in chunks of
:data:`CHUNK_LINES` lines, one transaction each — never loaded whole. A worker that stops
half-way leaves the charged chunks charged; the next one reads the results again and charges
only what is not charged yet (each line's charge is unique by batch id and ``custom_id``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import orjson
import sqlalchemy as sa

from app.owned import owning_account, send_to_owner
from app.state import Services
from billing.batch_billing import BatchOwner, LineCharge, at_batch_rate, charge_lines, finish
from billing.errors import InvalidField
from billing.models import Customer
from billing.owned import MessageBatch
from billing.pricing import PriceBook, Usage, cost_micros
from billing.usage import parse_time

log = logging.getLogger("poolrelay.batches")

CHUNK_LINES: Final = 500
DUE_PER_RUN: Final = 200
MAX_LINE_BYTES: Final = 64 * 1024 * 1024
"""A longer result line is not a result line (a message is at most a few MB)."""
_batches = MessageBatch.__table__  # type: ignore[attr-defined]


async def jsonl_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Complete lines of a JSONL stream, as they arrive (a line may span many chunks)."""
    pending = bytearray()
    async for chunk in chunks:
        pending += chunk
        start = 0
        while True:
            end = pending.find(b"\n", start)
            if end < 0:
                break
            line = bytes(pending[start:end]).strip()
            if line:
                yield line
            start = end + 1
        del pending[:start]
        if len(pending) > MAX_LINE_BYTES:
            raise ValueError("a result line is longer than any result can be")
    tail = bytes(pending).strip()
    if tail:
        yield tail


def line_charge(line: bytes, book: PriceBook, multiplier: Decimal) -> LineCharge | None:
    """The charge of one result line: None unless it ``succeeded`` (errored, canceled and
    expired lines cost nothing). The model is the one the line's message names; the usage is
    billed at the batch rate whatever tier it reports."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        log.error("a batch result line is not JSON; it is not charged")
        return None
    if not isinstance(data, dict):
        return None
    custom_id = data.get("custom_id")
    result = data.get("result")
    if not isinstance(custom_id, str) or not isinstance(result, dict):
        return None
    if result.get("type") != "succeeded":
        return None
    message = result.get("message")
    if not isinstance(message, dict):
        return None
    model = message.get("model") if isinstance(message.get("model"), str) else None
    usage = at_batch_rate(Usage.from_api(message.get("usage")))
    price = book.match(model) if model else None
    if price is None:
        log.error("batch line %s names model %r, which has no price; not charged", custom_id, model)
        return None
    message_id = message.get("id") if isinstance(message.get("id"), str) else None
    return LineCharge(
        custom_id[:64], model, usage, cost_micros(usage, price, multiplier), message_id
    )


def _parse_time(value: Any) -> datetime | None:
    try:
        return parse_time(value, "ended_at") if isinstance(value, str) else None
    except InvalidField:
        return None


async def note_state(services: Services, batch_id: str, data: dict[str, Any]) -> None:
    """Keep the last batch object the upstream returned (lists show it without a call)."""
    status = data.get("processing_status")
    values: dict[str, Any] = {"snapshot": orjson.dumps(data).decode()}
    if isinstance(status, str):
        values["processing_status"] = status[:20]
    ended = _parse_time(data.get("ended_at"))
    if ended is not None:
        values["ended_at"] = ended
    async with services.db.transaction() as session:
        await session.execute(sa.update(_batches).where(_batches.c.id == batch_id).values(**values))


async def settle_batch(services: Services, batch: MessageBatch) -> str:
    """Settle one batch if it has ended: ``settled``, ``pending`` (still processing),
    ``unavailable`` (its account's credential is gone), or ``failed`` (the upstream did not
    answer as expected; tried again on the next run)."""
    owner = BatchOwner(
        batch.id, batch.request_id, batch.customer_id, batch.key_id, batch.account_id
    )
    account = await owning_account(services, batch.account_id)
    if account is None:
        log.warning(
            "batch %s cannot be settled: the credential of account %s is gone; its hold stays",
            batch.id,
            batch.account_id,
        )
        return "unavailable"
    response = await send_to_owner(services, account, "GET", f"/v1/messages/batches/{batch.id}")
    body = await response.aread()
    await response.aclose()
    if response.status_code == 404:
        # gone upstream (deleted, or past retention): nothing can be charged any more
        log.warning("batch %s is gone from its account; its hold is released", batch.id)
        async with services.db.transaction() as session:
            await finish(session, owner, status="gone")
        return "settled"
    if response.status_code != 200:
        return "failed"
    data = orjson.loads(body)
    await note_state(services, batch.id, data)
    if data.get("processing_status") != "ended":
        return "pending"
    async with services.db.transaction() as session:
        customer = await session.get(Customer, batch.customer_id)
    multiplier = Decimal(customer.price_multiplier) if customer is not None else Decimal(1)
    book = await services.prices.get()
    results = await send_to_owner(
        services,
        account,
        "GET",
        f"/v1/messages/batches/{batch.id}/results",
        headers=[("accept", "application/binary")],
    )
    try:
        if results.status_code != 200:
            log.warning("results of batch %s: upstream answered %s", batch.id, results.status_code)
            return "failed"
        chunk: list[LineCharge] = []
        charged = 0
        async for line in jsonl_lines(results.aiter_raw()):
            charge = line_charge(line, book, multiplier)
            if charge is None:
                continue
            chunk.append(charge)
            if len(chunk) >= CHUNK_LINES:
                async with services.db.transaction() as session:
                    charged += await charge_lines(session, owner, chunk)
                chunk = []
        if chunk:
            async with services.db.transaction() as session:
                charged += await charge_lines(session, owner, chunk)
    finally:
        await results.aclose()
    async with services.db.transaction() as session:
        released = await finish(session, owner)
    if charged or released:
        services.metrics.charged.inc(charged)
        log.info(
            "batch %s settled: %d µUSD charged by this run",
            batch.id,
            charged,
            extra={
                "event": "batch_settled",
                "batch_id": batch.id,
                "customer_id": batch.customer_id,
            },
        )
    return "settled"


async def settle_due(services: Services) -> dict[str, int]:
    """Look at every batch not yet settled (oldest first, :data:`DUE_PER_RUN` rows per
    query); settle those that have ended. Returns how many ended how (``settle_batch``)."""
    counts: dict[str, int] = {}
    after: tuple[datetime, str] | None = None
    while True:
        query = sa.select(MessageBatch).where(MessageBatch.settled_at.is_(None))  # type: ignore[union-attr]
        if after is not None:
            query = query.where(
                sa.tuple_(_batches.c.created_at, _batches.c.id)
                > sa.tuple_(sa.literal(after[0]), sa.literal(after[1]))
            )
        query = query.order_by(_batches.c.created_at, _batches.c.id).limit(DUE_PER_RUN)
        async with services.db.transaction() as session:
            due = list((await session.execute(query)).scalars())
        for batch in due:
            try:
                outcome = await settle_batch(services, batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "settling batch %s failed; it is tried again on the next run", batch.id
                )
                outcome = "failed"
            counts[outcome] = counts.get(outcome, 0) + 1
        if len(due) < DUE_PER_RUN:
            return counts
        after = (due[-1].created_at, due[-1].id)
