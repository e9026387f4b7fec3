"""The Files API through the relay with the real anthropic SDK (``client.beta.files``), and
file-pinned routing: a request naming a file goes only to an account of the file's group.
Runs on the embedded defaults and on PostgreSQL + Redis."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import pytest

from tests.harness import FakeUpstream, RelayServer
from workers import tasks

# Two workspaces: ws-a has two accounts (one upstream workspace: the same sandbox credential,
# so they see the same files), ws-b one.
KEY_A = "sk-ant-api03-files-alpha-0001"
KEY_B = "sk-ant-api03-files-bravo-0002"
MODEL = "claude-haiku-4-5"
BETA = ["files-api-2025-04-14"]


@dataclass
class Setup:
    relay: RelayServer
    fake: FakeUpstream
    customer_id: str
    key: str
    accounts: dict[str, str]  # name -> id

    def client(self, key: str | None = None) -> anthropic.Anthropic:
        return anthropic.Anthropic(api_key=key or self.key, base_url=self.relay.url, max_retries=0)


@pytest.fixture
def setup(relay: RelayServer, fake: FakeUpstream) -> Iterator[Setup]:
    fake.control("POST", "batches", json={"processing_seconds": 0.2})
    accounts = {
        "alpha1": relay.add_account("alpha1", KEY_A, fake.url, group="ws-a"),
        "alpha2": relay.add_account("alpha2", KEY_A, fake.url, group="ws-a"),
        "bravo": relay.add_account("bravo", KEY_B, fake.url, group="ws-b"),
    }
    customer_id, key = relay.create_customer(balance_usd="10")
    yield Setup(relay, fake, customer_id, key, accounts)


def document_message(file_id: str) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "document", "source": {"type": "file", "file_id": file_id}},
            {"type": "text", "text": "Summarise this"},
        ],
    }


def test_upload_list_download_delete_through_the_sdk(setup: Setup) -> None:
    client = setup.client()
    data = b"%PDF-1.4\n" + bytes(range(256)) * 400
    meta = client.beta.files.upload(file=("report.pdf", data, "application/pdf"), betas=BETA)
    assert meta.id.startswith("file_")
    assert meta.filename == "report.pdf" and meta.size_bytes == len(data)
    assert meta.mime_type == "application/pdf"
    uploads = [r for r in setup.fake.requests() if r["path"] == "/v1/files"]
    assert len(uploads) == 1
    assert uploads[0]["headers"]["anthropic-beta"] == "files-api-2025-04-14"
    assert uploads[0]["credential"] != setup.key

    again = client.beta.files.retrieve_metadata(meta.id, betas=BETA)
    assert again.id == meta.id and again.size_bytes == len(data)
    assert [f.id for f in client.beta.files.list(betas=BETA)] == [meta.id]
    downloaded = client.beta.files.download(meta.id, betas=BETA)
    assert downloaded.read() == data

    # another customer sees nothing of it
    _other, other_key = setup.relay.create_customer(name="other")
    other = setup.client(other_key)
    assert list(other.beta.files.list(betas=BETA)) == []
    for call in (
        lambda: other.beta.files.retrieve_metadata(meta.id, betas=BETA),
        lambda: other.beta.files.download(meta.id, betas=BETA),
        lambda: other.beta.files.delete(meta.id, betas=BETA),
    ):
        with pytest.raises(anthropic.NotFoundError):
            call()
    with pytest.raises(anthropic.NotFoundError):
        other.messages.create(model=MODEL, max_tokens=50, messages=[document_message(meta.id)])  # type: ignore[list-item]

    deleted = client.beta.files.delete(meta.id, betas=BETA)
    assert deleted.id == meta.id
    assert list(client.beta.files.list(betas=BETA)) == []
    with pytest.raises(anthropic.NotFoundError):
        client.beta.files.retrieve_metadata(meta.id, betas=BETA)


def test_list_pages(setup: Setup) -> None:
    client = setup.client()
    ids = [
        client.beta.files.upload(file=(f"f{i}.txt", f"file {i}".encode(), "text/plain")).id
        for i in range(5)
    ]
    newest = ids[::-1]
    first = client.beta.files.list(limit=2)
    assert [f.id for f in first.data] == newest[:2]
    assert [f.id for f in client.beta.files.list(limit=2)] == newest  # the SDK follows next_page
    with httpx.Client(base_url=setup.relay.url, headers={"x-api-key": setup.key}) as http:
        page = http.get("/v1/files", params={"limit": 2, "after_id": newest[1]}).json()
        assert [f["id"] for f in page["data"]] == newest[2:4] and page["has_more"] is True
        page = http.get("/v1/files", params={"before_id": newest[2]}).json()
        assert [f["id"] for f in page["data"]] == newest[:2] and page["has_more"] is False


def _owner_group(setup: Setup, credential: str) -> str:
    return "ws-a" if credential == KEY_A else "ws-b"


def test_requests_naming_a_file_go_only_to_its_group(setup: Setup) -> None:
    client = setup.client()
    meta = client.beta.files.upload(file=("notes.txt", b"some notes", "text/plain"))
    upload = next(r for r in setup.fake.requests() if r["path"] == "/v1/files")
    holder = upload["credential"]
    for _ in range(8):
        reply = client.messages.create(
            model=MODEL,
            max_tokens=50,
            messages=[document_message(meta.id)],  # type: ignore[list-item]
        )
        assert reply.usage.output_tokens > 0
        with httpx.Client(base_url=setup.relay.url, headers={"x-api-key": setup.key}) as http:
            counted = http.post(
                "/v1/messages/count_tokens",
                headers={"anthropic-version": "2023-06-01"},
                json={"model": MODEL, "messages": [document_message(meta.id)]},
            )
            assert counted.status_code == 200, counted.text
    sent = [r for r in setup.fake.requests(limit=200) if r["path"].startswith("/v1/messages")]
    assert len(sent) == 16
    assert {r["credential"] for r in sent} == {holder}
    # requests without a file still spread over every account
    for _ in range(12):
        client.messages.create(
            model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
    spread = {r["credential"] for r in setup.fake.requests(limit=12)}
    assert spread == {KEY_A, KEY_B}

    # a batch naming the file goes to the file's group too
    batch = client.messages.batches.create(
        requests=[
            {
                "custom_id": "doc",
                "params": {
                    "model": MODEL,
                    "max_tokens": 50,
                    "messages": [document_message(meta.id)],
                },
            }
        ]  # type: ignore[list-item]
    )
    created = [r for r in setup.fake.requests() if r["path"] == "/v1/messages/batches"]
    assert created[-1]["credential"] == holder
    deadline = time.monotonic() + 10
    while client.messages.batches.retrieve(batch.id).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [line] = list(client.messages.batches.results(batch.id))
    assert line.result.type == "succeeded"
    services = setup.relay.services
    setup.relay.call(lambda: tasks.settle_batches({"services": services}))

    # no account of that group can serve: 529, and nothing goes to the other workspace
    group = _owner_group(setup, holder)
    names = ["alpha1", "alpha2"] if group == "ws-a" else ["bravo"]
    with setup.relay.admin() as admin:
        for name in names:
            admin.post(f"/admin/accounts/{setup.accounts[name]}/disable").raise_for_status()
    time.sleep(2.5)  # the accounts snapshot is refreshed every 2 s
    before = len(setup.fake.requests(limit=200))
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model=MODEL, max_tokens=50, messages=[document_message(meta.id)])  # type: ignore[list-item]
    assert caught.value.status_code == 529
    assert len(setup.fake.requests(limit=200)) == before
    # the file is still readable through its (disabled) account
    assert client.beta.files.retrieve_metadata(meta.id).id == meta.id


def test_unknown_file_in_a_message_is_404_without_a_call(setup: Setup) -> None:
    client = setup.client()
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(
            model=MODEL,
            max_tokens=50,
            messages=[document_message("file_nope")],  # type: ignore[list-item]
        )
    assert "file_nope" in caught.value.message
    with httpx.Client(base_url=setup.relay.url, headers={"x-api-key": setup.key}) as http:
        r = http.post(
            "/v1/messages",
            headers={"anthropic-version": "2023-06-01"},
            json={"model": MODEL, "max_tokens": 5, "messages": [document_message("file_\u0000x")]},
        )
        assert r.status_code == 404, r.text
    assert not [r for r in setup.fake.requests() if r["path"] == "/v1/messages"]


def _declared(relay: RelayServer, key: str, path: str, declared: int, ctype: str) -> int:
    """The status of a request declaring a body of ``declared`` bytes (answered before the
    body is read)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {key}\r\n"
            f"content-type: {ctype}\r\ncontent-length: {declared}\r\n\r\n".encode()
        )
        raw = b""
        while b"\r\n" not in raw:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    return int(raw.split(b" ", 2)[1])


def test_body_limits_are_those_of_the_endpoint(setup: Setup) -> None:
    multipart = "multipart/form-data; boundary=x"
    mib = 1024 * 1024
    assert _declared(setup.relay, setup.key, "/v1/files", 500 * mib + 1, multipart) == 413
    assert (
        _declared(setup.relay, setup.key, "/v1/messages/batches", 256 * mib + 1, "application/json")
        == 413
    )
    assert (
        _declared(setup.relay, setup.key, "/v1/messages", 32 * mib + 1, "application/json") == 413
    )


def test_an_upload_above_the_messages_limit_streams_through(setup: Setup) -> None:
    data = bytes(range(256)) * (160 * 1024)  # 40 MiB: above MAX_BODY_BYTES, below 500 MiB
    meta = setup.client().beta.files.upload(file=("big.bin", data, "application/octet-stream"))
    assert meta.size_bytes == len(data)
    with (
        httpx.Client(base_url=setup.relay.url, headers={"x-api-key": setup.key}) as http,
        http.stream("GET", f"/v1/files/{meta.id}/content") as r,
    ):
        assert r.status_code == 200
        assert sum(len(c) for c in r.iter_bytes()) == len(data)
