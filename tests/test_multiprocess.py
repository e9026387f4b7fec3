"""Several relay processes behave as one relay.

On PostgreSQL + Redis (``POOLRELAY_TEST_DATABASE_URL`` and ``POOLRELAY_TEST_REDIS_URL`` set): two
``poolrelay serve`` processes share the pool state (a quarantine seen by one is honoured by the
other, an operator's enable on one reaches the other) and one customer's concurrent load through
both never overdraws the balance.

On the embedded defaults there is no shared Redis: the pool state (headroom, leases,
quarantines, affinity) lives in each process's in-memory Redis, so sharing it between processes
needs a real Redis (``POOLRELAY_REDIS_URL``). What two relays on one SQLite file do share is the
ledger: there the test checks that two servers on the same file do not overdraw either.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

from billing.estimate import hold_micros
from billing.pricing import SEED_PRICES
from tests import harness
from tests.conftest import PG_URL, REDIS_URL
from tests.harness import ADMIN_TOKEN, FakeUpstream, RelayServer

MODEL = "claude-haiku-4-5"
HAIKU = next(p for p in SEED_PRICES if p.model == MODEL)
KEY_A = "sk-ant-api03-multi-aaaa-0000000001"
KEY_B = "sk-ant-api03-multi-bbbb-0000000002"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
REQUEST: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 200,
    "messages": [{"role": "user", "content": "Hello from two relays"}],
}
HOLD = hold_micros(REQUEST, HAIKU, Decimal(1))
SHARED_BACKENDS = bool(PG_URL and REDIS_URL)


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- two ``poolrelay serve`` processes --------------------------------------------------------


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server did not become ready: {log.read_text()}")


@pytest.fixture
def two_servers(settings_env: dict[str, str], tmp_path: Path) -> Iterator[list[str]]:
    """Two ``poolrelay serve`` processes on the test's database and Redis; their URLs."""
    env = {**os.environ, **settings_env, "POOLRELAY_LOG_LEVEL": "WARNING"}
    procs: list[tuple[subprocess.Popen[bytes], str, Path]] = []
    try:
        for i in (1, 2):
            port = free_port()
            log = tmp_path / f"serve{i}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            procs.append((proc, f"http://127.0.0.1:{port}", log))
        for proc, url, log in procs:
            wait_ready(url, proc, log)
        yield [url for _, url, _ in procs]
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def cli_add_account(name: str, credential: str, base_url: str, *args: str) -> None:
    from app.cli import main as cli

    with mock.patch("sys.stdin", io.StringIO(credential + "\n")):
        code = cli(["accounts", "add", "--name", name, "--base-url", base_url, *args])
    assert code == 0


def create_customer(url: str, name: str, balance_micros: int) -> tuple[str, str]:
    with httpx.Client(base_url=url, headers=ADMIN, timeout=30) as admin:
        customer = admin.post("/admin/customers", json={"name": name}).raise_for_status()
        customer_id = customer.json()["id"]
        key = admin.post(f"/admin/customers/{customer_id}/keys", json={"name": "k"})
        admin.post(
            f"/admin/customers/{customer_id}/topups",
            json={"amount_usd": f"{Decimal(balance_micros) / 1_000_000:.6f}"},
        ).raise_for_status()
    return customer_id, key.raise_for_status().json()["key"]


def accounts(url: str) -> dict[str, dict[str, Any]]:
    items = httpx.get(f"{url}/admin/accounts", headers=ADMIN, timeout=30).json()["items"]
    return {i["name"]: i for i in items}


def ask(url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=REQUEST,
        timeout=30,
    )


# --- concurrent load and the books ------------------------------------------------------------


def load(urls: list[str], key: str, total: int) -> list[httpx.Response]:
    """``total`` concurrent requests from one customer, split evenly over ``urls``."""

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=total)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:

            async def one(i: int) -> httpx.Response:
                return await client.post(
                    f"{urls[i % len(urls)]}/v1/messages",
                    headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                    json=REQUEST,
                )

            return list(await asyncio.gather(*(one(i) for i in range(total))))

    return asyncio.run(main())


