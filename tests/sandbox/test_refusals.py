"""app.sandbox refuses what Anthropic refuses, with Anthropic's status, type and message.

One test per refusal (status, ``error.type``, message, ``request-id`` = body ``request_id``,
``x-should-retry``), the order of the checks, what must pass (unknown fields, new block types),
and aliases.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from app.sandbox import MODEL_ALIASES, MODELS
from tests.sandbox.helpers import (
    AUTH,
    KEY,
    VERSION,
    assert_error,
    auth,
    body,
    fault,
    parse_sse,
    post,
)

pytestmark = pytest.mark.anyio

HAIKU = "claude-haiku-4-5-20251001"
COUNT = "/v1/messages/count_tokens"
# (method, path, body) of every Anthropic endpoint
ENDPOINTS = [
    ("POST", "/v1/messages", body()),
    ("POST", COUNT, body()),
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{HAIKU}", None),
]
ENDPOINT_IDS = ["messages", "count_tokens", "models", "model"]


async def call(
    client: httpx.AsyncClient, method: str, path: str, payload: Any, headers: dict[str, str]
) -> httpx.Response:
    if method == "GET":
        return await client.get(path, headers=headers)
    return await client.post(path, json=payload, headers=headers)


# --------------------------------------------------------------------------------------------
# Headers: credential, then anthropic-version
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "payload"), ENDPOINTS, ids=ENDPOINT_IDS)
async def test_missing_credential_is_401(
    client: httpx.AsyncClient, method: str, path: str, payload: Any
) -> None:
    for headers in ({"anthropic-version": VERSION}, {"authorization": "Basic abc"}, {}):
        r = await call(client, method, path, payload, headers)
        assert_error(
            r,
            401,
            "authentication_error",
            "x-api-key header is required",
            authenticated=False,
        )


@pytest.mark.parametrize(("method", "path", "payload"), ENDPOINTS, ids=ENDPOINT_IDS)
async def test_malformed_credential_is_401(
    client: httpx.AsyncClient, method: str, path: str, payload: Any
) -> None:
    r = await call(client, method, path, payload, auth("sk-pr-customer-key"))
    assert_error(r, 401, "authentication_error", "invalid x-api-key", authenticated=False)
    bearer = {"authorization": "Bearer not-a-key", "anthropic-version": VERSION}
    r = await call(client, method, path, payload, bearer)
    assert_error(r, 401, "authentication_error", "invalid x-api-key", authenticated=False)


async def test_either_credential_header_is_accepted(client: httpx.AsyncClient) -> None:
    bearer = {"authorization": "Bearer sk-ant-oat01-abc", "anthropic-version": VERSION}
    assert (await post(client, body(), headers=bearer)).status_code == 200
    # x-api-key wins when both are sent
    both = {**AUTH, "authorization": "Bearer not-a-key"}
    assert (await post(client, body(), headers=both)).status_code == 200


async def test_auth_is_checked_before_version_and_body(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages", content=b"{not json")
    assert_error(
        r, 401, "authentication_error", "x-api-key header is required", authenticated=False
    )
    r = await client.post("/v1/messages", json={"nothing": 1}, headers={"x-api-key": "bad"})
    assert_error(r, 401, "authentication_error", "invalid x-api-key", authenticated=False)


@pytest.mark.parametrize(("method", "path", "payload"), ENDPOINTS, ids=ENDPOINT_IDS)
async def test_missing_version_is_400(
    client: httpx.AsyncClient, method: str, path: str, payload: Any
) -> None:
    r = await call(client, method, path, payload, {"x-api-key": KEY})
    assert_error(r, 400, "invalid_request_error", "anthropic-version: header is required")


@pytest.mark.parametrize(("method", "path", "payload"), ENDPOINTS, ids=ENDPOINT_IDS)
async def test_unknown_version_is_400(
    client: httpx.AsyncClient, method: str, path: str, payload: Any
) -> None:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-10-01"}
    r = await call(client, method, path, payload, headers)
    message = 'anthropic-version: "2023-10-01" is not a valid version'
    assert_error(r, 400, "invalid_request_error", message)
    for known in ("2023-01-01", "2023-06-01", "2026-10-21"):
        headers = {"x-api-key": KEY, "anthropic-version": known}
        assert (await call(client, method, path, payload, headers)).status_code == 200


async def test_repeated_version_header_is_not_a_version(client: httpx.AsyncClient) -> None:
    headers = [("x-api-key", KEY), ("anthropic-version", VERSION), ("anthropic-version", VERSION)]
    r = await client.post("/v1/messages", json=body(), headers=headers)
    message = 'anthropic-version: "2023-06-01, 2023-06-01" is not a valid version'
    assert_error(r, 400, "invalid_request_error", message)


async def test_version_is_checked_before_faults_and_body(client: httpx.AsyncClient) -> None:
    await fault(client, fault="overloaded")
    r = await client.post("/v1/messages", content=b"{not json", headers={"x-api-key": KEY})
    assert_error(r, 400, "invalid_request_error", "anthropic-version: header is required")
    assert_error(await post(client, body()), 529, "overloaded_error")
    # every refused request still counts and is logged
    stats = (await client.get("/_fake/stats")).json()
    assert stats["requests"] == {KEY: 2}
    log = (await client.get("/_fake/requests")).json()
    assert [e["status"] for e in log] == [400, 529]


# --------------------------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/messages", COUNT])
async def test_body_over_32_mb_is_413(client: httpx.AsyncClient, path: str) -> None:
    raw = orjson.dumps(body("x" * (32 * 1024 * 1024)))
    r = await client.post(path, content=raw, headers=AUTH)
    data = assert_error(r, 413, "request_too_large")
    assert "maximum allowed number of bytes" in data["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/messages", COUNT])
async def test_invalid_json_is_400(client: httpx.AsyncClient, path: str) -> None:
    for raw in (b"{not json", b"", b'{"model": "x",}'):
        r = await client.post(path, content=raw, headers=AUTH)
        data = assert_error(r, 400, "invalid_request_error")
        assert data["error"]["message"].startswith("The request body is not valid JSON: ")


def _without(name: str) -> dict[str, Any]:
    payload = body()
    del payload[name]
    return payload


def _message(**fields: Any) -> dict[str, Any]:
    return body(messages=[{"role": "user", "content": "hi", **fields}])


def _content(*blocks: Any) -> dict[str, Any]:
    return body(messages=[{"role": "user", "content": list(blocks)}])


# (payload, message) of every 400 a Messages body can get
REFUSED: list[tuple[Any, str]] = [
    ([1, 2], "The request body must be a JSON object."),
    ("text", "The request body must be a JSON object."),
    (_without("model"), "model: Field required"),
    (body(model=5), "model: Input should be a valid string"),
    (body(model=""), "model: Input should be a valid string"),
    (_without("max_tokens"), "max_tokens: Field required"),
    (body(max_tokens="10"), "max_tokens: Input should be a valid integer"),
    (body(max_tokens=1.5), "max_tokens: Input should be a valid integer"),
    (body(max_tokens=True), "max_tokens: Input should be a valid integer"),
    (body(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
    (body(stream="yes"), "stream: Input should be a valid boolean"),
    (_without("messages"), "messages: Field required"),
    (body(messages={"role": "user"}), "messages: Input should be a valid list"),
    (body(messages=[]), "messages: at least one message is required"),
    (body(messages=["hi"]), "messages.0: Input should be a valid dictionary"),
    (body(messages=[{"content": "hi"}]), "messages.0.role: Field required"),
    (_message(role="robot"), "messages.0.role: Input should be 'user' or 'assistant'"),
    (_message(role=["user"]), "messages.0.role: Input should be 'user' or 'assistant'"),
    (body(messages=[{"role": "user"}]), "messages.0.content: Field required"),
    (
        _message(content=5),
        "messages.0.content: Input should be a valid string or a list of content blocks",
    ),
    (_content("hi"), "messages.0.content.0: Input should be a valid dictionary"),
    (_content({"text": "hi"}), "messages.0.content.0.type: Field required"),
    (_content({"type": 5}), "messages.0.content.0.type: Input should be a valid string"),
    (_content({"type": "text"}), "messages.0.content.0.text: Input should be a valid string"),
    (body(system=5), "system: Input should be a valid string or a list of text blocks"),
    (body(system=["be brief"]), "system.0: Input should be a valid dictionary"),
    (body(system=[{"type": "image"}]), "system.0.type: Input should be 'text'"),
    (body(system=[{"type": "text", "text": 1}]), "system.0.text: Input should be a valid string"),
    (body(tools={"name": "x"}), "tools: Input should be a valid list"),
    (body(tools=["get_weather"]), "tools.0: Input should be a valid dictionary"),
    (body(tool_choice="auto"), "tool_choice: Input should be a valid dictionary"),
    (body(tool_choice={"name": "x"}), "tool_choice.type: Field required"),
    (body(tool_choice={"type": "tool"}), "tool_choice.tool.name: Field required"),
    (body(temperature="hot"), "temperature: Input should be a valid number"),
    (body(temperature=True), "temperature: Input should be a valid number"),
    (body(top_p="0.9"), "top_p: Input should be a valid number"),
    (body(top_k=1.5), "top_k: Input should be a valid integer"),
    (body(metadata="u_1"), "metadata: Input should be a valid dictionary"),
    (body(metadata={"user_id": 5}), "metadata.user_id: Input should be a valid string"),
    (body(stop_sequences="END"), "stop_sequences: Input should be a valid list of strings"),
    (body(stop_sequences=["END", 1]), "stop_sequences: Input should be a valid list of strings"),
    (body(thinking="on"), "thinking: Input should be a valid dictionary"),
    (body(thinking={"budget_tokens": 2000}), "thinking.type: Field required"),
    (
        body(thinking={"type": "enabled", "budget_tokens": "2000"}),
        "thinking.enabled.budget_tokens: Input should be a valid integer",
    ),
    (
        body(thinking={"type": "enabled", "budget_tokens": 512}),
        "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024",
    ),
    (
        body(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 2048}),
        "`max_tokens` must be greater than `thinking.budget_tokens`",
    ),
]


@pytest.mark.parametrize(("payload", "message"), REFUSED, ids=[m for _, m in REFUSED])
async def test_invalid_messages_body_is_400(
    client: httpx.AsyncClient, payload: Any, message: str
) -> None:
    assert_error(await post(client, payload), 400, "invalid_request_error", message)
    if isinstance(payload, dict):  # refused as a stream too, as JSON and before any byte
        streamed = {**payload, "stream": True} if "stream" not in payload else payload
        assert_error(await post(client, streamed), 400, "invalid_request_error", message)


COUNT_REFUSED = [
    (p, m) for p, m in REFUSED if not m.startswith(("max_tokens", "stream", "`max_tokens`"))
]


@pytest.mark.parametrize(("payload", "message"), COUNT_REFUSED, ids=[m for _, m in COUNT_REFUSED])
async def test_invalid_count_tokens_body_is_400(
    client: httpx.AsyncClient, payload: Any, message: str
) -> None:
    assert_error(await post(client, payload, path=COUNT), 400, "invalid_request_error", message)


@pytest.mark.parametrize("path", ["/v1/messages", COUNT])
async def test_unknown_model_is_404(client: httpx.AsyncClient, path: str) -> None:
    r = await post(client, body(model="claude-nope-9"), path=path)
    assert_error(r, 404, "not_found_error", "model: claude-nope-9")


async def test_max_tokens_above_the_models_is_400(client: httpx.AsyncClient) -> None:
    message = (
        "max_tokens: 100000 > 64000, which is the maximum allowed number of output tokens for "
        "claude-haiku-4-5-20251001"
    )
    for model in ("claude-haiku-4-5", HAIKU):
        r = await post(client, body(model=model, max_tokens=100_000))
        assert_error(r, 400, "invalid_request_error", message)
    r = await post(client, body(model="claude-opus-4-8", max_tokens=128_001))
    assert "128001 > 128000" in assert_error(r, 400, "invalid_request_error")["error"]["message"]
    # the model's maximum itself is fine
    assert (await post(client, body(model=HAIKU, max_tokens=64_000))).status_code == 200
    # count_tokens has no max_tokens to check
    assert (await post(client, body(max_tokens=10**9), path=COUNT)).status_code == 200


# --------------------------------------------------------------------------------------------
# What passes
# --------------------------------------------------------------------------------------------


async def test_unknown_fields_and_block_types_pass(client: httpx.AsyncClient) -> None:
    payload = body(
        some_field_from_2027={"anything": [1, 2]},
        container="container_011",
        context_management={"edits": []},
        output_config={"effort": "low"},
        service_tier="auto",
        speed="fast",
        thinking={"type": "adaptive", "display": "omitted"},
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        metadata={"user_id": "u_7f3a", "future": 1},
    )
    payload["messages"] = [
        {"role": "user", "content": [{"type": "text", "text": "hi", "citations": None}], "x": 1},
        {"role": "assistant", "content": [{"type": "future_block", "data": {"k": "v"}}]},
        {"role": "system", "content": "a mid-conversation system message"},
        {"role": "user", "content": [{"type": "search_result", "source": "s", "title": "t"}]},
    ]
    r = await post(client, payload)
    assert r.status_code == 200, r.text
    assert r.headers["request-id"].startswith("req_")
    assert (await post(client, payload, path=COUNT)).status_code == 200
    streamed = await post(client, {**payload, "stream": True})
    assert parse_sse(streamed.content)[-1][0] == "message_stop"


async def test_null_optional_fields_pass(client: httpx.AsyncClient) -> None:
    nulls = {
        k: None
        for k in (
            "system",
            "stream",
            "tools",
            "tool_choice",
            "temperature",
            "top_p",
            "top_k",
            "metadata",
            "stop_sequences",
            "thinking",
        )
    }
    r = await post(client, body(**nulls))
    assert r.status_code == 200, r.text
    ok = body(
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        temperature=1,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": None},
        stop_sequences=[],
        thinking={"type": "enabled", "budget_tokens": 1024},
        max_tokens=1025,
    )
    assert (await post(client, ok)).status_code == 200


# --------------------------------------------------------------------------------------------
# Aliases, ids and headers on every answer
# --------------------------------------------------------------------------------------------


async def test_aliases_resolve_to_their_newest_dated_id(client: httpx.AsyncClient) -> None:
    by_id = {m.id: m for m in MODELS}
    for alias, dated in MODEL_ALIASES.items():
        assert dated in by_id, alias
        family = [m for m in MODELS if m.display_name == by_id[dated].display_name]
        assert max(family, key=lambda m: m.created_at).id == dated
        one = await client.get(f"/v1/models/{alias}", headers=AUTH)
        assert one.status_code == 200
        assert one.json() == by_id[dated].to_json()
    one = (await client.get("/v1/models/claude-haiku-4-5", headers=AUTH)).json()
    assert one["id"] == HAIKU and one["max_tokens"] == 64_000
    r = await client.get("/v1/models/claude-nope", headers=AUTH)
    assert_error(r, 404, "not_found_error", "model: claude-nope")


async def test_messages_answer_an_alias_with_the_dated_id(client: httpx.AsyncClient) -> None:
    assert (await post(client, body(model="claude-haiku-4-5"))).json()["model"] == HAIKU
    events = parse_sse((await post(client, body(model="claude-haiku-4-5", stream=True))).content)
    assert events[0][1]["message"]["model"] == HAIKU
    # an undated id is its own name
    assert (await post(client, body(model="claude-sonnet-5"))).json()["model"] == "claude-sonnet-5"


@pytest.mark.parametrize(("method", "path", "payload"), ENDPOINTS, ids=ENDPOINT_IDS)
async def test_every_success_carries_a_request_id(
    client: httpx.AsyncClient, method: str, path: str, payload: Any
) -> None:
    r = await call(client, method, path, payload, AUTH)
    assert r.status_code == 200
    assert r.headers["request-id"].startswith("req_")
    assert "x-should-retry" not in r.headers


async def test_unknown_paths_are_404_with_request_id(client: httpx.AsyncClient) -> None:
    for r in (
        await client.get("/v1/nothing-here", headers=AUTH),
        await client.post("/v2/messages", headers=AUTH),
        await client.get("/"),
    ):
        data = assert_error(r, 404, "not_found_error", authenticated=False)
        assert data["error"]["message"] == "Not Found"
    r = await client.get("/v1/messages", headers=AUTH)
    assert_error(r, 405, "invalid_request_error", "Method Not Allowed", authenticated=False)


@pytest.mark.parametrize(
    ("status", "retry"),
    [
        (400, "false"),
        (403, "false"),
        (404, "false"),
        (408, "true"),
        (409, "true"),
        (413, "false"),
        (429, "true"),
        (500, "true"),
        (503, "true"),
        (529, "true"),
    ],
)
async def test_x_should_retry_follows_the_status(
    client: httpx.AsyncClient, status: int, retry: str
) -> None:
    await fault(client, fault="error", status=status, error_type="some_error", message="m")
    r = await post(client, body())
    assert_error(r, status, "some_error", "m")
    assert r.headers["x-should-retry"] == retry


async def test_added_models_are_served_until_reset(client: httpx.AsyncClient) -> None:
    r = await client.post("/_fake/models", json={"id": "claude-test-9-20990101", "max_tokens": 99})
    assert r.status_code == 200 and r.json()["ok"] is True
    listed = (await client.get("/v1/models", headers=AUTH)).json()
    assert listed["first_id"] == "claude-test-9-20990101"
    reply = (await post(client, body(model="claude-test-9-20990101", max_tokens=99))).json()
    assert reply["model"] == "claude-test-9-20990101"
    r = await post(client, body(model="claude-test-9-20990101", max_tokens=100))
    assert_error(r, 400, "invalid_request_error")
    for bad in ({}, {"id": 5}, {"id": "a/b"}, {"id": "m", "max_tokens": 0}):
        r = await client.post("/_fake/models", json=bad)
        assert r.status_code == 400 and r.json()["ok"] is False
    await client.post("/_fake/reset")
    r = await post(client, body(model="claude-test-9-20990101"))
    assert_error(r, 404, "not_found_error", "model: claude-test-9-20990101")
