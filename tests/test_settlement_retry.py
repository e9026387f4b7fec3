"""A settlement the database did not take (it was unreachable) is written later, in the
background, instead of leaving the hold reserved until the process restarts: a stream that was
delivered is charged, a JSON answer that was withheld is released."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from app.relay.credit import Desk
from app.relay.service import Relay
from billing.hold_store import HoldStore
from billing.pricing import SEED_PRICES, Usage, cost_micros
from tests.harness import FakeUpstream, RelayServer

MODEL = "claude-haiku-4-5"
HAIKU = next(p for p in SEED_PRICES if p.model == MODEL)
UPSTREAM_KEY = "sk-ant-api03-retry-key-0001"


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


class Outage:
    """The relay's settlement writes fail (as with an unreachable database) until ``failures``
    of them have failed; every attempt is counted."""

    def __init__(self, store: HoldStore, failures: int) -> None:
        self.failures = failures
        self.attempts = 0
        self._write = store.settle

    async def __call__(self, *args: Any) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OSError("connection refused (simulated outage)")
        await self._write(*args)


@pytest.fixture
def outage(
    relay: RelayServer, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Outage]:
    store = relay.app.state.customer_api.relay.services.holds
    monkeypatch.setattr(Desk, "retry_first_delay", 0.05)
    # 3 attempts while the request is answered, then 2 more in the background.
    outage = Outage(store, failures=5)
    monkeypatch.setattr(store, "settle", outage)
    relay.add_account("a", UPSTREAM_KEY, fake.url)
    yield outage


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def assert_released(relay: RelayServer, customer_id: str, request_id: str) -> None:
    """The request's hold is given back, nothing is charged, and the log says it failed."""
    wait_for(lambda: micros(relay.customer(customer_id)["held_usd"]) == 0)
    assert relay.customer(customer_id)["balance_usd"] == "1.000000"
    assert [e["kind"] for e in relay.ledger(customer_id)] == ["topup"]
    with relay.admin() as admin:
        row = admin.get(f"/admin/requests/{request_id}").json()
    assert row["status"] == "failed"
    assert row["cost_usd"] == "0.000000"


def body(stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": "Hello"}],
    }


def test_a_delivered_stream_is_charged_once_the_database_answers(
    relay: RelayServer, outage: Outage
) -> None:
    customer_id, key = relay.create_customer(balance_usd="1")
    with httpx.stream(
        "POST",
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=body(True),
        timeout=30,
    ) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_raw())
        request_id = r.headers["x-poolrelay-request-id"]
    assert raw.count(b"event: message_stop") == 1  # the customer got the whole answer
    usage = Usage()
    for line in raw.split(b"\n"):
        if line.startswith(b"data: "):
            data = orjson.loads(line[6:])
            if data["type"] == "message_start":
                usage = Usage.from_api(data["message"]["usage"])
            elif data["type"] == "message_delta":
                usage = usage.merged(data["usage"])

    wait_for(lambda: micros(relay.customer(customer_id)["held_usd"]) == 0)
    assert outage.attempts == outage.failures + 1
    customer = relay.customer(customer_id)
    ledger = relay.ledger(customer_id)
    debits = [e for e in ledger if e["kind"] == "usage"]
    assert [e["request_id"] for e in debits] == [request_id]
    assert -micros(debits[0]["amount_usd"]) == cost_micros(usage, HAIKU)
    assert micros(customer["balance_usd"]) == sum(micros(e["amount_usd"]) for e in ledger)


def test_a_withheld_json_answer_is_released_not_charged(relay: RelayServer, outage: Outage) -> None:
    customer_id, key = relay.create_customer(balance_usd="1")
    r = httpx.post(
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=body(False),
        timeout=30,
    )
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "api_error"
    assert "not charged" in r.json()["error"]["message"]

    assert_released(relay, customer_id, r.headers["x-poolrelay-request-id"])


def key_spend_held(relay: RelayServer, key_id: str) -> list[int]:
    import sqlalchemy as sa

    from billing.models import KeySpend

    async def read() -> list[int]:
        async with relay.services.db.transaction() as session:
            table = KeySpend.__table__  # type: ignore[attr-defined]
            rows = await session.execute(
                sa.select(table.c.held_micros).where(table.c.key_id == key_id)
            )
            return [int(r[0]) for r in rows]

    return relay.call(read)


def test_a_hold_written_but_not_confirmed_is_released_with_its_budget(
    relay: RelayServer, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold's statement committed, but its answer was lost (the connection broke): the
    request is refused, never sent upstream, and the hold and its budget reservation are given
    back exactly once."""
    instance: Relay = relay.app.state.customer_api.relay
    relay.add_account("a", UPSTREAM_KEY, fake.url)
    customer_id, _ = relay.create_customer(balance_usd="1")
    with relay.admin() as admin:
        created = admin.post(
            f"/admin/customers/{customer_id}/keys", json={"name": "b", "daily_budget_usd": "0.5"}
        ).json()
    begin = instance.services.holds.begin

    async def place_then_lose_the_answer(hold: Any) -> None:
        await (await begin(hold))
        raise OSError("connection lost after the commit (simulated)")

    monkeypatch.setattr(instance.services.holds, "begin", place_then_lose_the_answer)
    monkeypatch.setattr(instance.desk, "ambiguous_hold_wait", 0.05)
    r = httpx.post(
        f"{relay.url}/v1/messages",
        headers={"x-api-key": created["key"]},
        json=body(False),
        timeout=30,
    )
    assert r.status_code == 500 and r.json()["type"] == "error"
    assert fake.count(UPSTREAM_KEY) == 0

    wait_for(lambda: micros(relay.customer(customer_id)["held_usd"]) == 0)
    wait_for(lambda: key_spend_held(relay, created["id"]) == [0, 0])
    time.sleep(0.3)  # nothing more happens: the reservation is not given back twice
    assert key_spend_held(relay, created["id"]) == [0, 0]
    assert_released(relay, customer_id, r.headers["x-poolrelay-request-id"])


def retrying(relay: RelayServer, kind: str) -> float:
    text = httpx.get(f"{relay.url}/metrics", timeout=10).text
    prefix = f'poolrelay_billing_writes_retrying{{kind="{kind}"}} '
    line = next((line for line in text.splitlines() if line.startswith(prefix)), None)
    return float(line[len(prefix) :]) if line else 0.0


def test_writes_being_retried_are_visible_in_metrics(relay: RelayServer, outage: Outage) -> None:
    outage.failures = 10**9  # the database stays away until the test brings it back
    customer_id, key = relay.create_customer(balance_usd="1")
    with httpx.stream(
        "POST",
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=body(True),
        timeout=30,
    ) as r:
        b"".join(r.iter_raw())
    wait_for(lambda: retrying(relay, "settlement") == 1.0)
    assert micros(relay.customer(customer_id)["held_usd"]) > 0

    outage.failures = 0  # back
    wait_for(lambda: retrying(relay, "settlement") == 0.0)
    assert micros(relay.customer(customer_id)["held_usd"]) == 0
    assert [e["kind"] for e in relay.ledger(customer_id)] == ["usage", "topup"]
