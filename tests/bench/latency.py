"""Benchmark: added latency as the public boards report it, next to its floor, in one run.

    python -m tests.bench.latency [--duration 6] [--rps-duration 4] [--p99-bound 50]
                                  [--parts c1,rps]
                                  [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
                                  [--redis-url redis://127.0.0.1:6379/11]

On PostgreSQL + Redis with full billing and scheduling (the stack of
:mod:`tests.bench.bench_relay`: the sandbox upstream, ``poolrelay serve``, the bare passthrough,
the Python load generator :mod:`tests.bench.loadgen` in its own process):

1. **Added latency at concurrency 1**: p50 and p99 of a JSON request's latency and of a
   stream's time to first token (first ``content_block_delta``), direct, through the bare
   passthrough and through the relay; "added" is relay − direct.
2. **The floor**, measured in the same run: what any relay with these money rules must add —
   the bare Python hop (passthrough − direct) plus the two durable PostgreSQL round trips a
   request needs before its answer (the hold before the upstream call, the charge before the
   answer: the relay's group-commit path, ``billing.holds_pg.PgHolds``, at concurrency 1 on a
   scratch database of the same server, no HTTP).
3. **Requests per second at a p99 bound** (default 50 ms): JSON requests at concurrency 1, 2,
   4, … until p99 passes the bound at two levels in a row; the best rate whose p99 stays within
   it, per target.

Every run prints the machine's steal time and the other processes' CPU (busy runs flagged), and
the load average. A billing check ends the run (one usage entry per relayed 200, no hold left,
balance = top-up − Σ usage). Nothing is asserted; about 3 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench.bench_relay import (
    CREDENTIALS,
    Report,
    Run,
    Scenario,
    Stack,
    Watch,
    _with_db,
    run_load,
    setup,
    start_passthrough,
    verify_billing,
)
from tests.bench.streams import add_stack_args, check_stack_args, fmt

TARGETS = ("direct", "passthrough", "relay")


async def _pg_pair(url: str, count: int) -> dict[str, float]:
    """p50/p99 (ms) of a hold + settlement through the relay's group commit, one at a time."""
    from app.db import Database
    from billing import customers, ledger
    from billing.holds import HoldRequest, Outcome
    from billing.holds_pg import PgHolds
    from billing.ids import new_id
    from billing.pricing import Usage

    db = Database(url, pool_size=2)
    async with db.transaction() as session:
        customer = await customers.create_customer(session, "floor")
        await ledger.credit(session, customer.id, "topup", 10**12, memo=None, idempotency_key=None)
    group = PgHolds(db.connect_raw)
    latencies: list[float] = []
    try:
        for i in range(count + 50):
            request_id = new_id("req")
            hold = HoldRequest(
                request_id=request_id,
                customer_id=customer.id,
                key_id="key_floor",
                amount_micros=1_000,
                instance_id="floor",
                requested_model="claude-haiku-4-5",
            )
            started = time.perf_counter()
            await group.place(hold)
            usage = Usage(input_tokens=10, output_tokens=30)
            await group.settle(request_id, usage, 200, Outcome(status="ok"))
            if i >= 50:  # the first 50 warm up connections and statements
                latencies.append(time.perf_counter() - started)
    finally:
        await group.aclose()
        await db.dispose()
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(0, round(0.99 * len(latencies)) - 1)] * 1000,
    }


def pg_floor(pg_url: str, count: int = 400) -> dict[str, float]:
    from tests.harness import pg_drop, pg_template

    scratch = pg_template(pg_url)
    try:
        return asyncio.run(_pg_pair(_with_db(pg_url, scratch), count))
    finally:
        pg_drop(pg_url, scratch)


def busy(run: Run) -> str:
    return " BUSY" if run.noisy else ""


def machine(run: Run) -> str:
    return (
        f"steal {run.steal_percent:3.0f}%, others {run.others_percent:3.0f}%, "
        f"load {os.getloadavg()[0]:.2f}{busy(run)}"
    )


Measure = Callable[[Scenario, str], Run]


