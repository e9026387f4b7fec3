"""Webhooks (contract §5): signed POSTs delivered by the workers at least once, retried with
the same event id, every try in the deliveries list; each event raised once per transition;
no redirects followed, no credentials or cookies sent; secrets shown once, stored encrypted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import sqlalchemy as sa

from app.oversight import delivery, signals
from app.oversight.models import WebhookEvent
from tests.conftest import needs_postgres_and_redis
from tests.harness import FakeUpstream, RelayServer, start_worker
from tests.harness import test_settings as relay_settings
from tests.test_cli import database_text
from tests.webhook_receiver import Receiver
from workers import notify

SECRET = "test-webhook-secret-0123456789"
ALL_EVENTS = [
    "account.quarantined",
    "account.restored",
    "customer.balance_low",
    "key.budget_exhausted",
    "reconciliation.discrepancy",
]


@pytest.fixture
def hooked(settings_env: dict[str, str], fake: FakeUpstream) -> Iterator[RelayServer]:
    """A relay whose background jobs do not run: the test runs them, so counts are exact."""
    server = RelayServer.start(relay_settings(settings_env, embedded_jobs=False))
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET).start()
    yield r
    r.stop()


def transitions(relay: RelayServer) -> dict[str, Any]:
    result: dict[str, Any] = relay.call(
        lambda: notify.notify_transitions({"services": relay.services})
    )
    return result


def deliver(relay: RelayServer, now: datetime | None = None) -> dict[str, Any]:
    services = relay.services
    result: dict[str, Any] = relay.call(
        lambda: delivery.deliver_due(services.db, services.cipher, now=now)
    )
    return result


def events_of(relay: RelayServer, event_type: str) -> list[WebhookEvent]:
    async def load() -> list[WebhookEvent]:
        async with relay.services.db.transaction() as session:
            rows = await session.execute(
                sa.select(WebhookEvent)
                .where(WebhookEvent.type == event_type)  # type: ignore[arg-type]
                .order_by(WebhookEvent.created_at)  # type: ignore[arg-type]
            )
            return list(rows.scalars())

    return relay.call(load)


def register(admin: httpx.Client, url: str, events: list[str] = ALL_EVENTS) -> dict[str, Any]:
    r = admin.post("/admin/webhooks", json={"url": url, "events": events, "secret": SECRET})
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def low_balance_customer(admin: httpx.Client, threshold: str = "5") -> str:
    customer = admin.post("/admin/customers", json={"name": "low"}).json()
    cid = customer["id"]
    admin.post(f"/admin/customers/{cid}/topups", json={"amount_usd": "10"}).raise_for_status()
    r = admin.patch(f"/admin/customers/{cid}", json={"low_balance_usd": threshold})
    assert r.status_code == 200 and r.json()["low_balance_usd"] == "5.000000", r.text
    return str(cid)


def move(admin: httpx.Client, cid: str, amount: str) -> None:
    admin.post(
        f"/admin/customers/{cid}/adjustments", json={"amount_usd": amount, "memo": "test"}
    ).raise_for_status()


def test_signed_delivery_is_retried_with_the_same_event_id(
    hooked: RelayServer, receiver: Receiver
) -> None:
    with hooked.admin() as admin:
        hook = register(admin, receiver.url)
        cid = low_balance_customer(admin)
        move(admin, cid, "-6")  # 10 → 4, below 5
    assert transitions(hooked) == {"events": 1}
    first = deliver(hooked)
    assert first == {"delivered": 0, "pending": 1, "failed": 0}
    assert deliver(hooked) == {"delivered": 0, "pending": 0, "failed": 0}  # not due yet
    later = datetime.now(UTC) + timedelta(seconds=3)
    assert deliver(hooked, now=later) == {"delivered": 1, "pending": 0, "failed": 0}
    assert deliver(hooked, now=later + timedelta(hours=2))["delivered"] == 0  # done for good

    got = receiver.received
    assert [r.answered for r in got] == [500, 200]
    assert all(r.signature_ok for r in got)
    assert got[0].body == got[1].body  # the same bytes, the same event id, on every try
    event = got[0].event
    assert set(event) == {"id", "type", "created_at", "data"}
    assert event["type"] == "customer.balance_low" and event["id"].startswith("evt_")
    assert event["data"]["customer_id"] == cid
    assert event["data"]["balance_usd"] == "4.000000"
    assert event["data"]["low_balance_usd"] == "5.000000"
    for r in got:
        assert r.headers["x-poolrelay-signature"].startswith("sha256=")
        assert r.headers["content-type"] == "application/json"
        assert "authorization" not in r.headers and "x-api-key" not in r.headers
        assert "cookie" not in r.headers  # the receiver set one on the first answer

    with hooked.admin() as admin:
        tries = admin.get(f"/admin/webhooks/{hook['id']}/deliveries").json()
    items = tries["items"]
    assert [t["status_code"] for t in items] == [200, 500]  # newest first
    assert [t["attempt"] for t in items] == [2, 1]
    assert {t["event_id"] for t in items} == {event["id"]}
    assert items[1]["error"] == "HTTP 500" and items[0]["error"] is None
    assert items[0]["ok"] is True and items[1]["ok"] is False
    assert all(t["created_at"] and t["event_type"] == "customer.balance_low" for t in items)


def test_each_event_is_raised_once_per_transition(
    hooked: RelayServer, fake: FakeUpstream, database_url: str
) -> None:
    relay = hooked
    services = relay.services
    with relay.admin() as admin:
        register(admin, "http://127.0.0.1:9/unused")
        cid = low_balance_customer(admin)

    # account.quarantined / account.restored
    account_id = relay.add_account("a1", "sk-ant-api03-webhooks-0001", fake.url)
    transitions(relay)
    assert events_of(relay, "account.quarantined") == []
    relay.call(lambda: services.scheduler.quarantine(account_id, "credential_invalid", None, "401"))
    for _ in range(3):
        transitions(relay)
    quarantined = events_of(relay, "account.quarantined")
    assert len(quarantined) == 1
    assert quarantined[0].data["account_id"] == account_id
    assert quarantined[0].data["reason"] == "credential_invalid"
    relay.call(lambda: services.scheduler.clear_quarantine(account_id))
    for _ in range(3):
        transitions(relay)
    restored = events_of(relay, "account.restored")
    assert len(restored) == 1 and restored[0].data["account_id"] == account_id
    relay.call(lambda: services.scheduler.quarantine(account_id, "upstream_errors", None, "5xx"))
    transitions(relay)
    transitions(relay)
    assert len(events_of(relay, "account.quarantined")) == 2  # a second transition

    # customer.balance_low: once while low, again only after it recovered and fell again
    with relay.admin() as admin:
        move(admin, cid, "-6")
        transitions(relay)
        move(admin, cid, "-1")
        transitions(relay)
        assert len(events_of(relay, "customer.balance_low")) == 1
        move(admin, cid, "10")
        transitions(relay)
        move(admin, cid, "-10")
        transitions(relay)
    assert len(events_of(relay, "customer.balance_low")) == 2

    # key.budget_exhausted: refused requests (the real request path) raise it once per period
    relay.call(lambda: services.scheduler.clear_quarantine(account_id))
    with relay.admin() as admin:
        key = admin.post(
            f"/admin/customers/{cid}/keys",
            json={"name": "capped", "daily_budget_usd": "0.000001"},
        ).json()
        admin.post(f"/admin/customers/{cid}/topups", json={"amount_usd": "50"}).raise_for_status()
    client = anthropic.Anthropic(api_key=key["key"], base_url=relay.url, max_retries=0)
    for _ in range(3):  # the real SDK sees the relay's 403; the workers see one transition
        with pytest.raises(anthropic.PermissionDeniedError, match="budget"):
            client.messages.create(
                model="claude-haiku-4-5",
                max_tokens=20,
                messages=[{"role": "user", "content": "hi"}],
            )
        transitions(relay)
    exhausted = events_of(relay, "key.budget_exhausted")
    assert len(exhausted) == 1
    assert exhausted[0].data["key_id"] == key["id"] and exhausted[0].data["budget"] == "daily"
    assert exhausted[0].data["budget_usd"] == "0.000001"
    assert relay.call(lambda: services.redis.scard(signals.BUDGET_EXHAUSTED)) == 0

    # reconciliation.discrepancy: once while the books disagree, again after a fix and a new one
    def corrupt(delta: int) -> None:
        async def run() -> None:
            async with services.db.transaction() as session:
                await session.execute(
                    sa.text(
                        "UPDATE customers SET balance_micros = balance_micros + :d WHERE id = :c"
                    ),
                    {"d": delta, "c": cid},
                )

        relay.call(run)

    corrupt(7)
    relay.reconcile()
    relay.reconcile()
    found = events_of(relay, "reconciliation.discrepancy")
    assert len(found) == 1
    assert found[0].data["kind"] == "balance_mismatch" and found[0].data["customer_id"] == cid
    corrupt(-7)
    relay.reconcile()
    corrupt(3)
    relay.reconcile()
    assert len(events_of(relay, "reconciliation.discrepancy")) == 2
    corrupt(-3)

    # every event went to the outbox with one delivery to the webhook that wants it
    async def pending() -> int:
        async with services.db.transaction() as session:
            n = await session.scalar(sa.text("SELECT count(*) FROM webhook_deliveries"))
            return int(n or 0)

    assert len(events_of(relay, "account.restored")) == 2  # cleared before the budget part
    assert relay.call(pending) == 2 + 2 + 2 + 1 + 2


def test_embedded_jobs_deliver_500_then_200(
    settings_env: dict[str, str], fake: FakeUpstream, receiver: Receiver
) -> None:
    """The server's own timers (embedded defaults) look for the event and deliver it."""
    server = RelayServer.start(
        relay_settings(settings_env, embedded_jobs=True, webhook_scan_seconds=0.5)
    )
    try:
        with server.admin() as admin:
            hook = register(admin, receiver.url, ["customer.balance_low"])
            cid = low_balance_customer(admin)
            move(admin, cid, "-9")
            got = receiver.wait_for(2, timeout=30)
            assert [r.answered for r in got] == [500, 200], got
            assert got[0].event["id"] == got[1].event["id"]
            assert all(r.signature_ok for r in got)
            tries = admin.get(f"/admin/webhooks/{hook['id']}/deliveries").json()["items"]
            assert [t["status_code"] for t in tries] == [200, 500]
            failed = admin.get("/admin/webhook-deliveries", params={"failed": "true"}).json()
            assert [t["status_code"] for t in failed["items"]] == [500]
            assert failed["items"][0]["webhook_id"] == hook["id"]
    finally:
        server.stop()


