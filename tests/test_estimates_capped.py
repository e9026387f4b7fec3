"""An estimated charge never exceeds what the request allowed (issue 12, deliverable 2), and
model ids the database could refuse are a 400 before anything is held (deliverable 3)."""

from __future__ import annotations

import time
from decimal import Decimal

import httpx
import orjson
import pytest

from billing.estimate import hold_micros
from billing.pricing import SEED_PRICES, Usage, cost_micros
from tests.harness import FakeUpstream, RelayServer

MODEL = "claude-haiku-4-5"
HAIKU = next(p for p in SEED_PRICES if p.model == MODEL)
CRED = "sk-ant-api03-estimates-0001"


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def test_a_late_disconnect_is_charged_at_most_max_tokens_and_never_above_the_hold(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    relay.add_account("a", CRED, fake.url)
    request = {
        "model": MODEL,
        "max_tokens": 40,
        "stream": True,
        # long words: the byte-based estimate of the deltas is far above one token per word
        "messages": [{"role": "user", "content": "reply with 60 words " + "elephantine " * 30}],
    }
    hold = hold_micros(request, HAIKU, Decimal(1))
    customer_id, key = relay.create_customer(balance_usd=f"{Decimal(hold) / 1_000_000:.6f}")
    fake.fault(CRED, "slow_stream", delay=0.02)
    with httpx.stream(
        "POST",
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=request,
        timeout=30,
    ) as r:
        assert r.status_code == 200
        request_id = r.headers["x-poolrelay-request-id"]
        seen = b""
        for chunk in r.iter_raw():
            seen += chunk
            if seen.count(b"content_block_delta") >= 38:
                break
    start = orjson.loads(seen.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    complete = cost_micros(
        Usage.from_api(start["message"]["usage"]).merged({"output_tokens": 40}), HAIKU
    )
    deadline = time.monotonic() + 10
    debit = None
    while time.monotonic() < deadline and debit is None:
        debit = next((e for e in relay.ledger(customer_id) if e["kind"] == "usage"), None)
        time.sleep(0.05)
    assert debit is not None and debit["request_id"] == request_id
    charged = -micros(debit["amount_usd"])
    assert charged <= complete, "a cut stream cost more than its complete answer would have"
    assert charged <= hold
    customer = relay.customer(customer_id)
    assert micros(customer["balance_usd"]) >= 0
    assert customer["held_usd"] == "0.000000"


@pytest.mark.parametrize(
    "model",
    ["claude-haiku-4-5-" + "x" * 300, "claude-haiku-4-5\x00", "claude-haiku-4-5\n"],
    ids=["too-long", "nul", "control"],
)
def test_model_ids_the_database_could_refuse_are_a_400(
    relay: RelayServer, fake: FakeUpstream, model: str
) -> None:
    relay.add_account("a", CRED, fake.url)
    customer_id, key = relay.create_customer(balance_usd="1")
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    request = {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        response = httpx.post(f"{relay.url}{path}", headers=headers, json=request, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert "model" in response.json()["error"]["message"]
    assert relay.customer(customer_id)["held_usd"] == "0.000000"
    with relay.admin() as admin:
        rows = admin.get("/admin/requests").raise_for_status().json()["items"]
    assert len(rows) == 2 and all(r["status"] == "refused" for r in rows)
    assert all(
        r["requested_model"] is not None and "\x00" not in r["requested_model"] for r in rows
    )


def test_a_delivered_stream_whose_hold_was_released_is_still_charged_once(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    """Reconciliation took the relay for dead (Redis lost its heartbeat) and released the hold
    of a live stream: the stream's own settlement charges it all the same, once."""
    from billing import holds

    relay.add_account("a", CRED, fake.url)
    customer_id, key = relay.create_customer(balance_usd="1")
    fake.fault(CRED, "slow_stream", delay=0.05)
    request = {
        "model": MODEL,
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "reply with 10 words"}],
    }
    services = relay.services

    async def release(request_id: str) -> bool:
        async with services.db.transaction() as session:
            return await holds.release(session, request_id, holds.Outcome(status="crashed"))

    with httpx.stream(
        "POST",
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=request,
        timeout=30,
    ) as r:
        request_id = r.headers["x-poolrelay-request-id"]
        chunks = r.iter_raw()
        seen = next(chunks)
        while b"message_start" not in seen:
            seen += next(chunks)
        assert relay.call(lambda: release(request_id))
        assert relay.customer(customer_id)["held_usd"] == "0.000000"
        for chunk in chunks:
            seen += chunk
    assert b"message_stop" in seen
    deadline = time.monotonic() + 10
    debits: list[dict[str, object]] = []
    while time.monotonic() < deadline and not debits:
        debits = [e for e in relay.ledger(customer_id) if e["kind"] == "usage"]
        time.sleep(0.05)
    assert [d["request_id"] for d in debits] == [request_id]
    customer = relay.customer(customer_id)
    assert customer["held_usd"] == "0.000000"
    ledger = relay.ledger(customer_id)
    assert micros(customer["balance_usd"]) == sum(micros(str(e["amount_usd"])) for e in ledger)
    with relay.admin() as admin:
        row = admin.get(f"/admin/requests/{request_id}").raise_for_status().json()
    assert row["cost_usd"] == str(debits[0]["amount_usd"]).lstrip("-")
    assert "without its hold" in row["error"]
