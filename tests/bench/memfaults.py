"""Benchmark: the relay's memory through faults, and nothing lost.

    python -m tests.bench.memfaults [--only pg-outage,failover,disconnects]
                                    [--duration 60] [--outage 20] [--outages 1] [--streams 32]
                                    [--failovers 300] [--disconnects 1000]
                                    [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
                                    [--redis-url redis://127.0.0.1:6379/11]

The shapes of LiteLLM's 2026 memory reports (RSS ratcheting by ~100 MiB per PostgreSQL outage,
growing by 87 MB over 300 failing, retried requests) and one of our own, each run against one
``poolrelay serve`` with full billing and scheduling, on a scratch PostgreSQL database (created
and dropped) reached through a TCP proxy (:class:`tests.faults.TcpProxy`: the outage is the
proxy cutting every connection and refusing new ones; the real PostgreSQL is never touched)
and Redis db 11 (flushed before and after). The upstream is the sandbox, streams paced by its
``paced`` fault (64 deltas, 20 ms apart), load from the C generator
(:mod:`tests.bench.streamgen`).

- ``pg-outage``: ``--streams`` concurrent streams back to back for ``--duration`` seconds;
  PostgreSQL cut for ``--outage`` seconds in the middle (``--outages K``: K cuts, evenly
  spread, to tell a one-time growth from a ratchet per outage). New requests get 529 meanwhile (the
  generator waits 200 ms after each); settlements of streams that finish during the outage are
  retried until PostgreSQL returns.
- ``failover``: ``--failovers`` requests, one at a time, half streamed, each of whose first
  upstream attempt gets a 500 (the sandbox's ``server_error`` fault, ``times: 1``, re-armed
  before every request) and is failed over to the other account; the accounts' circuit
  breakers are reset (``POST /admin/accounts/{id}/enable``) after every request, so every
  request fails once and is failed over.
- ``disconnects``: ``--disconnects`` streams whose client closes the connection after the 4th
  delta (50 at a time).

For each: RSS before (after a warm-up of the same load, idle), during (sampled every 0.5 s:
peak, and at points of the timeline), after (once every hold is settled, idle); whether RSS
came back to within 10 MB of before; and the billing check: balance = Σ ledger, no hold left,
and one usage entry per delivered request of the scenario (its 200 answers). Machine steal and
the other processes' CPU are printed per scenario. Nothing is asserted; about 3 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.bench import streamgen
from tests.bench.bench_relay import Stack, Watch, _with_db, machine_seconds
from tests.bench.memfaults_scenarios import MemBench, Outcome
from tests.bench.streams import add_stack_args, check_stack_args
from tests.faults import TcpProxy


def report(out: Outcome) -> None:
    b = out.billing
    print(f"\n== {out.name} ==")
    print(f"  load: {out.counts}")
    print(
        f"  RSS before {out.rss_before:.1f} MB, during: peak {out.timeline.peak:.1f} MB"
        + "".join(f", {label} {mb:.1f}" for label, mb in out.points)
        + f"; after {out.rss_after:.1f} MB ({out.rss_after - out.rss_before:+.1f} MB): "
        + ("returned within 10 MB" if out.returned else "DID NOT return within 10 MB")
    )
    samples = out.timeline.samples[:: max(1, len(out.timeline.samples) // 12)]
    print("  timeline (s: MB): " + ", ".join(f"{t:.0f}: {mb:.0f}" for t, mb in samples))
    print(
        f"  billing: {b['charged']} usage entries for {b['delivered']} delivered, "
        f"{b['holds_left']} holds left ({b['held_micros']} µUSD held), balance "
        f"{'=' if b['balance_is_ledger_sum'] else '≠'} Σ ledger, {b['duplicate_charges']} charged "
        f"twice: {'PASS' if b['pass'] else 'FAIL'}"
    )
    print(
        f"  machine: steal {out.steal_pct:.0f}%, other processes {out.others_pct:.0f}% of a core; "
        f"load average {out.loadavg:.2f}"
    )


def main(args: argparse.Namespace) -> int:
    try:
        streamgen.binary()
    except streamgen.NoCompiler as exc:
        print(f"memfaults: {exc}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="poolrelay-memfaults-"))
    stack = Stack(args, workdir)
    proxy = TcpProxy.for_url(args.pg_url)
    proxy.start()
    stack.env["POOLRELAY_DATABASE_URL"] = proxy.url(_with_db(args.pg_url, stack.dbname))

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    failed = False
    started = time.monotonic()
    try:
        bench = MemBench(args, stack, proxy)
        bench.start()
        print(
            f"[setup] relay pid {bench.relay.pid}; PostgreSQL via proxy :{proxy.port}", flush=True
        )
        scenarios: dict[str, Callable[[], Outcome]] = {
            "pg-outage": bench.pg_outage,
            "failover": bench.failover,
            "disconnects": bench.disconnects,
        }
        results = []
        for name in args.only:
            ours0 = _ours(bench)
            machine0, steal0 = machine_seconds()
            t0 = time.monotonic()
            out = scenarios[name]()
            wall = time.monotonic() - t0
            machine1, steal1 = machine_seconds()
            out.steal_pct = (steal1 - steal0) / wall * 100
            out.others_pct = max(0.0, (machine1 - machine0) - (_ours(bench) - ours0)) / wall * 100
            out.loadavg = os.getloadavg()[0]
            report(out)
            results.append(out)
        print(
            "\n== summary == "
            + "; ".join(
                f"{o.name}: RSS {o.rss_before:.0f} → peak {o.timeline.peak:.0f} → {o.rss_after:.0f} MB "
                f"({'ok' if o.returned else 'RATCHET'}), billing {'PASS' if o.billing['pass'] else 'FAIL'}"
                for o in results
            )
            + f"; total {time.monotonic() - started:.0f} s"
        )
        lines = bench.relay.log.read_text(errors="replace").splitlines()
        levels: dict[str, int] = {}
        for text in lines:
            level = text.split('"level":"', 1)[1].split('"', 1)[0] if '"level":"' in text else "?"
            levels[level] = levels.get(level, 0) + 1
        print(f"relay log: {len(lines)} lines {levels} ({bench.relay.log.name})")
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        failed = True
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print(f"\nbenchmark failed: {exc!r}", file=sys.stderr)
        for server in stack.servers:
            tail = "\n".join(line[:300] for line in server.log_tail(8).splitlines())
            print(f"--- {server.name} log ---\n{tail}", file=sys.stderr)
        failed = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with contextlib.suppress(Exception):
            proxy.start()  # the relay's last settlements, and the drop of the database
        stack.close()
        proxy.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def _ours(bench: MemBench) -> float:
    watch = Watch(bench.stack.dbname)
    watch.pids = {"fake": bench.fake.pid, "relay": bench.relay.pid}
    cpu = watch.snapshot(os.getpid()).cpu
    cpu.pop("loadgen", None)
    # the generators are children of this process: their CPU is in RUSAGE_CHILDREN
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(cpu.values()) + children.ru_utime + children.ru_stime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_stack_args(parser)
    parser.add_argument("--only", default="pg-outage,failover,disconnects")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--outage", type=float, default=20.0, help="seconds per outage")
    parser.add_argument("--outages", type=int, default=1, help="outages during the load")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--failovers", type=int, default=300)
    parser.add_argument("--disconnects", type=int, default=1000)
    args = parser.parse_args(argv)
    check_stack_args(parser, args)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - {"pg-outage", "failover", "disconnects"}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


def run() -> None:
    sys.exit(main(parse_args()))


if __name__ == "__main__":
    run()
