"""Per-key policies (rpm, tpm, budgets, allowed models, expiry), model aliases and routing rules."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import pytest

from billing.estimate import hold_micros
from billing.pricing import SEED_PRICES
from tests.harness import FakeUpstream, RelayServer

HAIKU = "claude-haiku-4-5"
SONNET = "claude-sonnet-4-6"
UPSTREAM_KEY = "sk-ant-api03-policy-key-0001"
PRICE = {p.model: p for p in SEED_PRICES}


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def usd(value: int) -> str:
    return f"{Decimal(value) / 1_000_000:.6f}"


def make_key(relay: RelayServer, balance: str = "10", **policy: Any) -> tuple[str, str]:
    with relay.admin() as admin:
        customer = admin.post("/admin/customers", json={"name": "p"}).raise_for_status().json()
        key = admin.post(f"/admin/customers/{customer['id']}/keys", json={"name": "k", **policy})
        assert key.status_code == 201, key.text
        admin.post(
            f"/admin/customers/{customer['id']}/topups", json={"amount_usd": balance}
        ).raise_for_status()
    return customer["id"], key.json()["key"]


def sdk(relay: RelayServer, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=relay.url, max_retries=0)


def ask(relay: RelayServer, key: str, model: str = HAIKU, **extra: Any) -> httpx.Response:
    body = {
        "model": model,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }
    return httpx.post(
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=body,
        timeout=30,
    )


@pytest.fixture
def pool(relay: RelayServer, fake: FakeUpstream) -> RelayServer:
    relay.add_account("primary", UPSTREAM_KEY, fake.url)
    return relay


def test_rpm_limit_answers_429_with_retry_after_and_the_keys_own_headers(pool: RelayServer) -> None:
    _customer, key = make_key(pool, rpm=3)
    for remaining in (2, 1, 0):
        r = ask(pool, key)
        assert r.status_code == 200
        assert r.headers["anthropic-ratelimit-requests-limit"] == "3"
        assert r.headers["anthropic-ratelimit-requests-remaining"] == str(remaining)
    with pytest.raises(anthropic.RateLimitError) as info:
        sdk(pool, key).messages.create(
            model=HAIKU, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    response = info.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert response.headers["x-should-retry"] == "true"
    assert info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_tpm_limit_counts_real_tokens(pool: RelayServer, fake: FakeUpstream) -> None:
    _customer, key = make_key(pool, tpm=60)
    first = ask(
        pool, key, messages=[{"role": "user", "content": "reply with 40 words"}], max_tokens=100
    )
    assert first.status_code == 200
    used = first.json()["usage"]["input_tokens"] + first.json()["usage"]["output_tokens"]
    assert used > 40
    second = ask(
        pool, key, messages=[{"role": "user", "content": "reply with 40 words"}], max_tokens=100
    )
    assert second.status_code == 429
    assert second.headers["anthropic-ratelimit-tokens-limit"] == "60"
    assert fake.count(UPSTREAM_KEY) == 1


def test_model_not_allowed_is_403_and_models_are_filtered(pool: RelayServer) -> None:
    _customer, key = make_key(pool, allowed_models=[HAIKU])
    assert ask(pool, key).status_code == 200
    with pytest.raises(anthropic.PermissionDeniedError):
        sdk(pool, key).messages.create(
            model=SONNET, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    ids = [m.id for m in sdk(pool, key).models.list().data]
    assert ids and all(i.startswith(HAIKU) for i in ids)


def test_expired_key_is_401(pool: RelayServer) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    _customer, key = make_key(pool, expires_at=past)
    with pytest.raises(anthropic.AuthenticationError):
        sdk(pool, key).messages.create(
            model=HAIKU, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


def _hold(model: str = HAIKU) -> int:
    body = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    return hold_micros(body, PRICE[model], Decimal(1))


def test_daily_budget_blocks_with_403(pool: RelayServer, fake: FakeUpstream) -> None:
    customer_id, key = make_key(pool, daily_budget_usd=usd(2 * _hold()), budget_action="block")
    statuses = [ask(pool, key).status_code for _ in range(12)]
    assert statuses[0] == 200 and statuses[-1] == 403
    spent = sum(-micros(e["amount_usd"]) for e in pool.ledger(customer_id) if e["kind"] == "usage")
    assert spent <= 2 * _hold()
    r = ask(pool, key)
    assert r.json()["error"]["type"] == "permission_error"
    assert "budget" in r.json()["error"]["message"]


def test_daily_budget_is_never_overshot_under_concurrency(pool: RelayServer) -> None:
    budget = 5 * _hold()
    customer_id, key = make_key(pool, daily_budget_usd=usd(budget))

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=pool.url, timeout=60) as client:
            body = {
                "model": HAIKU,
                "max_tokens": 50,
                "messages": [{"role": "user", "content": "hi"}],
            }

            async def one() -> int:
                r = await client.post(
                    "/v1/messages",
                    headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                    json=body,
                )
                return r.status_code

            return list(await asyncio.gather(*(one() for _ in range(60))))

    statuses = asyncio.run(main())
    assert set(statuses) <= {200, 403}
    assert statuses.count(200) >= 5
    spent = sum(-micros(e["amount_usd"]) for e in pool.ledger(customer_id) if e["kind"] == "usage")
    assert 0 < spent <= budget


def test_budget_downgrade_routes_to_the_cheaper_model(
    pool: RelayServer, fake: FakeUpstream
) -> None:
    sonnet_hold = _hold(SONNET)
    _customer, key = make_key(
        pool, daily_budget_usd=usd(sonnet_hold), budget_action="downgrade", downgrade_model=HAIKU
    )
    first = ask(pool, key, model=SONNET)
    assert first.status_code == 200 and first.json()["model"].startswith(SONNET)
    second = ask(pool, key, model=SONNET)
    assert second.status_code == 200
    assert second.json()["model"].startswith(HAIKU)
    assert second.headers["x-poolrelay-model"] == HAIKU
    assert "budget" in second.headers["x-poolrelay-budget-downgrade"]
    assert fake.requests(limit=1)[-1]["body"]["model"] == HAIKU
    usage = second.json()["usage"]
    expected = usage["input_tokens"] * 1 + usage["output_tokens"] * 5  # billed at Haiku's price
    assert micros(second.headers["x-poolrelay-cost-usd"]) == expected


def test_budget_warn_only_adds_a_header(pool: RelayServer) -> None:
    _customer, key = make_key(pool, daily_budget_usd="0.000001", budget_action="warn")
    r = ask(pool, key)
    assert r.status_code == 200
    assert "budget" in r.headers["x-poolrelay-budget-warning"]


def test_model_alias(pool: RelayServer, fake: FakeUpstream) -> None:
    with pool.admin() as admin:
        assert admin.put("/admin/aliases/fast", json={"model": HAIKU}).status_code == 200
        assert [a["alias"] for a in admin.get("/admin/aliases").json()["items"]] == ["fast"]
    customer_id, key = make_key(pool)
    message = sdk(pool, key).messages.create(
        model="fast", max_tokens=20, messages=[{"role": "user", "content": "x"}]
    )
    assert message.model == "claude-haiku-4-5-20251001"
    assert fake.requests(limit=1)[-1]["body"]["model"] == HAIKU
    debit = next(e for e in pool.ledger(customer_id) if e["kind"] == "usage")
    assert (
        -micros(debit["amount_usd"])
        == message.usage.input_tokens * 1 + message.usage.output_tokens * 5
    )
    with pool.admin() as admin:
        assert admin.delete("/admin/aliases/fast").status_code == 200
        assert admin.delete("/admin/aliases/fast").status_code == 404


def test_small_requests_route_to_the_cheaper_model(pool: RelayServer, fake: FakeUpstream) -> None:
    _customer, key = make_key(pool, route_small_to=HAIKU, route_small_max_input_tokens=2000)
    small = ask(pool, key, model=SONNET)
    assert small.json()["model"].startswith(HAIKU)
    assert small.headers["x-poolrelay-route"] == "small_request"
    big = ask(pool, key, model=SONNET, messages=[{"role": "user", "content": "word " * 3000}])
    assert big.json()["model"].startswith(SONNET)
    tools = [{"name": "t", "input_schema": {"type": "object", "properties": {}}}]
    with_tools = ask(pool, key, model=SONNET, tools=tools, tool_choice={"type": "none"})
    assert with_tools.json()["model"].startswith(SONNET)
