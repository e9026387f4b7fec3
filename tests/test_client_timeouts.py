"""Slow and oversized clients: request headers that never end, bodies that trickle, bodies
over the limit.

The relay is served here as ``poolrelay serve`` serves it: uvicorn with
:func:`app.http_protocol.http_protocol` (httptools plus a deadline on request headers).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from app.http_protocol import http_protocol
from app.main import create_app
from tests import harness
from tests.harness import FakeUpstream, RelayServer

MODEL = "claude-haiku-4-5"
UPSTREAM_KEY = "sk-ant-api03-client-timeouts-000000001"
LIMIT = 32 * 1024 * 1024


class ServedRelay(RelayServer):
    """The relay on uvicorn configured as ``poolrelay serve`` configures it."""

    @classmethod
    def serve(cls, settings: Any, *, keep_alive: float = 5.0) -> ServedRelay:
        server = cls(create_app(settings, print_token=lambda _t: None))
        server.settings = settings
        config = uvicorn.Config(
            server.app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            http=http_protocol(settings.client_header_timeout),
            timeout_keep_alive=keep_alive,
            timeout_graceful_shutdown=5,
        )
        server.server = uvicorn.Server(config)
        server.start_thread()
        return server


@pytest.fixture
def serve(settings_env: dict[str, str], fake: FakeUpstream) -> Iterator[Any]:
    started: list[RelayServer] = []

    def start(keep_alive: float = 5.0, **overrides: Any) -> ServedRelay:
        settings = harness.test_settings(settings_env, **overrides)
        server = ServedRelay.serve(settings, keep_alive=keep_alive)
        started.append(server)
        server.add_account("a", UPSTREAM_KEY, fake.url)
        return server

    yield start
    for server in started:
        server.stop()


def connect(relay: RelayServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed the connection (None if it did not within ``seconds``).
    Anything the server sends first is read and ignored."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return time.monotonic() - started
    except TimeoutError:
        return None
    except ConnectionResetError:
        return time.monotonic() - started


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a content-length body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]


def request_head(
    key: str, *, length: int | None = None, path: str = "/v1/messages", close: bool = False
) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "host: 127.0.0.1",
        f"x-api-key: {key}",
        "anthropic-version: 2023-06-01",
        "content-type: application/json",
    ]
    lines.append(
        f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    )
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def messages_body(text: str = "hi") -> bytes:
    return orjson.dumps(
        {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": text}]}
    )


def oversized(size: int) -> bytes:
    prefix = b'{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{"role":"user","content":"'
    suffix = b'"}]}'
    return prefix + b"a" * (size - len(prefix) - len(suffix)) + suffix


# --- request headers --------------------------------------------------------------------------


def test_a_connection_whose_headers_never_end_is_closed_after_the_header_timeout(
    serve: Callable[..., ServedRelay],
) -> None:
    relay = serve(client_header_timeout=0.5)
    _, key = relay.create_customer()
    # nothing at all
    idle = connect(relay)
    # headers begun, never finished (a slowloris client)
    partial = connect(relay)
    partial.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: ")
    for sock in (idle, partial):
        took = closed_within(sock, 5)
        assert took is not None, "the connection stayed open"
        assert took < 2.0
        sock.close()
    # a kept-alive connection: a full request is served; the next one's headers are timed again
    sock = connect(relay)
    payload = messages_body()
    sock.sendall(request_head(key, length=len(payload)) + payload)
    status, _, _ = read_response(sock)
    assert status == 200
    time.sleep(0.7)  # longer than the header timeout: between requests only keep-alive counts
    sock.sendall(request_head(key, length=len(payload)) + payload)
    status, _, _ = read_response(sock)
    assert status == 200
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\n")
    took = closed_within(sock, 5)
    assert took is not None and took < 2.0
    sock.close()


def test_uvicorns_keep_alive_timeout_still_closes_idle_connections(
    serve: Callable[..., ServedRelay],
) -> None:
    relay = serve(client_header_timeout=5.0, keep_alive=0.5)
    _, key = relay.create_customer()
    sock = connect(relay)
    payload = messages_body()
    sock.sendall(request_head(key, length=len(payload)) + payload)
    assert read_response(sock)[0] == 200
    took = closed_within(sock, 4)
    assert took is not None and took < 2.0
    sock.close()


# --- request bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions"]
)
def test_a_trickling_body_gets_408_after_the_body_timeout(
    serve: Callable[..., ServedRelay], path: str
) -> None:
    relay = serve(client_body_timeout=0.5)
    customer_id, key = relay.create_customer()
    sock = connect(relay)
    started = time.monotonic()
    sock.sendall(request_head(key, length=1000, path=path) + b'{"model": "claude-')
    status, headers, content = read_response(sock)
    assert 0.4 < time.monotonic() - started < 3.0
    assert status == 408
    assert headers["x-should-retry"] == "true"
    assert headers["connection"] == "close"
    assert headers["request-id"].startswith("req_")
    data = orjson.loads(content)
    if path == "/v1/chat/completions":  # the OpenAI edge answers in OpenAI's shape
        assert "error" in data and "within 0.5 seconds" in data["error"]["message"]
    else:
        assert data["type"] == "error"
        assert data["error"]["type"] == "timeout_error"
        assert "within 0.5 seconds" in data["error"]["message"]
    took = closed_within(sock, 3)
    assert took is not None, "the connection stayed open"
    sock.close()
    assert relay.customer(customer_id)["held_usd"] == "0.000000"


def test_a_body_that_arrives_in_time_in_pieces_is_served(
    serve: Callable[..., ServedRelay],
) -> None:
    relay = serve(client_body_timeout=2.0)
    _, key = relay.create_customer()
    payload = messages_body("in pieces")
    sock = connect(relay)
    sock.sendall(request_head(key, length=len(payload)))
    for i in range(0, len(payload), 16):
        sock.sendall(payload[i : i + 16])
        time.sleep(0.02)
    status, _, content = read_response(sock)
    assert status == 200, content
    sock.close()


# --- bodies over the limit --------------------------------------------------------------------


def assert_too_large(status: int, headers: dict[str, str], content: bytes) -> None:
    assert status == 413
    data = orjson.loads(content)
    assert data["type"] == "error"
    assert data["error"]["type"] == "request_too_large"
    assert str(LIMIT) in data["error"]["message"]
    assert headers["x-should-retry"] == "false"
    assert data["request_id"] == headers["request-id"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_40_mb_body_gets_a_413_the_client_can_read(
    serve: Callable[..., ServedRelay], framing: str
) -> None:
    relay = serve()
    _, key = relay.create_customer()
    payload = oversized(40 * 1024 * 1024)
    for _ in range(2):  # a client that says it will close the connection, the hardest case
        sock = connect(relay)
        if framing == "content-length":
            sock.sendall(request_head(key, length=len(payload), close=True))
            sock.sendall(payload)
        else:
            sock.sendall(request_head(key, close=True))
            step = 256 * 1024
            for i in range(0, len(payload), step):
                piece = payload[i : i + step]
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        assert_too_large(*read_response(sock))
        sock.close()


def test_a_40_mb_body_from_an_http_client_gets_a_readable_413(
    serve: Callable[..., ServedRelay],
) -> None:
    relay = serve()
    _, key = relay.create_customer()
    r = httpx.post(
        f"{relay.url}/v1/messages",
        content=oversized(40 * 1024 * 1024),
        headers={
            "x-api-key": key,
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
            "connection": "close",
        },
        timeout=30,
    )
    assert_too_large(r.status_code, dict(r.headers), r.content)


def test_a_body_far_over_the_limit_is_refused_at_once_and_the_connection_closed(
    serve: Callable[..., ServedRelay],
) -> None:
    relay = serve()
    _, key = relay.create_customer()
    sock = connect(relay)
    sock.sendall(request_head(key, length=10 * LIMIT))  # 320 MiB: not worth reading
    status, headers, content = read_response(sock)
    assert_too_large(status, headers, content)
    assert headers["connection"] == "close"
    assert closed_within(sock, 3) is not None
    sock.close()
    # a client waiting for "100 Continue" is answered before it sends anything
    sock = connect(relay)
    head = request_head(key, length=40 * 1024 * 1024).replace(
        b"\r\n\r\n", b"\r\nexpect: 100-continue\r\n\r\n"
    )
    sock.sendall(head)
    status, headers, content = read_response(sock)
    assert_too_large(status, headers, content)
    assert headers["connection"] == "close"
    sock.close()
