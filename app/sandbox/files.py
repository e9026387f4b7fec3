"""The Files API (beta): ``POST /v1/files`` (multipart upload), ``GET /v1/files``,
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``.

Files belong to the credential that uploaded them: another credential's file id is answered
404 ``not_found_error``, as an unknown one is, and a Messages request (or a batch line) that
names it in a ``{"type": "file", "file_id": ...}`` source gets the same 404. An upload is
streamed to a temporary file (never held in memory) and parsed there; more than 500 MB is a
413 ``request_too_large``. A body that is not ``multipart/form-data`` with a ``file`` part is a
400. Uploaded files are ``downloadable`` (the content endpoint streams them back).
Lists page as Anthropic's lists do (``limit`` 1–1000, ``after_id``, ``before_id``; ``data``,
``has_more``, ``first_id``, ``last_id``), newest first, and also answer the cursor style of the
newer SDKs (``page`` = the ``next_page`` of the previous answer).
"""

from __future__ import annotations

import contextlib
import mimetypes
import mmap
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from app.sandbox.common import Problem, new_id
from app.sandbox.gate import Gate
from app.sandbox.paging import page

MAX_FILE_BODY_BYTES: Final = 500 * 1024 * 1024
CHUNK: Final = 1024 * 1024
TOO_LARGE: Final[Problem] = (
    413,
    "request_too_large",
    "Request exceeds the maximum allowed number of bytes. The maximum request size is 500 MB.",
)


def _invalid(message: str) -> Problem:
    return 400, "invalid_request_error", message


def file_not_found(file_id: str) -> Problem:
    return 404, "not_found_error", f"File not found: {file_id}"


@dataclass(slots=True)
class StoredFile:
    id: str
    credential: str
    filename: str
    mime_type: str
    size_bytes: int
    created_at: float
    path: str
    offset: int

    def to_json(self) -> dict[str, Any]:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.created_at))
        millis = int((self.created_at % 1) * 1000)
        return {
            "type": "file",
            "id": self.id,
            "filename": self.filename,
            "mime_type": self.mime_type,
            "size_bytes": self.size_bytes,
            "created_at": f"{created}.{millis:03d}Z",
            "downloadable": True,
        }

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            left = self.size_bytes
            while left > 0:
                data = handle.read(min(CHUNK, left))
                if not data:
                    return
                left -= len(data)
                yield data


class FileStore:
    """Every uploaded file of one sandbox app, kept on disk in a temporary directory."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="poolrelay-sandbox-files-")
        self.files: dict[str, StoredFile] = {}

    @property
    def directory(self) -> str:
        return self._dir.name

    def clear(self) -> None:
        for stored in list(self.files.values()):
            self.remove(stored)

    def remove(self, stored: StoredFile) -> None:
        self.files.pop(stored.id, None)
        with contextlib.suppress(OSError):
            os.unlink(stored.path)

    def get(self, file_id: str, credential: str) -> StoredFile | None:
        stored = self.files.get(file_id)
        return stored if stored is not None and stored.credential == credential else None

    def of(self, credential: str) -> list[StoredFile]:
        """The credential's files, newest first."""
        mine = [f for f in self.files.values() if f.credential == credential]
        mine.sort(key=lambda f: (f.created_at, f.id), reverse=True)
        return mine


def file_ids(body: Any) -> Iterator[str]:
    """Every ``file_id`` a Messages body names: ``{"type": "file", "file_id": …}`` sources of
    documents and images, and ``container_upload`` blocks, in messages and system."""
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


def missing_file(store: FileStore, body: Any, credential: str) -> Problem | None:
    """404 for the first file the body names that this credential does not hold."""
    for file_id in file_ids(body):
        if store.get(file_id, credential) is None:
            return file_not_found(file_id)
    return None


def _boundary(content_type: str) -> bytes | None:
    kind, _, rest = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in rest.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip().strip('"').encode("latin-1")
    return None


