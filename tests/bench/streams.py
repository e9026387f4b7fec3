"""Benchmark: how many concurrent paced streams pass without a single stalled frame.

    python -m tests.bench.streams [--max-n 2048] [--deltas 64] [--pace-ms 20] [--stall-ms 50]
                                  [--targets direct,passthrough,relay] [--profile DIR]
                                  [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
                                  [--redis-url redis://127.0.0.1:6379/11] [--json FILE]

The shape of the public "stall-free streams" board: N concurrent streaming ``POST
/v1/messages``, all opened at once, each answered with ``--deltas`` content deltas paced
``--pace-ms`` apart (the sandbox's ``paced`` fault, ``reply with 64 words``); a frame is
*stalled* when it arrives more than ``--stall-ms`` after its predecessor beyond the pacing
(:mod:`tests.bench.streamgen`, an epoll load generator in C). N is searched upward (32, 64,
128, …, ``--max-n``) for each target until a run has a stalled frame or an error; the largest
clean N is the target's figure.

Targets, in the same run: DIRECT (the sandbox upstream itself), the bare PASSTHROUGH
(:mod:`tests.bench.passthrough`) and the RELAY (``poolrelay serve``, full billing and
scheduling on a scratch PostgreSQL database, created and dropped, and Redis db 11, flushed
before and after). The process under test (passthrough, relay) is pinned to CPU 0, the
generator, the sandbox and this harness to CPU 1 (when the machine has two CPUs or more;
``--no-pin``: nowhere); PostgreSQL and Redis are not ours to pin. On a shared, busy machine
``--rt`` runs the generator and the replay upstream under ``SCHED_FIFO`` (both are
event-driven and light), so that a stall they record is the server's, not their own
descheduling; the servers under test keep the normal scheduler.

Printed per run: stalled frames (and at which delta), errors, time to first byte and to the
first delta (p50/p99), the gap between deltas (p50/p99/max), the generator's CPU and its
longest loop turn (it keeps up when both stay small), the server's CPU per stream, its peak RSS,
the machine's steal time and the other processes' CPU. Then, at the relay's largest clean N,
the added time to first delta and added inter-delta gap against direct and against the
passthrough at the same N, and a billing check (one usage entry per relayed stream, no hold
left, balance = top-up − Σ usage). ``--profile DIR`` records the relay with ``py-spy`` (if
installed) during its run at ``--profile-n`` streams (default: the largest clean N doubled).
Nothing is asserted; about 1–3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
        fake, relay, customer_id, key = setup(
            self.stack, self.watch, report, upstream.url if upstream else None
        )
        self.fake, self.relay, self.customer_id = fake, relay, customer_id
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


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _d(result: dict[str, Any], name: str, q: str) -> float | None:
    dist = result.get(name)
    return None if dist is None else float(dist[q])


def fmt(value: float | None, spec: str = "{:.1f}") -> str:
    return "-" if value is None else spec.format(value)


def line(run: StreamRun) -> str:
    r = run.result
    busy = " BUSY" if run.pct(run.steal_s) > 20 or run.pct(run.others_s) > 20 else ""
    return (
        f"{run.target:<11} {run.n:>5} {r['ok']:>5} {r['errors']:>4} {r['stalled_frames']:>6} "
        f"{r['stalls_by_delta']!s:<22} "
        f"{fmt(_d(r, 'ttft_ms', 'p50')):>7} {fmt(_d(r, 'ttft_ms', 'p99')):>7} "
        f"{fmt(_d(r, 'gap_ms', 'p50')):>6} {fmt(_d(r, 'gap_ms', 'p99')):>6} "
        f"{fmt(_d(r, 'gap_ms', 'max')):>7} "
        f"{fmt(run.cpu_ms_per_stream, '{:.2f}'):>7} "
        f"{fmt(run.pct(run.server_cpu_s), '{:.0f}%'):>5} "
        f"{fmt(None if run.peak_rss_kb is None else run.peak_rss_kb / 1024):>6} "
        f"{r['cpu_s'] / max(run.wall_s, 1e-9) * 100:>4.0f}% {r['max_loop_ms']:>6.1f} "
        f"{run.pct(run.steal_s):>4.0f}% {run.pct(run.others_s):>5.0f}% {run.loadavg:>5.2f}{busy}"
    )


HEADER = (
    f"{'target':<11} {'N':>5} {'ok':>5} {'err':>4} {'stalls':>6} {'stalls at delta 1..8,+':<22} "
    f"{'ttft50':>7} {'ttft99':>7} {'gap50':>6} {'gap99':>6} {'gapmax':>7} "
    f"{'cpu/str':>7} {'cpu%':>5} {'rssMB':>6} {'gen%':>5} {'genloop':>6} "
    f"{'steal':>5} {'others':>6} {'load':>5}"
)
LEGEND = (
    "times in ms; cpu/str: the server's CPU ms per stream (the sandbox's for direct); cpu%: of "
    "one core; gen%/genloop: the C generator's CPU and its longest loop turn (ms); steal: "
    "hypervisor steal, others: other processes' CPU, both in % of one core over the run"
)


def largest_clean(runs: list[StreamRun]) -> StreamRun | None:
    clean = None
    for run in runs:
        if not run.clean:
            break
        clean = run
    return clean


def summarize(by_target: dict[str, list[StreamRun]]) -> dict[str, Any]:
    best = {t: largest_clean(runs) for t, runs in by_target.items()}
    out: dict[str, Any] = {t: (b.n if b else 0) for t, b in best.items()}
    print("\n== largest N without a stalled frame ==")
    for t, b in best.items():
        print(f"  {t:<11} {b.n if b else 0}")
    relay = best.get("relay")
    if relay is None:
        return out
    n = relay.n
    for base_name in ("direct", "passthrough"):
        base = next((r for r in by_target.get(base_name, []) if r.n == n), None)
        if base is None:
            continue
        rr, br = relay.result, base.result
        added = {
            f"ttft_{q}": _diff(_d(rr, "ttft_ms", q), _d(br, "ttft_ms", q)) for q in ("p50", "p99")
        }
        added.update(
            {f"gap_{q}": _diff(_d(rr, "gap_ms", q), _d(br, "gap_ms", q)) for q in ("p50", "p99")}
        )
        out[f"added_vs_{base_name}"] = added
        print(
            f"  relay at N={n} vs {base_name} at N={n}: added TTFT p50 {fmt(added['ttft_p50'], '{:+.1f}')} "
            f"p99 {fmt(added['ttft_p99'], '{:+.1f}')} ms; added inter-delta gap p50 "
            f"{fmt(added['gap_p50'], '{:+.2f}')} p99 {fmt(added['gap_p99'], '{:+.2f}')} ms"
        )
        ratio = (relay.n / best[base_name].n) if best.get(base_name) else None  # type: ignore[union-attr]
        print(f"  relay's figure / {base_name}'s: {fmt(ratio, '{:.2f}')}")
    out["relay_cpu_ms_per_stream"] = relay.cpu_ms_per_stream
    out["relay_peak_rss_mb"] = None if relay.peak_rss_kb is None else relay.peak_rss_kb / 1024
    print(
        f"  relay at N={n}: {fmt(relay.cpu_ms_per_stream, '{:.2f}')} ms CPU per stream "
        f"({fmt(relay.cpu_ms_per_stream and relay.cpu_ms_per_stream / (_frames(relay) or 1) * 1000, '{:.0f}')} µs per frame), "
        f"peak RSS {fmt(out['relay_peak_rss_mb'])} MB"
    )
    print(
        "  goal: relay ≥ 512, ≥ 0.5 × direct, ≥ 0.7 × passthrough, ≤ 3 ms CPU per stream, "
        "≤ 5 ms added TTFT"
    )
    return out


def _frames(run: StreamRun) -> float:
    done = run.result["ok"] + run.result["errors"]
    return run.result["frames"] / done if done else 0.0


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def search(bench: Bench, names: list[str], args: argparse.Namespace) -> dict[str, list[StreamRun]]:
    by_target: dict[str, list[StreamRun]] = {}
    print(f"\n{HEADER}\n{LEGEND}", flush=True)
    for name in names:
        target = bench.targets[name]
        bench.run(target, 16)  # warm-up: connection pools, caches (not reported)
        runs: list[StreamRun] = []
        n = args.start_n
        while n <= args.max_n:
            run = bench.run(target, n)
            runs.append(run)
            print(line(run), flush=True)
            if not run.clean:
                break
            n *= 2
        by_target[name] = runs
    return by_target


def main(args: argparse.Namespace) -> int:
    try:
        streamgen.binary()
    except streamgen.NoCompiler as exc:
        print(f"streams benchmark: {exc}", file=sys.stderr)
        return 2
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="poolrelay-streams-"))
    stack = Stack(args, workdir)
    watch = Watch(stack.dbname)
    started = time.monotonic()
    load0 = os.getloadavg()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    failed = False
    try:
        bench = Bench(args, stack, watch)
        bench.start()
        names = [t for t in ("direct", "passthrough", "relay") if t in args.targets]
        by_target = search(bench, names, args)
        summary = summarize(by_target)
        if args.profile:
            best = largest_clean(by_target.get("relay", []))
            n = args.profile_n or (best.n * 2 if best else args.start_n)
            out = Path(args.profile) / f"relay-streams-{n}.txt"
            run = bench.run(bench.targets["relay"], n, profile=out)
            print(f"\n[profile] relay at N={n} (py-spy raw stacks in {out}):\n{line(run)}")
        billing = bench.billing()
        summary["billing"] = billing
        ok = billing["usage_entries"] == billing["expected"] and billing["open_holds"] == 0
        print(
            f"\n== billing: {billing['usage_entries']} usage entries for {billing['expected']} "
            f"delivered relay streams, {billing['open_holds']} holds open, balance "
            f"{'= top-up − Σ usage' if billing['balance_ok'] else 'MISMATCH'}: "
            f"{'PASS' if ok and billing['balance_ok'] else 'FAIL'}"
        )
        load1 = os.getloadavg()
        print(
            f"load average before {load0[0]:.2f}, after {load1[0]:.2f}; total {time.monotonic() - started:.0f} s"
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "summary": summary,
                        "runs": [
                            {**r.__dict__, "cpu_ms_per_stream": r.cpu_ms_per_stream}
                            for runs in by_target.values()
                            for r in runs
                        ],
                    },
                    indent=2,
                    default=str,
                )
            )
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        failed = True
    except Exception as exc:
        print(f"\nbenchmark failed: {exc!r}", file=sys.stderr)
        for server in stack.servers:
            print(f"--- {server.name} log ---\n{server.log_tail()}", file=sys.stderr)
        failed = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def add_stack_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")


def check_stack_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for url in (args.pg_url, args.redis_url):
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", None):
            parser.error("only 127.0.0.1 / localhost services are used")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_stack_args(parser)
    parser.add_argument("--targets", default="direct,passthrough,relay")
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler place every process"
    )
    parser.add_argument(
        "--rt",
        action="store_true",
        help="run the generator and the replay upstream (light, event-driven) under SCHED_FIFO,"
        " so that other processes on a shared machine cannot delay them (needs root)",
    )
    parser.add_argument(
        "--upstream",
        choices=("replay", "sandbox"),
        default="replay",
        help="replay: the sandbox's answers replayed by streamsrv.c (default); sandbox: itself",
    )
    parser.add_argument("--start-n", type=int, default=32)
    parser.add_argument("--max-n", type=int, default=2048)
    parser.add_argument("--deltas", type=int, default=64)
    parser.add_argument("--pace-ms", type=float, default=20.0)
    parser.add_argument("--stall-ms", type=float, default=50.0)
    parser.add_argument("--run-timeout", type=float, default=60.0)
    parser.add_argument("--profile", help="record the relay with py-spy into this directory")
    parser.add_argument("--profile-n", type=int, help="streams during the profile")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    check_stack_args(parser, args)
    return args


def run() -> None:
    global PINNING, REALTIME
    args = parse_args()
    PINNING = not args.no_pin
    REALTIME = args.rt
    sys.exit(main(args))


if __name__ == "__main__":
    run()