def concurrency_1(args: argparse.Namespace, measure: Measure) -> dict[str, Any]:
    """Part 1 and 2: added p50/p99 at c=1, and the floor measured now."""
    c1: dict[tuple[str, str], Run] = {}
    print("\n== concurrency 1 ==  (ms)")
    for name, stream in (("json", False), ("stream", True)):
        s = Scenario(f"{name}-c1", f"{name} c=1", stream, 1, args.duration, 1.0)
        for target in TARGETS:
            run = c1[(name, target)] = measure(s, target)
            q50, q99 = ("ttft_p50_ms", "ttft_p99_ms") if stream else ("p50_ms", "p99_ms")
            print(
                f"  {name:<6} {target:<11} {'TTFT' if stream else 'latency'} p50 "
                f"{fmt(run.load[q50], '{:.2f}'):>6} p99 {fmt(run.load[q99], '{:.2f}'):>7}  "
                f"{run.load['ok']:>5} requests; {machine(run)}",
                flush=True,
            )
    floor = pg_floor(args.pg_url)
    print(
        f"\n== floor: hold + settlement (group commit, c=1, no HTTP): p50 "
        f"{floor['p50_ms']:.2f} ms, p99 {floor['p99_ms']:.2f} ms =="
    )
    print("\n== added vs direct at concurrency 1 (ms) ==")
    summary: dict[str, Any] = {"pg_pair": floor}
    for name, stream in (("json", False), ("stream", True)):
        q50, q99 = ("ttft_p50_ms", "ttft_p99_ms") if stream else ("p50_ms", "p99_ms")
        d, p, r = (c1[(name, t)].load for t in TARGETS)
        hop50, hop99 = p[q50] - d[q50], p[q99] - d[q99]
        add50, add99 = r[q50] - d[q50], r[q99] - d[q99]
        floor50 = hop50 + floor["p50_ms"]
        summary[name] = {
            "added_p50": add50, "added_p99": add99, "hop_p50": hop50, "hop_p99": hop99,
            "floor_p50": floor50,
        }  # fmt: skip
        what = "time to first token" if stream else "JSON latency"
        print(
            f"  {what:<20} relay added p50 {add50:+.2f} p99 {add99:+.2f} | bare hop p50 "
            f"{hop50:+.2f} p99 {hop99:+.2f} | floor p50 (hop + hold + settlement) "
            f"{floor50:+.2f} | relay above the floor at p50: {add50 - floor50:+.2f}"
        )
    return summary


def rate_at_bound(args: argparse.Namespace, measure: Measure) -> dict[str, Any]:
    """Part 3: JSON req/s at c = 1, 2, 4, … while p99 stays within the bound (the search goes
    on past one level over it, so that one noisy window does not end it)."""
    print(f"\n== JSON requests per second with p99 ≤ {args.p99_bound:g} ms ==")
    best: dict[str, tuple[int, float, float]] = {}
    for target in TARGETS:
        c, misses = 1, 0
        while c <= args.max_concurrency and misses < 2:
            s = Scenario(f"rps-c{c}", f"json c={c}", False, c, args.rps_duration, 0.5)
            run = measure(s, target)
            rps, p99 = float(run.load["rps"]), float(run.load["p99_ms"] or 0)
            within = p99 <= args.p99_bound and not run.load["errors"]
            print(
                f"  {target:<11} c={c:<4} {rps:8.0f} req/s p99 {p99:7.2f} ms "
                f"{'' if within else '(over the bound)'}; {machine(run)}",
                flush=True,
            )
            if within and rps > best.get(target, (0, 0.0, 0.0))[1]:
                best[target] = (c, rps, p99)
            misses = 0 if within else misses + 1
            c *= 2
    for target in TARGETS:
        c, rps, p99 = best.get(target, (0, 0.0, 0.0))
        print(f"  best {target:<11} {rps:8.0f} req/s (c={c}, p99 {p99:.2f} ms)")
    return best


def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="poolrelay-latency-"))
    stack = Stack(args, workdir)
    watch = Watch(stack.dbname)
    report = Report()
    started = time.monotonic()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    failed = False
    try:
        fake, relay, customer_id, key = setup(stack, watch, report)
        bare = start_passthrough(stack, watch, report, fake)
        targets = {
            "direct": (fake.url, CREDENTIALS[0], None),
            "passthrough": (bare.url, "unused", bare.pid),
            "relay": (relay.url, key, relay.pid),
        }
        relay_ok = 1  # the setup request

        def measure(s: Scenario, target: str) -> Run:
            nonlocal relay_ok
            url, credential, pid = targets[target]
            run = run_load(stack, watch, s, target, url, credential, pid)
            if target == "relay":
                relay_ok += int(run.load["ok"]) + int(run.load["warmup_ok"])
            if run.load["errors"]:
                print(f"  ! {target}: {run.load['errors']} errors {run.load['error_kinds']}")
            return run

        summary: dict[str, Any] = {}
        if "c1" in args.parts:
            summary.update(concurrency_1(args, measure))
        if "rps" in args.parts:
            summary["rps_at_bound"] = rate_at_bound(args, measure)

        billing = verify_billing(stack, relay, customer_id, relay_ok)

        ok = billing["usage_entries"] == billing["expected"] and billing["open_holds"] == 0
        print(
            f"\n== billing: {billing['usage_entries']} usage entries for {billing['expected']} "
            f"relayed 200s, {billing['open_holds']} holds open, balance "
            f"{'= top-up − Σ usage' if billing['balance_ok'] else 'MISMATCH'}: "
            f"{'PASS' if ok and billing['balance_ok'] else 'FAIL'}"
        )
        print(f"total {time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.2f}")
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        failed = True
    except Exception as exc:
        print(f"\nbenchmark failed: {exc!r}", file=sys.stderr)
        for server in stack.servers:
            tail = "\n".join(line[:300] for line in server.log_tail(8).splitlines())
            print(f"--- {server.name} log ---\n{tail}", file=sys.stderr)
        failed = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_stack_args(parser)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per c=1 run")
    parser.add_argument("--rps-duration", type=float, default=4.0, help="seconds per rate run")
    parser.add_argument("--p99-bound", type=float, default=50.0, help="ms")
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument("--parts", default="c1,rps", help="c1 (with the floor), rps")
    args = parser.parse_args(argv)
    check_stack_args(parser, args)
    return args


def run() -> None:
    sys.exit(main(parse_args()))


if __name__ == "__main__":
    run()
