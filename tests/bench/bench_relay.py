"""Benchmark: the relay against direct-to-upstream, on PostgreSQL + Redis, in one run.

    python -m tests.bench.bench_relay [--quick] [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
                                      [--redis-url redis://127.0.0.1:6379/13]
                                      [--only nonstream-c1,nonstream-c64,stream-c1,stream-c64,slow-500,slow-500-burst]
                                      [--duration S] [--slow-streams 500] [--slow-delay 0.4]
                                      [--json results.json] [--log-dir DIR]

What it starts, each as its own process on 127.0.0.1 with free ports:

- ``poolrelay fake-upstream``, with its rate limits lifted (``/_fake/limits``, key ``*``);
- ``poolrelay serve`` on a scratch PostgreSQL database (created, then migrated with
  ``poolrelay migrate``, dropped at exit) and Redis db 13 (``FLUSHDB`` first and last), with a
  generated Fernet key, an admin token and ``POOLRELAY_LOG_LEVEL=WARNING``: full billing (a hold
  and a settlement per request) and scheduling over 2 upstream accounts added with
  ``poolrelay accounts add --max-concurrency 1000`` (credential on stdin), and one customer with
  a $1,000,000 top-up and a key (admin API);
- for each measured run, a load generator (:mod:`tests.bench.loadgen`, aiohttp + uvloop) in a
  separate process: fixed concurrency, fixed duration, a short warm-up that is not measured.

Scenarios, each run DIRECT (to the fake upstream) and THROUGH the relay:

- ``nonstream-c1`` / ``nonstream-c64``: JSON replies (~30 output tokens) at concurrency 1 / 64;
- ``stream-c1`` / ``stream-c64``: the same reply as SSE (~35 small events);
- ``slow-500``: 500 concurrent slow streams (fake fault ``slow_stream``, ``--slow-delay``
  seconds between the 8 events of a 2-word reply, ~2.8 s per stream); each of the 500 workers
  runs 3 streams back to back, their first starts spread evenly over one stream's duration
  (``--stagger``), so ~500 are open at any time: the steady state of many long streams. The
  rate is completed streams ÷ (wall − stagger);
- ``slow-500-burst``: the same with all 500 workers starting at once (a burst of 500 new
  requests at the start of each round, as the streams end together): completed ÷ wall.

Durations: 6 s measured (1 s or 1.5 s warm-up) per fast run, ~9-12 s per slow run: about
two minutes in all with setup on a 2-core machine; ``--quick``: 1.5 s runs, ~70 s.

Printed per run: requests/s, p50/p99 latency, time to first byte and to the first
``content_block_delta`` (first token) for streams, CPU per request of the process under test
(the relay; the fake for direct runs; from ``/proc/<pid>/stat`` utime+stime around the measured
window), peak RSS of the relay (``VmHWM`` reset per run through ``clear_refs``, and sampled
``VmRSS``), errors; then relay/direct ratios, a CPU breakdown (load generator, fake, relay,
PostgreSQL backends of the scratch database, Redis, and everything else the machine ran), the
issue's targets next to the measured figures, and a billing check: usage ledger entries ==
successful relay requests, no open holds, balance == top-up − Σ usage. Nothing is asserted; the
exit status is 0 unless the harness itself failed.

Options:
  --quick          short runs (a smoke test, ~70 s); the default run takes ~2 min
  --pg-url         a PostgreSQL server URL whose user may CREATE DATABASE (scratch db made there)
  --redis-url      Redis URL; its db is flushed before and after (default db 13)
  --only           comma-separated scenario names to run (default: all)
  --duration       measured seconds for the four fast scenarios (default 6, quick 1.5)
  --slow-streams   concurrency of the slow-stream scenario (default 500)
  --slow-delay     seconds between the events of a slow stream (default 0.4, quick 0.2)
  --json           also write every figure to this file
  --log-dir        keep the servers' logs there (default: a temporary directory, removed)

Figures depend on what else the machine runs: the "others" column says how much CPU other
processes took during each window, and "steal" how long the hypervisor gave this virtual
machine's CPUs to someone else (a run with either above 20% of a core is flagged "busy").

``--no-passthrough`` skips the third target of every scenario, the bare passthrough
(:mod:`tests.bench.passthrough`: the same server stack and upstream client, no auth, billing or
scheduling), whose rows show what any Python relay costs on this machine ("passthru/dir") and
what poolrelay's own work adds on top ("vs passthru").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(8)
CREDENTIALS = ("sk-ant-api03-bench-account-0001", "sk-ant-api03-bench-account-0002")
TOPUP_USD = "1000000"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SLOW_PROMPT = "reply with 2 words"
BUSY_PERCENT = 20.0  # other processes' CPU, % of one core, above which a run is flagged
SERVER_OF = {"direct": "fake", "passthrough": "passthrough", "relay": "relay"}
"""The process whose CPU per request a run reports, by target."""
# What ``poolrelay serve`` imports from its libraries, without any of poolrelay's own code: the
# RSS of a process that imports just these is the floor of any relay built on this stack.
STACK_IMPORTS = (
    "uvloop", "uvicorn", "uvicorn.protocols.http.httptools_impl", "uvicorn.lifespan.on",
    "starlette.applications", "fastapi", "pydantic_settings", "sqlalchemy.ext.asyncio",
    "sqlmodel", "psycopg", "psycopg_pool", "redis.asyncio", "aiohttp", "cryptography.fernet",
    "orjson", "prometheus_client",
)  # fmt: skip
# Only what the relay path itself uses (no FastAPI for the admin API, no SQLAlchemy/SQLModel ORM):
# the floor of even a relay process that loaded the admin API and the ORM on first use.
RELAY_PATH_IMPORTS = tuple(
    m for m in STACK_IMPORTS if m.split(".")[0] not in ("fastapi", "sqlalchemy", "sqlmodel")
)


# --------------------------------------------------------------------------------------------
# /proc readings
# --------------------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0
    fields = data.rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, ``echo 5 > clear_refs``)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_seconds() -> tuple[float, float]:
    """(CPU seconds the machine's processes ran, all cores; seconds the hypervisor gave the
    virtual CPUs to someone else — "steal"), from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    values = [int(v) for v in parts[:8]]
    idle, steal = values[3] + values[4], values[7]
    return (sum(values) - idle - steal) / CLK_TCK, steal / CLK_TCK


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def postgres_backends(dbname: str) -> list[int]:
    """PostgreSQL backend processes connected to the scratch database."""
    marker = f" {dbname} "
    return [p for p in _pids() if (c := _cmdline(p)).startswith("postgres:") and marker in c]


