"""Sessions and per-request cost: ``/v1/me/sessions``, ``/v1/me/requests``, ``/admin/sessions``,
``group_by=session``, against the ledger, with the real anthropic and openai SDKs as clients.

Every figure is checked against the books: a session's ``cost_usd`` is the sum of the ledger's
usage debits of its requests, and a request's ``cost_usd`` is its debit.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.harness import FakeUpstream, RelayServer

MODEL = "claude-haiku-4-5"
UPSTREAM_KEY = "sk-ant-api03-sessions-key-0001"
S1 = "5b0c2a7e-1111-4c3d-9e8f-0a1b2c3d4e5f"
S2 = "9f8e7d6c-2222-4b5a-8c9d-112233445566"
USAGE_STATUSES = ("ok", "client_disconnect", "upstream_error", "crashed")
SYSTEM = [
    {
        "type": "text",
        "text": "You are a careful assistant. " * 60,
        "cache_control": {"type": "ephemeral"},
    }
]


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def customer_client(relay: RelayServer, key: str, **headers: str) -> httpx.Client:
    return httpx.Client(
        base_url=relay.url,
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", **headers},
        timeout=30,
    )


def log_rows(relay: RelayServer, customer_id: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    cursor = None
    with relay.admin() as admin:
        while True:
            params: dict[str, Any] = {"limit": 100, "customer_id": customer_id}
            if cursor:
                params["cursor"] = cursor
            page = admin.get("/admin/requests", params=params).raise_for_status().json()
            rows.update({r["id"]: r for r in page["items"]})
            cursor = page["next_cursor"]
            if not cursor:
                return rows


def settled(relay: RelayServer, customer_id: str) -> dict[str, dict[str, Any]]:
    """The request log once nothing of this customer is in flight (streams settle just after
    their last byte)."""
    deadline = time.monotonic() + 10
    while True:
        rows = log_rows(relay, customer_id)
        if all(r["status"] != "in_flight" for r in rows.values()) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def debits(relay: RelayServer, customer_id: str) -> dict[str, int]:
    """Request id → micro-USD the ledger debited for it."""
    found: dict[str, int] = {}
    for entry in relay.ledger(customer_id):
        if entry["kind"] == "usage":
            assert entry["request_id"] not in found
            found[entry["request_id"]] = -micros(entry["amount_usd"])
    return found


def ratio(reads: int, total: int) -> str | None:
    if not total:
        return None
    return str((Decimal(reads) / Decimal(total)).quantize(Decimal("0.0001")))


@pytest.fixture
def two_customers(relay: RelayServer, fake: FakeUpstream) -> dict[str, Any]:
    relay.add_account("sessions-a", UPSTREAM_KEY, fake.url)
    a_id, a_key = relay.create_customer(balance_usd="20", name="Initech")
    b_id, b_key = relay.create_customer(balance_usd="20", name="Umbrella")
    return {"a": (a_id, a_key), "b": (b_id, b_key)}


def run_traffic(relay: RelayServer, key: str) -> list[str]:
    """Session S1 by header over every path (messages with a cache write then a read, a stream
    through the anthropic SDK, chat/completions through the openai SDK, count_tokens, a
    refusal), S2 by Claude Code's ``metadata.user_id``, and a request with no session."""
    ids: list[str] = []
    with customer_client(relay, key, **{"x-claude-code-session-id": S1}) as c:
        for text in ("first turn", "second turn"):
            answer = c.post("/v1/messages", json=body(text, system=SYSTEM))
            assert answer.status_code == 200, answer.text
            ids.append(answer.headers["x-poolrelay-request-id"])
        refused = c.post("/v1/messages", json=body("x", model="no-such-model"))
        assert refused.status_code in (400, 404), refused.text
        ids.append(refused.headers["x-poolrelay-request-id"])
        counted = c.post(
            "/v1/messages/count_tokens", json={"model": MODEL, "messages": body("x")["messages"]}
        )
        assert counted.status_code == 200, counted.text
        ids.append(counted.headers["x-poolrelay-request-id"])
    sdk = anthropic.Anthropic(
        api_key=key,
        base_url=relay.url,
        max_retries=0,
        default_headers={"x-claude-code-session-id": S1},
    )
    with sdk.messages.stream(**body("stream me", system=SYSTEM)) as stream:
        assert stream.get_final_message().usage.output_tokens > 0
        ids.append(stream.response.headers["x-poolrelay-request-id"])
    sdk.close()
    oa = openai.OpenAI(
        api_key=key,
        base_url=f"{relay.url}/v1",
        max_retries=0,
        default_headers={"x-claude-code-session-id": S1},
    )
    completion = oa.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=32, messages=[{"role": "user", "content": "hi from openai"}]
    )
    ids.append(completion.headers["x-poolrelay-request-id"])
    oa.close()
    with customer_client(relay, key) as c:
        user_id = f"user_{'ab' * 32}_account__session_{S2}"
        for text in ("s2 one", "s2 two"):
            answer = c.post("/v1/messages", json=body(text, metadata={"user_id": user_id}))
            assert answer.status_code == 200, answer.text
            ids.append(answer.headers["x-poolrelay-request-id"])
        plain = c.post("/v1/messages", json=body("no session"))
        assert plain.status_code == 200
        ids.append(plain.headers["x-poolrelay-request-id"])
    return ids


