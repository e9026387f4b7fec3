"""A relay process SIGKILLed with streams in flight (issue 12, items 1 and 6; PostgreSQL + Redis).

What the operator must find afterwards, without doing anything: reconciliation (here
``poolrelay reconcile``, as the worker runs it every 30 s) finishes the dead relay's holds —
charging each stream what its recorded progress says it had used — and gives the
concurrency slots of its leases back at once, not when the leases expire 15 minutes later.
Meanwhile a live relay's streams on the same account keep their holds and their slots.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PG_URL, REDIS_URL
from tests.harness import ADMIN_TOKEN, FakeUpstream
from tests.test_multiprocess import (
    cli_add_account,
    create_customer,
    free_port,
    micros,
    wait_ready,
)

pytestmark = pytest.mark.skipif(
    not (PG_URL and REDIS_URL), reason="a relay process's crash needs PostgreSQL and Redis"
)

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
CREDENTIAL = "sk-ant-api03-crash-aaaa-0000000001"
MODEL = "claude-haiku-4-5"
HEARTBEAT = 2  # seconds: the dead relay's heartbeat lapses quickly


def start(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log)
    return proc, url


@pytest.fixture
def crash_env(settings_env: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        **settings_env,
        "POOLRELAY_LOG_LEVEL": "WARNING",
        "POOLRELAY_HEARTBEAT_SECONDS": str(HEARTBEAT),
    }


@pytest.fixture
def relays(crash_env: dict[str, str], tmp_path: Path) -> Iterator[list[Any]]:
    procs: list[Any] = []
    try:
        for name in ("doomed", "survivor"):
            procs.append(start(crash_env, tmp_path / f"{name}.log"))
        yield procs
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def stream_in_background(url: str, key: str, started: threading.Event, out: list[Any]) -> None:
    def run() -> None:
        try:
            with httpx.stream(
                "POST",
                f"{url}/v1/messages",
                headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                json={
                    "model": MODEL,
                    "max_tokens": 64,
                    "stream": True,
                    "messages": [{"role": "user", "content": "a slow story"}],
                },
                timeout=60,
            ) as response:
                out.append(response.headers.get("x-poolrelay-request-id"))
                for line in response.iter_lines():
                    if line.startswith("event: content_block_delta"):
                        started.set()
        except httpx.HTTPError as exc:
            out.append(exc)

    threading.Thread(target=run, daemon=True).start()


def in_flight(url: str) -> int:
    items = httpx.get(f"{url}/admin/accounts", headers=ADMIN, timeout=10).json()["items"]
    return sum(int(i.get("in_flight") or 0) for i in items)


def test_a_killed_relay_is_finished_by_reconciliation_and_its_slots_come_back(
    relays: list[Any],
    fake: FakeUpstream,
    crash_env: dict[str, str],
    tmp_path: Path,
) -> None:
    (doomed, doomed_url), (_, survivor_url) = relays
    cli_add_account("crashy", CREDENTIAL, fake.url)
    customer_id, key = create_customer(survivor_url, "c", 5_000_000)
    fake.fault(CREDENTIAL, "slow_stream", delay=0.5)

    doomed_started = [threading.Event() for _ in range(3)]
    doomed_ids: list[Any] = []
    for event in doomed_started:
        stream_in_background(doomed_url, key, event, doomed_ids)
    survivor_started = threading.Event()
    survivor_ids: list[Any] = []
    stream_in_background(survivor_url, key, survivor_started, survivor_ids)
    for event in [*doomed_started, survivor_started]:
        assert event.wait(20), "the streams did not start"
    assert in_flight(survivor_url) == 4

    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    time.sleep(HEARTBEAT + 0.5)  # its heartbeat lapses; the survivor's is renewed

    killed_at = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "reconcile"],
        env=crash_env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    if not report["heartbeats_trusted"]:
        # Redis's memory began when the test flushed it: wait out the grace period
        time.sleep(max(0.0, 2 * HEARTBEAT - (time.monotonic() - killed_at)) + 0.5)
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "reconcile"],
            env=crash_env,
            capture_output=True,
            timeout=60,
        )
        report = json.loads(done.stdout)
    assert report["heartbeats_trusted"] is True, report
    # the three dead streams had recorded their progress (message_start): charged, not released
    assert report["holds_settled"] == 3, report
    assert report["leases_dropped"] == 3, report
    assert in_flight(survivor_url) == 1  # the survivor's own stream keeps its slot

    with httpx.Client(base_url=survivor_url, headers=ADMIN, timeout=30) as admin:
        customer = admin.get(f"/admin/customers/{customer_id}").json()
        assert micros(customer["held_usd"]) > 0  # the survivor's stream still holds
        # the survivor's stream finishes normally and is charged once
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            customer = admin.get(f"/admin/customers/{customer_id}").json()
            if customer["held_usd"] == "0.000000":
                break
            time.sleep(0.5)
        assert customer["held_usd"] == "0.000000"
        ledger = admin.get(f"/admin/customers/{customer_id}/ledger", params={"limit": 100}).json()
    usage = [e for e in ledger["items"] if e["kind"] == "usage"]
    assert len(usage) == 4 and len({e["request_id"] for e in usage}) == 4
    assert micros(customer["balance_usd"]) == sum(micros(e["amount_usd"]) for e in ledger["items"])
    assert survivor_ids and survivor_ids[0] in {e["request_id"] for e in usage}
    assert in_flight(survivor_url) == 0
