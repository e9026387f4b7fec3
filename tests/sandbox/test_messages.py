"""app.sandbox: Messages replies, JSON and SSE, and tool use."""

from __future__ import annotations

import math

import httpx
import orjson
import pytest

from tests.sandbox.helpers import (
    AUTH,
    GREETING,
    ORDER,
    SSE_CT,
    VERSION,
    WEATHER_INPUT,
    WEATHER_TOOL,
    body,
    final_usage,
    parse_sse,
    post,
    streamed_text,
)

pytestmark = pytest.mark.anyio


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
    r2 = await post(client, body(model="claude-opus-4-8"))
    assert r2.json()["model"] == "claude-opus-4-8"
    assert r2.headers["anthropic-organization-id"] == org
    assert r2.headers["request-id"] != r.headers["request-id"]
    assert r2.json()["id"] != msg["id"]
    # deterministic text and usage
    r3 = await post(client, payload)
    assert r3.json()["content"] == msg["content"] and r3.json()["usage"] == usage


async def test_reply_with_n_words_and_bearer_auth(client: httpx.AsyncClient) -> None:
    bearer = {"authorization": "Bearer sk-ant-oat01-token", "anthropic-version": VERSION}
    r = await post(client, body("Please reply with 3 words"), headers=bearer)
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
