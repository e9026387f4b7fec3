"""The Files API (beta) for customers (contract §4): upload, list, metadata, content, delete.

An upload streams through: the relay leases one account from the scheduler and forwards the
multipart body chunk by chunk as the client sends it (never holding it whole; at most 500 MiB,
413 beyond), then records which customer, key and account own the file. An upload is not
failed over (its body is gone once sent): an account fault is a 529 the SDK retries. Every
later call on a file goes to its account; a file the customer does not own is a 404, as an
unknown one. Files are free. A Messages request or a batch that names a file goes only to an
account of the file's group (:func:`app.owned.file_pin`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app import errors
from app.errors import ApiError, to_api_error
from app.owned import send_to_owner
from app.relay.forward import on_failure
from app.relay.owned_api import (
    Forwarded,
    OwnedApi,
    answer,
    json_of,
    owned_page,
    page_body,
    read_answer,
    stream_answer,
)
from app.state import Services
from billing.errors import BillingError
from billing.ids import new_id
from billing.models import utcnow
from billing.owned import UpstreamFile
from pool.errors import PoolError
from pool.upstream import TRANSPORT_ERRORS, Verdict, classify

FILE_MAX_BODY_BYTES: Final = 500 * 1024 * 1024


class _TooLarge(Exception):
    pass


class _ClientLeft(Exception):
    pass


class FileApi(OwnedApi[UpstreamFile]):
    model = UpstreamFile
    id_param = "file_id"
    path = "/v1/files"
    noun = "File"
    what = "file"

    def __init__(self, services: Services) -> None:
        self.services = services

    async def upload(self, request: Request) -> Response:
        services = self.services
        request_id = new_id("req")
        try:
            key = await services.keys.authenticate(request.headers)
            declared = request.headers.get("content-length")
            length = int(declared) if declared is not None and declared.isdigit() else None
            if length is not None and length > FILE_MAX_BODY_BYTES:
                raise errors.too_large(FILE_MAX_BODY_BYTES)
            if not request.headers.get("content-type", "").lower().startswith("multipart/"):
                raise errors.invalid_request(
                    "Content-Type must be multipart/form-data (a file upload)"
                )
            live = await services.directory.accounts()
            lease = await services.scheduler.acquire(
                services.directory.candidates(None), expected_tokens=0
            )
        except (ApiError, BillingError, PoolError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        account = live.get(lease.account_id) or (await services.directory.accounts()).get(
            lease.account_id
        )
        if account is None:  # removed between the snapshot and the pick
            await services.scheduler.release(lease)
            return errors.anthropic_response(errors.overloaded(), request_id)
        headers: list[tuple[str, str]] = list(request.headers.items())
        try:
            upstream = await send_to_owner(
                services,
                account,
                "POST",
                "/v1/files",
                query=request.url.query,
                headers=headers,
                content=self._body(request),
                content_length=length,
                header_timeout=services.settings.max_request_seconds,
            )
            content = await read_answer(upstream)
        except _TooLarge:
            return errors.anthropic_response(errors.too_large(FILE_MAX_BODY_BYTES), request_id)
        except _ClientLeft:
            return errors.anthropic_response(
                ApiError(499, "api_error", "The client closed the connection during the upload."),
                request_id,
            )
        except TimeoutError:
            return errors.anthropic_response(
                ApiError(408, "timeout_error", "The upload stalled; it was not stored."),
                request_id,
            )
        except TRANSPORT_ERRORS:
            await on_failure(services, account.id, "upload: connection to upstream failed")
            return errors.anthropic_response(
                errors.overloaded("The upstream did not take the upload; retry shortly."),
                request_id,
            )
        finally:
            await services.scheduler.release(lease)
        status = upstream.status_code
        if status >= 400:
            verdict = classify(status, content)
            if verdict is not Verdict.CUSTOMER_ERROR:
                if verdict is Verdict.SERVER_ERROR:
                    await on_failure(services, account.id, f"upload: {status}")
                return errors.anthropic_response(
                    errors.overloaded("The upstream did not take the upload; retry shortly."),
                    request_id,
                )
            return answer(upstream, content, request_id)
        data = json_of(content)
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            size = data.get("size_bytes")
            filename = data.get("filename")
            async with services.db.transaction() as session:
                session.add(
                    UpstreamFile(
                        id=data["id"],
                        customer_id=key.customer_id,
                        key_id=key.key_id,
                        account_id=account.id,
                        account_group=account.group,
                        filename=filename[:1000] if isinstance(filename, str) else None,
                        size_bytes=size if isinstance(size, int) else 0,
                        snapshot=content.decode("utf-8", "replace"),
                    )
                )
        return answer(upstream, content, request_id)

    def _body(self, request: Request) -> AsyncIterator[bytes]:
        """The request body as it arrives: each chunk within ``CLIENT_BODY_TIMEOUT`` of the
        last (an upload may take long, a stalled one may not), at most 500 MiB."""
        receive = request.receive
        idle = self.services.settings.client_body_timeout

        async def chunks() -> AsyncIterator[bytes]:
            received = 0
            while True:
                async with asyncio.timeout(idle):
                    message = await receive()
                if message["type"] != "http.request":
                    raise _ClientLeft
                chunk = message.get("body", b"")
                if chunk:
                    received += len(chunk)
                    if received > FILE_MAX_BODY_BYTES:
                        raise _TooLarge
                    yield chunk
                if not message.get("more_body", False):
                    return

        return chunks()

    async def list_files(self, request: Request) -> Response:
        request_id = new_id("req")
        params = dict(request.query_params)
        cursor = params.pop("page", None)
        if cursor:
            params["after_id"] = cursor.removeprefix("page_")
        try:
            key = await self.services.keys.authenticate(request.headers)
            async with self.services.db.transaction() as session:
                rows, has_more = await owned_page(session, UpstreamFile, key.customer_id, params)
        except (ApiError, BillingError, PoolError) as exc:
            return errors.anthropic_response(to_api_error(exc), request_id)
        data: list[dict[str, Any]] = []
        for row in rows:
            item = json_of((row.snapshot or "null").encode())
            data.append(item if isinstance(item, dict) else {"id": row.id, "type": "file"})
        body = page_body(data, has_more)
        body["next_page"] = f"page_{body['last_id']}" if has_more and body["last_id"] else None
        headers = errors.relay_headers(request_id, 200, None)
        return Response(orjson.dumps(body), 200, headers, media_type="application/json")

    async def metadata(self, request: Request) -> Response:
        forwarded = await self._forward(request, "GET")
        if not isinstance(forwarded, Forwarded):
            return forwarded
        upstream = forwarded.upstream
        return answer(upstream, await read_answer(upstream), forwarded.request_id)

    async def content(self, request: Request) -> Response:
        forwarded = await self._forward(request, "GET", "/content")
        if not isinstance(forwarded, Forwarded):
            return forwarded
        return await stream_answer(forwarded.upstream, forwarded.request_id)

    async def delete(self, request: Request) -> Response:
        forwarded = await self._forward(request, "DELETE")
        if not isinstance(forwarded, Forwarded):
            return forwarded
        request_id, found, upstream = forwarded.request_id, forwarded.found, forwarded.upstream
        content = await read_answer(upstream)
        if upstream.status_code in (200, 404):  # gone upstream either way
            async with self.services.db.transaction() as session:
                row = await session.get(UpstreamFile, found.id)
                if row is not None and row.deleted_at is None:
                    row.deleted_at = utcnow()
        return answer(upstream, content, request_id)
