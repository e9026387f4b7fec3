"""The ``openai`` Python SDK against the relay's OpenAI-compatible surface (``<relay>/v1``).

The relay translates Chat Completions to Messages; what reaches the sandbox must be a request
Anthropic accepts (``anthropic-version`` included), billed like any other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest

from tests.clients.conftest import MODEL, MODEL_ID, Pool, wait_for

WEATHER = {
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
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture
def client(pool: Pool) -> Iterator[openai.OpenAI]:
    made = openai.OpenAI(api_key=pool.key, base_url=f"{pool.url}/v1", max_retries=0, timeout=30)
    yield made
    made.close()


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def assert_translated_request(pool: Pool) -> None:
    """The Messages request the relay built: what Anthropic requires, and no customer key."""
    seen = pool.upstream_messages()[-1]
    assert seen["status"] == 200, seen
    assert seen["headers"].get("anthropic-version") == "2023-06-01", seen["headers"]
    assert seen["headers"].get("content-type", "").startswith("application/json")
    assert seen["credential"] in pool.accounts.values()
    assert pool.key not in json.dumps(seen)
    body = seen["body"]
    assert body["model"] == MODEL and body["max_tokens"] > 0 and body["messages"]


def test_chat_completion(pool: Pool, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello from openai"},
        ],
        max_tokens=40,
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == MODEL_ID
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert "Hello from openai" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert_translated_request(pool)
    entries = wait_for(pool.usage_entries, what="the usage debit")
    assert [e["request_id"] for e in entries] == [raw.headers["x-poolrelay-request-id"]]
    assert -micros(entries[0]["amount_usd"]) == micros(raw.headers["x-poolrelay-cost-usd"])


def test_tool_call(pool: Pool, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        max_tokens=100,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    assert_translated_request(pool)
    second = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        max_tokens=100,
    )
    assert second.choices[0].finish_reason == "stop"
    assert_translated_request(pool)


def test_stream_with_usage_in_the_last_chunk(pool: Pool, client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Stream to openai"}],
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Stream to openai" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert_translated_request(pool)
    wait_for(pool.usage_entries, what="the usage debit")
    spent = pool.spent_micros()
    # Haiku 4.5: $1 / $5 per million input / output tokens.
    assert spent == last.usage.prompt_tokens * 1 + last.usage.completion_tokens * 5


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert MODEL_ID in ids
    assert all(m.object == "model" and m.owned_by for m in models.data)
    one = client.models.retrieve(MODEL)
    assert one.object == "model" and one.id == MODEL_ID


def test_wrong_key_is_an_authentication_error(pool: Pool) -> None:
    wrong = openai.OpenAI(
        api_key="sk-pr-" + "x" * 43, base_url=f"{pool.url}/v1", max_retries=2, timeout=30
    )
    with wrong, pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    err = caught.value
    assert err.status_code == 401
    assert set(err.response.json()["error"]) == OPENAI_ERROR_FIELDS, err.response.text
    assert isinstance(err.body, dict) and err.body["message"]
    assert "sk-pr-xxxx" not in err.response.text
    assert pool.fake.stats()["total"] == 0


def test_unknown_model_in_openai_shape(pool: Pool, client: openai.OpenAI) -> None:
    with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as caught:
        client.chat.completions.create(
            model="claude-no-such-model-1", messages=[{"role": "user", "content": "x"}]
        )
    err = caught.value
    assert isinstance(err, openai.APIStatusError)
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_ERROR_FIELDS, body
    assert "claude-no-such-model-1" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("claude-no-such-model-1")
    assert set(missing.value.response.json()["error"]) == OPENAI_ERROR_FIELDS
    assert pool.fake.stats()["total"] == 0
