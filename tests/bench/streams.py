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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.bench import streamgen, streams_bench
from tests.bench.bench_relay import Watch
from tests.bench.streams_bench import Bench, ReplayStack, StreamRun, stream_body

__all__ = ["add_stack_args", "check_stack_args", "fmt", "main", "stream_body"]


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
    stack = ReplayStack(args, workdir)
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
    args = parse_args()
    streams_bench.PINNING = not args.no_pin
    streams_bench.REALTIME = args.rt
    sys.exit(main(args))


if __name__ == "__main__":
    run()
