"""Calls on what an upstream account holds for a customer (batches, files), shared by the
customer API (:mod:`app.relay.batches`, :mod:`app.relay.files`) and the workers
(:mod:`app.batch_settlement`).

A batch or a file lives on the account that accepted it, so every later call on it goes to
that account with its stored credential — whether or not the account is in service: reading a
batch is not sending it traffic, so a quarantined or disabled account still serves its batches
and files, and a removed one does as long as its credential decrypts.

:func:`file_pin` is the hard routing constraint of a request that names files: the accounts of
the group (upstream workspace) that holds them, and no other.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Collection, Iterator, Mapping
from typing import Any

import sqlalchemy as sa

from app import errors
from app.state import Services
from billing.owned import UpstreamFile
from pool.accounts import LiveAccount
from pool.errors import CredentialError
from pool.models import UpstreamAccount
from pool.upstream import UpstreamResponse, upstream_headers

DEFAULT_VERSION = "2023-06-01"
MAX_ID_CHARS = 200
"""The longest batch or file id the relay records (and looks up)."""


async def owning_account(services: Services, account_id: str) -> LiveAccount | None:
    """The account holding a batch or a file, with its credential: from the live directory,
    else from the database (disabled or removed accounts); None when its credential is gone."""
    live = await services.directory.accounts()
    found = live.get(account_id)
    if found is not None:
        return found
    async with services.db.transaction() as session:
        row = await session.get(UpstreamAccount, account_id)
    if row is None:
        return None
    try:
        credential = services.cipher.decrypt(row.credential_ciphertext)
    except CredentialError:
        return None
    return LiveAccount.of(row, credential)


async def send_to_owner(
    services: Services,
    account: LiveAccount,
    method: str,
    path: str,
    *,
    query: str = "",
    headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
    content: bytes | AsyncIterable[bytes] | None = None,
    content_length: int | None = None,
    header_timeout: float | None = None,
) -> UpstreamResponse:
    """One request to ``account`` (no lease: it reads or changes what the account already
    holds). The customer's headers pass as on the Messages path; ``anthropic-version`` is
    added when absent (the workers' own calls). A streamed ``content`` is sent with
    ``content_length`` when known (else chunked)."""
    forwarded = upstream_headers(headers or [], account.credential.reveal())
    forwarded.setdefault("anthropic-version", DEFAULT_VERSION)
    if content_length is not None and not isinstance(content, bytes):
        forwarded["content-length"] = str(content_length)
    settings = services.settings
    url = f"{account.base_url}{path}" + (f"?{query}" if query else "")
    return await services.upstream.send(
        method,
        url,
        headers=forwarded,
        content=content,
        connect_timeout=settings.upstream_connect_timeout,
        header_timeout=settings.request_deadline if header_timeout is None else header_timeout,
    )


BODY_LIMITS = {
    "/v1/messages/batches": 256 * 1024 * 1024,
    "/v1/files": 500 * 1024 * 1024,
}
"""Request bodies larger than ``MAX_BODY_BYTES`` that these endpoints take (wire spec §4)."""


def body_limit(path: str, default: int) -> int:
    """The largest request body a path takes."""
    return BODY_LIMITS.get(path.rstrip("/"), default)


def file_ids(body: Any) -> Iterator[str]:
    """Every ``file_id`` a Messages body names: ``{"type": "file", "file_id": …}`` sources of
    documents and images, and ``container_upload`` blocks, in ``messages`` and ``system``."""
    if not isinstance(body, dict):
        return
    stack: list[Any] = [body.get("messages"), body.get("system")]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            file_id = value.get("file_id")
            if isinstance(file_id, str) and value.get("type") in ("file", "container_upload"):
                yield file_id
            for key in ("content", "source"):
                inner = value.get(key)
                if isinstance(inner, list | dict):
                    stack.append(inner)


async def file_pin(
    services: Services, customer_id: str, bodies: Collection[Any], raw: bytes | None = None
) -> frozenset[str] | None:
    """The accounts a request naming files may go to: those of the group holding every file
    it names (an account without a group is a workspace of its own). None when it names no
    file (``raw``, the request's bytes, lets a request without ``file_id`` skip the walk). A
    file the customer does not own, or that was deleted: 404, as Anthropic answers an unknown
    file. An empty set (no account of that group can serve) makes the scheduler's pick a 529."""
    if raw is not None and b"file_id" not in raw:
        return None
    wanted = {file_id for body in bodies for file_id in file_ids(body)}
    if not wanted:
        return None
    for file_id in sorted(wanted):
        if not file_id or len(file_id) > MAX_ID_CHARS or not file_id.isprintable():
            raise errors.not_found(f"File not found: {file_id[:MAX_ID_CHARS]!r}")
    table = UpstreamFile.__table__  # type: ignore[attr-defined]
    async with services.db.transaction() as session:
        rows = (
            await session.execute(
                sa.select(table.c.id, table.c.account_id, table.c.account_group).where(
                    table.c.id.in_(sorted(wanted)),
                    table.c.customer_id == customer_id,
                    table.c.deleted_at.is_(None),
                )
            )
        ).all()
    found = {str(row.id): row for row in rows}
    for file_id in sorted(wanted):
        if file_id not in found:
            raise errors.not_found(f"File not found: {file_id}")
    live = await services.directory.accounts()
    allowed: set[str] | None = None
    for row in found.values():
        owner = live.get(row.account_id)
        group = owner.group if owner is not None else row.account_group
        accounts = {row.account_id}
        if group is not None:
            accounts.update(a.id for a in live.values() if a.group == group)
        allowed = accounts if allowed is None else allowed & accounts
    return frozenset(allowed or ())
