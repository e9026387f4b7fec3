"""What the relay answers itself is what Anthropic would answer (contract §4, §5, §8): request ids
and ``x-should-retry`` on every response it makes, ``anthropic-version`` on every request it
builds, model aliases, OpenAI-shaped errors for OpenAI clients, CORS for opted-in browsers, and
one request-log row for every authenticated request."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import orjson
import pytest

from tests.harness import FakeUpstream, RelayServer

CRED_A = "sk-ant-api03-faithful-a"
CRED_B = "sk-ant-api03-faithful-b"
V = {"anthropic-version": "2023-06-01"}
BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.fixture
def pool(relay: RelayServer, fake: FakeUpstream) -> tuple[RelayServer, FakeUpstream, str]:
    relay.add_account("a", CRED_A, fake.url)
    _, key = relay.create_customer(balance_usd="5")
    return relay, fake, key


def _client(relay: RelayServer, key: str | None, **headers: str) -> httpx.Client:
    base = {**V, **headers}
    if key is not None:
        base["x-api-key"] = key
    return httpx.Client(base_url=relay.url, headers=base, timeout=30)


def _assert_relay_error(response: httpx.Response, status: int, retry: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    request_id = response.headers["request-id"]
    assert request_id.startswith("req_")
    assert response.headers["x-poolrelay-request-id"] == request_id
    assert body["request_id"] == request_id
    assert response.headers["x-should-retry"] == retry
    return body


def _declared_too_big(relay: RelayServer, key: str) -> httpx.Response:
    """A request declaring a body over the limit (answered before the body is read)."""
    declared = relay.settings.max_body_bytes + 1
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {declared}\r\n\r\n".encode()
        )
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, content = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=content)


def requests_log(relay: RelayServer, **params: Any) -> list[dict[str, Any]]:
    with relay.admin() as admin:
        items: list[dict[str, Any]] = (
            admin.get("/admin/requests", params={"limit": 100, **params})
            .raise_for_status()
            .json()["items"]
        )
        return items


# --- request ids and x-should-retry --------------------------------------------------------


def test_errors_the_relay_makes_carry_request_ids_and_should_retry(
    pool: tuple[RelayServer, FakeUpstream, str],
) -> None:
    relay, _fake, key = pool
    with _client(relay, "sk-pr-wrong-key-000000000000000000000000000000") as c:
        body = _assert_relay_error(c.post("/v1/messages", json=BODY), 401, "false")
        assert body["error"]["type"] == "authentication_error"
    with _client(relay, key) as c:
        body = _assert_relay_error(c.post("/v1/messages", content=b"{nope"), 400, "false")
        assert body["error"]["type"] == "invalid_request_error"
        _assert_relay_error(c.get("/v1/nothing-here"), 404, "false")
        _assert_relay_error(
            c.post("/v1/messages", json={**BODY, "model": "no-such-model"}), 400, "false"
        )
        _assert_relay_error(_declared_too_big(relay, key), 413, "false")
        # /v1/me is the relay's own answer too
        me = c.get("/v1/me")
        assert me.status_code == 200
        assert me.headers["request-id"] == me.headers["x-poolrelay-request-id"]


def test_credit_too_low_and_overloaded(pool: tuple[RelayServer, FakeUpstream, str]) -> None:
    relay, fake, _key = pool
    _, poor = relay.create_customer(balance_usd="0.000001", name="poor")
    with _client(relay, poor) as c:
        body = _assert_relay_error(c.post("/v1/messages", json=BODY), 400, "false")
        assert "credit balance is too low" in body["error"]["message"]
    fake.fault(CRED_A, "overloaded")
    _, rich = relay.create_customer(balance_usd="5", name="rich")
    with _client(relay, rich) as c:
        body = _assert_relay_error(c.post("/v1/messages", json=BODY), 529, "true")
        assert body["error"]["type"] == "overloaded_error"


# --- requests the relay builds -------------------------------------------------------------


def test_openai_translation_sends_what_anthropic_requires(
    pool: tuple[RelayServer, FakeUpstream, str],
) -> None:
    relay, fake, key = pool
    response = httpx.post(
        f"{relay.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}", "user-agent": "OpenAI/Python 1.0"},
        json={"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    sent = [r for r in fake.requests() if r["path"] == "/v1/messages"][-1]
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["headers"]["content-type"] == "application/json"
    assert sent["headers"]["x-api-key"] == CRED_A
    assert "authorization" not in sent["headers"]


# --- models --------------------------------------------------------------------------------


def test_model_by_alias_and_openai_shaped_not_found(
    pool: tuple[RelayServer, FakeUpstream, str],
) -> None:
    relay, _fake, key = pool
    with _client(relay, key) as c:
        found = c.get("/v1/models/claude-haiku-4-5")
        assert found.status_code == 200, found.text
        assert found.json()["id"].startswith("claude-haiku-4-5-")
        assert found.headers["request-id"] == found.headers["x-poolrelay-request-id"]
        _assert_relay_error(c.get("/v1/models/claude-nope-9"), 404, "false")
    openai_headers = {"authorization": f"Bearer {key}", "user-agent": "OpenAI/Python 1.0"}
    missing = httpx.get(f"{relay.url}/v1/models/claude-nope-9", headers=openai_headers)
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "model_not_found"
    assert missing.headers["x-should-retry"] == "false"
    wrong = httpx.get(f"{relay.url}/v1/models", headers={"authorization": "Bearer sk-pr-bad"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"


# --- CORS ----------------------------------------------------------------------------------


def test_cors_as_anthropic_answers_browsers(pool: tuple[RelayServer, FakeUpstream, str]) -> None:
    relay, _fake, key = pool
    origin = {"origin": "https://app.example"}
    pre = httpx.options(
        f"{relay.url}/v1/messages",
        headers={
            **origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-api-key,anthropic-version,content-type",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "*"
    assert "x-api-key" in pre.headers["access-control-allow-headers"]
    with _client(relay, key, **origin) as c:
        refused = c.post("/v1/messages", json=BODY)
        body = _assert_relay_error(refused, 401, "false")
        assert "anthropic-dangerous-direct-browser-access" in body["error"]["message"]
        assert "access-control-allow-origin" not in refused.headers
        allowed = c.post(
            "/v1/messages",
            json=BODY,
            headers={"anthropic-dangerous-direct-browser-access": "true"},
        )
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == "*"
        assert allowed.headers["access-control-expose-headers"] == "*"
    with relay.admin() as admin:
        answer = admin.get("/admin/accounts", headers=origin)
        assert "access-control-allow-origin" not in answer.headers
        assert admin.options("/admin/accounts", headers=origin).status_code != 200


# --- the request log -----------------------------------------------------------------------


def test_every_authenticated_request_has_a_log_row(
    pool: tuple[RelayServer, FakeUpstream, str],
) -> None:
    relay, fake, key = pool
    relay.add_account("b", CRED_B, fake.url)
    with _client(relay, key) as c:
        refused = c.post("/v1/messages", json={**BODY, "model": "no-such-model"})
        counted = c.post(
            "/v1/messages/count_tokens",
            json={"model": BODY["model"], "messages": BODY["messages"]},
        )
        assert counted.status_code == 200, counted.text
        # one account fails: the request fails over to the other
        fake.fault(CRED_A, "server_error", times=1)
        fake.fault(CRED_B, "server_error", times=1)
        failed = c.post("/v1/messages", json=BODY)
        fake.clear_faults()
    assert failed.status_code >= 500
    rows = {r["id"]: r for r in requests_log(relay)}
    row = rows[refused.headers["x-poolrelay-request-id"]]
    assert row["status"] == "refused"
    assert row["http_status"] == 400
    assert "no-such-model" in row["error"]
    assert row["requested_model"] == "no-such-model"
    assert row["cost_usd"] == "0.000000"

    row = rows[counted.headers["x-poolrelay-request-id"]]
    assert row["endpoint"] == "count_tokens"
    assert row["status"] == "ok"
    assert row["cost_usd"] == "0.000000"
    assert row["account_id"] is not None
    assert row["attempts"] == 1

    row = rows[failed.headers["x-poolrelay-request-id"]]
    assert row["status"] == "failed"
    assert row["attempts"] == 2
    assert len(row["accounts_tried"]) == 2
    assert len(set(row["accounts_tried"])) == 2
    assert row["account_id"] == row["accounts_tried"][-1]


def test_unauthenticated_requests_leave_no_row(
    pool: tuple[RelayServer, FakeUpstream, str],
) -> None:
    relay, _fake, _key = pool
    before = len(requests_log(relay))
    httpx.post(f"{relay.url}/v1/messages", headers=V, json=BODY)
    assert len(requests_log(relay)) == before


# --- outages -------------------------------------------------------------------------------


def test_an_unreachable_dependency_is_a_retryable_overload_not_a_bare_500(
    pool: tuple[RelayServer, FakeUpstream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.exceptions
    import sqlalchemy.exc

    from app.errors import to_api_error

    relay, _fake, key = pool
    for exc in (
        redis.exceptions.ConnectionError("Connection refused"),
        sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError()),
    ):

        async def down(exc: Exception = exc) -> Any:
            raise exc

        monkeypatch.setattr(relay.services.prices, "get", down)
        with _client(relay, key) as c:
            body = _assert_relay_error(c.post("/v1/messages", json=BODY), 529, "true")
        assert body["error"]["type"] == "overloaded_error"
        assert "retry" in body["error"]["message"].lower()
    # a statement the database refused on its merits is not an outage
    refused = sqlalchemy.exc.IntegrityError("INSERT", {}, ValueError("duplicate"))
    assert to_api_error(refused).status == 500


# --- sessions ------------------------------------------------------------------------------


def test_session_id_from_header_or_claude_codes_user_id() -> None:
    from pool.affinity import session_id

    sid = "2f1c4a8e-0d5b-4f7e-9a41-6c2b8e3d7f10"
    assert session_id({"x-claude-code-session-id": sid}, None) == sid
    legacy = {"metadata": {"user_id": f"user_{'ab' * 32}_account__session_{sid}"}}
    assert session_id({}, legacy) == sid
    as_json = orjson.dumps({"device_id": "d", "account_uuid": "", "session_id": sid}).decode()
    assert session_id({}, {"metadata": {"user_id": as_json}}) == sid
    assert session_id({"X-Claude-Code-Session-Id": "h"}, legacy) == "h"  # the header wins
    assert session_id({}, {"metadata": {"user_id": "opaque-user"}}) is None
    assert session_id({"x-claude-code-session-id": "x" * 201}, None) is None
    assert session_id({"x-claude-code-session-id": "a\x00b"}, None) is None


def test_the_request_log_names_the_session(pool: tuple[RelayServer, FakeUpstream, str]) -> None:
    relay, _fake, key = pool
    sid = "7d0e9c1b-3a2f-4e5d-8c6b-1a2b3c4d5e6f"
    with _client(relay, key, **{"x-claude-code-session-id": sid}) as c:
        ok = c.post("/v1/messages", json=BODY)
        refused = c.post("/v1/messages", json={**BODY, "model": "no-such-model"})
        counted = c.post(
            "/v1/messages/count_tokens",
            json={"model": BODY["model"], "messages": BODY["messages"]},
        )
    with _client(relay, key) as c:
        user_id = f"user_{'cd' * 32}_account__session_{sid}"
        by_body = c.post("/v1/messages", json={**BODY, "metadata": {"user_id": user_id}})
    rows = {r["id"]: r for r in requests_log(relay)}
    for response in (ok, refused, counted, by_body):
        assert rows[response.headers["x-poolrelay-request-id"]]["session_id"] == sid
