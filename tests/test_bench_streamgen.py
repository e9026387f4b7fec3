"""The streams benchmark's load generator (``tests/bench/streamgen.c``) finds stalled frames.

A scripted server sends Anthropic-shaped SSE over HTTP/1.1 chunked encoding, paced, with or
without a known stall; the generator must count exactly the stalls that were scripted, at the
right delta, whatever the chunk and TCP-write boundaries. Needs gcc (skips without it, fails in
CI).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.bench import streamgen
from tests.harness import FakeUpstream
from tests.system import unavailable

PACE = 0.010  # s between deltas
STALL = 0.400  # s of scripted stall
THRESHOLD_MS = 150.0  # the generator's stall threshold in these tests (beyond the pacing)
DELTAS = 16


@pytest.fixture(scope="module")
def generator() -> None:
    try:
        streamgen.binary()
    except streamgen.NoCompiler as exc:
        unavailable(str(exc))


def event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def script(
    stall_before_delta: int | None = None, stall_before_block_start: bool = False
) -> list[tuple[float, list[bytes]]]:
    """(wait before, the writes) per frame; some frames split over several chunks/writes."""
    message: dict[str, Any] = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5-20251001",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 1},
    }
    start = event("message_start", {"type": "message_start", "message": message})
    block = event(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    frames: list[tuple[float, list[bytes]]] = [(0.0, [start])]
    frames.append((STALL if stall_before_block_start else 0.0, [block]))
    frames.append((0.0, [b": a comment line, not a frame\n", event("ping", {"type": "ping"})]))
    for i in range(1, DELTAS + 1):
        delta = event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": f" w{i}"},
            },
        )
        wait = PACE if i > 1 else 0.0
        if i == stall_before_delta:
            wait += STALL
        # every third delta is split in two chunks, one of them mid-line
        writes = [delta[:7], delta[7:]] if i % 3 == 0 else [delta]
        frames.append((wait, writes))
    frames.append((0.0, [event("content_block_stop", {"type": "content_block_stop", "index": 0})]))
    end = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": DELTAS},
    }
    frames.append((0.0, [event("message_delta", end)]))
    frames.append((0.0, [event("message_stop", {"type": "message_stop"})]))
    return frames


class ScriptedServer:
    """Answers each connection's one request with ``frames`` (HTTP/1.1, chunked), then closes."""

    def __init__(self, frames: list[tuple[float, list[bytes]]]) -> None:
        self.frames = frames
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client may leave mid-stream
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(rest) < length:
                rest += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + rest)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for wait, writes in self.frames:
                if wait:
                    time.sleep(wait)
                for piece in writes:
                    conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.sendall(b"0\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[ScriptedServer] = []

    def start(frames: list[tuple[float, list[bytes]]]) -> ScriptedServer:
        server = ScriptedServer(frames)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def run(server: ScriptedServer, **options: Any) -> dict[str, Any]:
    return streamgen.run(
        server.port,
        b'{"stream": true}',
        pace_ms=PACE * 1000,
        stall_ms=THRESHOLD_MS,
        expect_deltas=DELTAS,
        timeout=30,
        headers={"x-api-key": "k"},
        **options,
    )


@pytest.mark.usefixtures("generator")
def test_a_paced_stream_has_no_stall(serve: Any) -> None:
    server = serve(script())
    result = run(server, concurrency=2, rounds=2)
    assert result["ok"] == 4 and result["errors"] == 0, result
    assert result["frames"] == 4 * (3 + DELTAS + 3)
    assert result["stalled_frames"] == 0 and result["stalled_streams"] == 0, result
    assert result["gap_ms"]["n"] == 4 * (DELTAS - 1)
    assert result["gap_ms"]["p50"] >= PACE * 1000 * 0.9
    assert result["ttft_ms"]["n"] == 4
    request = server.requests[0]
    assert request.startswith(b"POST /v1/messages HTTP/1.1\r\n")
    assert b"\r\nx-api-key: k\r\n" in request and request.endswith(b'{"stream": true}')


@pytest.mark.usefixtures("generator")
def test_a_known_stall_is_found_at_its_delta(serve: Any) -> None:
    result = run(serve(script(stall_before_delta=5)))
    assert result["ok"] == 1, result
    assert result["stalled_frames"] == 1 and result["stalled_streams"] == 1, result
    assert result["stalls_by_delta"] == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert STALL * 1000 * 0.9 < result["max_excess_ms"] < STALL * 1000 + 300
    assert result["gap_ms"]["max"] >= (PACE + STALL) * 1000 * 0.9


@pytest.mark.usefixtures("generator")
def test_a_stall_before_the_first_delta_counts_too(serve: Any) -> None:
    result = run(serve(script(stall_before_block_start=True)))
    assert result["stalled_frames"] == 1, result
    assert result["stalls_by_delta"][-1] == 1  # not a delta: counted with "later / other"
    assert result["ttft_ms"]["p50"] >= STALL * 1000 * 0.9


@pytest.mark.usefixtures("generator")
def test_a_stream_without_message_stop_is_an_error(serve: Any) -> None:
    result = run(serve(script()[:-1]))
    assert result["ok"] == 0 and result["error_kinds"] == {"stream without message_stop": 1}


@pytest.mark.usefixtures("generator")
def test_disconnect_after_and_duration(serve: Any) -> None:
    server = serve(script())
    result = run(server, concurrency=2, disconnect_after=3)
    assert result["disconnected"] == 2 and result["delivered"] == 2, result
    assert result["ok"] == 0 and result["errors"] == 0 and result["stalled_frames"] == 0
    result = run(server, concurrency=1, duration=0.6)  # streams of ~0.15 s, back to back
    assert result["ok"] >= 2 and result["errors"] == 0, result
    assert result["ok"] == result["delivered"]


@pytest.mark.usefixtures("generator")
def test_the_sandbox_paced_stream(fake: FakeUpstream) -> None:
    """The sandbox's ``paced`` fault: every delta there, about ``delay`` apart."""
    fake.fault("*", "paced", delay=0.01)
    port = int(fake.url.rsplit(":", 1)[1])
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "reply with 12 words"}],
    }
    result = streamgen.run(
        port,
        orjson.dumps(body),
        headers={"x-api-key": "sk-ant-api03-streamgen", "anthropic-version": "2023-06-01"},
        concurrency=3,
        pace_ms=10,
        stall_ms=1000,
        expect_deltas=12,
        timeout=30,
    )
    assert result["ok"] == 3 and result["errors"] == 0, result
    assert result["gap_ms"]["n"] == 3 * 11 and result["gap_ms"]["p50"] >= 9.0
