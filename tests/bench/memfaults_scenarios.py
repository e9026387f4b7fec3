"""The memory-through-faults scenarios (:mod:`tests.bench.memfaults` runs and reports them).

:class:`MemBench` holds the relay under test (PostgreSQL behind a :class:`tests.faults.TcpProxy`),
its load (the C generator, or one request at a time), the RSS timeline of a scenario and the
billing check after it.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
from dataclasses import dataclass, field
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
    proc_status_kb,
    setup,
)
from tests.bench.streams import stream_body
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