def redis_server_pids() -> list[int]:
    return [p for p in _pids() if _cmdline(p).startswith("redis-server")]


@dataclass
class Snapshot:
    at: float
    cpu: dict[str, float]
    machine: float
    steal: float


class Watch:
    """CPU of the processes under test, read around each measured window."""

    def __init__(self, dbname: str) -> None:
        self.dbname = dbname
        self.pids: dict[str, int] = {}

    def snapshot(self, loadgen_pid: int) -> Snapshot:
        cpu = {name: proc_cpu_seconds(pid) for name, pid in self.pids.items()}
        cpu["loadgen"] = proc_cpu_seconds(loadgen_pid)
        cpu["harness"] = proc_cpu_seconds(os.getpid())
        cpu["postgres"] = sum(proc_cpu_seconds(p) for p in postgres_backends(self.dbname))
        cpu["redis"] = sum(proc_cpu_seconds(p) for p in redis_server_pids())
        return Snapshot(time.perf_counter(), cpu, *machine_seconds())


class RssSampler:
    """Max VmRSS of one process, sampled every 20 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid, "VmRSS") or 0)
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poolrelay_argv() -> list[str]:
    """The ``poolrelay`` console script of this interpreter (a Python script, so its pid is
    the server's own, not a shell wrapper's)."""
    script = Path(sys.executable).with_name("poolrelay")
    if script.exists():
        return [sys.executable, str(script)]
    found = shutil.which("poolrelay")
    if found is None:
        raise SystemExit("poolrelay is not installed: pip install -e .")
    return [found]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Stack:
    """Everything this run started; :meth:`close` stops it all and drops the scratch db."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.servers: list[Server] = []
        self.loadgens: list[subprocess.Popen[bytes]] = []
        self.dbname = "pr_bench_" + secrets.token_hex(4)
        self.db_created = False
        self.redis_flushed = False
        from cryptography.fernet import Fernet

        self.env = {k: v for k, v in os.environ.items() if not k.startswith("POOLRELAY_")}
        self.env.update(
            POOLRELAY_DATABASE_URL=_with_db(args.pg_url, self.dbname),
            POOLRELAY_REDIS_URL=args.redis_url,
            POOLRELAY_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
            POOLRELAY_ADMIN_TOKEN=ADMIN_TOKEN,
            POOLRELAY_LOG_LEVEL="WARNING",
            POOLRELAY_KEY_FILE=str(workdir / "poolrelay.key"),
            PYTHONUNBUFFERED="1",
        )

    # -- database and redis -----------------------------------------------------------------

    def create_database(self) -> None:
        import psycopg

        with psycopg.connect(_with_db(self.args.pg_url, "postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')
        self.db_created = True
        self.cli("migrate")

    def drop_database(self) -> None:
        if not self.db_created:
            return
        import psycopg

        with psycopg.connect(_with_db(self.args.pg_url, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        self.db_created = False

    def flush_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.args.redis_url)
        try:
            client.flushdb()
        finally:
            client.close()
        self.redis_flushed = True

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(_with_db(self.args.pg_url, self.dbname), autocommit=True) as conn:
            return list(conn.execute(query).fetchall())

    # -- processes ----------------------------------------------------------------------------

    def cli(self, *argv: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [*poolrelay_argv(), *argv],
            input=stdin.encode() if stdin is not None else None,
            capture_output=True,
            env=self.env,
            cwd=self.workdir,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"poolrelay {' '.join(argv)} failed ({done.returncode}): "
                f"{done.stderr.decode(errors='replace')}{done.stdout.decode(errors='replace')}"
            )
        return done.stdout.decode()

    def start(
        self,
        name: str,
        argv: list[str],
        url: str,
        ready_path: str,
        *,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Server:
        """Start ``poolrelay ARGV`` (or ``COMMAND ARGV``, run from the repository) and wait
        until ``url + ready_path`` answers 200."""
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*(command or poolrelay_argv()), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                cwd=REPO if command else self.workdir,
                start_new_session=True,  # Ctrl-C reaches only the harness, which stops it
            )
        server = Server(name, proc, log, url)
        self.servers.append(server)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while starting:\n{server.log_tail()}"
                )
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready in 60 s:\n{server.log_tail()}")
            time.sleep(0.1)

    def close(self) -> None:
        for proc in self.loadgens:
            _stop(proc)
        for server in reversed(self.servers):
            _stop(server.proc)
        self.servers.clear()
        with contextlib.suppress(Exception):
            self.drop_database()
        if self.redis_flushed:
            with contextlib.suppress(Exception):
                self.flush_redis()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    scheme = "postgresql" if parts.scheme.startswith("postgres") else parts.scheme
    return urlunsplit((scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


# --------------------------------------------------------------------------------------------
# Load runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    stream: bool
    concurrency: int
    duration: float
    warmup: float
    slow: bool = False
    per_worker: int | None = None  # a fixed count per worker instead of the duration
    stagger: float = 0.0  # seconds over which the workers' first requests are spread


@dataclass
class Run:
    scenario: Scenario
    target: str  # "direct" | "passthrough" | "relay"
    load: dict[str, Any]
    wall: float
    cpu: dict[str, float]
    others: float
    steal: float = 0.0
    peak_rss_kb: int | None = None

    @property
    def done(self) -> int:
        return int(self.load["ok"]) + int(self.load["errors"])

    def cpu_ms(self, name: str) -> float | None:
        seconds = self.cpu.get(name)
        return seconds / self.done * 1000 if seconds is not None and self.done else None

    def percent(self, name: str) -> float:
        return self.cpu.get(name, 0.0) / self.wall * 100 if self.wall > 0 else 0.0

    @property
    def others_percent(self) -> float:
        return self.others / self.wall * 100 if self.wall > 0 else 0.0

    @property
    def steal_percent(self) -> float:
        return self.steal / self.wall * 100 if self.wall > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.others_percent > BUSY_PERCENT or self.steal_percent > BUSY_PERCENT

    @property
    def server_cpu_ms(self) -> float | None:
        """CPU per request of the process under test (the fake, for direct runs)."""
        return self.cpu_ms(SERVER_OF[self.target])


class LineReader:
    """Lines from a child's stdout with a timeout (select + os.read, no blocking readline)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buffer = b""

    def line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the load generator did not answer in time")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return None
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def run_load(
    stack: Stack,
    watch: Watch,
    scenario: Scenario,
    target: str,
    url: str,
    key: str,
    rss_pid: int | None,
) -> Run:
    """One load-generator run against ``url``; ``rss_pid``: the process whose peak RSS to
    measure (None for direct runs)."""
    argv = [
        sys.executable,
        "-m",
        "tests.bench.loadgen",
        "--url",
        url + "/v1/messages",
        "--key",
        key,
        "--concurrency",
        str(scenario.concurrency),
        "--warmup",
        str(scenario.warmup),
        "--handshake",
    ]
    if scenario.per_worker:
        argv += ["--per-worker", str(scenario.per_worker), "--stagger", str(scenario.stagger)]
    else:
        argv += ["--duration", str(scenario.duration)]
    if scenario.stream:
        argv.append("--stream")
    if scenario.slow:
        argv += ["--prompt", SLOW_PROMPT, "--max-tokens", "16"]
    errlog = stack.workdir / f"loadgen-{scenario.name}-{target}.log"
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=REPO,
            start_new_session=True,
        )
    stack.loadgens.append(proc)
    assert proc.stdin is not None
    reader = LineReader(proc)
    budget = scenario.warmup + scenario.duration + 120
    try:
        if reader.line(budget) != "ready":
            raise RuntimeError(f"load generator failed: {errlog.read_text(errors='replace')}")
        sampler = RssSampler(rss_pid) if rss_pid is not None else None
        if rss_pid is not None:
            reset_peak_rss(rss_pid)
        hwm = 0
        with sampler or contextlib.nullcontext():
            before = watch.snapshot(proc.pid)
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            if reader.line(budget) != "done":
                raise RuntimeError(f"load generator failed: {errlog.read_text(errors='replace')}")
            after = watch.snapshot(proc.pid)
            if rss_pid is not None:
                hwm = proc_status_kb(rss_pid, "VmHWM") or 0
        result_line = reader.line(30)
        if result_line is None:
            raise RuntimeError(f"load generator failed: {errlog.read_text(errors='replace')}")
        load: dict[str, Any] = json.loads(result_line)
        proc.wait(timeout=30)
    finally:
        _stop(proc)
        stack.loadgens.remove(proc)
    cpu = {name: after.cpu[name] - before.cpu.get(name, 0.0) for name in after.cpu}
    ours = sum(cpu.values())
    return Run(
        scenario=scenario,
        target=target,
        load=load,
        wall=after.at - before.at,
        cpu=cpu,
        others=max(0.0, (after.machine - before.machine) - ours),
        steal=max(0.0, after.steal - before.steal),
        peak_rss_kb=max(hwm, sampler.peak_kb) if sampler is not None else None,
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:.2f}", dash: str = "-") -> str:
    return dash if value is None else fmt.format(value)


def _mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


@dataclass
class Report:
    runs: dict[tuple[str, str], Run] = field(default_factory=dict)
    idle_rss_kb: int = 0
    idle_rss_start_kb: int = 0
    passthrough_idle_rss_kb: int = 0
    stack_imports_rss_kb: int = 0
    relay_path_imports_rss_kb: int = 0
    billing: dict[str, Any] = field(default_factory=dict)

    def pair(self, name: str) -> tuple[Run, Run] | None:
        d, r = self.runs.get((name, "direct")), self.runs.get((name, "relay"))
        return (d, r) if d and r else None

    def targets(self, name: str) -> list[Run]:
        """The runs of one scenario, in the order direct, passthrough, relay."""
        return [r for t in SERVER_OF if (r := self.runs.get((name, t))) is not None]


def _ratio_row(label: str, r: Run, base: Run) -> str:
    """``r`` against ``base``: req/s as a ratio, latencies as ms added, CPU as a ratio."""
    return (
        f"{'':<22} {label:<11} {'':>7} "
        f"{_f(_ratio(r.load['rps'], base.load['rps']), '×{:.2f}'):>8} "
        f"{_f(_diff(r.load['p50_ms'], base.load['p50_ms']), '{:+.2f}'):>8} "
        f"{_f(_diff(r.load['p99_ms'], base.load['p99_ms']), '{:+.2f}'):>8} "
        f"{_f(_diff(r.load['ttfb_p50_ms'], base.load['ttfb_p50_ms']), '{:+.2f}'):>9} "
        f"{_f(_diff(r.load['ttft_p50_ms'], base.load['ttft_p50_ms']), '{:+.2f}'):>9} "
        f"{_f(_ratio(r.server_cpu_ms, base.server_cpu_ms), '×{:.1f}'):>11}\n"
    )


def print_report(report: Report, scenarios: list[Scenario], args: argparse.Namespace) -> None:
    out = sys.stdout.write
    out(
        "\n== Results (direct = load generator → fake upstream; passthrough = → bare Python"
        " relay → fake; relay = → poolrelay → fake) ==\n"
    )
    head = (
        f"{'scenario':<22} {'target':<11} {'ok':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'TTFB p50':>9} {'TTFT p50':>9} {'CPU ms/req':>11} {'RSS peak MB':>12} {'errors':>7}\n"
    )
    out(head)
    out("-" * (len(head) - 1) + "\n")
    for s in scenarios:
        runs = report.targets(s.name)
        if not runs:
            continue
        for i, run in enumerate(runs):
            load = run.load
            cpu_label = {"direct": "fake ", "passthrough": "pass ", "relay": "relay "}[
                run.target
            ] + _f(run.server_cpu_ms, "{:.3f}")
            out(
                f"{s.label if i == 0 else '':<22} {run.target:<11} {load['ok']:>7} "
                f"{load['rps']:>8.1f} {_f(load['p50_ms']):>8} {_f(load['p99_ms']):>8} "
                f"{_f(load['ttfb_p50_ms']):>9} {_f(load['ttft_p50_ms']):>9} {cpu_label:>11} "
                f"{_mb(run.peak_rss_kb):>12} {load['errors']:>7}"
                f"{'  (busy machine)' if run.noisy else ''}\n"
            )
        by = {run.target: run for run in runs}
        if "relay" in by and "direct" in by:
            out(_ratio_row("vs direct", by["relay"], by["direct"]))
        if "relay" in by and "passthrough" in by:
            out(_ratio_row("vs passthru", by["relay"], by["passthrough"]))
        if "passthrough" in by and "direct" in by:
            out(_ratio_row("passthru/dir", by["passthrough"], by["direct"]))
    out(
        "(vs direct: the relay against direct-to-fake; vs passthru: the relay against the bare"
        " passthrough, i.e. what auth, billing and scheduling add; passthru/dir: what a bare"
        " Python hop adds. req/s as ratios, p50, p99, TTFB and TTFT as ms added, CPU per request"
        " as ratios)\n"
        f"relay RSS idle: {_mb(report.idle_rss_start_kb)} MB just started, "
        f"{_mb(report.idle_rss_kb)} MB after setup and one request\n"
    )
    if report.stack_imports_rss_kb:
        out(
            f"passthrough RSS idle: {_mb(report.passthrough_idle_rss_kb)} MB; a process that "
            f"only imports the relay's libraries ({len(STACK_IMPORTS)} modules, no poolrelay"
            f" code): {_mb(report.stack_imports_rss_kb)} MB; only those of the relay path (no"
            f" FastAPI, no SQLAlchemy): {_mb(report.relay_path_imports_rss_kb)} MB\n"
        )

    out(
        "\n== CPU per request in ms (measured window ÷ requests), and %CPU of one core "
        f"(machine: {os.cpu_count()} cores) ==\n"
    )
    head = (
        f"{'scenario':<22} {'target':<11} {'loadgen':>8} {'fake':>7} {'pass':>7} {'relay':>7} "
        f"{'postgres':>9} {'redis':>7} | {'loadgen %':>9} {'server %':>9} {'others %':>9} "
        f"{'steal %':>8} {'wall s':>7}\n"
    )
    out(head)
    out("-" * (len(head) - 1) + "\n")
    for s in scenarios:
        for i, run in enumerate(report.targets(s.name)):
            out(
                f"{s.label if i == 0 else '':<22} {run.target:<11} "
                f"{_f(run.cpu_ms('loadgen'), '{:.3f}'):>8} {_f(run.cpu_ms('fake'), '{:.3f}'):>7} "
                f"{_f(run.cpu_ms('passthrough'), '{:.3f}'):>7} "
                f"{_f(run.cpu_ms('relay'), '{:.3f}'):>7} {_f(run.cpu_ms('postgres'), '{:.3f}'):>9} "
                f"{_f(run.cpu_ms('redis'), '{:.3f}'):>7} | {run.percent('loadgen'):>8.0f}% "
                f"{run.percent(SERVER_OF[run.target]):>8.0f}% {run.others_percent:>8.0f}% "
                f"{run.steal_percent:>7.0f}% {run.wall:>7.1f}\n"
            )
    out(
        "(postgres = backends of the scratch database; redis = the whole redis-server, shared;"
        " server = the process under test (fake, passthrough or relay);"
        " others = every other process on the machine; steal = time the hypervisor ran someone"
        " else on this machine's virtual CPUs, % of one core. Loadgen near 100% = the baseline"
        " is limited by the load generator; others or steal above ~20% = a busy machine,"
        " figures noisy)\n"
    )

    out("\n== Targets (issue 6, per relay process, full billing + scheduling) ==\n")
    rows: list[tuple[str, str, bool | None]] = []

    def add(label: str, measured: str, met: bool | None) -> None:
        rows.append((label, measured, met))

    p = report.pair("nonstream-c64")
    if p:
        add(
            "≥ 600 billed non-streaming req/s at c=64",
            f"{p[1].load['rps']:.0f} req/s "
            f"(direct {p[0].load['rps']:.0f}, ×{_f(_ratio(p[1].load['rps'], p[0].load['rps']))})",
            p[1].load["rps"] >= 600,
        )
    for name in ("nonstream-c64", "stream-c64", "nonstream-c1", "stream-c1"):
        p = report.pair(name)
        if p and p[1].server_cpu_ms is not None:
            cpu = p[1].server_cpu_ms
            add(f"relay CPU/request ≤ 1.5 ms ({name})", f"{cpu:.3f} ms", cpu <= 1.5)
    p = report.pair("nonstream-c1")
    if p:
        added = _diff(p[1].load["p50_ms"], p[0].load["p50_ms"])
        add(
            "added p50 ≤ 2 ms at c=1 (non-streaming)",
            _f(added, "{:+.2f} ms"),
            None if added is None else added <= 2,
        )
        bare = report.runs.get(("nonstream-c1", "passthrough"))
        if bare is not None:
            add(
                "  of which a bare Python hop (passthrough)",
                _f(_diff(bare.load["p50_ms"], p[0].load["p50_ms"]), "{:+.2f} ms")
                + "; billing + scheduling "
                + _f(_diff(p[1].load["p50_ms"], bare.load["p50_ms"]), "{:+.2f} ms"),
                None,
            )
    for name in ("stream-c1", "stream-c64"):
        p = report.pair(name)
        if p:
            added = _diff(p[1].load["ttft_p50_ms"], p[0].load["ttft_p50_ms"])
            ttfb = _diff(p[1].load["ttfb_p50_ms"], p[0].load["ttfb_p50_ms"])
            add(
                f"added time to first token ≤ 5 ms ({name})",
                f"{_f(added, '{:+.2f} ms')} (TTFB {_f(ttfb, '{:+.2f} ms')})",
                None if added is None else added <= 5,
            )
    peaks: list[int] = []
    for name, how in (("slow-500", "steady state"), ("slow-500-burst", "all started at once")):
        p = report.pair(name)
        if not p:
            continue
        ratio = _ratio(p[1].load["rps"], p[0].load["rps"])
        add(
            f"{args.slow_streams} slow streams at direct's rate (≥ 0.95×), {how}",
            f"{p[1].load['rps']:.1f} vs {p[0].load['rps']:.1f} streams/s (×{_f(ratio)}), "
            f"{p[1].load['errors']} errors",
            None if ratio is None else ratio >= 0.95 and p[1].load["errors"] == 0,
        )
        if p[1].peak_rss_kb is not None:
            peaks.append(p[1].peak_rss_kb)
    idle = max(report.idle_rss_kb, report.idle_rss_start_kb)
    add("relay RSS ≤ 80 MB idle", f"{_mb(idle)} MB", idle <= 80 * 1024)
    if report.stack_imports_rss_kb:
        add(
            "  libraries alone (all / relay path); passthrough",
            f"{_mb(report.stack_imports_rss_kb)} MB / {_mb(report.relay_path_imports_rss_kb)} MB;"
            f" {_mb(report.passthrough_idle_rss_kb)} MB",
            None,
        )
    if peaks:
        add(
            f"relay RSS ≤ 150 MB with {args.slow_streams} streams",
            f"{_mb(max(peaks))} MB",
            max(peaks) <= 150 * 1024,
        )
    relay_errors = sum(r.load["errors"] for (_, t), r in report.runs.items() if t == "relay")
    add("no relay errors under load", f"{relay_errors} errors", relay_errors == 0)
    for label, measured, met in rows:
        verdict = "n/a" if met is None else ("MET" if met else "NOT MET")
        out(f"  {label:<52} {measured:<52} {verdict}\n")

    b = report.billing
    if b:
        out("\n== Billing check ==\n")
        out(
            f"  successful relay requests (incl. warm-ups and 1 setup request): {b['expected']}\n"
            f"  usage ledger entries: {b['usage_entries']} "
            f"({'equal' if b['usage_entries'] == b['expected'] else 'MISMATCH'})"
            f"; Σ usage {b['usage_micros'] / 1e6:.6f} USD\n"
            f"  open holds: {b['open_holds']}; balance {b['balance_usd']} USD, held "
            f"{b['held_usd']} USD; top-up − Σ usage = {b['expected_balance_usd']} USD "
            f"({'equal' if b['balance_ok'] else 'MISMATCH'})\n"
            f"  request_log rows: {b['request_log']}\n"
        )
    for (name, target), run in report.runs.items():
        if run.load["errors"]:
            out(f"\nerrors in {name} / {target}: {run.load['error_kinds']}\n")
            for sample in run.load["error_samples"]:
                out(f"  {sample}\n")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def scenarios_for(args: argparse.Namespace) -> list[Scenario]:
    d = args.duration if args.duration else (1.5 if args.quick else 6.0)
    w1, w64 = (0.3, 0.5) if args.quick else (1.0, 1.5)
    slow_d = 2.0 if args.quick else 6.0
    stream_s = 7 * args.slow_delay  # a slow stream: 8 events, slow_delay apart
    all_ = [
        Scenario("nonstream-c1", "non-streaming c=1", False, 1, d, w1),
        Scenario("nonstream-c64", "non-streaming c=64", False, 64, d, w64),
        Scenario("stream-c1", "streaming c=1", True, 1, d, w1),
        Scenario("stream-c64", "streaming c=64", True, 64, d, w64),
        Scenario(
            "slow-500",
            f"{args.slow_streams} slow streams",
            True,
            args.slow_streams,
            slow_d,
            0.0,
            slow=True,
            per_worker=3,
            stagger=stream_s,
        ),
        Scenario(
            "slow-500-burst",
            f"{args.slow_streams} slow, burst",
            True,
            args.slow_streams,
            slow_d,
            0.0,
            slow=True,
            per_worker=3,
        ),
    ]
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {s.name for s in all_}
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        all_ = [s for s in all_ if s.name in wanted]
    return all_


def admin(url: str) -> httpx.Client:
    return httpx.Client(
        base_url=url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    )


def imports_rss_kb(modules: tuple[str, ...]) -> int:
    """VmRSS of a fresh interpreter that has imported ``modules`` and nothing else."""
    code = (
        "import gc, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "gc.collect()\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=120, check=True, cwd=REPO
    )
    return int(done.stdout.split()[-1])


def start_passthrough(stack: Stack, watch: Watch, report: Report, fake: Server) -> Server:
    """The bare passthrough (:mod:`tests.bench.passthrough`) in front of the fake upstream."""
    port = free_port()
    server = stack.start(
        "passthrough",
        ["--upstream", fake.url, "--host", "127.0.0.1", "--port", str(port)],
        f"http://127.0.0.1:{port}",
        "/ready",
        command=[sys.executable, "-m", "tests.bench.passthrough"],
        env={"PASSTHROUGH_CREDENTIAL": CREDENTIALS[0]},
    )
    watch.pids["passthrough"] = server.pid
    response = httpx.post(
        server.url + "/v1/messages",
        headers={"x-api-key": "unused", "anthropic-version": "2023-06-01"},
        json={"model": "claude-haiku-4-5", "max_tokens": 64,
              "messages": [{"role": "user", "content": "Hello"}]},
        timeout=30,
    )  # fmt: skip
    response.raise_for_status()
    time.sleep(0.5)
    report.passthrough_idle_rss_kb = proc_status_kb(server.pid, "VmRSS") or 0
    return server


def setup(stack: Stack, watch: Watch, report: Report) -> tuple[Server, Server, str, str]:
    def step(text: str) -> None:
        print(f"[setup] {text}", flush=True)

    step(f"scratch database {stack.dbname}, Redis {stack.args.redis_url} (FLUSHDB)")
    stack.flush_redis()
    stack.create_database()

    fake_port = free_port()
    fake = stack.start(
        "fake",
        ["fake-upstream", "--host", "127.0.0.1", "--port", str(fake_port)],
        f"http://127.0.0.1:{fake_port}",
        "/_fake/stats",
    )
    watch.pids["fake"] = fake.pid
    httpx.post(
        fake.url + "/_fake/limits",
        json={
            "key": "*",
            "requests_limit": 1_000_000_000,
            "input_tokens_limit": 1_000_000_000_000,
            "output_tokens_limit": 1_000_000_000_000,
            "tokens_limit": 2_000_000_000_000,
        },
    ).raise_for_status()
    step(f"fake upstream pid {fake.pid} on {fake.url}, limits lifted")

    for i, credential in enumerate(CREDENTIALS, 1):
        stack.cli(
            "accounts", "add", "--name", f"bench-{i}", "--base-url", fake.url,
            "--max-concurrency", "1000", stdin=credential + "\n",
        )  # fmt: skip
    step(f"{len(CREDENTIALS)} upstream accounts added (max concurrency 1000)")

    relay_port = free_port()
    relay = stack.start(
        "relay",
        ["serve", "--host", "127.0.0.1", "--port", str(relay_port)],
        f"http://127.0.0.1:{relay_port}",
        "/readyz",
    )
    watch.pids["relay"] = relay.pid
    time.sleep(1.0)
    report.idle_rss_start_kb = proc_status_kb(relay.pid, "VmRSS") or 0
    with admin(relay.url) as client:
        customer = client.post("/admin/customers", json={"name": "bench"}).raise_for_status().json()
        key = (
            client.post(f"/admin/customers/{customer['id']}/keys", json={"name": "bench"})
            .raise_for_status()
            .json()["key"]
        )
        client.post(
            f"/admin/customers/{customer['id']}/topups", json={"amount_usd": TOPUP_USD}
        ).raise_for_status()
    response = httpx.post(
        relay.url + "/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={"model": "claude-haiku-4-5", "max_tokens": 64,
              "messages": [{"role": "user", "content": "Hello"}]},
        timeout=30,
    )  # fmt: skip
    if response.status_code != 200:
        raise RuntimeError(
            f"the relay's first request failed: {response.status_code} {response.text}"
        )
    time.sleep(1.0)
    report.idle_rss_kb = proc_status_kb(relay.pid, "VmRSS") or 0
    step(
        f"relay pid {relay.pid} on {relay.url}; customer {customer['id']} with ${TOPUP_USD}; "
        f"first request ok; idle RSS {_mb(report.idle_rss_kb)} MB"
    )
    return fake, relay, customer["id"], key


def verify_billing(stack: Stack, relay: Server, customer_id: str, expected: int) -> dict[str, Any]:
    """Wait (≤ 15 s) for every settlement to land, then compare the ledger with the runs."""
    deadline = time.monotonic() + 15
    while True:
        (entries, usage), = stack.sql(
            "SELECT count(*), coalesce(sum(-amount_micros), 0) FROM ledger_entries"
            " WHERE kind = 'usage'"
        )  # fmt: skip
        (open_holds,), = stack.sql("SELECT count(*) FROM holds")  # fmt: skip
        if (entries >= expected and open_holds == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    (request_log,), = stack.sql("SELECT count(*) FROM request_log")  # fmt: skip
    with admin(relay.url) as client:
        customer = client.get(f"/admin/customers/{customer_id}").raise_for_status().json()
    from decimal import Decimal

    expected_balance = Decimal(TOPUP_USD) - Decimal(int(usage)) / Decimal(1_000_000)
    return {
        "expected": expected,
        "usage_entries": int(entries),
        "usage_micros": int(usage),
        "open_holds": int(open_holds),
        "request_log": int(request_log),
        "balance_usd": customer["balance_usd"],
        "held_usd": customer["held_usd"],
        "expected_balance_usd": f"{expected_balance:.6f}",
        "balance_ok": Decimal(customer["balance_usd"]) == expected_balance,
    }


def main(args: argparse.Namespace) -> int:
    scenarios = scenarios_for(args)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 500 streams × 3 sockets
    keep = args.log_dir is not None
    workdir = Path(args.log_dir) if keep else Path(tempfile.mkdtemp(prefix="poolrelay-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(args, workdir)
    watch = Watch(stack.dbname)
    report = Report()
    started = time.monotonic()
    load_before = os.getloadavg()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    failed = False
    try:
        fake, relay, customer_id, key = setup(stack, watch, report)
        report.stack_imports_rss_kb = imports_rss_kb(STACK_IMPORTS)
        report.relay_path_imports_rss_kb = imports_rss_kb(RELAY_PATH_IMPORTS)
        print(
            f"[setup] RSS of the relay's libraries alone: {_mb(report.stack_imports_rss_kb)} MB;"
            f" of the relay path's only: {_mb(report.relay_path_imports_rss_kb)} MB",
            flush=True,
        )
        targets: list[tuple[str, str, str, int | None]] = [
            ("direct", fake.url, CREDENTIALS[0], None)
        ]
        if not args.no_passthrough:
            bare = start_passthrough(stack, watch, report, fake)
            print(
                f"[setup] passthrough pid {bare.pid} on {bare.url}; idle RSS "
                f"{_mb(report.passthrough_idle_rss_kb)} MB",
                flush=True,
            )
            targets.append(("passthrough", bare.url, "unused", bare.pid))
        targets.append(("relay", relay.url, key, relay.pid))
        expected = 1  # the setup request
        for s in scenarios:
            if s.slow:
                httpx.post(
                    fake.url + "/_fake/faults",
                    json={"key": "*", "fault": "slow_stream", "delay": args.slow_delay},
                ).raise_for_status()
            try:
                for target, url, credential, pid in targets:
                    run = run_load(stack, watch, s, target, url, credential, pid)
                    report.runs[(s.name, target)] = run
                    if target == "relay":
                        expected += int(run.load["ok"]) + int(run.load["warmup_ok"])
                    print(
                        f"[run] {s.label:<20} {target:<11} {run.load['ok']:>6} ok "
                        f"{run.load['errors']:>4} errors {run.load['rps']:8.1f} req/s "
                        f"p50 {_f(run.load['p50_ms'])} ms",
                        flush=True,
                    )
                    if relay.proc.poll() is not None:
                        raise RuntimeError(
                            f"the relay exited ({relay.proc.returncode}):\n{relay.log_tail()}"
                        )
            finally:
                if s.slow:
                    httpx.delete(fake.url + "/_fake/faults").raise_for_status()
        report.billing = verify_billing(stack, relay, customer_id, expected)
        print_report(report, scenarios, args)
        relay_errors = any(r.load["errors"] for (_, t), r in report.runs.items() if t == "relay")
        log = relay.log_tail(60)
        if relay_errors or log.strip():
            print(f"\n== relay log (last lines of {relay.log}) ==\n{log or '(empty)'}")
        load_after = os.getloadavg()
        print(
            f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
            f"total {time.monotonic() - started:.0f} s"
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "runs": [
                            {
                                "scenario": r.scenario.name,
                                "target": r.target,
                                "load": r.load,
                                "wall_s": r.wall,
                                "cpu_s": r.cpu,
                                "others_cpu_s": r.others,
                                "steal_s": r.steal,
                                "peak_rss_kb": r.peak_rss_kb,
                            }
                            for r in report.runs.values()
                        ],
                        "idle_rss_kb": report.idle_rss_kb,
                        "idle_rss_start_kb": report.idle_rss_start_kb,
                        "passthrough_idle_rss_kb": report.passthrough_idle_rss_kb,
                        "stack_imports_rss_kb": report.stack_imports_rss_kb,
                        "relay_path_imports_rss_kb": report.relay_path_imports_rss_kb,
                        "billing": report.billing,
                    },
                    indent=2,
                )
            )
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        failed = True
    except Exception as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        for server in stack.servers:
            print(f"--- {server.name} log ---\n{server.log_tail()}", file=sys.stderr)
        failed = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stack.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs, a smoke test")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--duration", type=float, help="measured seconds per fast scenario")
    parser.add_argument("--slow-streams", type=int, default=500)
    parser.add_argument("--slow-delay", type=float, help="seconds between slow-stream events")
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument("--log-dir", help="keep the servers' logs in this directory")
    parser.add_argument(
        "--no-passthrough", action="store_true", help="skip the bare-passthrough baseline"
    )
    args = parser.parse_args(argv)
    if args.slow_delay is None:
        args.slow_delay = 0.2 if args.quick else 0.4
    for url in (args.pg_url, args.redis_url):
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", None):
            parser.error("only 127.0.0.1 / localhost services are used")
    return args


def run() -> None:
    sys.exit(main(parse_args()))


if __name__ == "__main__":
    run()