def test_no_redirects_followed(hooked: RelayServer, receiver: Receiver) -> None:
    target = Receiver(SECRET, fail_first=False).start()
    try:
        receiver.redirect_to = target.url
        with hooked.admin() as admin:
            hook = register(admin, receiver.url, ["customer.balance_low"])
            cid = low_balance_customer(admin)
            move(admin, cid, "-6")
        transitions(hooked)
        assert deliver(hooked)["pending"] == 1
        assert len(receiver.received) == 1 and target.received == []
        with hooked.admin() as admin:
            tries = admin.get(f"/admin/webhooks/{hook['id']}/deliveries").json()["items"]
        assert tries[0]["status_code"] == 307 and "redirect" in tries[0]["error"]
    finally:
        target.stop()


def test_give_up_after_a_day(hooked: RelayServer) -> None:
    with hooked.admin() as admin:
        hook = register(admin, "http://127.0.0.1:9/closed", ["customer.balance_low"])
        cid = low_balance_customer(admin)
        move(admin, cid, "-6")
    transitions(hooked)
    now = datetime.now(UTC)
    outcomes = []
    for _ in range(40):
        result = deliver(hooked, now=now)
        outcomes.append(result)
        if result["failed"]:
            break
        now += timedelta(hours=1, seconds=1)
    assert outcomes[-1]["failed"] == 1
    with hooked.admin() as admin:
        tries = admin.get(f"/admin/webhooks/{hook['id']}/deliveries", params={"limit": 100}).json()
    items = tries["items"]
    assert len(items) == len(outcomes) and len({t["event_id"] for t in items}) == 1
    assert all(t["status_code"] is None and "ConnectError" in t["error"] for t in items)
    span = datetime.fromisoformat(items[0]["created_at"]) - datetime.fromisoformat(
        items[-1]["created_at"]
    )
    assert timedelta(hours=20) < span <= timedelta(days=1)


