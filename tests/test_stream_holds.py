"""A stream's hold grows as it runs (contract §6, issue 13 item 4), end to end through the
relay: a small balance streams from an expensive model, a stream whose extension does not fit
is ended with one error event and charged within its hold, JSON requests still hold their whole
``max_tokens``, and concurrent streams on a small balance never overdraw it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from app.relay.sse import StreamMeter
from billing.estimate import hold_micros, worst_case_usage
from billing.pricing import SEED_PRICES, Usage, cost_micros
from tests import harness
from tests.harness import FakeUpstream, RelayServer

MODEL = "claude-opus-4-1"
OPUS = next(p for p in SEED_PRICES if p.model == MODEL)
CRED = "sk-ant-api03-stream-holds-0001"
SLICE = 64


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def usd(amount: int) -> str:
    return f"{Decimal(amount) / 1_000_000:.6f}"


@pytest.fixture
def relay(settings_env: dict[str, str], fake: FakeUpstream) -> Iterator[RelayServer]:
    server = RelayServer.start(harness.test_settings(settings_env, stream_hold_tokens=SLICE))
    server.add_account("a", CRED, fake.url)
    yield server
    server.stop()


def request(words: int, *, stream: bool = True, max_tokens: int = 32_000) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": f"reply with {words} words"}],
    }


def first_hold(body: dict[str, Any]) -> int:
    worst = worst_case_usage(body, OPUS)
    return cost_micros(
        dataclasses.replace(worst, output_tokens=min(SLICE, worst.output_tokens)), OPUS
    )


def stream(relay: RelayServer, key: str, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with httpx.stream(
        "POST",
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=body,
        timeout=60,
    ) as r:
        return r, b"".join(r.iter_raw())


def reported_usage(raw: bytes) -> Usage:
    usage = Usage()
    for line in raw.split(b"\n"):
        if line.startswith(b"data: "):
            data = orjson.loads(line[6:])
            if data["type"] == "message_start":
                usage = Usage.from_api(data["message"]["usage"])
            elif data["type"] == "message_delta":
                usage = usage.merged(data["usage"])
    return usage


def settled(relay: RelayServer, customer_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        customer = relay.customer(customer_id)
        if customer["held_usd"] == "0.000000" or time.monotonic() > deadline:
            return customer
        time.sleep(0.05)


def extensions(relay: RelayServer, outcome: str) -> float:
    text = httpx.get(f"{relay.url}/metrics", timeout=10).text
    prefix = f'poolrelay_hold_extensions_total{{outcome="{outcome}"}} '
    line = next((x for x in text.splitlines() if x.startswith(prefix)), None)
    return float(line[len(prefix) :]) if line else 0.0


def test_a_small_balance_streams_from_an_expensive_model(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    fake.fault(CRED, "slow_stream", delay=0.001)  # one event per chunk, as Anthropic sends them
    body = request(300)
    whole = hold_micros(body, OPUS, Decimal(1))
    balance = first_hold(body) + 300_000
    assert balance < whole / 5  # holding the whole max_tokens up front would refuse it
    customer_id, key = relay.create_customer(balance_usd=usd(balance))

    r, raw = stream(relay, key, body)
    assert r.status_code == 200
    assert raw.count(b"event: message_stop") == 1
    assert b"event: error" not in raw
    assert extensions(relay, "ok") >= 10  # ~300 words of text: many 64-token slices

    customer = settled(relay, customer_id)
    assert customer["held_usd"] == "0.000000"
    debits = [e for e in relay.ledger(customer_id) if e["kind"] == "usage"]
    assert len(debits) == 1
    assert -micros(debits[0]["amount_usd"]) == cost_micros(reported_usage(raw), OPUS)
    assert micros(customer["balance_usd"]) == balance - cost_micros(reported_usage(raw), OPUS)

    # The same balance cannot hold a JSON request's whole max_tokens: refused, nothing sent.
    r = httpx.post(
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=request(10, stream=False),
        timeout=30,
    )
    assert r.status_code == 400
    assert "credit balance is too low" in r.json()["error"]["message"]


def test_a_stream_whose_extension_does_not_fit_is_ended_and_charged_within_its_hold(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    body = request(3_000)
    balance = first_hold(body) + 3_000  # the first hold and about one more slice
    customer_id, key = relay.create_customer(balance_usd=usd(balance))

    r, raw = stream(relay, key, body)
    assert r.status_code == 200
    assert raw.count(b"event: error") == 1
    assert b"event: message_stop" not in raw
    error = orjson.loads(raw.split(b"event: error\ndata: ", 1)[1].split(b"\n", 1)[0])
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith("Your credit balance is too low")
    delivered = sum(
        len(orjson.loads(line[6:])["delta"].get("text", "").encode())
        for line in raw.split(b"\n")
        if line.startswith(b"data: ") and b'"content_block_delta"' in line
    )
    assert delivered <= SLICE * 2  # nothing beyond what was held reached the customer
    assert extensions(relay, "refused") == 1

    customer = settled(relay, customer_id)
    assert customer["held_usd"] == "0.000000"
    assert micros(customer["balance_usd"]) >= 0
    debits = [e for e in relay.ledger(customer_id) if e["kind"] == "usage"]
    assert len(debits) == 1 and 0 < -micros(debits[0]["amount_usd"]) <= balance
    with relay.admin() as admin:
        row = admin.get(f"/admin/requests/{r.headers['x-poolrelay-request-id']}").json()
    assert row["status"] == "credit_exhausted"


def test_concurrent_streams_on_a_small_balance_never_overdraw(relay: RelayServer) -> None:
    body = request(400)
    balance = first_hold(body) * 4
    customer_id, key = relay.create_customer(balance_usd=usd(balance))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: stream(relay, key, body), range(12)))
    statuses = [r.status_code for r, _ in results]
    assert set(statuses) <= {200, 400}
    assert statuses.count(200) >= 1

    customer = settled(relay, customer_id)
    assert customer["held_usd"] == "0.000000"
    ledger = relay.ledger(customer_id)
    charged = -sum(micros(e["amount_usd"]) for e in ledger if e["kind"] == "usage")
    assert 0 < charged <= balance
    assert micros(customer["balance_usd"]) == balance - charged >= 0


def test_a_stream_whose_hold_covers_max_tokens_is_never_metered_against_it(
    relay: RelayServer, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the hold covers ``max_tokens`` (here from the start: max_tokens < the slice), no
    chunk takes the careful path (a copy of the meter per chunk), however much text flows."""
    copies = []
    original = StreamMeter.copy

    def counted(self: StreamMeter) -> StreamMeter:
        copies.append(1)
        return original(self)

    monkeypatch.setattr(StreamMeter, "copy", counted)
    fake.fault(CRED, "slow_stream", delay=0.001)
    _, key = relay.create_customer(balance_usd="10")
    r, raw = stream(relay, key, request(200, max_tokens=SLICE // 2))
    assert r.status_code == 200 and raw.count(b"event: message_stop") == 1
    assert copies == []