def _disposition(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for param in value.split(";")[1:]:
        name, _, raw = param.strip().partition("=")
        out[name.lower()] = raw.strip().strip('"')
    return out


@dataclass(frozen=True, slots=True)
class Upload:
    """Where the ``file`` part of a stored multipart body is, and what it says it is."""

    offset: int
    length: int
    filename: str
    mime_type: str


def parse_upload(path: str, boundary: bytes) -> Upload | Problem:
    """(offset, length, filename, content type) of the ``file`` part of a multipart body
    stored at ``path`` (read through mmap, never loaded whole)."""
    size = os.path.getsize(path)
    if size == 0:
        return _invalid("file: Field required")
    delimiter = b"--" + boundary
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = m.find(delimiter)
        while pos >= 0:
            pos += len(delimiter)
            if m[pos : pos + 2] == b"--":
                break
            head_end = m.find(b"\r\n\r\n", pos)
            if head_end < 0:
                break
            headers: dict[str, str] = {}
            for line in m[pos:head_end].decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip():
                    headers[name.strip().lower()] = value.strip()
            start = head_end + 4
            end = m.find(b"\r\n" + delimiter, start)
            if end < 0:
                return _invalid("The multipart body is not terminated")
            params = _disposition(headers.get("content-disposition", ""))
            if params.get("name") == "file":
                filename = params.get("filename") or "upload"
                mime = headers.get("content-type", "").split(";")[0].strip().lower()
                if not mime or mime == "application/octet-stream":
                    mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
                return Upload(start, end - start, filename, mime)
            pos = end + 2
    return _invalid("file: Field required")


class FileRoutes:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    @property
    def store(self) -> FileStore:
        store: FileStore = self.gate.state.files
        return store

    async def upload(self, request: Request) -> Response:
        gate = self.gate
        raw_length = request.headers.get("content-length", "")
        declared = int(raw_length) if raw_length.isdigit() else 0
        ex = await gate.open(request, "/v1/files", None, declared)
        if isinstance(ex, Response):
            return ex
        if declared > MAX_FILE_BODY_BYTES:
            return gate.fail(ex, TOO_LARGE)
        boundary = _boundary(request.headers.get("content-type", ""))
        if boundary is None:
            return gate.fail(
                ex, _invalid("Content-Type must be multipart/form-data with a boundary")
            )
        fd, path = tempfile.mkstemp(dir=self.store.directory)
        received = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > MAX_FILE_BODY_BYTES:
                        raise OverflowError
                    out.write(chunk)
            found = parse_upload(path, boundary)
        except OverflowError:
            os.unlink(path)
            return gate.fail(ex, TOO_LARGE)
        except BaseException:
            os.unlink(path)
            raise
        if not isinstance(found, Upload):
            os.unlink(path)
            return gate.fail(ex, found)
        stored = StoredFile(
            new_id("file_011C", 22),
            ex.credential,
            found.filename,
            found.mime_type,
            found.length,
            time.time(),
            path,
            found.offset,
        )
        self.store.files[stored.id] = stored
        ex.entry["body_bytes"] = received
        return gate.ok(ex, stored.to_json())

    async def list_files(self, request: Request) -> Response:
        gate = self.gate
        ex = await gate.open(request, "/v1/files")
        if isinstance(ex, Response):
            return ex
        params = dict(request.query_params)
        cursor = params.pop("page", None)
        if cursor:
            params["after_id"] = cursor.removeprefix("page_")
        result = page(self.store.of(ex.credential), params, lambda f: f.id, StoredFile.to_json)
        if isinstance(result, tuple):
            return gate.fail(ex, result)
        result["next_page"] = f"page_{result['last_id']}" if result["has_more"] else None
        return gate.ok(ex, result)

    async def _find(self, request: Request, suffix: str = "") -> tuple[Any, StoredFile | None]:
        file_id: str = request.path_params["file_id"]
        ex = await self.gate.open(request, f"/v1/files/{file_id}{suffix}")
        if isinstance(ex, Response):
            return ex, None
        stored = self.store.get(file_id, ex.credential)
        if stored is None:
            return self.gate.fail(ex, file_not_found(file_id)), None
        return ex, stored

    async def metadata(self, request: Request) -> Response:
        ex, stored = await self._find(request)
        if stored is None:
            assert isinstance(ex, Response)
            return ex
        return self.gate.ok(ex, stored.to_json())

    async def content(self, request: Request) -> Response:
        ex, stored = await self._find(request, "/content")
        if stored is None:
            assert isinstance(ex, Response)
            return ex
        ex.entry["status"] = 200

        async def body() -> AsyncIterator[bytes]:
            for chunk in stored.chunks():
                yield chunk

        headers = {
            "request-id": ex.request_id,
            "content-length": str(stored.size_bytes),
            "content-disposition": f'attachment; filename="{stored.filename}"',
        }
        return StreamingResponse(body(), headers=headers, media_type=stored.mime_type)

    async def delete(self, request: Request) -> Response:
        ex, stored = await self._find(request)
        if stored is None:
            assert isinstance(ex, Response)
            return ex
        self.store.remove(stored)
        return self.gate.ok(ex, {"id": stored.id, "type": "file_deleted"})
