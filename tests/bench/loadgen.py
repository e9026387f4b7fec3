"""A small closed-loop HTTP load generator for the Messages API (aiohttp, one process).

    python -m tests.bench.loadgen --url http://127.0.0.1:8080/v1/messages --key KEY
                                  [--concurrency 64] [--duration 5 | --requests N]
                                  [--warmup 1.0] [--stream] [--max-tokens 64]
                                  [--prompt Hello] [--timeout 60] [--handshake]

``--concurrency`` workers each send one request at a time, back to back, over keep-alive
connections (one per worker). With ``--duration`` no new request starts after the deadline and
the requests in flight are finished, never cancelled, so every request the relay saw is counted.
With ``--requests`` exactly that many are sent; with ``--per-worker K`` each worker sends exactly
K. ``--stagger S`` spreads the workers' first requests evenly over S seconds (worker i starts
at S·i/concurrency), for a steady state of long requests instead of one burst; the rate is then
``ok ÷ (wall − S)``, the steady-state rate (each worker's K requests take wall − S at most).
``--warmup`` seconds of the same load run first and are reported apart (``warmup_ok``).

Measured per request: total latency (to the last body byte), time to first body byte and, for
streams, time to the first ``content_block_delta`` (first token). A request is an error when the
status is not 200, the transport fails, or a stream ends without ``message_stop``.

With ``--handshake`` the generator prints ``ready`` after the warm-up and waits for a line on
standard input before measuring, then prints ``done`` when the last request has finished, so a
parent can read other processes' counters exactly around the measured window. The result is one
JSON object on the last line of standard output. Only 127.0.0.1 / localhost URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

MAX_ERROR_SAMPLES = 5
_DELTA = b"content_block_delta"
_STOP = b"message_stop"


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)

    def error(self, kind: str, sample: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(sample[:600])


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url: str = args.url
        self.stream: bool = args.stream
        body: dict[str, Any] = {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": args.prompt}],
        }
        if self.stream:
            body["stream"] = True
        self.body = json.dumps(body).encode()
        self.headers = {
            "x-api-key": args.key,
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
        }
        self.timeout = aiohttp.ClientTimeout(total=args.timeout)

    async def one(self, session: aiohttp.ClientSession, results: Results) -> None:
        started = time.perf_counter()
        first: float | None = None
        first_token: float | None = None
        try:
            async with session.post(
                self.url, data=self.body, headers=self.headers, timeout=self.timeout
            ) as response:
                if response.status != 200:
                    text = (await response.read()).decode("utf-8", "replace")
                    results.error(
                        f"http {response.status}",
                        f"{response.status} {response.headers.get('request-id', '')} {text}",
                    )
                    return
                if self.stream:
                    tail = b""
                    async for chunk in response.content.iter_any():
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        window = tail + chunk
                        if first_token is None and _DELTA in window:
                            first_token = now
                        tail = window[-64:]
                    if _STOP not in tail:
                        results.error(
                            "stream without message_stop", tail.decode("utf-8", "replace")
                        )
                        return
                else:
                    async for _chunk in response.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            results.error(type(exc).__name__, f"{type(exc).__name__}: {exc}")
            return
        end = time.perf_counter()
        results.ok += 1
        results.latencies.append(end - started)
        if first is not None:
            results.ttfb.append(first - started)
        if first_token is not None:
            results.ttft.append(first_token - started)

    async def run(
        self,
        session: aiohttp.ClientSession,
        concurrency: int,
        duration: float | None,
        requests: int | None,
        *,
        per_worker: int | None = None,
        stagger: float = 0.0,
    ) -> tuple[Results, float]:
        results = Results()
        deadline = time.perf_counter() + duration if duration is not None else None
        remaining = [requests if requests is not None else 0]

        async def worker(index: int) -> None:
            if stagger > 0:
                await asyncio.sleep(stagger * index / concurrency)
            sent = 0
            while True:
                if per_worker is not None:
                    if sent >= per_worker:
                        return
                elif deadline is not None:
                    if time.perf_counter() >= deadline:
                        return
                elif remaining[0] <= 0:
                    return
                else:
                    remaining[0] -= 1
                sent += 1
                await self.one(session, results)

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return results, time.perf_counter() - started


def _summary(results: Results, wall: float, cpu: float) -> dict[str, Any]:
    lat = sorted(results.latencies)
    ttfb = sorted(results.ttfb)
    ttft = sorted(results.ttft)
    done = results.ok + results.errors
    return {
        "ok": results.ok,
        "errors": results.errors,
        "error_kinds": results.error_kinds,
        "error_samples": results.error_samples,
        "wall_s": round(wall, 4),
        "rps": results.ok / wall if wall > 0 else 0.0,
        "p50_ms": _ms(_percentile(lat, 0.50)),
        "p99_ms": _ms(_percentile(lat, 0.99)),
        "mean_ms": _ms(sum(lat) / len(lat)) if lat else None,
        "ttfb_p50_ms": _ms(_percentile(ttfb, 0.50)),
        "ttfb_p99_ms": _ms(_percentile(ttfb, 0.99)),
        "ttft_p50_ms": _ms(_percentile(ttft, 0.50)),
        "ttft_p99_ms": _ms(_percentile(ttft, 0.99)),
        "loadgen_cpu_ms_per_request": cpu / done * 1000 if done else None,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    gen = LoadGen(args)
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=connector) as session:
        warm_ok = warm_err = 0
        if args.warmup > 0:
            warm, _ = await gen.run(session, args.concurrency, args.warmup, None)
            warm_ok, warm_err = warm.ok, warm.errors
        if args.handshake:
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu0 = time.process_time()
        fixed = args.requests or args.per_worker
        results, wall = await gen.run(
            session,
            args.concurrency,
            None if fixed else args.duration,
            args.requests,
            per_worker=args.per_worker,
            stagger=args.stagger,
        )
        cpu = time.process_time() - cpu0
        if args.handshake:
            print("done", flush=True)
    summary = _summary(results, wall, cpu)
    if args.stagger > 0 and wall > args.stagger:
        summary["rps"] = results.ok / (wall - args.stagger)
    summary.update(
        stagger_s=args.stagger,
        warmup_ok=warm_ok,
        warmup_errors=warm_err,
        concurrency=args.concurrency,
        stream=gen.stream,
    )
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="the full /v1/messages URL on 127.0.0.1")
    parser.add_argument("--key", required=True, help="sent as x-api-key")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--requests", type=int, help="a fixed count instead of --duration")
    parser.add_argument("--per-worker", type=int, help="a fixed count per worker instead")
    parser.add_argument(
        "--stagger", type=float, default=0.0, help="spread the first requests over S seconds"
    )
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds of warm-up first")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--model", default="claude-haiku-4-5")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Hello")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--handshake", action="store_true", help="ready/go/done on stdio")
    args = parser.parse_args(argv)
    host = urlsplit(args.url).hostname
    if host not in ("127.0.0.1", "localhost"):
        parser.error("only 127.0.0.1 / localhost targets are allowed")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        pass
    print(json.dumps(asyncio.run(main(args))), flush=True)


if __name__ == "__main__":
    run()
