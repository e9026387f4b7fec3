"""The streams benchmark's upstream: the sandbox's own answers, replayed paced by a C server.

The sandbox (``poolrelay fake-upstream``) is the reference for what Anthropic sends, but it is
Python: it cannot pace a thousand streams at 20 ms on a shared core, and a benchmark of "how
many streams can a relay pass" needs an upstream that is never the bottleneck (the issue's
board uses nginx). :func:`capture` asks an in-process sandbox (rate limits lifted) for one
streamed and one JSON answer and cuts them into parts; ``streamsrv.c`` (built with gcc like
the generator, :func:`tests.bench.streamgen.build`) sends them back for every request: the
response head and every event up to the first ``content_block_delta`` at once, each further
delta ``pace_ms`` after the previous one, the closing events at once after the last delta —
the sandbox's ``paced`` fault, byte for byte, with the request id and message id made unique
per response (their last 12 characters become a counter).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.bench import streamgen

SOURCE = Path(__file__).with_name("streamsrv.c")
PLACEHOLDER = b"X" * 12
SKIP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


def _head(status: int, raw: list[tuple[bytes, bytes]], extra: list[bytes]) -> bytes:
    lines = [b"HTTP/1.1 %d OK" % status]
    lines += [k + b": " + v for k, v in raw if k.lower() not in SKIP_HEADERS]
    return b"\r\n".join([*lines, *extra]) + b"\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _parts(parts: list[tuple[str, bytes]]) -> bytes:
    return b"".join(kind.encode() + b" %d\n" % len(data) + data for kind, data in parts)


def _unique(data: bytes, ids: list[str]) -> bytes:
    for value in ids:
        raw = value.encode()
        data = data.replace(raw, raw[:-12] + PLACEHOLDER)
    return data


async def _ask(body: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
    """The sandbox's streamed and JSON answers to ``body`` (one sandbox: one organization)."""
    from app.sandbox import create_fake_app

    app = create_fake_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as client:
        limits = {"key": "*", "requests_limit": 1_000_000_000,
                  "input_tokens_limit": 1_000_000_000_000,
                  "output_tokens_limit": 1_000_000_000_000, "tokens_limit": 2_000_000_000_000}  # fmt: skip
        (await client.post("/_fake/limits", json=limits)).raise_for_status()
        headers = {"x-api-key": "sk-ant-api03-replay", "anthropic-version": "2023-06-01"}
        answers = []
        for stream in (True, False):
            response = await client.post(
                "/v1/messages", json={**body, "stream": stream}, headers=headers
            )
            answers.append(response.raise_for_status())
        return answers[0], answers[1]


def capture(body: dict[str, Any]) -> tuple[bytes, bytes]:
    """The parts files (stream, JSON) of the sandbox's answers to ``body``."""
    streamed, plain = asyncio.run(_ask(body))
    events = [e + b"\n\n" for e in streamed.content.split(b"\n\n") if e]
    start = orjson.loads(events[0].split(b"data: ", 1)[1])
    ids = [streamed.headers["request-id"], start["message"]["id"]]
    head = _head(200, streamed.headers.raw, [b"transfer-encoding: chunked"])
    deltas = [i for i, e in enumerate(events) if e.startswith(b"event: content_block_delta")]
    first, last = deltas[0], deltas[-1]
    parts = [("I", head + b"".join(_chunk(e) for e in events[: first + 1]))]
    parts += [("P", _chunk(e)) for e in events[first + 1 : last + 1]]
    parts.append(("I", b"".join(_chunk(e) for e in events[last + 1 :]) + b"0\r\n\r\n"))
    sse = _unique(_parts(parts), ids)

    ids = [plain.headers["request-id"], plain.json()["id"]]
    extra = [b"content-length: %d" % len(plain.content)]
    json_parts = _unique(_parts([("I", _head(200, plain.headers.raw, extra) + plain.content)]), ids)
    return sse, json_parts


def start(
    workdir: Path, port: int, body: dict[str, Any], pace_ms: float, **popen: Any
) -> subprocess.Popen[bytes]:
    """Build and start the replay server on 127.0.0.1:``port``; returns once it accepts."""
    binary = streamgen.build(SOURCE)
    sse, json_parts = capture(body)
    (workdir / "replay-sse.parts").write_bytes(sse)
    (workdir / "replay-json.parts").write_bytes(json_parts)
    log = open(workdir / "replay.log", "wb")  # noqa: SIM115 - the server's, closed with it
    proc = subprocess.Popen(
        [str(binary), "--port", str(port), "--pace-ms", str(pace_ms),
         "--sse", str(workdir / "replay-sse.parts"), "--json", str(workdir / "replay-json.parts")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamsrv exited: {(workdir / 'replay.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("streamsrv did not start in 10 s")
