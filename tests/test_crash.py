"""A relay process SIGKILLed with streams in flight (issue 12, items 1 and 6; PostgreSQL + Redis).

What the operator must find afterwards, without doing anything: reconciliation (here
``poolrelay reconcile``, as the worker runs it every 30 s) finishes the dead relay's holds —
charging each stream what its recorded progress says it had used — and gives the
concurrency slots of its leases back at once, not when the leases expire 15 minutes later.
Meanwhile a live relay's streams on the same account keep their holds and their slots.

It runs on the fault tests' stack (:mod:`tests.test_faults`): relays with a 2 s heartbeat on a
private Redis, the sandbox account ``solo``.
"""

from __future__ import annotations

import signal
import time

import httpx

from tests.conftest import needs_postgres_and_redis
from tests.harness import FakeUpstream
from tests.test_faults import ADMIN, CREDENTIAL, HEARTBEAT, Stack, open_stream, stack  # noqa: F401
from tests.test_multiprocess import create_customer, micros

pytestmark = needs_postgres_and_redis  # a relay's crash is seen through a shared Redis


def in_flight(url: str) -> int:
    items = httpx.get(f"{url}/admin/accounts", headers=ADMIN, timeout=10).json()["items"]
    return sum(int(i.get("in_flight") or 0) for i in items)


def test_a_killed_relay_is_finished_by_reconciliation_and_its_slots_come_back(
    stack: Stack,  # noqa: F811  (the fixture imported above)
    fake: FakeUpstream,
) -> None:
    doomed, doomed_url, _ = stack.relay("doomed")
    _, survivor_url, _ = stack.relay("survivor")
    customer_id, key = create_customer(survivor_url, "c", 5_000_000)
    fake.fault(CREDENTIAL, "slow_stream", delay=0.5)

    doomed_streams = [open_stream(doomed_url, key) for _ in range(3)]
    survivor = open_stream(survivor_url, key)
    for stream in [*doomed_streams, survivor]:
        assert stream.started.wait(20) and stream.error is None, "the streams did not start"
    assert in_flight(survivor_url) == 4

    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    time.sleep(HEARTBEAT + 0.5)  # its heartbeat lapses; the survivor's is renewed

    killed_at = time.monotonic()
    report = stack.reconcile()
    if not report["heartbeats_trusted"]:
        # Redis's memory began when the stack started it: wait out the grace period
        time.sleep(max(0.0, 2 * HEARTBEAT - (time.monotonic() - killed_at)) + 0.5)
        report = stack.reconcile()
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
    assert survivor.request_id in {e["request_id"] for e in usage}
    assert in_flight(survivor_url) == 0