def expected_session(rows: list[dict[str, Any]], charged: dict[str, int]) -> dict[str, Any]:
    used = [r for r in rows if r["status"] in USAGE_STATUSES]
    tokens = {
        k: sum(r[k] for r in used)
        for k in (
            "input_tokens",
            "output_tokens",
            "cache_write_5m_tokens",
            "cache_write_1h_tokens",
            "cache_read_tokens",
        )
    }
    write = tokens["cache_write_5m_tokens"] + tokens["cache_write_1h_tokens"]
    cost = sum(charged.get(r["id"], 0) for r in rows)
    return {
        "requests": len(used),
        "input_tokens": tokens["input_tokens"],
        "output_tokens": tokens["output_tokens"],
        "cache_write_tokens": write,
        "cache_read_tokens": tokens["cache_read_tokens"],
        "cost_usd": f"{Decimal(cost) / 1_000_000:.6f}",
        "cache_hit_ratio": ratio(
            tokens["cache_read_tokens"],
            tokens["input_tokens"] + write + tokens["cache_read_tokens"],
        ),
        "first_seen": min(r["started_at"] for r in used),
        "last_seen": max(r["started_at"] for r in used),
    }


def test_sessions_match_the_ledger(relay: RelayServer, two_customers: dict[str, Any]) -> None:
    a_id, a_key = two_customers["a"]
    b_id, b_key = two_customers["b"]
    a_ids = run_traffic(relay, a_key)
    with customer_client(relay, b_key, **{"x-claude-code-session-id": S1}) as c:
        assert c.post("/v1/messages", json=body("the other customer, same session id")).is_success
    rows = settled(relay, a_id)
    settled(relay, b_id)

    # Every path recorded its session: messages, refusal, count_tokens, stream, chat/completions.
    sessions_of = [rows[i]["session_id"] for i in a_ids]
    assert sessions_of == [S1] * 6 + [S2, S2, None], sessions_of
    assert rows[a_ids[4]]["stream"] is True and rows[a_ids[5]]["endpoint"] != "messages"

    charged = debits(relay, a_id)
    assert sum(charged.values()) > 0
    want = {
        s: expected_session([r for r in rows.values() if r["session_id"] == s], charged)
        for s in (S1, S2)
    }
    assert want[S1]["cache_read_tokens"] > 0 and want[S1]["cache_write_tokens"] > 0

    with customer_client(relay, a_key) as c:
        page = c.get("/v1/me/sessions").raise_for_status().json()
        assert page["next_cursor"] is None
        items = page["items"]
        assert [i["session_id"] for i in items] == [S2, S1]  # newest first (by last_seen)
        for item in items:
            assert "customer_id" not in item
            expected = want[item["session_id"]]
            assert {k: item[k] for k in expected} == expected, item
            assert isinstance(item["cache_hit_ratio"], str)

        # group_by=session in the customer's usage: the same figures, and no other customer's.
        usage = c.get("/v1/me/usage", params={"group_by": "session"}).raise_for_status().json()
        by_session = {i["session_id"]: i for i in usage["items"]}
        assert set(by_session) == {S1, S2, None}
        for s in (S1, S2):
            assert by_session[s]["cost_usd"] == want[s]["cost_usd"]
            assert by_session[s]["requests"] == want[s]["requests"]
            assert by_session[s]["cache_hit_ratio"] == want[s]["cache_hit_ratio"]
        assert micros(usage["totals"]["cost_usd"]) == sum(charged.values())

        # Pages of one, by cursor, give the same list; a forged cursor is a clear 400.
        first = c.get("/v1/me/sessions", params={"limit": 1}).raise_for_status().json()
        assert [i["session_id"] for i in first["items"]] == [S2] and first["next_cursor"]
        second = (
            c.get("/v1/me/sessions", params={"limit": 1, "cursor": first["next_cursor"]})
            .raise_for_status()
            .json()
        )
        assert [i["session_id"] for i in second["items"]] == [S1]
        third = c.get("/v1/me/sessions", params={"limit": 1, "cursor": second["next_cursor"]})
        assert third.json() == {"items": [], "next_cursor": None}
        for params in ({"cursor": "not-a-cursor"}, {"limit": 0}, {"limit": 101}, {"from": "x"}):
            bad = c.get("/v1/me/sessions", params=params)
            assert bad.status_code == 400, (params, bad.text)
            assert bad.json()["error"]["type"] == "invalid_request_error"
            assert bad.headers["x-poolrelay-request-id"] == bad.json()["request_id"]
        # A window before anything happened has no sessions.
        empty = c.get("/v1/me/sessions", params={"to": "2020-01-01"}).raise_for_status().json()
        assert empty["items"] == []

    # The admin view: both customers' S1 apart, with customer_id; filters by customer.
    with relay.admin() as admin:
        every = admin.get("/admin/sessions").raise_for_status().json()["items"]
        pairs = [(i["customer_id"], i["session_id"]) for i in every]
        assert sorted(pairs) == sorted([(a_id, S1), (a_id, S2), (b_id, S1)])
        assert pairs[0] == (b_id, S1)  # the newest
        mine = admin.get("/admin/sessions", params={"customer_id": a_id}).raise_for_status()
        for item in mine.json()["items"]:
            assert item["customer_id"] == a_id
            expected = want[item["session_id"]]
            assert {k: item[k] for k in expected} == expected
        one = (
            admin.get("/admin/usage", params={"customer_id": a_id, "session_id": S1})
            .raise_for_status()
            .json()
        )
        assert one["totals"]["cost_usd"] == want[S1]["cost_usd"]
        assert one["totals"]["requests"] == want[S1]["requests"]
        grouped = (
            admin.get("/admin/usage", params={"group_by": "customer,session"})
            .raise_for_status()
            .json()["items"]
        )
        keyed = {(i["customer_id"], i["session_id"]): i for i in grouped}
        assert keyed[(a_id, S1)]["cost_usd"] == want[S1]["cost_usd"]
        assert (b_id, S1) in keyed and (b_id, S2) not in keyed
        log = admin.get("/admin/requests", params={"session_id": S2}).raise_for_status().json()
        assert {r["id"] for r in log["items"]} == set(a_ids[6:8])
        assert admin.get("/admin/sessions", params={"limit": 0}).status_code in (400, 422)
        assert admin.get("/admin/sessions", params={"cursor": "%%%"}).status_code == 400


