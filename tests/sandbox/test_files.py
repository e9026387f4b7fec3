"""The sandbox's Files API: streamed multipart uploads, per-credential scope, file sources."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette

from app.sandbox import get_state
from tests.sandbox.helpers import AUTH, auth

pytestmark = pytest.mark.anyio
OTHER = "sk-ant-api03-other-key-bbbb"
BETA = {**AUTH, "anthropic-beta": "files-api-2025-04-14"}


async def upload(
    client: httpx.AsyncClient, data: bytes, name: str = "notes.txt", key: str | None = None
) -> dict:  # type: ignore[type-arg]
    headers = BETA if key is None else {**auth(key), "anthropic-beta": "files-api-2025-04-14"}
    r = await client.post("/v1/files", headers=headers, files={"file": (name, data, "text/plain")})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_upload_metadata_content_delete(client: httpx.AsyncClient) -> None:
    data = b"line one\r\n--not-a-boundary\r\n" * 1000
    meta = await upload(client, data)
    assert meta["type"] == "file"
    assert meta["id"].startswith("file_")
    assert meta["filename"] == "notes.txt"
    assert meta["mime_type"] == "text/plain"
    assert meta["size_bytes"] == len(data)
    assert meta["downloadable"] is True
    r = await client.get(f"/v1/files/{meta['id']}", headers=BETA)
    assert r.json() == meta
    r = await client.get(f"/v1/files/{meta['id']}/content", headers=BETA)
    assert r.status_code == 200
    assert r.content == data
    r = await client.delete(f"/v1/files/{meta['id']}", headers=BETA)
    assert r.json() == {"id": meta["id"], "type": "file_deleted"}
    r = await client.get(f"/v1/files/{meta['id']}", headers=BETA)
    assert r.status_code == 404


async def test_scoped_to_the_credential(client: httpx.AsyncClient) -> None:
    meta = await upload(client, b"%PDF-1.4 secret", "a.pdf")
    for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        r = await client.request(method, f"/v1/files/{meta['id']}{path}", headers=auth(OTHER))
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found_error"
    r = await client.get("/v1/files", headers=auth(OTHER))
    assert r.json()["data"] == []
    document = {
        "role": "user",
        "content": [
            {"type": "document", "source": {"type": "file", "file_id": meta["id"]}},
            {"type": "text", "text": "Summarise"},
        ],
    }
    message = {"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": [document]}
    r = await client.post("/v1/messages", headers=auth(OTHER), json=message)
    assert r.status_code == 404
    assert meta["id"] in r.json()["error"]["message"]
    r = await client.post("/v1/messages", headers=AUTH, json=message)
    assert r.status_code == 200


async def test_list_pages_both_styles(client: httpx.AsyncClient) -> None:
    ids = [(await upload(client, f"f{i}".encode()))["id"] for i in range(3)]
    newest = list(reversed(ids))
    r = await client.get("/v1/files", headers=BETA, params={"limit": 2})
    page = r.json()
    assert [f["id"] for f in page["data"]] == newest[:2]
    assert page["has_more"] is True
    assert page["next_page"]
    r = await client.get("/v1/files", headers=BETA, params={"page": page["next_page"]})
    assert [f["id"] for f in r.json()["data"]] == newest[2:]
    assert r.json()["next_page"] is None
    r = await client.get("/v1/files", headers=BETA, params={"after_id": newest[0]})
    assert [f["id"] for f in r.json()["data"]] == newest[1:]


async def test_refuses_what_is_not_a_multipart_upload(
    client: httpx.AsyncClient, fake_app: Starlette
) -> None:
    r = await client.post("/v1/files", headers=BETA, json={"file": "x"})
    assert r.status_code == 400
    r = await client.post("/v1/files", headers=BETA, files={"other": ("x", b"x")})
    assert r.status_code == 400
    assert "file" in r.json()["error"]["message"]
    r = await client.post(
        "/v1/files",
        headers={
            **BETA,
            "content-length": str(600 * 1024 * 1024),
            "content-type": "multipart/form-data; boundary=x",
        },
        content=b"",
    )
    assert r.status_code == 413
    assert not get_state(fake_app).files.files
