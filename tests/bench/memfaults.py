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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from tests.bench import streamgen
from tests.bench.bench_relay import (
    ADMIN_TOKEN,
    Report,
    Server,
    Stack,
    Watch,
    _with_db,
    machine_seconds,
    proc_status_kb,
    setup,
)
from tests.bench.streams import add_stack_args, check_stack_args, stream_body
from tests.faults import TcpProxy

RATCHET_MB = 10.0
DELTAS = 64


class RssTimeline:
    """VmRSS of one process every ``every`` seconds, on a thread."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            kb = proc_status_kb(self.pid, "VmRSS") or 0
            self.samples.append((time.monotonic() - self.t0, kb / 1024))
            self._stop.wait(self.every)

    def __enter__(self) -> RssTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        return max((mb for _, mb in self.samples), default=0.0)

    def at(self, second: float) -> float | None:
        """The sample nearest to ``second`` after the start."""
        if not self.samples:
            return None
        return min(self.samples, key=lambda s: abs(s[0] - second))[1]


@dataclass
class Outcome:
    name: str
    rss_before: float
    rss_after: float
    timeline: RssTimeline
    billing: dict[str, Any]
    counts: dict[str, Any] = field(default_factory=dict)
    points: list[tuple[str, float]] = field(default_factory=list)
    steal_pct: float = 0.0
    others_pct: float = 0.0
    loadavg: float = 0.0

    @property
    def returned(self) -> bool:
        return self.rss_after - self.rss_before <= RATCHET_MB


class MemBench:
    def __init__(self, args: argparse.Namespace, stack: Stack, proxy: TcpProxy) -> None:
        self.args = args
        self.stack = stack
        self.proxy = proxy
        self.body_file = stack.workdir / "stream-body.json"
        self.body_file.write_bytes(stream_body(DELTAS))
        self.fake: Server
        self.relay: Server
        self.customer_id = ""
        self.key = ""

    def start(self) -> None:
        watch = Watch(self.stack.dbname)
        self.fake, self.relay, self.customer_id, self.key = setup(self.stack, watch, Report())
        self.paced()

    # -- helpers --------------------------------------------------------------------------

    def paced(self) -> None:
        httpx.post(
            self.fake.url + "/_fake/faults", json={"key": "*", "fault": "paced", "delay": 0.02}
        ).raise_for_status()

    def rss(self) -> float:
        return (proc_status_kb(self.relay.pid, "VmRSS") or 0) / 1024

    def generator(self, **options: Any) -> subprocess.Popen[bytes]:
        port = int(urlsplit(self.relay.url).port or 80)
        argv = streamgen.command(
            port,
            self.body_file,
            headers={"x-api-key": self.key, "anthropic-version": "2023-06-01"},
            pace_ms=20,
            stall_ms=1000,
            expect_deltas=DELTAS,
            timeout=60,
            **options,
        )
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stack.loadgens.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        out, err = proc.communicate(timeout=self.args.duration + 120)
        self.stack.loadgens.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"streamgen failed: {err.decode(errors='replace')}")
        return streamgen.parse(out.decode())

    def streams(self, **options: Any) -> dict[str, Any]:
        return self.finish(self.generator(**options))

    def ledger(self) -> dict[str, int]:
        (usage, holds, balance, held, total), = self.stack.sql(
            "SELECT (SELECT count(*) FROM ledger_entries WHERE kind = 'usage'),"
            " (SELECT count(*) FROM holds),"
            f" c.balance_micros, c.held_micros,"
            " (SELECT coalesce(sum(amount_micros), 0) FROM ledger_entries l"
            "   WHERE l.customer_id = c.id)"
            f" FROM customers c WHERE c.id = '{self.customer_id}'"
        )  # fmt: skip
        (dupes,), = self.stack.sql(
            "SELECT count(*) FROM (SELECT request_id FROM ledger_entries WHERE kind = 'usage'"
            " GROUP BY request_id HAVING count(*) > 1) d"
        )  # fmt: skip
        return {
            "usage": int(usage),
            "holds": int(holds),
            "balance": int(balance),
            "held": int(held),
            "ledger_sum": int(total),
            "dupes": int(dupes),
        }

    def settled(self, expect_usage: int, timeout: float = 90.0) -> dict[str, int]:
        """Wait until no hold is open and the usage entries reach ``expect_usage`` (or stop
        changing for 5 s), then return the ledger's figures."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while True:
            state = self.ledger()
            if state["holds"] == 0 and state["usage"] >= expect_usage:
                return state
            if state["usage"] != last:
                last, since = state["usage"], time.monotonic()
            if time.monotonic() > deadline or (
                state["holds"] == 0 and time.monotonic() - since > 5
            ):
                return state
            time.sleep(0.5)

    def check(
        self, before: dict[str, int], after: dict[str, int], delivered: int
    ) -> dict[str, Any]:
        charged = after["usage"] - before["usage"]
        return {
            "delivered": delivered,
            "charged": charged,
            "holds_left": after["holds"],
            "held_micros": after["held"],
            "balance_is_ledger_sum": after["balance"] == after["ledger_sum"],
            "duplicate_charges": after["dupes"],
            "pass": charged == delivered
            and after["holds"] == 0
            and after["held"] == 0
            and after["balance"] == after["ledger_sum"]
            and after["dupes"] == 0,
        }

    def idle_rss(self, seconds: float = 3.0) -> float:
        time.sleep(seconds)
        return self.rss()

    # -- scenarios --------------------------------------------------------------------------

    def pg_outage(self) -> Outcome:
        a = self.args
        self.streams(concurrency=a.streams, duration=min(10.0, a.duration / 4), error_pause_ms=200)
        base = self.settled(0)
        before_rss = self.idle_rss()
        # ``--outages`` cuts of ``--outage`` seconds each, evenly spread over the load
        gap = (a.duration - a.outages * a.outage) / (a.outages + 1)
        points: list[tuple[str, float]] = []
        with RssTimeline(self.relay.pid) as timeline:
            proc = self.generator(concurrency=a.streams, duration=a.duration, error_pause_ms=200)
            t0 = time.monotonic()
            for k in range(a.outages):
                time.sleep(max(0.0, t0 + gap * (k + 1) + a.outage * k - time.monotonic()))
                points.append((f"cut {k + 1}", self.rss()))
                self.proxy.stop()
                print(f"[pg-outage] PostgreSQL cut at {time.monotonic() - t0:.1f} s", flush=True)
                time.sleep(a.outage)
                points.append((f"end of outage {k + 1}", self.rss()))
                self.proxy.start()
                print(f"[pg-outage] PostgreSQL back at {time.monotonic() - t0:.1f} s", flush=True)
            result = self.finish(proc)
            points.append(("end of the load", self.rss()))
            state = self.settled(base["usage"] + int(result["delivered"]))
            points.append(("all settled", self.rss()))
        after_rss = self.idle_rss()
        out = Outcome(
            "pg-outage",
            before_rss,
            after_rss,
            timeline,
            self.check(base, state, result["delivered"]),
        )
        out.points = points
        out.counts = _counts(result)
        return out

    def failover(self) -> Outcome:
        a = self.args
        with admin(self.relay.url) as client:
            listing = client.get("/admin/accounts").raise_for_status().json()
        accounts = [row["id"] for row in listing["items"]]
        headers = {"x-api-key": self.key, "anthropic-version": "2023-06-01"}
        body = orjson.loads(stream_body(16))  # short answers: failures are the point here
        httpx.delete(self.fake.url + "/_fake/faults").raise_for_status()
        statuses: dict[int, int] = {}

        def requests(count: int) -> None:
            with httpx.Client(timeout=60) as http, admin(self.relay.url) as control:
                for i in range(count):
                    httpx.post(
                        self.fake.url + "/_fake/faults",
                        json={"key": "*", "fault": "server_error", "times": 1},
                    ).raise_for_status()
                    payload = {**body, "stream": i % 2 == 0}
                    with http.stream(
                        "POST", self.relay.url + "/v1/messages", json=payload, headers=headers
                    ) as response:
                        response.read()
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    for account in accounts:  # the breaker would quarantine them
                        control.post(f"/admin/accounts/{account}/enable").raise_for_status()

        requests(min(50, a.failovers))  # warm-up
        base = self.settled(0)
        before_rss = self.idle_rss()
        statuses.clear()
        attempts0 = _fake_total(self.fake.url)
        with RssTimeline(self.relay.pid) as timeline:
            requests(a.failovers)
            attempts = _fake_total(self.fake.url) - attempts0
            delivered = statuses.get(200, 0)
            state = self.settled(base["usage"] + delivered)
        after_rss = self.idle_rss()
        self.paced()
        out = Outcome(
            "failover", before_rss, after_rss, timeline, self.check(base, state, delivered)
        )
        out.counts = {"statuses": statuses, "upstream attempts": attempts}
        return out

    def disconnects(self) -> Outcome:
        a = self.args
        at_once = min(50, a.disconnects)
        rounds = max(1, a.disconnects // at_once)
        self.streams(concurrency=at_once, rounds=2, disconnect_after=4)  # warm-up
        base = self.settled(0)
        before_rss = self.idle_rss()
        with RssTimeline(self.relay.pid) as timeline:
            result = self.streams(concurrency=at_once, rounds=rounds, disconnect_after=4)
            state = self.settled(base["usage"] + int(result["delivered"]))
        after_rss = self.idle_rss()
        out = Outcome(
            "disconnects",
            before_rss,
            after_rss,
            timeline,
            self.check(base, state, result["delivered"]),
        )
        out.counts = _counts(result)
        return out


def _counts(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("ok", "errors", "delivered", "disconnected", "error_kinds")}


def _fake_total(url: str) -> int:
    return int(httpx.get(url + "/_fake/stats").raise_for_status().json()["total"])


def admin(url: str) -> httpx.Client:
    return httpx.Client(
        base_url=url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    )


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
