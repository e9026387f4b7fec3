"""The background jobs: ``poolrelay worker`` (arq) with a real Redis, the same job functions
in-process on the embedded defaults (where ``poolrelay serve`` runs them on timers).

What a worker run must do: bring a quarantined account back once its health probe passes, and
release a hold left behind by a process that no longer heart-beats.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from app import instances
from billing import holds
from billing.holds import HoldRequest
from tests.conftest import REDIS_URL
from tests.harness import FakeUpstream, RelayServer, start_worker
from workers import tasks

MODEL = "claude-haiku-4-5"
KEY_A = "sk-ant-api03-worker-aaaa-0000000001"
KEY_B = "sk-ant-api03-worker-bbbb-0000000002"
DEAD_INSTANCE = "inst_deadbeefdeadbeef"


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


async def age_redis_memory(redis: Any, seconds: float = 3600.0) -> None:
    """Make Redis look as if its memory began ``seconds`` ago (app/instances.py's epoch)."""
    await redis.set(instances.EPOCH_KEY, repr(time.time() - seconds))


def account(relay: RelayServer, name: str) -> dict[str, Any]:
    with relay.admin() as admin:
        items = admin.get("/admin/accounts").raise_for_status().json()["items"]
    return next(i for i in items if i["name"] == name)


def ask(relay: RelayServer, key: str) -> httpx.Response:
    return httpx.post(
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


def prepare(relay: RelayServer, fake: FakeUpstream) -> tuple[str, str]:
    """A quarantined account whose fault is fixed, and a hold left behind by a dead process.
    Returns (customer_id, customer key)."""
    relay.add_account("flaky", KEY_A, fake.url, weight=3)
    relay.add_account("steady", KEY_B, fake.url)
    customer_id, key = relay.create_customer(balance_usd="1")
    fake.fault(KEY_A, "unauthorized")
    assert ask(relay, key).status_code == 200  # failed over
    assert account(relay, "flaky")["quarantine_reason"] == "credential_invalid"
    fake.clear_faults()  # the operator fixed the credential upstream

    with relay.admin() as admin:
        key_id = admin.get(f"/admin/customers/{customer_id}/keys").json()["items"][0]["id"]
    services = relay.services

    async def leave_hold() -> None:
        async with services.db.transaction() as session:
            await holds.place(
                session,
                HoldRequest(
                    request_id="req_lefthehind0000000000001",
                    customer_id=customer_id,
                    key_id=key_id,
                    amount_micros=250_000,
                    instance_id=DEAD_INSTANCE,  # never heart-beat: its process is gone
                    requested_model=MODEL,
                ),
            )

    relay.call(leave_hold)
    assert relay.customer(customer_id)["held_usd"] == "0.250000"
    return customer_id, key


def check_recovered(relay: RelayServer, fake: FakeUpstream, customer_id: str, key: str) -> None:
    flaky = account(relay, "flaky")
    assert flaky["status"] == "active" and flaky["quarantine_reason"] is None
    customer = relay.customer(customer_id)
    assert customer["held_usd"] == "0.000000"
    # the left-behind hold was released, not charged
    assert [e["kind"] for e in relay.ledger(customer_id)] == ["usage", "topup"]
    before = fake.count(KEY_A)
    assert ask(relay, key).status_code == 200
    assert fake.count(KEY_A) == before + 1, "the account is not back in service"
    # the probe was a free call: only the one failed-over message ever reached the account
    messages = [
        r for r in fake.requests(limit=200) if r["credential"] == KEY_A and r["method"] == "POST"
    ]
    assert len(messages) == 2


def test_worker_probes_and_reconciles(
    relay: RelayServer, fake: FakeUpstream, settings_env: dict[str, str], tmp_path: Path
) -> None:
    customer_id, key = prepare(relay, fake)
    if not REDIS_URL:
        # Embedded mode: no separate worker (it could not see the server's in-memory Redis);
        # ``poolrelay serve`` runs these very functions on timers.
        services = relay.services
        probed = relay.call(lambda: tasks.probe_accounts({"services": services}))
        assert [p["ok"] for p in probed] == [True]
        report = relay.call(lambda: tasks.reconcile_billing({"services": services}))
        assert report["holds_released"] == 1 and report["discrepancies"] == []
        check_recovered(relay, fake, customer_id, key)
        return

    # Redis has been up for long (a fresh epoch would make the worker wait for heartbeats)
    relay.call(lambda: age_redis_memory(relay.services.redis))
    log = tmp_path / "worker.log"
    proc = start_worker({**settings_env, "POOLRELAY_LOG_LEVEL": "INFO"}, log)
    try:
        # both jobs run at the worker's start-up, then on their timers
        recovered = wait_for(
            lambda: (
                account(relay, "flaky")["status"] == "active"
                and relay.customer(customer_id)["held_usd"] == "0.000000"
            ),
            timeout=20,
        )
        assert proc.poll() is None, log.read_text()
        assert recovered, log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
            raise
    assert code == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text, text
    check_recovered(relay, fake, customer_id, key)


def test_worker_refuses_an_in_memory_redis(settings_env: dict[str, str]) -> None:
    env = {**os.environ, **settings_env, "POOLRELAY_REDIS_URL": "memory://"}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "redis" in lines[0].lower() and lines[0].startswith("poolrelay: error:")
    assert "Traceback" not in done.stderr
