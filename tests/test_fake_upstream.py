"""app.fake_upstream: the Anthropic-compatible sandbox upstream and its control API."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette

from app.fake_upstream import MODELS, create_fake_app, get_state

pytestmark = pytest.mark.anyio

KEY = "sk-ant-api03-test-key-aaaa"
AUTH = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
GREETING = "Hello from the fake upstream. You said:"
SSE_CT = "text/event-stream; charset=utf-8"
ORDER = ["message_start", "content_block_start", "ping"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake_app() -> Starlette:
    return create_fake_app()


@pytest.fixture
async def client(fake_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=fake_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as c:
        yield c


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


def assert_error(r: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    data: dict[str, Any] = r.json()
    assert data["type"] == "error"
    assert data["error"]["type"] == error_type
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    assert data["request_id"] == r.headers["request-id"]
    assert r.headers["request-id"].startswith("req_")
    assert "anthropic-ratelimit-requests-limit" in r.headers
    return data


# --------------------------------------------------------------------------------------------
# Messages: JSON
# --------------------------------------------------------------------------------------------


async def test_json_reply_shape_and_headers(client: httpx.AsyncClient) -> None:
    payload = body(model="claude-haiku-4-5")
    raw_len = len(orjson.dumps(payload))
    r = await post(client, payload, params={"beta": "true"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    msg = r.json()
    assert list(msg) == [
        "id",
        "type",
        "role",
        "model",
        "content",
        "stop_reason",
        "stop_sequence",
        "usage",
    ]
    assert msg["id"].startswith("msg_01") and len(msg["id"]) == 28
    assert (msg["type"], msg["role"]) == ("message", "assistant")
    assert msg["model"] == "claude-haiku-4-5-20251001"
    assert msg["stop_reason"] == "end_turn" and msg["stop_sequence"] is None
    [block] = msg["content"]
    assert block["type"] == "text"
    assert block["text"].startswith(f"{GREETING} What is the capital of France?")
    usage = msg["usage"]
    assert list(usage) == [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "cache_creation",
        "output_tokens",
        "service_tier",
    ]
    assert usage["cache_creation"] == {
        "ephemeral_5m_input_tokens": 0,
        "ephemeral_1h_input_tokens": 0,
    }
    assert usage["cache_creation_input_tokens"] == usage["cache_read_input_tokens"] == 0
    assert 1 <= usage["input_tokens"] <= raw_len
    assert usage["output_tokens"] == len(block["text"].split()) == 20
    assert usage["service_tier"] == "standard"

    assert r.headers["request-id"].startswith("req_")
    org = r.headers["anthropic-organization-id"]
    assert len(org) == 36
    r2 = await post(client, body(model="my-custom-model"))
    assert r2.json()["model"] == "my-custom-model"
    assert r2.headers["anthropic-organization-id"] == org
    assert r2.headers["request-id"] != r.headers["request-id"]
    assert r2.json()["id"] != msg["id"]
    # deterministic text and usage
    r3 = await post(client, payload)
    assert r3.json()["content"] == msg["content"] and r3.json()["usage"] == usage


async def test_reply_with_n_words_and_bearer_auth(client: httpx.AsyncClient) -> None:
    r = await post(client, body("Please reply with 3 words"), headers={"authorization": "Bearer t"})
    msg = r.json()
    assert msg["content"][0]["text"] == "Hello from the"
    assert msg["usage"]["output_tokens"] == 3
    r = await post(client, body("reply with 60 words"))
    text = r.json()["content"][0]["text"]
    assert len(text.split()) == 60 == r.json()["usage"]["output_tokens"]
    assert r.json()["stop_reason"] == "end_turn"


async def test_input_tokens_never_exceed_body_bytes(client: httpx.AsyncClient) -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://x.io/a.png"}}
    small = body()
    small["messages"][0]["content"] = [image, {"type": "text", "text": "hi"}]
    raw = orjson.dumps(small)
    r = await client.post("/v1/messages", content=raw, headers=AUTH)
    assert 1 <= r.json()["usage"]["input_tokens"] <= len(raw)
    big = body("word " * 4000)
    raw = orjson.dumps(big)
    tokens = (await client.post("/v1/messages", content=raw, headers=AUTH)).json()["usage"]
    assert tokens["input_tokens"] == math.ceil((len("word " * 4000)) / 4) + 3
    unicode_text = body("日本語のテキスト" * 50)
    raw = orjson.dumps(unicode_text)
    r = await client.post("/v1/messages", content=raw, headers=AUTH)
    assert r.json()["usage"]["input_tokens"] <= len(raw)


async def test_max_tokens_and_stop_sequences(client: httpx.AsyncClient) -> None:
    r = await post(client, body(max_tokens=3))
    msg = r.json()
    assert msg["content"][0]["text"] == "Hello from the"
    assert (msg["stop_reason"], msg["usage"]["output_tokens"]) == ("max_tokens", 3)

    r = await post(client, body(stop_sequences=["\n\nEND", "upstream"]))
    msg = r.json()
    assert msg["content"][0]["text"] == "Hello from the fake "
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", "upstream")
    assert msg["usage"]["output_tokens"] == 5  # the last piece is the cut " "

    # a stop sequence beyond the max_tokens cut does not fire
    r = await post(client, body(max_tokens=2, stop_sequences=["fake"]))
    assert (r.json()["stop_reason"], r.json()["stop_sequence"]) == ("max_tokens", None)

    r = await post(client, body(stream=True, stop_sequences=["the fake"]))
    events = parse_sse(r.content)
    assert streamed_text(events) == "Hello from "
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "the fake"}
    assert delta["usage"]["output_tokens"] == 3  # "Hello", " from", " "


async def test_validation_and_auth_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages", json=body())
    assert_error(r, 401, "authentication_error")
    r = await client.post("/v1/messages", content=b"{not json", headers=AUTH)
    assert_error(r, 400, "invalid_request_error")
    for missing in ("model", "max_tokens", "messages"):
        payload = body()
        del payload[missing]
        data = assert_error(await post(client, payload), 400, "invalid_request_error")
        assert missing in data["error"]["message"]
    assert_error(await post(client, body(max_tokens=0)), 400, "invalid_request_error")
    assert_error(await post(client, [1, 2]), 400, "invalid_request_error")
    r = await client.get("/v1/nothing-here", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# --------------------------------------------------------------------------------------------
# Messages: SSE
# --------------------------------------------------------------------------------------------


async def test_sse_framing_order_and_final_usage(client: httpx.AsyncClient) -> None:
    plain = (await post(client, body())).json()
    r = await post(client, body(stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"] == SSE_CT
    assert r.headers["request-id"].startswith("req_")
    assert "anthropic-ratelimit-tokens-remaining" in r.headers
    events = parse_sse(r.content)
    names = [n for n, _ in events]
    n_words = plain["usage"]["output_tokens"]
    assert names == [
        *ORDER,
        *["content_block_delta"] * n_words,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["id"].startswith("msg_01") and start["model"] == "claude-sonnet-4-6"
    assert start["usage"]["output_tokens"] == 1
    assert start["usage"]["input_tokens"] == plain["usage"]["input_tokens"]
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert streamed_text(events) == plain["content"][0]["text"]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {
        "input_tokens": plain["usage"]["input_tokens"],
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": n_words,
    }
    assert final_usage(events) == plain["usage"]
    assert r.content.startswith(b'event: message_start\ndata: {"type":"message_start"')
    assert b'event: ping\ndata: {"type":"ping"}\n\n' in r.content


# --------------------------------------------------------------------------------------------
# Prompt caching
# --------------------------------------------------------------------------------------------


def cached_body(system_ttl: str | None = None, **extra: Any) -> dict[str, Any]:
    cc: dict[str, Any] = {"type": "ephemeral"}
    if system_ttl:
        cc["ttl"] = system_ttl
    return body(
        system=[
            {"type": "text", "text": "You are a helpful assistant. " * 200, "cache_control": cc}
        ],
        **extra,
    )


async def test_cache_creation_then_read(client: httpx.AsyncClient) -> None:
    payload = cached_body()
    count = (await post(client, payload, path="/v1/messages/count_tokens")).json()["input_tokens"]
    first = (await post(client, payload)).json()["usage"]
    assert first["cache_creation_input_tokens"] == 1450  # ceil(5800 / 4)
    assert first["cache_creation"] == {
        "ephemeral_5m_input_tokens": 1450,
        "ephemeral_1h_input_tokens": 0,
    }
    assert first["cache_read_input_tokens"] == 0
    assert first["input_tokens"] + first["cache_creation_input_tokens"] == count

    second = (await post(client, {**payload, "stream": True})).content
    usage = final_usage(parse_sse(second))
    assert usage["cache_read_input_tokens"] == 1450
    assert usage["cache_creation_input_tokens"] == 0
    assert usage["cache_creation"] == {
        "ephemeral_5m_input_tokens": 0,
        "ephemeral_1h_input_tokens": 0,
    }
    assert usage["input_tokens"] == first["input_tokens"]

    # caches are per credential and per model
    other = (await post(client, payload, headers={"x-api-key": "other"})).json()["usage"]
    assert other["cache_creation_input_tokens"] == 1450
    opus = (await post(client, {**payload, "model": "claude-opus-4-8"})).json()["usage"]
    assert opus["cache_creation_input_tokens"] == 1450


async def test_cache_ttl_split_and_conversation_growth(client: httpx.AsyncClient) -> None:
    tools = [{**WEATHER_TOOL, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    turn1 = cached_body(tools=tools, tool_choice={"type": "none"})
    turn1["messages"][0]["content"] = [
        {"type": "text", "text": "long question " * 100, "cache_control": {"type": "ephemeral"}}
    ]
    u1 = (await post(client, turn1)).json()["usage"]
    split = u1["cache_creation"]
    assert split["ephemeral_1h_input_tokens"] > 0 and split["ephemeral_5m_input_tokens"] > 1450
    assert u1["cache_creation_input_tokens"] == sum(split.values())
    total1 = u1["input_tokens"] + u1["cache_creation_input_tokens"]

    # turn 2: the breakpoint moves to the new last message; the old prefix is read
    turn2 = orjson.loads(orjson.dumps(turn1))
    del turn2["messages"][0]["content"][0]["cache_control"]
    turn2["messages"] += [
        {"role": "assistant", "content": "An answer."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "follow up", "cache_control": {"type": "ephemeral"}}
            ],
        },
    ]
    u2 = (await post(client, turn2)).json()["usage"]
    assert u2["cache_read_input_tokens"] == total1 - u1["input_tokens"]
    assert (
        u2["cache_creation_input_tokens"] == u2["cache_creation"]["ephemeral_5m_input_tokens"] > 0
    )
    count = (await post(client, turn2, path="/v1/messages/count_tokens")).json()["input_tokens"]
    assert (
        u2["input_tokens"] + u2["cache_read_input_tokens"] + u2["cache_creation_input_tokens"]
        == count
    )

    # top-level cache_control caches the whole prompt
    auto = body("automatic caching " * 50, cache_control={"type": "ephemeral", "ttl": "1h"})
    a1 = (await post(client, auto)).json()["usage"]
    assert a1["cache_creation"]["ephemeral_1h_input_tokens"] == a1["cache_creation_input_tokens"]
    assert a1["input_tokens"] == 0
    a2 = (await post(client, auto)).json()["usage"]
    assert a2["cache_read_input_tokens"] == a1["cache_creation_input_tokens"]


# --------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------


async def test_tool_use_json(client: httpx.AsyncClient) -> None:
    second = {"name": "lookup", "input_schema": {"type": "object", "properties": {}}}
    r = await post(client, body("Weather in Paris?", tools=[WEATHER_TOOL, second]))
    msg = r.json()
    assert msg["stop_reason"] == "tool_use"
    text, call = msg["content"]
    assert text["type"] == "text" and text["text"]
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_01")
    assert call["name"] == "get_weather"
    assert call["input"] == WEATHER_INPUT
    assert msg["usage"]["output_tokens"] > len(text["text"].split())

    forced = body(tools=[WEATHER_TOOL, second], tool_choice={"type": "tool", "name": "lookup"})
    msg = (await post(client, forced)).json()
    assert msg["content"][1]["name"] == "lookup" and msg["content"][1]["input"] == {}

    msg = (await post(client, body(tools=[WEATHER_TOOL], tool_choice={"type": "none"}))).json()
    assert msg["stop_reason"] == "end_turn" and len(msg["content"]) == 1

    after = body(tools=[WEATHER_TOOL])
    after["messages"] += [
        {"role": "assistant", "content": [{**call, "input": WEATHER_INPUT}]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "Sunny 21C"}],
        },
    ]
    msg = (await post(client, after)).json()
    assert msg["stop_reason"] == "end_turn"
    assert [b["type"] for b in msg["content"]] == ["text"]
    assert "Sunny 21C" in msg["content"][0]["text"]


async def test_tool_use_streaming(client: httpx.AsyncClient) -> None:
    plain = (await post(client, body(tools=[WEATHER_TOOL]))).json()
    events = parse_sse((await post(client, body(tools=[WEATHER_TOOL], stream=True))).content)
    starts = [d for n, d in events if n == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1]
    block = starts[1]["content_block"]
    assert block["type"] == "tool_use" and block["input"] == {}
    assert block["id"].startswith("toolu_01") and block["name"] == "get_weather"
    pieces = [
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["index"] == 1
    ]
    assert pieces[0] == "" and len(pieces) > 2
    assert all(
        d["delta"]["type"] == "input_json_delta"
        for n, d in events
        if d.get("index") == 1 and n == "content_block_delta"
    )
    assert orjson.loads("".join(pieces)) == WEATHER_INPUT
    assert streamed_text(events) == plain["content"][0]["text"]
    assert [n for n, _ in events][-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert final_usage(events)["output_tokens"] == plain["usage"]["output_tokens"]


# --------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------


async def test_rate_limit_headers_fall_with_use(client: httpx.AsyncClient) -> None:
    r1 = await post(client, body("reply with 10 words"))
    h = r1.headers
    assert h["anthropic-ratelimit-requests-limit"] == "4000"
    assert h["anthropic-ratelimit-requests-remaining"] == "3999"
    assert h["anthropic-ratelimit-input-tokens-limit"] == "2000000"
    assert h["anthropic-ratelimit-output-tokens-limit"] == "400000"
    assert h["anthropic-ratelimit-tokens-limit"] == "2400000"
    assert h["anthropic-ratelimit-input-tokens-remaining"] == "1999000"  # rounded down
    reset = h["anthropic-ratelimit-requests-reset"]
    assert len(reset) == 20 and reset.endswith(":00Z") and reset[10] == "T"
    for family in ("tokens", "input-tokens", "output-tokens"):
        assert h[f"anthropic-ratelimit-{family}-reset"] == reset
    r2 = await post(client, body("reply with 10 words"))
    assert r2.headers["anthropic-ratelimit-requests-remaining"] == "3998"
    # another credential has its own bucket
    r3 = await post(client, body(), headers={"x-api-key": "other"})
    assert r3.headers["anthropic-ratelimit-requests-remaining"] == "3999"

    r = await client.post(
        "/_fake/limits",
        json={"key": KEY, "input_tokens_limit": 10_000, "remaining": {"input-tokens": 5_500}},
    )
    assert r.json()["ok"] is True
    r = await post(client, body("reply with 10 words"))
    assert r.headers["anthropic-ratelimit-input-tokens-limit"] == "10000"
    assert r.headers["anthropic-ratelimit-input-tokens-remaining"] == "5000"
    assert r.headers["anthropic-ratelimit-tokens-limit"] == "410000"


async def test_rate_limit_429_at_zero(client: httpx.AsyncClient, fake_app: Starlette) -> None:
    await client.post("/_fake/limits", json={"key": KEY, "requests_limit": 2})
    for expected in ("1", "0"):
        r = await post(client, body())
        assert r.status_code == 200
        assert r.headers["anthropic-ratelimit-requests-remaining"] == expected
    r = await post(client, body())
    assert_error(r, 429, "rate_limit_error")
    assert 1 <= int(r.headers["retry-after"]) <= 90
    assert r.headers["x-should-retry"] == "true"
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert (await post(client, body(), headers={"x-api-key": "fresh"})).status_code == 200

    # the window ends: everything refills
    get_state(fake_app).buckets[KEY].reset_at = 0
    r = await post(client, body())
    assert r.status_code == 200
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "1"

    # token families: output tokens that would not fit
    await client.post("/_fake/limits", json={"key": KEY, "remaining": {"output_tokens": 5}})
    assert_error(await post(client, body("reply with 6 words")), 429, "rate_limit_error")
    assert (await post(client, body("reply with 5 words"))).status_code == 200

    # "*" changes the defaults for new credentials
    await client.post("/_fake/limits", json={"key": "*", "tokens_limit": 1000})
    r = await post(client, body(), headers={"x-api-key": "newcomer"})
    assert r.headers["anthropic-ratelimit-tokens-limit"] == "1000"
    r = await client.post("/_fake/limits", json={"key": KEY, "requests_limit": -1})
    assert r.status_code == 400 and r.json()["ok"] is False


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


async def test_rate_limit_fault(client: httpx.AsyncClient) -> None:
    await fault(client, fault="rate_limit", times=1, retry_after=7)
    r = await post(client, body())
    data = assert_error(r, 429, "rate_limit_error")
    assert "rate limit" in data["error"]["message"]
    assert r.headers["retry-after"] == "7"
    assert r.headers["x-should-retry"] == "true"
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert (await post(client, body())).status_code == 200  # times=1 used up


@pytest.mark.parametrize(
    ("kind", "status", "error_type", "message"),
    [
        ("unauthorized", 401, "authentication_error", "invalid x-api-key"),
        ("forbidden", 403, "permission_error", None),
        (
            "no_credit",
            400,
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
            "Billing to upgrade or purchase credits.",
        ),
        ("server_error", 500, "api_error", None),
        ("overloaded", 529, "overloaded_error", "Overloaded"),
    ],
)
async def test_error_faults(
    client: httpx.AsyncClient, kind: str, status: int, error_type: str, message: str | None
) -> None:
    await fault(client, fault=kind, times=2)
    for stream in (False, True):
        r = await post(client, body(stream=stream))
        data = assert_error(r, status, error_type)
        assert r.headers["content-type"] == "application/json"
        if message is not None:
            assert data["error"]["message"] == message
    assert (await post(client, body())).status_code == 200


async def test_fault_scoping_and_control(client: httpx.AsyncClient) -> None:
    await client.post("/_fake/faults", json={"key": "*", "fault": "overloaded"})
    await fault(client, fault="forbidden")
    assert (await post(client, body())).status_code == 403  # own key beats "*"
    assert (await post(client, body(), headers={"x-api-key": "b"})).status_code == 529
    for _ in range(3):  # times: null lasts until cleared
        assert (await post(client, body(), headers={"x-api-key": "c"})).status_code == 529
    # probes are untouched by default
    probe = await post(client, body(), path="/v1/messages/count_tokens")
    assert probe.status_code == 200
    assert (await client.get("/v1/models", headers=AUTH)).status_code == 200
    listed = (await client.get("/_fake/faults")).json()["faults"]
    assert listed[KEY]["fault"] == "forbidden" and listed["*"]["times"] is None

    r = await client.delete("/_fake/faults")
    assert r.json() == {"ok": True}
    assert (await post(client, body())).status_code == 200

    await fault(client, fault="unauthorized", paths="all")
    assert_error(
        await post(client, body(), path="/v1/messages/count_tokens"), 401, "authentication_error"
    )
    assert_error(await client.get("/v1/models", headers=AUTH), 401, "authentication_error")
    assert_error(
        await client.get(f"/v1/models/{MODELS[0].id}", headers=AUTH), 401, "authentication_error"
    )
    await client.delete("/_fake/faults", params={"key": KEY})
    assert (await client.get("/v1/models", headers=AUTH)).status_code == 200

    for bad in (
        {"key": KEY, "fault": "nope"},
        {"fault": "overloaded"},
        {"key": KEY, "fault": "slow", "delay": -1},
        {"key": KEY, "fault": "overloaded", "times": 0},
        {"key": KEY, "fault": "overloaded", "paths": "some"},
    ):
        r = await client.post("/_fake/faults", json=bad)
        assert r.status_code == 400 and r.json()["ok"] is False


async def test_slow_faults(client: httpx.AsyncClient) -> None:
    await fault(client, fault="slow", delay=0.02, times=2)
    t = time.perf_counter()
    assert (await post(client, body())).status_code == 200
    assert time.perf_counter() - t >= 0.02
    t = time.perf_counter()
    r = await post(client, body("reply with 3 words", stream=True))
    assert time.perf_counter() - t >= 0.02 * 3  # before headers + between 3 deltas
    assert streamed_text(parse_sse(r.content)) == "Hello from the"

    await fault(client, fault="slow_stream", delay=0.01, times=1)
    t = time.perf_counter()
    r = await post(client, body("reply with 2 words", stream=True))
    events = parse_sse(r.content)
    assert len(events) == 8
    assert time.perf_counter() - t >= 0.01 * 7  # between every event
    assert events[-1][0] == "message_stop"


async def test_mid_stream_error(client: httpx.AsyncClient) -> None:
    await fault(client, fault="mid_stream_error", times=3)
    r = await post(client, body(stream=True))
    assert r.status_code == 200 and r.headers["content-type"] == SSE_CT
    events = parse_sse(r.content)
    assert [n for n, _ in events] == [*ORDER, "content_block_delta", "error"]
    assert events[-1][1] == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0

    await fault(client, fault="mid_stream_error", after_events=6, times=1)
    events = parse_sse((await post(client, body("reply with 2 words", stream=True))).content)
    names = [n for n, _ in events]
    assert "message_delta" not in names and "message_stop" not in names
    assert names[-1] == "error" and len(names) <= 7

    await fault(client, fault="mid_stream_error", times=1)
    assert_error(await post(client, body()), 529, "overloaded_error")  # not streaming


async def test_hang_and_disconnect_in_process(client: httpx.AsyncClient) -> None:
    await fault(client, fault="hang", times=1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(post(client, body()), 0.05)
    await fault(client, fault="hang", delay=0.01, times=1)
    assert (await post(client, body())).status_code == 200

    await fault(client, fault="disconnect", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, body(stream=True))
    assert (await post(client, body())).status_code == 200


# --------------------------------------------------------------------------------------------
# Other endpoints and the control API
# --------------------------------------------------------------------------------------------


async def test_count_tokens(client: httpx.AsyncClient) -> None:
    payload = body("some text " * 30, system="Be brief.", tools=[WEATHER_TOOL])
    r = await post(client, payload, path="/v1/messages/count_tokens", params={"beta": "true"})
    assert r.status_code == 200
    assert list(r.json()) == ["input_tokens"]
    n = r.json()["input_tokens"]
    assert "anthropic-ratelimit-requests-remaining" in r.headers
    usage = (await post(client, payload)).json()["usage"]
    assert usage["input_tokens"] == n
    no_max = {k: v for k, v in payload.items() if k != "max_tokens"}
    assert (await post(client, no_max, path="/v1/messages/count_tokens")).json()[
        "input_tokens"
    ] == n
    r = await client.post("/v1/messages/count_tokens", json=payload)
    assert_error(r, 401, "authentication_error")
    r = await post(client, {"model": "x"}, path="/v1/messages/count_tokens")
    assert_error(r, 400, "invalid_request_error")


async def test_models(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models", headers=AUTH)
    page = r.json()
    assert list(page) == ["data", "has_more", "first_id", "last_id"]
    ids = [m["id"] for m in page["data"]]
    for required in (
        "claude-opus-4-8",
        "claude-opus-4-7",
        "claude-opus-4-6",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5-20251001",
        "claude-sonnet-5",
        "claude-fable-5",
    ):
        assert required in ids
    assert page["has_more"] is False and (page["first_id"], page["last_id"]) == (ids[0], ids[-1])
    first = page["data"][0]
    assert first["type"] == "model" and first["display_name"] and first["created_at"].endswith("Z")

    p1 = (await client.get("/v1/models", params={"limit": 3}, headers=AUTH)).json()
    assert [m["id"] for m in p1["data"]] == ids[:3] and p1["has_more"] is True
    p2 = (
        await client.get("/v1/models", params={"limit": 3, "after_id": p1["last_id"]}, headers=AUTH)
    ).json()
    assert [m["id"] for m in p2["data"]] == ids[3:6]
    back = (
        await client.get("/v1/models", params={"limit": 2, "before_id": ids[3]}, headers=AUTH)
    ).json()
    assert [m["id"] for m in back["data"]] == ids[1:3] and back["has_more"] is True
    assert_error(await client.get("/v1/models?limit=0", headers=AUTH), 400, "invalid_request_error")

    one = (await client.get("/v1/models/claude-sonnet-5", headers=AUTH)).json()
    assert one["id"] == "claude-sonnet-5" and one["type"] == "model"
    alias = (await client.get("/v1/models/claude-haiku-4-5", headers=AUTH)).json()
    assert alias["id"] == "claude-haiku-4-5-20251001"
    assert_error(await client.get("/v1/models/claude-nope", headers=AUTH), 404, "not_found_error")
    assert_error(await client.get("/v1/models"), 401, "authentication_error")


async def test_stats_requests_and_reset(client: httpx.AsyncClient) -> None:
    headers = {**AUTH, "Anthropic-Beta": "a-1,b-2", "X-Claude-Code-Session-Id": "s1"}
    await post(client, body(), headers=headers, params={"beta": "true"})
    await post(client, body(), headers={"authorization": "Bearer tok-2"})
    await post(client, body(), path="/v1/messages/count_tokens")
    await client.get("/v1/models", headers=AUTH)
    await client.post("/v1/messages", json=body())  # no credential

    stats = (await client.get("/_fake/stats")).json()
    assert stats == {
        "requests": {KEY: 1, "tok-2": 1, "": 1},
        "total": 3,
        "by_path": {"/v1/messages": 3, "/v1/messages/count_tokens": 1, "/v1/models": 1},
    }
    log = (await client.get("/_fake/requests")).json()
    assert len(log) == 5
    first = log[0]
    assert set(first) >= {"method", "path", "query", "headers", "body", "credential"}
    assert first["body_bytes"] == len(orjson.dumps(body()))
    assert (first["method"], first["path"], first["query"]) == ("POST", "/v1/messages", "beta=true")
    assert first["headers"]["anthropic-beta"] == "a-1,b-2"
    assert first["headers"]["x-claude-code-session-id"] == "s1"
    assert first["headers"]["x-api-key"] == KEY
    assert first["body"] == body() and first["credential"] == KEY and first["status"] == 200
    assert log[1]["credential"] == "tok-2" and "x-api-key" not in log[1]["headers"]
    assert log[3]["method"] == "GET" and log[3]["body"] is None
    assert log[4]["credential"] is None and log[4]["status"] == 401
    assert (await client.get("/_fake/requests", params={"limit": 2})).json() == log[-2:]

    for _ in range(205):
        await client.get("/v1/models/claude-fable-5", headers=AUTH)
    assert len((await client.get("/_fake/requests", params={"limit": 1000})).json()) == 200

    await fault(client, fault="overloaded")
    assert (await client.post("/_fake/reset")).json() == {"ok": True}
    assert (await client.get("/_fake/stats")).json() == {"requests": {}, "total": 0, "by_path": {}}
    assert (await client.get("/_fake/requests")).json() == []
    assert (await post(client, body())).status_code == 200


async def test_apps_do_not_share_state() -> None:
    a, b = create_fake_app(), create_fake_app()
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://a") as ca,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=b), base_url="http://b") as cb,
    ):
        await fault(ca, fault="overloaded")
        assert (await post(ca, body())).status_code == 529
        rb = await post(cb, body())
        assert rb.status_code == 200
        ra = await post(ca, body(), headers={"x-api-key": "x"})
        assert ra.headers["anthropic-organization-id"] != rb.headers["anthropic-organization-id"]
        assert (await cb.get("/_fake/stats")).json()["total"] == 1


# --------------------------------------------------------------------------------------------
# A real server (uvicorn, uvloop + httptools): streaming, disconnect, hang
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    config = uvicorn.Config(
        create_fake_app(),
        host="127.0.0.1",
        port=0,
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


def test_live_server_streams_disconnects_and_hangs(live_url: str) -> None:
    with httpx.Client(base_url=live_url, timeout=5) as c:
        c.post("/_fake/reset")
        c.post("/_fake/faults", json={"key": "*", "fault": "slow_stream", "delay": 0.03})
        arrivals: list[float] = []
        buf = b""
        start = time.perf_counter()
        with c.stream(
            "POST", "/v1/messages", json=body("reply with 2 words", stream=True), headers=AUTH
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"] == SSE_CT
            assert r.headers["request-id"].startswith("req_")
            for chunk in r.iter_raw():
                arrivals.append(time.perf_counter() - start)
                buf += chunk
        assert [n for n, _ in parse_sse(buf)][-1] == "message_stop"
        assert len(arrivals) >= 4 and arrivals[0] < arrivals[-1] - 0.1  # really streamed

        c.post("/_fake/faults", json={"key": "*", "fault": "disconnect", "times": 1})
        with pytest.raises(httpx.RemoteProtocolError):
            c.post("/v1/messages", json=body(), headers=AUTH)
        assert c.post("/v1/messages", json=body(), headers=AUTH).status_code == 200

        c.post("/_fake/faults", json={"key": "*", "fault": "hang", "times": 1})
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/messages", json=body(), headers=AUTH, timeout=0.1)
        assert c.post("/v1/messages", json=body(), headers=AUTH).status_code == 200
        assert c.get("/_fake/stats").json()["total"] == 5
