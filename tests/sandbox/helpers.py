"""Requests, stream parsing and error checks shared by the sandbox tests."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

VERSION = "2023-06-01"
KEY = "sk-ant-api03-test-key-aaaa"
AUTH = {"x-api-key": KEY, "anthropic-version": VERSION}
GREETING = "Hello from the fake upstream. You said:"
SSE_CT = "text/event-stream; charset=utf-8"
ORDER = ["message_start", "content_block_start", "ping"]


def auth(key: str) -> dict[str, str]:
    """Headers of a well-formed request with another credential."""
    return {"x-api-key": key, "anthropic-version": VERSION}


def body(text: str = "What is the capital of France?", **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather by city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "detail": {
                "type": "object",
                "properties": {"hourly": {"type": "boolean"}, "note": {"type": "string"}},
                "required": ["hourly"],
            },
            "optional": {"type": "string"},
        },
        "required": ["city", "days", "unit", "detail"],
    },
}
WEATHER_INPUT = {"city": "Paris", "days": 1, "unit": "celsius", "detail": {"hourly": True}}


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split a stream into events, checking the exact byte framing."""
    assert raw.endswith(b"\n\n")
    events: list[tuple[str, dict[str, Any]]] = []
    for frame in raw[:-2].split(b"\n\n"):
        event_line, data_line = frame.split(b"\n")
        assert event_line.startswith(b"event: ")
        assert data_line.startswith(b"data: ")
        name = event_line[7:].decode()
        data = orjson.loads(data_line[6:])
        assert orjson.dumps(data) == data_line[6:], "data must be compact JSON"
        assert data["type"] == name
        events.append((name, data))
    return events


def final_usage(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """spec §2: message_start usage, overwritten by the last message_delta's non-null fields."""
    usage = dict(events[0][1]["message"]["usage"])
    for name, data in events:
        if name == "message_delta":
            usage.update({k: v for k, v in data["usage"].items() if v is not None})
    return usage


def streamed_text(events: list[tuple[str, dict[str, Any]]], index: int = 0) -> str:
    return "".join(
        d["delta"]["text"]
        for n, d in events
        if n == "content_block_delta" and d["index"] == index and d["delta"]["type"] == "text_delta"
    )


async def post(client: httpx.AsyncClient, payload: Any, **kw: Any) -> httpx.Response:
    headers = kw.pop("headers", AUTH)
    return await client.post(kw.pop("path", "/v1/messages"), json=payload, headers=headers, **kw)


async def fault(client: httpx.AsyncClient, **spec: Any) -> None:
    r = await client.post("/_fake/faults", json={"key": KEY, **spec})
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True}


def assert_error(
    r: httpx.Response,
    status: int,
    error_type: str,
    message: str | None = None,
    *,
    authenticated: bool = True,
) -> dict[str, Any]:
    """An Anthropic error: status, type, message, ``request-id`` = body's, ``x-should-retry``.

    ``authenticated``: the credential was accepted, so the org and rate-limit headers are there
    (and absent otherwise).
    """
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    data: dict[str, Any] = r.json()
    assert list(data) == ["type", "error", "request_id"]
    assert data["type"] == "error"
    assert data["error"]["type"] == error_type
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    if message is not None:
        assert data["error"]["message"] == message
    assert data["request_id"] == r.headers["request-id"]
    assert r.headers["request-id"].startswith("req_")
    retry = status in (408, 409, 429) or status >= 500
    assert r.headers["x-should-retry"] == ("true" if retry else "false")
    assert ("anthropic-ratelimit-requests-limit" in r.headers) is authenticated
    assert ("anthropic-organization-id" in r.headers) is authenticated
    return data
