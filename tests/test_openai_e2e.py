"""The OpenAI-compatible endpoint with the real ``openai`` SDK, billed like /v1/messages."""

from __future__ import annotations

import json
from decimal import Decimal

import openai
import pytest

from billing.pricing import SEED_PRICES, Usage, cost_micros
from tests.harness import FakeUpstream, RelayServer

MODEL = "claude-haiku-4-5"
HAIKU = next(p for p in SEED_PRICES if p.model == MODEL)
UPSTREAM_KEY = "sk-ant-api03-openai-key-0001"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather by city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


@pytest.fixture
def setup(
    relay: RelayServer, fake: FakeUpstream
) -> tuple[RelayServer, FakeUpstream, str, openai.OpenAI]:
    relay.add_account("primary", UPSTREAM_KEY, fake.url)
    customer_id, key = relay.create_customer(balance_usd="10")
    client = openai.OpenAI(api_key=key, base_url=f"{relay.url}/v1", max_retries=0)
    return relay, fake, customer_id, client


def test_chat_completion_json(setup: tuple[RelayServer, FakeUpstream, str, openai.OpenAI]) -> None:
    relay, fake, customer_id, client = setup
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello from openai"},
        ],
        max_tokens=40,
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "claude-haiku-4-5-20251001"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert "Hello from openai" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    cost = micros(raw.headers["x-poolrelay-cost-usd"])
    assert cost == cost_micros(
        Usage(
            input_tokens=completion.usage.prompt_tokens,
            output_tokens=completion.usage.completion_tokens,
        ),
        HAIKU,
    )
    sent = fake.requests(limit=1)[-1]["body"]
    assert sent["system"] == "Be brief."
    assert sent["messages"] == [{"role": "user", "content": "Hello from openai"}]
    debits = [e for e in relay.ledger(customer_id) if e["kind"] == "usage"]
    assert len(debits) == 1 and debits[0]["request_id"] == raw.headers["x-poolrelay-request-id"]


def test_chat_completion_stream_with_usage(
    setup: tuple[RelayServer, FakeUpstream, str, openai.OpenAI],
) -> None:
    relay, _fake, customer_id, client = setup
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream to openai"}],
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Stream to openai" in text
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["stop"] or finish == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    expected = cost_micros(
        Usage(
            input_tokens=usage_chunk.usage.prompt_tokens,
            output_tokens=usage_chunk.usage.completion_tokens,
        ),
        HAIKU,
    )
    debits = [e for e in relay.ledger(customer_id) if e["kind"] == "usage"]
    assert len(debits) == 1 and -micros(debits[0]["amount_usd"]) == expected


def test_tool_call_round_trip(setup: tuple[RelayServer, FakeUpstream, str, openai.OpenAI]) -> None:
    _relay, fake, _customer_id, client = setup
    first = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=100,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    args = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert "city" in args
    second = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        max_tokens=100,
    )
    assert second.choices[0].finish_reason == "stop"
    sent = fake.requests(limit=1)[-1]["body"]
    assert sent["messages"][1]["content"][-1]["type"] == "tool_use"
    assert sent["messages"][2]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": call.id,
        "content": "Sunny, 21 C",
    }


def test_streamed_tool_call(setup: tuple[RelayServer, FakeUpstream, str, openai.OpenAI]) -> None:
    _relay, _fake, _customer_id, client = setup
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=100,
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    assert "city" in json.loads(arguments)
    assert [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ] == ["tool_calls"]


def test_openai_shaped_errors(setup: tuple[RelayServer, FakeUpstream, str, openai.OpenAI]) -> None:
    relay, fake, _customer_id, client = setup
    with pytest.raises(openai.AuthenticationError) as auth:
        openai.OpenAI(
            api_key="sk-pr-" + "x" * 43, base_url=f"{relay.url}/v1", max_retries=0
        ).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert auth.value.status_code == 401
    body = auth.value.body
    assert isinstance(body, dict) and body["type"] == "authentication_error" and body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert isinstance(bad.value.body, dict) and "no-such-model" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], n=2
        )
    assert fake.count(UPSTREAM_KEY) == 0


def test_models_in_openai_shape(
    setup: tuple[RelayServer, FakeUpstream, str, openai.OpenAI],
) -> None:
    _relay, _fake, _customer_id, client = setup
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "claude-haiku-4-5-20251001" in ids
    assert all(m.object == "model" for m in models.data)
