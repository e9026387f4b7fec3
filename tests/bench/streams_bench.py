"""The streams benchmark's targets and runs (:mod:`tests.bench.streams` drives them).

:class:`Bench` starts the stack (the replay upstream or the sandbox, the relay on PostgreSQL +
Redis, the bare passthrough), pins the processes, and runs the C generator against one target
at one N (:meth:`Bench.run`), reading the server's CPU, peak RSS, the machine's steal and the
other processes' CPU around the run; ``py-spy`` can record the server meanwhile.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from tests.bench import replay, streamgen
from tests.bench.bench_relay import (
    CREDENTIALS,
    RssSampler,
    Server,
    Stack,
    Watch,
    free_port,
    machine_seconds,
    proc_cpu_seconds,
    proc_status_kb,
    reset_peak_rss,
    setup,
    start_passthrough,
    verify_billing,
)
from tests.bench.bench_relay import Report as RelayReport

SERVER_CPU, CLIENT_CPU = 0, 1


class ReplayStack(Stack):
    """A :class:`Stack` whose ``accounts add`` points the accounts at ``account_url`` (the
    replay upstream) instead of the sandbox that :func:`setup` starts."""

    account_url: str | None = None

    def cli(self, *argv: str, stdin: str | None = None) -> str:
        if self.account_url and argv[:2] == ("accounts", "add") and "--base-url" in argv:
            at = argv.index("--base-url") + 1
            argv = (*argv[:at], self.account_url, *argv[at + 1 :])
        return super().cli(*argv, stdin=stdin)


PINNING = True
REALTIME = False  # --rt: the generator and the replay upstream under SCHED_FIFO


def pin(pid: int, cpu: int) -> bool:
    """Pin every thread of ``pid`` to ``cpu`` (False on a one-CPU machine, with ``--no-pin``
    or when refused)."""
    if (os.cpu_count() or 1) < 2 or not PINNING:
        return False
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})
    except OSError:
        return False
    return True


def stream_body(deltas: int) -> bytes:
    return orjson.dumps(
        {
            "model": "claude-haiku-4-5",
            "max_tokens": deltas + 16,
            "stream": True,
            "messages": [{"role": "user", "content": f"reply with {deltas} words"}],
        }
    )


@dataclass
class Target:
    name: str
    url: str
    key: str
    pid: int | None  # the process under test (None: direct, the sandbox itself)


@dataclass
class StreamRun:
    target: str
    n: int
    result: dict[str, Any]
    server_cpu_s: float
    wall_s: float
    steal_s: float
    others_s: float
    peak_rss_kb: int | None
    loadavg: float

    @property
    def clean(self) -> bool:
        return self.result["stalled_frames"] == 0 and self.result["errors"] == 0

    @property
    def cpu_ms_per_stream(self) -> float | None:
        done = self.result["ok"] + self.result["errors"]
        return self.server_cpu_s / done * 1000 if done else None

    def pct(self, seconds: float) -> float:
        return seconds / self.wall_s * 100 if self.wall_s > 0 else 0.0


class Bench:
    """The three targets and the stream runs against them."""

    def __init__(self, args: argparse.Namespace, stack: Stack, watch: Watch) -> None:
        self.args = args
        self.stack = stack
        self.watch = watch
        self.body = stream_body(args.deltas)
        self.body_file = stack.workdir / "stream-body.json"
        self.body_file.write_bytes(self.body)
        self.targets: dict[str, Target] = {}
        self.relay_ok = 0
        self.fake: Server | None = None
        self.upstream: Server
        self.relay: Server | None = None
        self.customer_id = ""

    def start(self) -> None:
        report = RelayReport()
        pin(os.getpid(), CLIENT_CPU)
        upstream: Server | None = None
        if self.args.upstream == "replay":
            port = free_port()
            proc = replay.start(
                self.stack.workdir,
                port,
                orjson.loads(self.body),
                self.args.pace_ms,
                preexec_fn=_on_client_cpu,
            )
            upstream = Server(
                "replay", proc, self.stack.workdir / "replay.log", f"http://127.0.0.1:{port}"
            )
            self.stack.servers.append(upstream)
            self.watch.pids["replay"] = proc.pid
            print(
                f"[setup] replay upstream (streamsrv.c) pid {proc.pid} on {upstream.url}",
                flush=True,
            )
        if upstream is not None and isinstance(self.stack, ReplayStack):
            self.stack.account_url = upstream.url
        fake, relay, customer_id, key = setup(self.stack, self.watch, report)
        self.fake, self.relay, self.customer_id = fake, relay, customer_id
        if upstream is not None:  # the relay's first request must have gone to the replay
            stats = httpx.get(fake.url + "/_fake/stats").raise_for_status().json()
            if stats["total"]:
                raise RuntimeError("the relay's accounts point at the sandbox, not the replay")
        self.upstream = upstream or fake
        self.relay_ok = 1  # the setup request
        pinned = pin(fake.pid, CLIENT_CPU) and pin(relay.pid, SERVER_CPU)
        self.targets["direct"] = Target("direct", self.upstream.url, CREDENTIALS[0], None)
        if "passthrough" in self.args.targets:
            bare = start_passthrough(self.stack, self.watch, report, self.upstream)
            pin(bare.pid, SERVER_CPU)
            self.targets["passthrough"] = Target("passthrough", bare.url, "unused", bare.pid)
        self.targets["relay"] = Target("relay", relay.url, key, relay.pid)
        print(
            f"[setup] pinned: {'relay/passthrough on CPU 0, the rest of ours on CPU 1' if pinned else 'no (one CPU, or refused)'}",
            flush=True,
        )
        httpx.post(
            fake.url + "/_fake/faults",
            json={"key": "*", "fault": "paced", "delay": self.args.pace_ms / 1000},
        ).raise_for_status()

    def run(
        self, target: Target, n: int, *, rounds: int = 1, profile: Path | None = None
    ) -> StreamRun:
        port = int(urlsplit(target.url).port or 80)
        argv = streamgen.command(
            port,
            self.body_file,
            headers={"x-api-key": target.key, "anthropic-version": "2023-06-01"},
            concurrency=n,
            rounds=rounds,
            pace_ms=self.args.pace_ms,
            stall_ms=self.args.stall_ms,
            expect_deltas=self.args.deltas,
            timeout=self.args.run_timeout,
        )
        spy: subprocess.Popen[bytes] | None = None
        if profile is not None and target.pid is not None:
            spy = start_profiler(target.pid, profile)
        pid = target.pid
        if pid is not None:
            reset_peak_rss(pid)
        server_pid = pid if pid is not None else self.upstream.pid
        cpu0 = proc_cpu_seconds(server_pid)
        ours0 = self._ours()
        machine0, steal0 = machine_seconds()
        started = time.perf_counter()
        with RssSampler(pid) if pid is not None else _Null() as sampler:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=_on_client_cpu,
            )
            self.stack.loadgens.append(proc)
            out, err = proc.communicate(timeout=self.args.run_timeout + 30)
            self.stack.loadgens.remove(proc)
        wall = time.perf_counter() - started
        server_cpu = proc_cpu_seconds(server_pid) - cpu0
        ours = self._ours() - ours0
        machine1, steal1 = machine_seconds()
        if spy is not None:
            stop_profiler(spy)
        if proc.returncode != 0:
            raise RuntimeError(f"streamgen failed: {err.decode(errors='replace')}")
        result = streamgen.parse(out.decode())
        gen_cpu = float(result["cpu_s"])
        peak = None
        if pid is not None:
            peak = max(proc_status_kb(pid, "VmHWM") or 0, getattr(sampler, "peak_kb", 0))
        if target.name == "relay":
            self.relay_ok += int(result["ok"])
        return StreamRun(
            target=target.name,
            n=n,
            result=result,
            server_cpu_s=server_cpu,
            wall_s=wall,
            steal_s=max(0.0, steal1 - steal0),
            others_s=max(0.0, (machine1 - machine0) - ours - gen_cpu),
            peak_rss_kb=peak,
            loadavg=os.getloadavg()[0],
        )

    def _ours(self) -> float:
        """CPU seconds of every process of this run but the generator (servers, the harness,
        the scratch database's PostgreSQL backends, Redis)."""
        cpu = self.watch.snapshot(os.getpid()).cpu
        cpu.pop("loadgen", None)
        return sum(cpu.values())

    def billing(self) -> dict[str, Any]:
        assert self.relay is not None
        return verify_billing(self.stack, self.relay, self.customer_id, self.relay_ok)


def _on_client_cpu() -> None:
    if (os.cpu_count() or 1) > 1 and PINNING:
        os.sched_setaffinity(0, {CLIENT_CPU})
    if REALTIME:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))


class _Null:
    peak_kb = 0

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("[profile] py-spy is not installed (pip install py-spy): not profiling", flush=True)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
         "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_on_client_cpu,
    )  # fmt: skip
    time.sleep(1.0)
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
