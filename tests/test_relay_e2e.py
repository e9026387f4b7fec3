"""End to end with the real ``anthropic`` SDK: relay → fake upstream, and what crosses the wire."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.harness import FakeUpstream, RelayServer

MODEL = "claude-haiku-4-5"
UPSTREAM_KEY = "sk-ant-api03-upstream-key-0001"


@pytest.fixture
def setup(relay: RelayServer, fake: FakeUpstream) -> tuple[RelayServer, FakeUpstream, str, str]:
    relay.add_account("primary", UPSTREAM_KEY, fake.url)
    customer_id, key = relay.create_customer(balance_usd="10")
    return relay, fake, customer_id, key


def client(relay: RelayServer, key: str, **kwargs: object) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=relay.url, max_retries=0, **kwargs)  # type: ignore[arg-type]


def test_create_json_through_the_sdk(setup: tuple[RelayServer, FakeUpstream, str, str]) -> None:
    relay, fake, customer_id, key = setup
    raw = client(relay, key).messages.with_raw_response.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hello relay"}]
    )
    message = raw.parse()
    assert message.type == "message"
    assert message.model == "claude-haiku-4-5-20251001"
    assert "Hello relay" in message.content[0].text  # type: ignore[union-attr]
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    request_id = raw.headers["x-poolrelay-request-id"]
    cost = raw.headers["x-poolrelay-cost-usd"]
    expected = (
        message.usage.input_tokens * 1 + message.usage.output_tokens * 5
    ) / 1  # µUSD at $1/$5
    assert cost == f"{expected / 1e6:.6f}"
    assert raw.headers["request-id"].startswith("req_")
    ledger = relay.ledger(customer_id)
    usage = [e for e in ledger if e["kind"] == "usage"]
    assert len(usage) == 1 and usage[0]["request_id"] == request_id
    assert usage[0]["amount_usd"] == f"-{cost}"
    assert fake.count(UPSTREAM_KEY) == 1


def test_stream_through_the_sdk(setup: tuple[RelayServer, FakeUpstream, str, str]) -> None:
    relay, _fake, customer_id, key = setup
    with client(relay, key).messages.stream(
        model=MODEL, max_tokens=30, messages=[{"role": "user", "content": "Stream please"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Stream please" in text
    assert final.stop_reason in ("end_turn", "max_tokens")
    customer = relay.customer(customer_id)
    spent = 10_000_000 - int(customer["balance_usd"].replace(".", ""))
    assert spent == final.usage.input_tokens * 1 + final.usage.output_tokens * 5
    assert customer["held_usd"] == "0.000000"


def test_count_tokens_and_models(setup: tuple[RelayServer, FakeUpstream, str, str]) -> None:
    relay, _fake, customer_id, key = setup
    sdk = client(relay, key)
    counted = sdk.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "count me"}]
    )
    assert counted.input_tokens > 0
    models = sdk.models.list()
    ids = [m.id for m in models.data]
    assert "claude-haiku-4-5-20251001" in ids
    one = sdk.models.retrieve("claude-haiku-4-5-20251001")
    assert one.id == "claude-haiku-4-5-20251001"
    with pytest.raises(anthropic.NotFoundError):
        sdk.models.retrieve("claude-nonexistent-1")
    # count_tokens is free
    assert [e["kind"] for e in relay.ledger(customer_id)] == ["topup"]


def test_header_policy(setup: tuple[RelayServer, FakeUpstream, str, str]) -> None:
    relay, fake, _customer_id, key = setup
    response = httpx.post(
        f"{relay.url}/v1/messages?beta=true",
        headers={
            "authorization": f"Bearer {key}",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "interleaved-thinking-2025-05-14,oauth-2025-04-20",
            "x-stainless-lang": "python",
            "x-stainless-retry-count": "0",
            "x-claude-code-session-id": "sess-123",
            "x-app": "cli",
            "user-agent": "claude-cli/2.1.0 (external, cli)",
            "cookie": "session=secret",
        },
        json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 200
    seen = fake.requests(limit=1)[-1]
    headers = seen["headers"]
    assert seen["query"] in ("beta=true", "?beta=true")
    assert headers["x-api-key"] == UPSTREAM_KEY
    assert "authorization" not in headers
    assert "cookie" not in headers
    assert key not in str(seen)
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert headers["x-stainless-lang"] == "python"
    assert headers["x-claude-code-session-id"] == "sess-123"
    assert headers["x-app"] == "cli"
    assert headers["user-agent"].startswith("claude-cli/")
    # response side: pool headers stripped, ids added, upstream request-id kept
    assert "anthropic-organization-id" not in response.headers
    assert not [h for h in response.headers if h.startswith("anthropic-ratelimit-")]
    assert response.headers["request-id"].startswith("req_")
    assert response.headers["x-poolrelay-request-id"].startswith("req_")


def test_body_is_forwarded_unedited(setup: tuple[RelayServer, FakeUpstream, str, str]) -> None:
    relay, fake, _customer_id, key = setup
    raw = (
        b'{"model": "claude-haiku-4-5",  "max_tokens": 8, "metadata": {"user_id": "u1"},'
        b' "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],'
        b' "messages": [{"role": "user", "content": "hi \\u00e9"}]}'
    )
    response = httpx.post(
        f"{relay.url}/v1/messages",
        headers={
            "x-api-key": key,
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
        },
        content=raw,
        timeout=30,
    )
    assert response.status_code == 200
    import orjson

    assert fake.requests(limit=1)[-1]["body"] == orjson.loads(raw)


def test_probes_need_no_auth(relay: RelayServer) -> None:
    for path in ("/", "/api/hello"):
        assert httpx.head(f"{relay.url}{path}").status_code == 200
    assert httpx.get(f"{relay.url}/").status_code == 200


@pytest.mark.parametrize(
    ("headers", "body", "status", "error_type"),
    [
        (
            {},
            b'{"model":"claude-haiku-4-5","max_tokens":5,"messages":[]}',
            401,
            "authentication_error",
        ),
        (
            {"x-api-key": "sk-pr-not-a-real-key-000000000000000000000000000"},
            b"{}",
            401,
            "authentication_error",
        ),
        ({"x-api-key": "KEY"}, b"{not json", 400, "invalid_request_error"),
        ({"x-api-key": "KEY"}, b"[]", 400, "invalid_request_error"),
        ({"x-api-key": "KEY"}, b'{"max_tokens":5,"messages":[]}', 400, "invalid_request_error"),
        (
            {"x-api-key": "KEY"},
            b'{"model":"claude-haiku-4-5","messages":[]}',
            400,
            "invalid_request_error",
        ),
        (
            {"x-api-key": "KEY"},
            b'{"model":"claude-haiku-4-5","max_tokens":5}',
            400,
            "invalid_request_error",
        ),
        (
            {"x-api-key": "KEY"},
            b'{"model":"claude-haiku-4-5","max_tokens":0,"messages":[]}',
            400,
            "invalid_request_error",
        ),
        (
            {"x-api-key": "KEY"},
            b'{"model":"gpt-4o","max_tokens":5,"messages":[]}',
            400,
            "invalid_request_error",
        ),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    setup: tuple[RelayServer, FakeUpstream, str, str],
    headers: dict[str, str],
    body: bytes,
    status: int,
    error_type: str,
) -> None:
    relay, fake, customer_id, key = setup
    headers = {k: (key if v == "KEY" else v) for k, v in headers.items()}
    before = relay.customer(customer_id)
    response = httpx.post(f"{relay.url}/v1/messages", headers=headers, content=body, timeout=30)
    assert response.status_code == status
    data = response.json()
    assert data["type"] == "error" and data["error"]["type"] == error_type
    assert data["error"]["message"]
    assert relay.customer(customer_id) == before
    assert fake.count(UPSTREAM_KEY) == 0


def test_sdk_raises_the_right_exceptions(setup: tuple[RelayServer, FakeUpstream, str, str]) -> None:
    relay, _fake, _customer_id, key = setup
    with pytest.raises(anthropic.AuthenticationError):
        client(relay, "sk-pr-" + "x" * 43).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(anthropic.BadRequestError) as info:
        client(relay, key).messages.create(
            model="unknown-model", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert "unknown-model" in str(info.value)


def test_oversize_body_is_413(settings_env: dict[str, str], fake: FakeUpstream) -> None:
    from tests.harness import test_settings

    relay = RelayServer.start(test_settings(settings_env, max_body_bytes=2048))
    try:
        relay.add_account("primary", UPSTREAM_KEY, fake.url)
        _customer_id, key = relay.create_customer()
        big = {
            "model": MODEL,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x" * 5000}],
        }
        response = httpx.post(
            f"{relay.url}/v1/messages",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            json=big,
            timeout=30,
        )
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "request_too_large"
        # also when the body is sent without a content-length (chunked)
        payload = httpx.Request("POST", "/", json=big).content

        def chunks() -> object:
            yield payload

        response = httpx.post(
            f"{relay.url}/v1/messages",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            content=chunks(),
            timeout=30,  # type: ignore[arg-type]
        )
        assert response.status_code == 413
        assert fake.count(UPSTREAM_KEY) == 0
    finally:
        relay.stop()


def test_restart_keeps_everything(settings_env: dict[str, str], fake: FakeUpstream) -> None:
    from tests.harness import test_settings

    relay = RelayServer.start(test_settings(settings_env))
    relay.add_account("primary", UPSTREAM_KEY, fake.url)
    customer_id, key = relay.create_customer(balance_usd="3")
    client(relay, key).messages.create(
        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
    )
    before = relay.customer(customer_id)
    relay.stop()
    relay = RelayServer.start(test_settings(settings_env))
    try:
        assert relay.customer(customer_id) == before
        message = client(relay, key).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "again"}]
        )
        assert message.content
        assert len(relay.ledger(customer_id)) == 3
    finally:
        relay.stop()


RECORDED = (
    b"event: message_start\r\n"
    b'data: {"type": "message_start", "message": {"id": "msg_rec", "type": "message", "role": "assistant",'
    b' "model": "claude-haiku-4-5-20251001", "content": [], "stop_reason": null, "stop_sequence": null,'
    b' "usage": {"input_tokens": 706, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,'
    b' "output_tokens": 1}}}\r\n\r\n'
    b": a comment line\r\n\r\n"
    b"event: content_block_start\r\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\r\n\r\n'
    b'event: ping\r\ndata: {"type": "ping"}\r\n\r\n'
    b"event: content_block_delta\r\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Caf\xc3\xa9 \\u00e9"}}\r\n\r\n'
    b'event: future_event\r\ndata: {"type":"future_event","x":1}\r\n\r\n'
    b'event: content_block_stop\r\ndata: {"type":"content_block_stop","index":0}\r\n\r\n'
    b"event: message_delta\r\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":13}}\r\n\r\n'
    b'event: message_stop\r\ndata: {"type":"message_stop"}\r\n\r\n'
)


def recorded_upstream() -> object:
    """An upstream that replays a recording in awkward chunks (split mid-line, mid-UTF-8)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def messages(request: Request) -> StreamingResponse:
        async def chunks() -> object:
            for i in range(0, len(RECORDED), 37):
                yield RECORDED[i : i + 37]

        return StreamingResponse(
            chunks(),  # type: ignore[arg-type]
            media_type="text/event-stream; charset=utf-8",
            headers={"request-id": "req_recorded", "anthropic-organization-id": "org-x"},
        )

    return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])])


