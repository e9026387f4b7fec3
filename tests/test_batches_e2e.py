"""Message Batches through the relay with the real anthropic SDK, on the sandbox upstream:
the hold at the batch rate and its release, exact 50 % charges per succeeded line, settlement
raced by two workers, ``results()`` through the relay's ``results_url``, and isolation between
customers. Runs on the embedded defaults and on PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from billing.batch_billing import batch_hold_micros
from billing.pricing import SEED_PRICES
from tests.conftest import needs_postgres_and_redis
from tests.harness import FakeUpstream, RelayServer, start_worker
from workers import tasks

KEY_A = "sk-ant-api03-batches-alpha-0001"
KEY_B = "sk-ant-api03-batches-bravo-0002"
MODEL = "claude-haiku-4-5"
HAIKU = next(p for p in SEED_PRICES if p.model == MODEL)


@dataclass
class Setup:
    relay: RelayServer
    fake: FakeUpstream
    customer_id: str
    key: str
    accounts: dict[str, str]

    def client(self, key: str | None = None) -> anthropic.Anthropic:
        return anthropic.Anthropic(api_key=key or self.key, base_url=self.relay.url, max_retries=0)

    def settle(self) -> dict[str, Any]:
        services = self.relay.services
        result: dict[str, Any] = self.relay.call(
            lambda: tasks.settle_batches({"services": services})
        )
        return result

    def held_micros(self, customer_id: str | None = None) -> int:
        customer = self.relay.customer(customer_id or self.customer_id)
        return int(Decimal(customer["held_usd"]) * 1_000_000)

    def balance_micros(self, customer_id: str | None = None) -> int:
        customer = self.relay.customer(customer_id or self.customer_id)
        return int(Decimal(customer["balance_usd"]) * 1_000_000)

    def usage_entries(self) -> list[dict[str, Any]]:
        return [e for e in self.relay.ledger(self.customer_id) if e["kind"] == "usage"]


@pytest.fixture
def setup(relay: RelayServer, fake: FakeUpstream) -> Iterator[Setup]:
    fake.control("POST", "batches", json={"processing_seconds": 0.3})
    accounts = {
        relay.add_account("alpha", KEY_A, fake.url, group="ws-a"): KEY_A,
        relay.add_account("bravo", KEY_B, fake.url, group="ws-b"): KEY_B,
    }
    customer_id, key = relay.create_customer(balance_usd="10")
    yield Setup(relay, fake, customer_id, key, accounts)


def requests(*texts: str, max_tokens: int = 100) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"row-{i}",
            "params": {
                "model": MODEL,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": text}],
            },
        }
        for i, text in enumerate(texts)
    ]


def wait_ended(client: anthropic.Anthropic, batch_id: str) -> Any:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        time.sleep(0.05)
    raise AssertionError("the batch did not end")


def wait_for(probe: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def expected_line_cost(usage: Any) -> int:
    """Haiku at the batch rate: $0.50 / $2.50 per Mtok, rounded up to a micro-USD."""
    scaled = usage.input_tokens * HAIKU.input + usage.output_tokens * HAIKU.output
    return -(-scaled // 2_000_000)


def test_batch_held_sent_settled_at_half_price(setup: Setup) -> None:
    client = setup.client()
    reqs = requests("hello there", "please [batch:error]", "reply with 7 words")
    batch = client.messages.batches.create(requests=reqs)  # type: ignore[arg-type]
    assert batch.processing_status == "in_progress"
    # one hold for the whole batch: the worst case at the batch rate, rounded up once
    hold = batch_hold_micros([(r["params"], HAIKU) for r in reqs], Decimal(1))
    assert setup.held_micros() == hold
    sent = [r for r in setup.fake.requests() if r["path"] == "/v1/messages/batches"]
    assert len(sent) == 1 and sent[0]["credential"] in (KEY_A, KEY_B)
    assert sent[0]["headers"]["x-api-key"] != setup.key

    # reconciliation never takes a batch hold for a crashed request
    setup.relay.reconcile()
    assert setup.held_micros() == hold

    ended = wait_ended(client, batch.id)
    assert ended.results_url == f"{setup.relay.url}/v1/messages/batches/{batch.id}/results"
    assert ended.request_counts.succeeded == 2 and ended.request_counts.errored == 1
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert set(results) == {"row-0", "row-1", "row-2"}
    assert results["row-1"].type == "errored"
    # the SDK's results call reached the relay; the customer's key never reached the upstream
    assert all(r["credential"] != setup.key for r in setup.fake.requests())

    # seeing the batch ended started its settlement; the poll finds nothing left to do
    setup.settle()
    wait_for(lambda: setup.held_micros() == 0, "the batch to settle")
    entries = {e["request_id"]: e for e in setup.usage_entries()}
    assert len(entries) == 2
    charged = 0
    rows = [r for r in _requests_log(setup) if r["endpoint"] == "batch" and r["status"] == "ok"]
    assert len(rows) == 2
    by_message = {r.message.id: r for r in results.values() if r.type == "succeeded"}
    for row in rows:
        result = by_message[row["upstream_request_id"]]
        assert result.message.usage.service_tier == "batch"
        assert row["input_tokens"] == result.message.usage.input_tokens
        cost = expected_line_cost(result.message.usage)
        assert Decimal(row["cost_usd"]) * 1_000_000 == cost
        assert Decimal(entries[row["id"]]["amount_usd"]) * 1_000_000 == -cost
        charged += cost
    assert setup.held_micros() == 0
    assert setup.balance_micros() == 10_000_000 - charged
    # settling again charges nothing more
    setup.settle()
    assert len(setup.usage_entries()) == 2
    assert setup.relay.reconcile()["discrepancies"] == []

    # usage: the customer's view, the admin's by batch
    with httpx.Client(base_url=setup.relay.url, headers={"x-api-key": setup.key}) as http:
        mine = http.get("/v1/me/usage", params={"group_by": "batch"}).json()
    assert mine["totals"]["requests"] == 2
    assert Decimal(mine["totals"]["cost_usd"]) * 1_000_000 == charged
    with setup.relay.admin() as admin:
        by_batch = admin.get("/admin/usage", params={"group_by": "batch"}).json()
    assert [i["batch_id"] for i in by_batch["items"]] == [batch.id]
    assert Decimal(by_batch["items"][0]["cost_usd"]) * 1_000_000 == charged


def _requests_log(setup: Setup) -> list[dict[str, Any]]:
    with setup.relay.admin() as admin:
        page = admin.get(
            "/admin/requests", params={"customer_id": setup.customer_id, "limit": 100}
        ).raise_for_status()
        return list(page.json()["items"])


def test_batch_that_does_not_fit_is_refused_and_never_sent(setup: Setup) -> None:
    _customer, key = setup.relay.create_customer(balance_usd="0.001", name="poor")
    client = setup.client(key)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.create(requests=requests("a", "b", max_tokens=64000))  # type: ignore[arg-type]
    assert "credit balance is too low" in caught.value.message
    assert not [r for r in setup.fake.requests() if r["path"] == "/v1/messages/batches"]


def test_batch_refuses_unpriced_or_disallowed_models(setup: Setup) -> None:
    client = setup.client()
    bad = requests("x")
    bad[0]["params"]["model"] = "claude-unknown-9"
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.create(requests=bad)  # type: ignore[arg-type]
    assert "no price" in caught.value.message
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.create(requests=[{"custom_id": "a", "params": {"model": MODEL}}])  # type: ignore[list-item]
    assert "requests.0.params.max_tokens" in caught.value.message
    assert setup.held_micros() == 0


def test_two_workers_settle_a_batch_once(setup: Setup) -> None:
    client = setup.client()
    client.messages.batches.create(requests=requests(*(f"line {i}" for i in range(30))))  # type: ignore[arg-type]
    time.sleep(0.8)  # ended upstream, unseen by the relay (a retrieve would start settling it)
    services = setup.relay.services

    async def race() -> list[Any]:
        return list(
            await asyncio.gather(
                tasks.settle_batches({"services": services}),
                tasks.settle_batches({"services": services}),
            )
        )

    setup.relay.call(race)
    entries = setup.usage_entries()
    assert len(entries) == 30
    assert len({e["request_id"] for e in entries}) == 30
    assert setup.held_micros() == 0
    spent = 10_000_000 - setup.balance_micros()
    assert spent == -sum(int(Decimal(e["amount_usd"]) * 1_000_000) for e in entries)
    assert setup.relay.reconcile()["discrepancies"] == []


def test_other_customers_get_404_and_lists_are_their_own(setup: Setup) -> None:
    client = setup.client()
    mine = client.messages.batches.create(requests=requests("mine"))  # type: ignore[arg-type]
    _other_id, other_key = setup.relay.create_customer(name="other")
    other = setup.client(other_key)
    theirs = other.messages.batches.create(requests=requests("theirs"))  # type: ignore[arg-type]
    for call in (
        lambda: other.messages.batches.retrieve(mine.id),
        lambda: other.messages.batches.cancel(mine.id),
        lambda: other.messages.batches.delete(mine.id),
        lambda: other.messages.batches.retrieve("msgbatch_unknown"),
    ):
        with pytest.raises(anthropic.NotFoundError):
            call()
    with httpx.Client(base_url=setup.relay.url, headers={"x-api-key": other_key}) as http:
        r = http.get(f"/v1/messages/batches/{mine.id}/results")
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found_error"
    assert [b.id for b in other.messages.batches.list()] == [theirs.id]
    assert [b.id for b in client.messages.batches.list()] == [mine.id]


def test_list_pages_newest_first(setup: Setup) -> None:
    client = setup.client()
    ids = [client.messages.batches.create(requests=requests(f"b{i}")).id for i in range(5)]  # type: ignore[arg-type]
    newest = ids[::-1]
    first = client.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == newest[:2]
    assert first.has_more and first.first_id == newest[0] and first.last_id == newest[1]
    assert [b.id for b in client.messages.batches.list(limit=2)] == newest  # auto-paging
    after = client.messages.batches.list(limit=10, after_id=newest[1])
    assert [b.id for b in after.data] == newest[2:] and not after.has_more
    before = client.messages.batches.list(limit=2, before_id=newest[3])
    assert [b.id for b in before.data] == newest[1:3] and before.has_more


def test_cancel_then_delete_settles_what_succeeded(setup: Setup) -> None:
    setup.fake.control("POST", "batches", json={"processing_seconds": 3.0})
    client = setup.client()
    batch = client.messages.batches.create(requests=requests("a", "b", "c"))  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.delete(batch.id)  # still processing: refused upstream
    time.sleep(1.3)  # the first of three lines is done at 1 s, the second at 2 s
    canceled = client.messages.batches.cancel(batch.id)
    assert canceled.processing_status == "canceling"
    ended = wait_ended(client, batch.id)
    assert ended.request_counts.succeeded == 1 and ended.request_counts.canceled == 2
    deleted = client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    assert len(setup.usage_entries()) == 1  # charged before its results went away
    assert setup.held_micros() == 0
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)


def test_quarantined_or_disabled_account_still_serves_its_batches(setup: Setup) -> None:
    client = setup.client()
    batch = client.messages.batches.create(requests=requests("keep me"))  # type: ignore[arg-type]
    sent = next(r for r in setup.fake.requests() if r["path"] == "/v1/messages/batches")
    owner = next(a for a, k in setup.accounts.items() if k == sent["credential"])
    services = setup.relay.services
    setup.relay.call(lambda: services.scheduler.quarantine(owner, "upstream_errors", None, "test"))
    with setup.relay.admin() as admin:
        admin.post(f"/admin/accounts/{owner}/disable").raise_for_status()
    ended = wait_ended(client, batch.id)
    assert [r.custom_id for r in client.messages.batches.results(ended.id)] == ["row-0"]
    setup.settle()
    wait_for(lambda: setup.held_micros() == 0, "the batch to settle")
    assert len(setup.usage_entries()) == 1

    # removed: still readable while its credential is stored
    from pool import accounts as account_repo

    async def remove() -> None:
        async with services.db.transaction() as session:
            await account_repo.remove_account(session, owner)
        services.directory.invalidate()

    setup.relay.call(remove)
    assert client.messages.batches.retrieve(batch.id).processing_status == "ended"
    assert [b.id for b in client.messages.batches.list()] == [batch.id]


def test_a_batch_seen_ended_is_settled_without_waiting_for_the_poll(setup: Setup) -> None:
    client = setup.client()
    batch = client.messages.batches.create(requests=requests("quick", "quicker"))  # type: ignore[arg-type]
    wait_ended(client, batch.id)
    wait_for(lambda: len(setup.usage_entries()) == 2, "the two lines to be charged")
    wait_for(lambda: setup.held_micros() == 0, "the rest of the hold to be released")


def test_a_settlement_that_dies_half_way_is_finished_once(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import batch_settlement

    client = setup.client()
    client.messages.batches.create(requests=requests(*(f"row {i}" for i in range(12))))  # type: ignore[arg-type]
    time.sleep(0.8)  # ended upstream, unseen by the relay
    real = batch_settlement.charge_lines
    calls = 0

    async def dying(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("the worker died")
        return await real(*args, **kwargs)

    monkeypatch.setattr(batch_settlement, "CHUNK_LINES", 5)
    monkeypatch.setattr(batch_settlement, "charge_lines", dying)
    assert setup.settle() == {"failed": 1}
    assert len(setup.usage_entries()) == 10  # two chunks of five made it
    held = setup.held_micros()
    assert held > 0
    monkeypatch.setattr(batch_settlement, "charge_lines", real)
    assert setup.settle() == {"settled": 1}
    entries = setup.usage_entries()
    assert len(entries) == 12 and len({e["request_id"] for e in entries}) == 12
    assert setup.held_micros() == 0
    assert setup.relay.reconcile()["discrepancies"] == []


def test_batch_poll_cron_follows_the_setting() -> None:
    from workers.main import batch_poll_cron, worker_settings

    every_minute = batch_poll_cron(60)
    assert every_minute.second == 0 and every_minute.minute == set(range(60))
    assert batch_poll_cron(15).second == {0, 15, 30, 45}
    assert batch_poll_cron(300).minute == {0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55}
    from app.settings import Settings

    jobs = worker_settings(Settings(_env_file=None, batch_poll_seconds=10))["cron_jobs"]  # type: ignore[call-arg]
    [poll] = [j for j in jobs if j.name == "cron:settle_batches"]
    assert poll.second == {0, 10, 20, 30, 40, 50}


def test_key_budgets_hold_and_count_a_batch(setup: Setup) -> None:
    import sqlalchemy as sa

    from billing.models import KeySpend

    with setup.relay.admin() as admin:
        keys = {
            name: admin.post(
                f"/admin/customers/{setup.customer_id}/keys",
                json={"name": name, "daily_budget_usd": budget},
            )
            .raise_for_status()
            .json()
            for name, budget in (("small", "0.0001"), ("big", "5"))
        }
    with pytest.raises(anthropic.PermissionDeniedError):
        setup.client(keys["small"]["key"]).messages.batches.create(requests=requests("no"))  # type: ignore[arg-type]
    assert setup.held_micros() == 0
    client = setup.client(keys["big"]["key"])
    batch = client.messages.batches.create(requests=requests("yes", "also"))  # type: ignore[arg-type]
    wait_ended(client, batch.id)
    wait_for(lambda: setup.held_micros() == 0, "the batch to settle")
    charged = -sum(int(Decimal(e["amount_usd"]) * 1_000_000) for e in setup.usage_entries())
    assert charged > 0
    services = setup.relay.services

    async def spend() -> list[tuple[int, int]]:
        table = KeySpend.__table__  # type: ignore[attr-defined]
        async with services.db.transaction() as session:
            rows = await session.execute(
                sa.select(table.c.spent_micros, table.c.held_micros).where(
                    table.c.key_id == keys["big"]["id"]
                )
            )
            return [(int(r[0]), int(r[1])) for r in rows]

    assert setup.relay.call(spend) == [(charged, 0), (charged, 0)]  # the day and the month


def test_reconciliation_releases_only_a_batch_hold_without_its_batch(setup: Setup) -> None:
    from datetime import timedelta

    from billing import holds
    from billing.batch_billing import BATCH_HOLD_INSTANCE
    from billing.models import utcnow
    from billing.owned import MessageBatch

    services = setup.relay.services
    old = utcnow() - timedelta(hours=30)

    async def place() -> None:
        async with services.db.transaction() as session:
            for request_id in ("req_orphan", "req_recorded"):
                await holds.place(
                    session,
                    holds.HoldRequest(
                        request_id=request_id,
                        customer_id=setup.customer_id,
                        key_id="key_x",
                        amount_micros=1000,
                        instance_id=BATCH_HOLD_INSTANCE,
                        endpoint="batch",
                        started_at=old,
                    ),
                )
            session.add(
                MessageBatch(
                    id="msgbatch_recorded",
                    customer_id=setup.customer_id,
                    key_id="key_x",
                    account_id="acc_x",
                    request_id="req_recorded",
                    hold_micros=1000,
                    created_at=old,
                )
            )

    setup.relay.call(place)
    assert setup.held_micros() == 2000
    report = setup.relay.reconcile()
    assert report["holds_released"] == 1
    assert setup.held_micros() == 1000  # the recorded batch keeps its hold, however old


@needs_postgres_and_redis
def test_the_worker_settles_ended_batches(
    setup: Setup, settings_env: dict[str, str], tmp_path: Path
) -> None:
    """``poolrelay worker`` (arq, real Redis) runs the batch poll every BATCH_POLL_SECONDS."""
    client = setup.client()
    client.messages.batches.create(requests=requests("worker one", "worker two"))  # type: ignore[arg-type]
    time.sleep(0.8)  # ended upstream, unseen by the relay
    assert setup.usage_entries() == []
    log = tmp_path / "worker.log"
    proc = start_worker({**settings_env, "POOLRELAY_BATCH_POLL_SECONDS": "1"}, log)
    try:
        wait_for(lambda: setup.held_micros() == 0, "the worker to settle the batch")
        assert proc.poll() is None, log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    assert len(setup.usage_entries()) == 2
    assert "Traceback" not in log.read_text(), log.read_text()
