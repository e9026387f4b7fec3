"""Benchmark scenario: many concurrent streams on a balance that covers only a few of them.

    python -m tests.bench.small_balance [--streams 200] [--covered 20] [--words 4000]
                                        [--delay 0.001] [--pg-url ...] [--redis-url ...]

Starts (as :mod:`tests.bench.bench_relay` does, with its helpers) the sandbox upstream and
``poolrelay serve`` on a scratch PostgreSQL database and Redis, with ONE upstream account added
with the product's defaults (no concurrency cap) and every setting at its default
(``STREAM_HOLD_TOKENS`` 8192, ``QUEUE_SECONDS`` 30). It measures what one stream costs (one
stream of ``--words`` words on ``claude-sonnet-4-5``, ``max_tokens`` 16000), gives a second
customer a balance of exactly ``--covered`` such streams, and opens ``--streams`` streams at
once for that customer, each paced (``--delay`` seconds between events) so that all of them
overlap. Printed: how many completed, how many were cut with the "credit balance is too low"
error event, how many were refused before starting (400), anything else; the charges; and the
overdraw — how far below zero the balance went (must be 0 µUSD) — with the books checked
(balance = Σ ledger, nothing held at the end, Σ charges ≤ the top-up). Nothing is asserted;
the exit status is 1 when money was overdrawn or the books do not balance.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from tests.bench.bench_relay import (
    ADMIN_TOKEN,
    Stack,
    admin,
    free_port,
)

CREDENTIAL = "sk-ant-api03-small-balance-0001"
MODEL = "claude-sonnet-4-5"


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def usd(amount: int) -> str:
    return f"{Decimal(amount) / 1_000_000:.6f}"


def new_customer(url: str, name: str, balance: int) -> tuple[str, str]:
    with admin(url) as client:
        customer = client.post("/admin/customers", json={"name": name}).raise_for_status().json()
        key = (
            client.post(f"/admin/customers/{customer['id']}/keys", json={"name": name})
            .raise_for_status()
            .json()["key"]
        )
        if balance:
            client.post(
                f"/admin/customers/{customer['id']}/topups", json={"amount_usd": usd(balance)}
            ).raise_for_status()
    return customer["id"], key


async def one_stream(client: httpx.AsyncClient, key: str, body: dict[str, Any]) -> str:
    """How one stream ended: completed, cut, refused_<status>, or other."""
    async with client.stream(
        "POST",
        "/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=body,
    ) as r:
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    if r.status_code != 200:
        return f"refused_{r.status_code}"
    if b"event: message_stop" in raw:
        return "completed"
    if b"credit balance is too low" in raw:
        return "cut"
    return "other"


def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="poolrelay-small-balance-"))
    stack = Stack(args, workdir)
    try:
        stack.flush_redis()
        stack.create_database()
        fake_port = free_port()
        fake = stack.start(
            "fake",
            ["fake-upstream", "--host", "127.0.0.1", "--port", str(fake_port)],
            f"http://127.0.0.1:{fake_port}",
            "/_fake/stats",
        )
        httpx.post(
            fake.url + "/_fake/limits",
            json={"key": "*", "requests_limit": 10**9, "tokens_limit": 10**12,
                  "input_tokens_limit": 10**12, "output_tokens_limit": 10**12},
        ).raise_for_status()  # fmt: skip
        stack.cli("accounts", "add", "--name", "one", "--base-url", fake.url, stdin=CREDENTIAL)
        relay_port = free_port()
        relay = stack.start(
            "relay",
            ["serve", "--host", "127.0.0.1", "--port", str(relay_port)],
            f"http://127.0.0.1:{relay_port}",
            "/readyz",
        )
        body = {
            "model": MODEL,
            "max_tokens": 16_000,
            "stream": True,
            "messages": [{"role": "user", "content": f"reply with {args.words} words"}],
        }
        # What one stream costs: measured once, by a customer with plenty.
        probe_id, probe_key = new_customer(relay.url, "probe", 10_000_000)
        ended = asyncio.run(_streams(relay.url, probe_key, body, 1))  # one stream, unpaced
        assert ended == ["completed"], ended
        time.sleep(0.5)
        with admin(relay.url) as client:
            ledger = client.get(f"/admin/customers/{probe_id}/ledger").json()["items"]
        one = -sum(micros(e["amount_usd"]) for e in ledger if e["kind"] == "usage")
        topup = one * args.covered
        customer_id, key = new_customer(relay.url, "small", topup)
        print(
            f"one stream of {args.words} words on {MODEL} costs {usd(one)} USD; balance "
            f"{usd(topup)} USD covers {args.covered}; opening {args.streams} streams at once "
            f"(events {args.delay * 1000:g} ms apart)",
            flush=True,
        )
        httpx.post(
            fake.url + "/_fake/faults",
            json={"key": CREDENTIAL, "fault": "slow_stream", "delay": args.delay},
        ).raise_for_status()
        started = time.monotonic()
        ended = asyncio.run(_streams(relay.url, key, body, args.streams))
        wall = time.monotonic() - started
        deadline = time.monotonic() + 30
        while True:
            with admin(relay.url) as client:
                customer = client.get(f"/admin/customers/{customer_id}").json()
            if customer["held_usd"] == "0.000000" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        (lowest,) = stack.sql(
            f"SELECT coalesce(min(balance_after_micros), 0) FROM ledger_entries "
            f"WHERE customer_id = '{customer_id}'"
        )[0]
        (ledger_sum, charges) = stack.sql(
            f"SELECT coalesce(sum(amount_micros), 0), "
            f"coalesce(sum(-amount_micros) FILTER (WHERE kind = 'usage'), 0) "
            f"FROM ledger_entries WHERE customer_id = '{customer_id}'"
        )[0]
        balance = micros(customer["balance_usd"])
        overdraw = max(0, -int(lowest), -balance)
        counts = {name: ended.count(name) for name in sorted(set(ended))}
        books = balance == int(ledger_sum) and customer["held_usd"] == "0.000000"
        print(f"streams in {wall:.1f} s: {counts}")
        print(
            f"charged {usd(int(charges))} USD of {usd(topup)} USD; balance {usd(balance)} USD; "
            f"held {customer['held_usd']} USD"
        )
        print(f"overdraw: {overdraw} µUSD (must be 0)")
        print(f"books: balance = Σ ledger and nothing held: {'yes' if books else 'NO'}")
        return 0 if overdraw == 0 and books and int(charges) <= topup else 1
    finally:
        stack.close()


async def _streams(url: str, key: str, body: dict[str, Any], n: int) -> list[str]:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        return list(await asyncio.gather(*(one_stream(client, key, body) for _ in range(n))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--covered", type=int, default=20)
    parser.add_argument("--words", type=int, default=4000)
    parser.add_argument("--delay", type=float, default=0.001)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))

__all__ = ["ADMIN_TOKEN", "main"]
