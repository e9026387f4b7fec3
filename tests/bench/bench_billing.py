"""Benchmark: what a hold + settlement costs per request on PostgreSQL (or SQLite).

    python -m tests.bench.bench_billing [--url postgresql://postgres@127.0.0.1:5432/postgres]
                                        [--requests 2000] [--concurrency 64]

Creates a scratch database, then measures billed requests per second and the added
milliseconds per request (hold + settlement, no HTTP), for one hot customer (every request
contends for the same row) and for many customers (no contention), on three paths: the ORM
session (baseline), one statement each (``place_fast``/``settle_fast``), and the group commit
the relay uses on PostgreSQL (``PgHolds``). Prints figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from app.db import Database
from app.migrate import upgrade
from billing import customers, holds, holds_pg, ledger
from billing.holds import HoldRequest, Outcome
from billing.holds_pg import PgHolds
from billing.ids import new_id
from billing.pricing import Usage


async def one_request(
    db: Database, customer_id: str, latencies: list[float], path: str, group: PgHolds | None
) -> None:
    start = time.perf_counter()
    request_id = new_id("req")
    hold = HoldRequest(
        request_id=request_id,
        customer_id=customer_id,
        key_id="key_bench",
        amount_micros=1_000,
        instance_id="bench",
        requested_model="claude-haiku-4-5",
    )
    usage = Usage(input_tokens=100, output_tokens=50)
    if path == "group":
        assert group is not None
        await group.place(hold)
        await group.settle(request_id, usage, 350, Outcome(status="ok"))
    elif path == "single":
        async with db.raw() as conn:
            await holds_pg.place_fast(conn, hold)
        async with db.raw() as conn:
            await holds_pg.settle_fast(conn, request_id, usage, 350, Outcome(status="ok"))
    else:
        async with db.transaction() as session:
            await holds.place(session, hold)
        async with db.transaction() as session:
            await holds.settle(session, request_id, usage, 350, Outcome(status="ok"))
    latencies.append(time.perf_counter() - start)


async def scenario(
    db: Database,
    customer_ids: list[str],
    total: int,
    concurrency: int,
    path: str = "session",
    group: PgHolds | None = None,
) -> dict[str, float]:
    latencies: list[float] = []
    queue = iter(range(total))

    async def worker(n: int) -> None:
        for i in queue:
            await one_request(db, customer_ids[(i + n) % len(customer_ids)], latencies, path, group)

    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    latencies.sort()
    return {
        "rps": total / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "cpu_ms_per_request": cpu / total * 1000,
    }


async def main(url: str, total: int, concurrency: int) -> None:
    db = Database(url, pool_size=16)
    async with db.transaction() as session:
        ids = []
        for _ in range(200):
            customer = await customers.create_customer(session, "bench")
            await ledger.credit(
                session, customer.id, "topup", 10**12, memo=None, idempotency_key=None
            )
            ids.append(customer.id)
    group = PgHolds(db.connect_raw) if db.has_fast_path else None
    paths = [("session (baseline)", "session")] + (
        [("single statement", "single"), ("group commit", "group")] if db.has_fast_path else []
    )
    for _, path in paths:
        await scenario(db, ids, 200, 8, path, group)  # warm up connections and statements
    print(f"backend: {db.engine.dialect.name}, {total} billed requests per run")
    for label, pool in (("one hot customer", ids[:1]), ("many customers (200)", ids)):
        for c in (1, concurrency):
            baseline: dict[str, float] | None = None
            for path_label, path in paths:
                r = await scenario(db, pool, total if c > 1 else total // 4, c, path, group)
                ratio = (
                    f"  ×{r['rps'] / baseline['rps']:.2f} req/s, ×{r['cpu_ms_per_request'] / baseline['cpu_ms_per_request']:.2f} CPU vs baseline"
                    if baseline
                    else ""
                )
                baseline = baseline or r
                print(
                    f"  {label:<20} c={c:<3} {path_label:<19} {r['rps']:7.0f} billed req/s"
                    f"  added p50 {r['p50_ms']:6.2f} ms p99 {r['p99_ms']:7.2f} ms"
                    f"  CPU {r['cpu_ms_per_request']:.3f} ms/req{ratio}"
                )
    if group is not None:
        await group.aclose()
    await db.dispose()


def run() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    url = args.url
    scratch = None
    if url.startswith("postgres"):
        from tests.harness import pg_drop, pg_template

        scratch = pg_template(url)
        base = url.rsplit("/", 1)[0]
        url = f"{base}/{scratch}"
    else:
        upgrade(url)
    try:
        asyncio.run(main(url, args.requests, args.concurrency))
    finally:
        if scratch:
            pg_drop(args.url, scratch)


if __name__ == "__main__":
    run()
