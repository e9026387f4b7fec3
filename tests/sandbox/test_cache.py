"""app.sandbox: the prompt-cache simulation."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.sandbox.helpers import WEATHER_TOOL, auth, body, final_usage, parse_sse, post

pytestmark = pytest.mark.anyio


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
    other = (await post(client, payload, headers=auth("sk-ant-api03-other"))).json()["usage"]
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