def test_a_request_s_cost_after_its_stream(
    relay: RelayServer, two_customers: dict[str, Any]
) -> None:
    a_id, a_key = two_customers["a"]
    _b_id, b_key = two_customers["b"]
    sdk = anthropic.Anthropic(api_key=a_key, base_url=relay.url, max_retries=0)
    with sdk.messages.stream(**body("a streamed answer, then its cost")) as stream:
        final = stream.get_final_message()
        request_id = stream.response.headers["x-poolrelay-request-id"]
    assert "x-poolrelay-cost-usd" not in stream.response.headers
    assert final.usage.output_tokens > 0

    # The SDK's own request method reads it (a client learns what the stream cost).
    deadline = time.monotonic() + 10
    while True:
        found = sdk.get(f"/v1/me/requests/{request_id}", cast_to=object)
        assert isinstance(found, dict)
        if found["status"] != "in_flight" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    sdk.close()
    charged = debits(relay, a_id)
    assert found["request_id"] == request_id
    assert found["status"] == "ok" and found["stream"] is True
    assert micros(found["cost_usd"]) == charged[request_id] > 0
    assert found["output_tokens"] == final.usage.output_tokens
    assert found["input_tokens"] == final.usage.input_tokens
    assert found["model"] == final.model
    assert found["finished_at"] and found["started_at"] <= found["finished_at"]
    for hidden in ("account_id", "accounts_tried", "hold_usd", "instance_id", "request_body"):
        assert hidden not in found

    # Another customer's id and an unknown id get the same 404, Anthropic-shaped.
    answers = []
    for key, rid in (
        (b_key, request_id),
        (b_key, "req_00000000000000000000000000"),
        (a_key, "x" * 300),
    ):
        with customer_client(relay, key) as c:
            response = c.get(f"/v1/me/requests/{rid}")
        assert response.status_code == 404, response.text
        data = response.json()
        assert data["type"] == "error" and data["error"]["type"] == "not_found_error"
        assert response.headers["x-should-retry"] == "false"
        assert a_id not in response.text
        answers.append(data["error"]["message"].replace(rid[:40], "ID"))
    assert answers[0] == answers[1]
    other_sdk = anthropic.Anthropic(api_key=b_key, base_url=relay.url, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        other_sdk.get(f"/v1/me/requests/{request_id}", cast_to=object)
    other_sdk.close()
    with httpx.Client(base_url=relay.url, timeout=10) as anonymous:
        denied = anonymous.get(f"/v1/me/requests/{request_id}")
        assert denied.status_code == 401
        assert denied.json()["error"]["type"] == "authentication_error"


def test_recent_requests_are_the_customer_s_own(
    relay: RelayServer, two_customers: dict[str, Any]
) -> None:
    a_id, a_key = two_customers["a"]
    b_id, b_key = two_customers["b"]
    a_ids = []
    with customer_client(relay, a_key, **{"x-claude-code-session-id": S1}) as c:
        for n in range(3):
            a_ids.append(
                c.post("/v1/messages", json=body(f"a {n}")).headers["x-poolrelay-request-id"]
            )
    with customer_client(relay, b_key) as c:
        b_request = c.post("/v1/messages", json=body("b")).headers["x-poolrelay-request-id"]
    with customer_client(relay, a_key) as c:
        c.post("/v1/messages", json=body("a plain")).raise_for_status()
        charged = debits(relay, a_id)
        page = c.get("/v1/me/requests", params={"limit": 2}).raise_for_status().json()
        assert len(page["items"]) == 2 and page["next_cursor"]
        rest = (
            c.get("/v1/me/requests", params={"cursor": page["next_cursor"]})
            .raise_for_status()
            .json()
        )
        listed = page["items"] + rest["items"]
        assert rest["next_cursor"] is None
        ids = [r["request_id"] for r in listed]
        assert ids == sorted(ids, reverse=True) and len(ids) == 4
        assert set(a_ids) < set(ids) and b_request not in ids
        for item in listed:
            assert micros(item["cost_usd"]) == charged[item["request_id"]]
            assert "account_id" not in item
        in_session = c.get("/v1/me/requests", params={"session_id": S1}).raise_for_status().json()
        assert sorted(r["request_id"] for r in in_session["items"]) == sorted(a_ids)
        assert c.get("/v1/me/requests", params={"limit": "lots"}).status_code == 400
    assert b_id != a_id


def test_cache_hit_ratio_and_cursor_round_trip() -> None:
    from datetime import UTC, datetime

    from billing.errors import InvalidField
    from billing.sessions import Cursor
    from billing.usage import cache_hit_ratio

    assert cache_hit_ratio(0, 0, 0) is None
    assert cache_hit_ratio(10, 0, 0) == "0.0000"
    assert cache_hit_ratio(0, 0, 7) == "1.0000"
    assert cache_hit_ratio(12, 440, 440) == "0.4933"
    assert cache_hit_ratio(1, 0, 2) == "0.6667"
    assert cache_hit_ratio(7, 0, 1) == "0.1250"  # exact: no rounding needed
    cursor = Cursor(datetime(2026, 12, 4, 20, 1, 2, 345678, tzinfo=UTC), "cus_1", "sé/ssion")
    assert Cursor.decode(cursor.encode()) == cursor
    for forged in ("", "%%%", "bm9wZQ", "WzEsMiwzXQ", "WyJ4IiwgMSwgMl0"):
        with pytest.raises(InvalidField):
            Cursor.decode(forged)