def test_raw_sse_through_the_relay_equals_the_upstream_bytes(relay: RelayServer) -> None:
    from tests.harness import ThreadServer

    upstream = ThreadServer(recorded_upstream())
    upstream.start_thread()
    try:
        relay.add_account("recorded", UPSTREAM_KEY, upstream.url)
        customer_id, key = relay.create_customer(balance_usd="1")
        with httpx.stream(
            "POST",
            f"{relay.url}/v1/messages",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            json={"model": MODEL, "max_tokens": 100, "stream": True, "messages": []},
            timeout=30,
        ) as response:
            relayed = b"".join(response.iter_raw())
            headers = response.headers
        assert relayed == RECORDED
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["request-id"] == "req_recorded"
        assert "anthropic-organization-id" not in headers
        # billed from message_start overwritten by the last message_delta: 706 in, 13 out
        debit = next(e for e in relay.ledger(customer_id) if e["kind"] == "usage")
        assert debit["amount_usd"] == "-0.000771"
    finally:
        upstream.stop()


def test_upstream_cookies_are_never_replayed(relay: RelayServer) -> None:
    """A cookie one upstream answer sets must not ride along on later requests."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests.harness import ThreadServer

    seen: list[str | None] = []

    async def messages(request: Request) -> JSONResponse:
        seen.append(request.headers.get("cookie"))
        response = JSONResponse(
            {
                "id": "msg_c",
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [{"type": "text", "text": "ok"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1},
            }
        )
        response.set_cookie("upstream_session", "secret-of-account-a")
        return response

    upstream = ThreadServer(Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])]))
    upstream.start_thread()
    try:
        relay.add_account("cookie-setter", UPSTREAM_KEY, upstream.url)
        _customer, key = relay.create_customer()
        for _ in range(3):
            r = httpx.post(
                f"{relay.url}/v1/messages",
                headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                json={
                    "model": MODEL,
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "x"}],
                },
            )
            assert r.status_code == 200
        assert seen == [None, None, None]
    finally:
        upstream.stop()