def test_webhook_api_validation_secrets_and_delete(
    hooked: RelayServer, receiver: Receiver, database_url: str
) -> None:
    with hooked.admin() as admin:
        for body in (
            {"url": "ftp://x", "events": ["account.restored"]},
            {"url": "http://u:p@example.com/", "events": ["account.restored"]},
            {"url": "http://example.com/", "events": ["nope"]},
            {"url": "http://example.com/", "events": []},
            {"url": "http://example.com/", "events": ["account.restored"], "secret": "short"},
            {"url": "http://example.com/", "events": ["account.restored"], "x": 1},
        ):
            r = admin.post("/admin/webhooks", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
        made = admin.post(
            "/admin/webhooks", json={"url": receiver.url, "events": ["customer.balance_low"]}
        )
        assert made.status_code == 201
        hook = made.json()
        assert hook["secret"].startswith("whsec_") and len(hook["secret"]) > 40
        listed = admin.get("/admin/webhooks").json()["items"]
        assert [h["id"] for h in listed] == [hook["id"]]
        assert all("secret" not in h for h in listed)
        assert "secret" not in admin.get(f"/admin/webhooks/{hook['id']}").json()
        assert admin.get("/admin/webhooks/whk_nope/deliveries").status_code == 404
        assert admin.delete("/admin/webhooks/whk_nope").status_code == 404
        audit = admin.get("/admin/audit", params={"action": "webhook.create"}).json()["items"]
        assert len(audit) == 1 and "secret" not in json.dumps(audit)
        assert hook["secret"] not in json.dumps(audit)
        # deleted: listed no more, nothing more sent
        r = admin.delete(f"/admin/webhooks/{hook['id']}")
        assert r.status_code == 200 and r.json()["status"] == "deleted"
        assert admin.get("/admin/webhooks").json()["items"] == []
        cid = low_balance_customer(admin)
        move(admin, cid, "-6")
    transitions(hooked)
    deliver(hooked)
    assert receiver.received == []
    assert hook["secret"].encode() not in database_text(database_url)


@needs_postgres_and_redis
def test_poolrelay_worker_delivers(
    relay: RelayServer, settings_env: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    """Production shape: the server runs no jobs; ``poolrelay worker`` (arq) finds the event
    and delivers it, 500 then 200, the same event id."""
    assert not relay.settings.run_jobs_in_process
    log = tmp_path / "worker.log"
    proc = start_worker({**settings_env, "POOLRELAY_LOG_LEVEL": "INFO"}, log)
    try:
        with relay.admin() as admin:
            hook = register(admin, receiver.url, ["customer.balance_low"])
            cid = low_balance_customer(admin)
            move(admin, cid, "-9")
        got = receiver.wait_for(2, timeout=40)
        assert [r.answered for r in got] == [500, 200], log.read_text()
        assert got[0].event["id"] == got[1].event["id"] and all(r.signature_ok for r in got)
        with relay.admin() as admin:
            tries = admin.get(f"/admin/webhooks/{hook['id']}/deliveries").json()["items"]
        assert [t["status_code"] for t in tries] == [200, 500]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    assert "Traceback" not in log.read_text()