def check_books(
    url: str, customer_id: str, responses: list[httpx.Response], upstream_calls: int
) -> None:
    ok = [r for r in responses if r.status_code == 200]
    for r in responses:
        if r.status_code != 200:
            assert r.status_code == 400, r.text
            assert "credit balance is too low" in r.json()["error"]["message"]
    assert len(ok) >= 20  # the balance covers 20 worst cases; actual costs are lower
    with httpx.Client(base_url=url, headers=ADMIN, timeout=30) as admin:
        customer = admin.get(f"/admin/customers/{customer_id}").raise_for_status().json()
        ledger: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = admin.get(f"/admin/customers/{customer_id}/ledger", params=params).json()
            ledger.extend(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                break
    assert customer["held_usd"] == "0.000000"
    assert micros(customer["balance_usd"]) >= 0, "overdrawn"
    assert micros(customer["balance_usd"]) == sum(micros(e["amount_usd"]) for e in ledger)
    debits = [e for e in ledger if e["kind"] == "usage"]
    assert len(debits) == len(ok) == upstream_calls
    assert {e["request_id"] for e in debits} == {r.headers["x-poolrelay-request-id"] for r in ok}


def wait_settled(url: str, customer_id: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        customer = httpx.get(f"{url}/admin/customers/{customer_id}", headers=ADMIN, timeout=30)
        if customer.json()["held_usd"] == "0.000000":
            return
        time.sleep(0.1)


# --- the tests --------------------------------------------------------------------------------


def test_two_relays_act_as_one(
    settings_env: dict[str, str], fake: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    if SHARED_BACKENDS:
        shared_pool_and_ledger(fake, request.getfixturevalue("two_servers"))
    else:
        shared_ledger_embedded(settings_env, fake)


def shared_pool_and_ledger(fake: FakeUpstream, urls: list[str]) -> None:
    one, two = urls
    # accounts added with the CLI while both servers run: picked up within seconds
    cli_add_account("a", KEY_A, fake.url, "--weight", "3", "--max-concurrency", "200")
    cli_add_account("b", KEY_B, fake.url, "--max-concurrency", "200")
    _customer_id, key = create_customer(one, "first", 10**6)
    for url in urls:
        assert wait_ready_accounts(url), "a server did not pick up the CLI's accounts"

    # a quarantine seen by one process is honoured by the other
    fake.fault(KEY_A, "unauthorized")
    assert ask(one, key).status_code == 200  # failed over, invisibly
    assert (fake.count(KEY_A), fake.count(KEY_B)) == (1, 1)
    view = accounts(two)["a"]
    assert view["status"] == "quarantined" and view["quarantine_reason"] == "credential_invalid"
    for _ in range(5):
        assert ask(two, key).status_code == 200
    assert (fake.count(KEY_A), fake.count(KEY_B)) == (1, 6), "process 2 sent traffic to A"

    # an operator's enable on process 2 returns A to service for process 1 as well
    fake.clear_faults()
    a_id = view["id"]
    httpx.post(f"{two}/admin/accounts/{a_id}/enable", headers=ADMIN, timeout=30)
    assert ask(one, key).status_code == 200
    assert fake.count(KEY_A) == 2

    # one customer's concurrent load through both processes never overdraws
    customer_id, key = create_customer(two, "second", 20 * HOLD)
    before = fake.stats()["total"]
    responses = load(urls, key, 100)
    wait_settled(one, customer_id)
    check_books(two, customer_id, responses, fake.stats()["total"] - before)


def wait_ready_accounts(url: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if len(accounts(url)) == 2:
            return True
        time.sleep(0.1)
    return False


def shared_ledger_embedded(settings_env: dict[str, str], fake: FakeUpstream) -> None:
    # Two relays on one SQLite file, each with its own in-memory Redis (so each its own view of
    # the pool): the balance, holds and ledger are the database's and stay exact.
    relays = [RelayServer.start(harness.test_settings(settings_env)) for _ in range(2)]
    try:
        relays[0].add_account("a", KEY_A, fake.url, max_concurrency=200)
        relays[1].services.directory.invalidate()  # do not wait for its 2 s refresh
        customer_id, key = relays[0].create_customer(balance_usd=f"{Decimal(20 * HOLD) / 10**6}")
        responses = load([r.url for r in relays], key, 100)
        wait_settled(relays[1].url, customer_id)
        check_books(relays[1].url, customer_id, responses, fake.count(KEY_A))
    finally:
        for relay in relays:
            relay.stop()
