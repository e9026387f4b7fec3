"""The ``anthropic`` Python SDK through the relay to the sandbox, as a customer uses it.

Each client records every HTTP attempt it makes (an httpx event hook), so the tests see the
SDK's own retries as well as what the relay and the sandbox saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import pytest

from tests.clients.conftest import MODEL, MODEL_ID, Pool, wait_for

WEATHER = {
    "name": "get_weather",
    "description": "Weather by city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
WRONG_KEY = "sk-pr-" + "x" * 43


class Client:
    """An SDK client against the relay, and the attempts (retry counts) it made."""

    def __init__(self, pool: Pool, *, key: str | None = None, max_retries: int = 0) -> None:
        self.attempts: list[dict[str, Any]] = []
        self.http = httpx2.Client(event_hooks={"request": [self._record]}, timeout=30)
        self.sdk = anthropic.Anthropic(
            api_key=key or pool.key,
            base_url=pool.url,
            max_retries=max_retries,
            http_client=self.http,
        )

    def _record(self, request: httpx2.Request) -> None:
        self.attempts.append(
            {
                "path": request.url.path,
                "retry_count": request.headers.get("x-stainless-retry-count"),
                "anthropic_version": request.headers.get("anthropic-version"),
            }
        )

    def close(self) -> None:
        self.sdk.close()
        self.http.close()


@pytest.fixture
def client(pool: Pool) -> Iterator[Client]:
    made = Client(pool)
    yield made
    made.close()


def test_create(pool: Pool, client: Client) -> None:
    raw = client.sdk.messages.with_raw_response.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hello from Python"}]
    )
    message = raw.parse()
    assert message.model == MODEL_ID and message.type == "message"
    assert message.content[0].type == "text" and "Hello from Python" in message.content[0].text
    assert message._request_id and message._request_id.startswith("req_")
    entries = wait_for(pool.usage_entries, what="the usage debit")
    assert [e["request_id"] for e in entries] == [raw.headers["x-poolrelay-request-id"]]
    assert entries[0]["amount_usd"] == f"-{raw.headers['x-poolrelay-cost-usd']}"
    assert pool.fake.stats()["total"] == 1
    seen = pool.upstream_messages()[-1]
    assert seen["headers"]["anthropic-version"] == client.attempts[0]["anthropic_version"]
    assert seen["headers"]["x-stainless-lang"] == "python"


def test_stream(pool: Pool, client: Client) -> None:
    with client.sdk.messages.stream(
        model=MODEL, max_tokens=40, messages=[{"role": "user", "content": "Stream from Python"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Stream from Python" in text
    assert final.model == MODEL_ID and final.stop_reason in ("end_turn", "max_tokens")
    wait_for(pool.usage_entries, what="the usage debit")
    assert pool.spent_micros() == final.usage.input_tokens * 1 + final.usage.output_tokens * 5
    assert pool.relay.customer(pool.customer_id)["held_usd"] == "0.000000"


def test_tools(pool: Pool, client: Client) -> None:
    message = client.sdk.messages.create(
        model=MODEL,
        max_tokens=200,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    )
    assert message.stop_reason == "tool_use"
    calls = [b for b in message.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(calls[0].input, dict) and isinstance(calls[0].input["city"], str)
    # ... and the answer to the tool call, in a second turn.
    reply = client.sdk.messages.create(
        model=MODEL,
        max_tokens=64,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": message.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": calls[0].id, "content": "Sunny, 21 C"}
                ],
            },
        ],
    )
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert len(wait_for(lambda: pool.usage_entries()[1:] and pool.usage_entries())) == 2


def test_count_tokens_is_free(pool: Pool, client: Client) -> None:
    counted = client.sdk.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "Count these tokens, please"}]
    )
    assert counted.input_tokens > 0
    rows = wait_for(pool.requests_log, what="the count_tokens row")
    assert [(r["endpoint"], r["cost_usd"]) for r in rows] == [("count_tokens", "0.000000")]
    assert pool.usage_entries() == []


def test_models_list_and_alias(client: Client) -> None:
    ids = [m.id for m in client.sdk.models.list(limit=5)]  # auto-paging
    assert MODEL_ID in ids and len(ids) == len(set(ids)) > 1
    # Contract §4: an alias, as Anthropic accepts it, answered with the model it resolves to.
    model = client.sdk.models.retrieve(MODEL)
    assert model.type == "model" and model.id == MODEL_ID


def test_wrong_key(pool: Pool) -> None:
    wrong = Client(pool, key=WRONG_KEY, max_retries=2)
    try:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            wrong.sdk.messages.create(
                model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        wrong.close()
    err = caught.value
    assert err.status_code == 401 and err.type == "authentication_error"
    assert err.request_id and err.request_id.startswith("req_")
    assert err.response.headers["x-should-retry"] == "false"
    assert WRONG_KEY not in err.response.text
    assert len(wrong.attempts) == 1  # not retried
    assert pool.fake.stats()["total"] == 0


def test_unknown_path_and_model_are_not_found(client: Client) -> None:
    with pytest.raises(anthropic.NotFoundError) as path:
        client.sdk.get("/v1/no-such-endpoint", cast_to=object)
    assert path.value.status_code == 404 and path.value.type == "not_found_error"
    assert path.value.request_id and path.value.request_id.startswith("req_")
    assert path.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(anthropic.NotFoundError) as model:
        client.sdk.models.retrieve("claude-no-such-model-1")
    assert model.value.type == "not_found_error"
    assert model.value.request_id and model.value.request_id.startswith("req_")


def test_bad_body_is_a_bad_request(pool: Pool, client: Client) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.sdk.post(
            "/v1/messages",
            body={"model": MODEL, "messages": [{"role": "user", "content": "no max_tokens"}]},
            cast_to=object,
        )
    err = caught.value
    assert err.status_code == 400 and err.type == "invalid_request_error"
    assert "max_tokens" in (err.api_message or "")
    assert err.request_id and err.request_id.startswith("req_")
    assert err.response.headers["x-should-retry"] == "false"
    assert len(client.attempts) == 1
    assert pool.fake.stats()["total"] == 0


@pytest.mark.parametrize(
    ("fault", "extra", "error", "status"),
    [
        ("overloaded", {}, anthropic.OverloadedError, 529),
        ("rate_limit", {"retry_after": 1}, anthropic.RateLimitError, 429),
    ],
)
def test_sdk_retries_what_is_retryable(
    pool: Pool,
    fault: str,
    extra: dict[str, Any],
    error: type[anthropic.APIStatusError],
    status: int,
) -> None:
    pool.fake.fault("*", fault, **extra)
    retrying = Client(pool, max_retries=2)
    try:
        with pytest.raises(error) as caught:
            retrying.sdk.messages.create(
                model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "retry me"}]
            )
    finally:
        retrying.close()
    err = caught.value
    assert err.status_code == status
    assert err.request_id and err.request_id.startswith("req_")
    assert err.response.headers["x-should-retry"] == "true"
    assert [a["retry_count"] for a in retrying.attempts] == ["0", "1", "2"]
    rows = wait_for(lambda: pool.message_rows()[2:] and pool.message_rows(), what="3 rows")
    assert len(rows) == 3 and all(r["http_status"] == status for r in rows), rows
    assert pool.usage_entries() == []
    assert pool.relay.customer(pool.customer_id)["held_usd"] == "0.000000"
