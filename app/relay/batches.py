"""The Message Batches API for customers (contract §4, §6; wire spec §5).

- create: :mod:`app.relay.batch_create` (checked, held at the batch rate, sent to one account).
- retrieve, cancel, delete and results go to the owning account; a batch the customer does
  not own is a 404, as an unknown one. ``results_url`` in every batch object names the relay.
  Results stream through. A batch is settled before it is deleted (its results are gone after).
- list: the customer's own batches, newest first; batches not yet ended are refreshed from
  their accounts, ended ones are shown as last seen.
- settlement is the workers' (:mod:`app.batch_settlement`, every ``BATCH_POLL_SECONDS``);
  a customer who retrieves a batch that has ended and is not settled yet starts its settlement
  at once, in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app import errors
from app.batch_settlement import note_state, settle_batch
from app.errors import ApiError, to_api_error
from app.owned import owning_account, send_to_owner
from app.relay.batch_create import BatchCreator, rewrite
from app.relay.owned_api import (
    Forwarded,
    OwnedApi,
    answer,
    call_owner,
    json_of,
    owned_page,
    owner_of,
    page_body,
    read_answer,
    relay_base,
    stream_answer,
)
from app.relay.service import Relay
from app.state import Services
from billing.errors import BillingError
from billing.ids import new_id
from billing.models import utcnow
from billing.owned import MessageBatch
from pool.errors import PoolError
from pool.upstream import TRANSPORT_ERRORS

log = logging.getLogger("poolrelay.batches")

REFRESH_CONCURRENCY: Final = 8


class BatchApi(OwnedApi[MessageBatch]):
    model = MessageBatch
    id_param = "batch_id"
    path = "/v1/messages/batches"
    noun = "Message Batch"
    what = "batch"

    def __init__(self, services: Services, relay: Relay) -> None:
        self.services = services
        self.relay = relay
        self._settling: dict[str, asyncio.Task[None]] = {}
        self.creator = BatchCreator(services, relay)

    def settle_soon(self, batch: MessageBatch) -> None:
        """A customer saw its batch ended before the poll settled it: settle it now, in the
        background (idempotent, like the poll; at most one at a time per batch here)."""
        if batch.settled_at is not None or batch.id in self._settling:
            return

        async def settle() -> None:
            try:
                await settle_batch(self.services, batch)
            except Exception:
                log.warning("settling batch %s failed; the poll retries", batch.id, exc_info=True)
            finally:
                self._settling.pop(batch.id, None)

        self._settling[batch.id] = asyncio.create_task(settle())

    async def create(self, request: Request) -> Response:
        return await self.creator.create(request)

    # -- the batch's later calls --------------------------------------------------------------

    async def _on_batch(self, request: Request, method: str, suffix: str = "") -> Response:
        """Retrieve (GET) or cancel (POST …/cancel): forwarded to the owning account."""
        forwarded = await self._forward(request, method, suffix)
        if not isinstance(forwarded, Forwarded):
            return forwarded
        request_id, batch, upstream = forwarded.request_id, forwarded.found, forwarded.upstream
        content = await read_answer(upstream)
        data = json_of(content)
        if upstream.status_code == 200 and isinstance(data, dict):
            with contextlib.suppress(Exception):  # a snapshot is a convenience
                await note_state(self.services, batch.id, data)
            if data.get("processing_status") == "ended":
                self.settle_soon(batch)
            return answer(upstream, content, request_id, rewrite(data, relay_base(request)))
        return answer(upstream, content, request_id)

    async def retrieve(self, request: Request) -> Response:
        return await self._on_batch(request, "GET")

    async def cancel(self, request: Request) -> Response:
        return await self._on_batch(request, "POST", "/cancel")

    async def delete(self, request: Request) -> Response:
        request_id = new_id("req")
        services = self.services
        try:
            key = await services.keys.authenticate(request.headers)
            batch = await self._own(key, request.path_params["batch_id"])
            account = await owner_of(services, batch.account_id, "batch")
            if batch.settled_at is None:
                # its results go with it: charge them first (an unended batch is refused by
                # the upstream below, and stays unsettled)
                outcome = await settle_batch(services, batch)
                if outcome in ("failed", "unavailable"):
                    raise errors.overloaded(
                        "The batch's results could not be read before deleting it; retry shortly."
                    )
            upstream = await call_owner(
                services, account, request, "DELETE", f"/v1/messages/batches/{batch.id}"
            )
        except TRANSPORT_ERRORS:
            err = errors.overloaded("The upstream account that holds this batch did not answer.")
            return errors.anthropic_response(err, request_id)
        except (ApiError, BillingError, PoolError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        content = await read_answer(upstream)
        if upstream.status_code == 200:
            async with services.db.transaction() as session:
                row = await session.get(MessageBatch, batch.id)
                if row is not None:
                    row.deleted_at = row.deleted_at or utcnow()
        return answer(upstream, content, request_id)

    async def results(self, request: Request) -> Response:
        forwarded = await self._forward(request, "GET", "/results")
        if not isinstance(forwarded, Forwarded):
            return forwarded
        return await stream_answer(forwarded.upstream, forwarded.request_id)

    # -- list -----------------------------------------------------------------------------------

    async def list_batches(self, request: Request) -> Response:
        request_id = new_id("req")
        services = self.services
        try:
            key = await services.keys.authenticate(request.headers)
            async with services.db.transaction() as session:
                rows, has_more = await owned_page(
                    session, MessageBatch, key.customer_id, request.query_params
                )
        except (ApiError, BillingError, PoolError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        gate = asyncio.Semaphore(REFRESH_CONCURRENCY)
        base = relay_base(request)

        async def view(row: MessageBatch) -> dict[str, Any]:
            data = json_of((row.snapshot or "null").encode())
            if row.processing_status != "ended" or not isinstance(data, dict):
                async with gate:
                    fresh = await self._refresh(row)
                data = fresh if fresh is not None else data
            if not isinstance(data, dict):
                data = {"id": row.id, "type": "message_batch"}
            return dict(rewrite(data, base))

        items = await asyncio.gather(*(view(row) for row in rows))
        body = page_body(list(items), has_more)
        headers = errors.relay_headers(request_id, 200, None)
        return Response(orjson.dumps(body), 200, headers, media_type="application/json")

    async def _refresh(self, row: MessageBatch) -> dict[str, Any] | None:
        """The batch as its account sees it now (None when that cannot be had)."""
        try:
            account = await owning_account(self.services, row.account_id)
            if account is None:
                return None
            upstream = await send_to_owner(
                self.services, account, "GET", f"/v1/messages/batches/{row.id}"
            )
            content = await read_answer(upstream)
            data = json_of(content)
            if upstream.status_code != 200 or not isinstance(data, dict):
                return None
            await note_state(self.services, row.id, data)
            if data.get("processing_status") == "ended":
                self.settle_soon(row)
            return data
        except Exception:
            return None
