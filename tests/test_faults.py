"""PostgreSQL and Redis going away under load, and coming back (issue 12, items 4, 5 and 8).

On PostgreSQL + Redis only (``POOLRELAY_TEST_DATABASE_URL`` and ``POOLRELAY_TEST_REDIS_URL``
set). Each test has its own database — reached through a proxy that the test stops and starts
(:class:`tests.faults.TcpProxy`: the database going away and coming back) — and its own
``redis-server``, which the test SIGKILLs and starts again empty (:class:`tests.faults.
RedisServer`); the machine's Redis is never touched. The relay and the worker are real
``poolrelay serve`` and ``poolrelay worker`` processes.

What must hold through every outage:

- every answer the relay gives meanwhile is an honest one: Anthropic-shaped (OpenAI-shaped on
  ``/v1/chat/completions``) 529 ``overloaded_error`` or 500 ``api_error``, with
  ``x-should-retry: true`` and a request id — never a bare "Internal Server Error", never a hang;
- ``/readyz`` names the dependency that is down, quickly;
- once the dependency is back, requests succeed again within seconds, nothing restarted;
- the books: balance = Σ ledger, nothing left held, each answered request charged exactly once
  and nothing else charged;
- the worker keeps running (and running jobs) through both outages;
- streams that run across a Redis restart (Redis comes back empty) are charged exactly once
  each, by their own relay, even when reconciliation runs meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import needs_postgres_and_redis
from tests.faults import RedisServer, TcpProxy
from tests.harness import ADMIN_TOKEN, FakeUpstream
from tests.system import require_program
from tests.test_multiprocess import cli_add_account, create_customer, free_port, wait_ready

# the fault tests stop PostgreSQL and restart Redis
pytestmark = needs_postgres_and_redis

MODEL = "claude-haiku-4-5"
CREDENTIAL = "sk-ant-api03-faults-aaaa-0000000001"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
HEARTBEAT = 2  # seconds: relays beat every 0.7 s, a Redis restart is forgotten quickly
MESSAGES = "/v1/messages"
CHAT = "/v1/chat/completions"
RETRYABLE = {500: "api_error", 529: "overloaded_error"}


# --- the stack: a database behind a proxy, a private Redis, relay and worker processes -------


@dataclass
class Stack:
    env: dict[str, str]
    proxy: TcpProxy
    redis: RedisServer
    db_url: str
    """The database itself (not through the proxy): what the test reads the books from."""
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", *args],
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc, log

    def relay(self, name: str = "serve", **env: str) -> tuple[subprocess.Popen[bytes], str, Path]:
        """A ``poolrelay serve`` process, once ready: the process, its URL and its log."""
        port = free_port()
        proc, log = self.spawn(name, "serve", "--port", str(port), **env)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, log)
        return proc, url, log

    def serve(self, name: str = "serve", **env: str) -> tuple[str, Path]:
        _proc, url, log = self.relay(name, **env)
        return url, log

    def reconcile(self, **env: str) -> dict[str, Any]:
        """``poolrelay reconcile``: its report."""
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "reconcile"],
            env={**self.env, **env},
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
        report: dict[str, Any] = json.loads(done.stdout)
        return report

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            return list(conn.execute(query, params).fetchall())

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@pytest.fixture
def stack(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeUpstream
) -> Iterator[Stack]:
    from cryptography.fernet import Fernet

    binary = require_program("redis-server", install_hint="apt-get install redis-server")
    redis = RedisServer(binary, tmp_path / "redis")
    redis.start()
    proxy = TcpProxy.for_url(database_url)
    proxy.start()
    settings = {
        "POOLRELAY_DATABASE_URL": proxy.url(database_url),
        "POOLRELAY_REDIS_URL": redis.url,
        "POOLRELAY_KEY_FILE": str(tmp_path / "poolrelay.key"),
        "POOLRELAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "POOLRELAY_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "POOLRELAY_HEARTBEAT_SECONDS": str(HEARTBEAT),
        "POOLRELAY_LOG_LEVEL": "WARNING",
        "POOLRELAY_LOG_FORMAT": "text",
    }
    for name, value in settings.items():  # the in-process CLI (accounts add) reads them
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    cli_add_account("solo", CREDENTIAL, fake.url)
    env = {**os.environ, **settings}
    result = Stack(env=env, proxy=proxy, redis=redis, db_url=database_url, tmp=tmp_path)
    try:
        yield result
    finally:
        result.stop_all()
        proxy.close()
        redis.kill()


# --- a steady trickle of requests -------------------------------------------------------------


@dataclass
class Answer:
    at: float
    path: str
    status: int
    headers: httpx.Headers
    body: bytes


class Trickle:
    """One request after another (``/v1/messages`` and ``/v1/chat/completions`` in turn)
    from a thread, every answer kept; a transport error (a hang, a dropped connection) fails
    the test."""

    def __init__(self, url: str, key: str, gap: float = 0.04) -> None:
        self.url = url
        self.key = key
        self.gap = gap
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=20) as client:
            i = 0
            while not self._done.is_set():
                path = MESSAGES if i % 2 == 0 else CHAT
                i += 1
                try:
                    response = post(client, self.url, path, self.key)
                except httpx.HTTPError as exc:
                    self.errors.append(f"{path}: {type(exc).__name__}: {exc}")
                else:
                    self.answers.append(
                        Answer(
                            time.monotonic(),
                            path,
                            response.status_code,
                            response.headers,
                            response.content,
                        )
                    )
                self._done.wait(self.gap)

    def since(self, moment: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.at >= moment]

    def wait_until(self, predicate: Callable[[list[Answer]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(list(self.answers)):
                return True
            time.sleep(0.05)
        return predicate(list(self.answers))


def post(client: httpx.Client, url: str, path: str, key: str) -> httpx.Response:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "reply with 3 words"}],
    }
    if path == MESSAGES:
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    else:
        headers = {"authorization": f"Bearer {key}"}
    return client.post(f"{url}{path}", headers=headers, json=body)


def check_honest(answer: Answer) -> None:
    """A failed answer of an outage: retryable, with a request id, in the endpoint's shape."""
    what = f"{answer.path} {answer.status}: {answer.body[:300]!r}"
    assert answer.status in RETRYABLE, what
    assert answer.headers.get("x-should-retry") == "true", what
    request_id = answer.headers.get("request-id")
    assert request_id and request_id.startswith("req"), what
    assert answer.headers.get("x-poolrelay-request-id") == request_id, what
    assert answer.headers.get("content-type", "").startswith("application/json"), what
    body = json.loads(answer.body)
    if answer.path == MESSAGES:
        assert body["type"] == "error", what
        assert body["error"]["type"] == RETRYABLE[answer.status], what
        assert body["error"]["message"], what
        assert body["request_id"] == request_id, what
    else:  # OpenAI's shape
        assert body["error"]["type"] == "api_error", what
        assert body["error"]["code"] == "server_error", what
        assert body["error"]["message"], what


def check_answers(trickle: Trickle, outage: tuple[float, float]) -> list[Answer]:
    """Every answer is a success or an honest failure; some failed during the outage; the
    trickle succeeds again within seconds after it. Returns the successes."""
    assert not trickle.errors, trickle.errors[:5]
    answers = list(trickle.answers)
    ok = [a for a in answers if a.status == 200]
    failed = [a for a in answers if a.status != 200]
    for answer in failed:
        check_honest(answer)
    began, ended = outage
    during = [a for a in answers if began <= a.at <= ended]
    assert any(a.status != 200 for a in during), "no request failed during the outage"
    back = [a.at for a in ok if a.at > ended]
    assert back, "no request succeeded after the outage"
    assert back[0] - ended < 8, f"the relay took {back[0] - ended:.1f} s to recover"
    tail = [a for a in answers if a.at > back[0] + 2]
    assert tail and all(a.status == 200 for a in tail), [a.status for a in tail]
    for answer in ok:
        assert answer.headers.get("x-poolrelay-request-id"), answer.path
    return ok


def readyz(url: str) -> tuple[float, int, dict[str, Any]]:
    started = time.monotonic()
    response = httpx.get(f"{url}/readyz", timeout=15)
    return time.monotonic() - started, response.status_code, response.json()


# --- the books --------------------------------------------------------------------------------


def wait_released(stack: Stack, customer_id: str, timeout: float = 40) -> None:
    """Until nothing is held (a hold whose placement broke is resolved ~16 s later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (held,) = stack.sql("SELECT held_micros FROM customers WHERE id = %s", customer_id)[0]
        if held == 0:
            return
        time.sleep(0.25)
    raise AssertionError(f"{held} µUSD still held {timeout} s after the load")


def check_books(stack: Stack, customer_id: str, charged: set[str]) -> list[tuple[Any, ...]]:
    """balance = Σ ledger, nothing held, no hold row left, and one usage debit (cost > 0) for
    each request of ``charged`` — and none for any other request."""
    wait_released(stack, customer_id)
    (balance, held) = stack.sql(
        "SELECT balance_micros, held_micros FROM customers WHERE id = %s", customer_id
    )[0]
    (total,) = stack.sql(
        "SELECT COALESCE(sum(amount_micros), 0) FROM ledger_entries WHERE customer_id = %s",
        customer_id,
    )[0]
    assert held == 0
    assert balance == total, f"balance {balance} != Σ ledger {total}"
    assert stack.sql("SELECT request_id FROM holds WHERE customer_id = %s", customer_id) == []
    usage = stack.sql(
        "SELECT request_id, amount_micros FROM ledger_entries"
        " WHERE customer_id = %s AND kind = 'usage'",
        customer_id,
    )
    ids = [row[0] for row in usage]
    assert len(ids) == len(set(ids)), "a request was charged twice"
    assert all(amount < 0 for _, amount in usage)
    missing = charged - set(ids)
    extra = set(ids) - charged
    assert not missing, f"answered but never charged: {sorted(missing)[:5]}"
    assert not extra, f"charged but answered with an error: {sorted(extra)[:5]}"
    return usage


# --- a. PostgreSQL goes away, b. Redis restarts (empty), under load -------------------------


@dataclass(frozen=True)
class Outage:
    down: str  # the /readyz check that fails meanwhile
    up: str  # the one that stays ok
    seconds: float

    def stop(self, stack: Stack) -> None:
        if self.down == "database":
            stack.proxy.stop()
        else:
            stack.redis.kill()

    def start(self, stack: Stack) -> None:
        if self.down == "database":
            stack.proxy.start()
        else:
            stack.redis.start()  # empty: every key is gone


@pytest.mark.parametrize(
    "outage",
    [Outage("database", "redis", 3.0), Outage("redis", "database", 2.0)],
    ids=["database_outage", "redis_restart"],
)
def test_an_outage_is_answered_honestly_and_recovered_from(stack: Stack, outage: Outage) -> None:
    url, log = stack.serve()
    customer_id, key = create_customer(url, f"trickle-{outage.down}", 5_000_000)
    with Trickle(url, key) as trickle:
        assert trickle.wait_until(lambda a: sum(x.status == 200 for x in a) >= 10, 15)
        began = time.monotonic()
        outage.stop(stack)
        time.sleep(1.0)
        took, status, ready = readyz(url)
        assert status == 503, ready
        assert ready["checks"][outage.down].startswith("error"), ready
        assert ready["checks"][outage.up] == "ok", ready
        assert took < 6, f"/readyz took {took:.1f} s with {outage.down} down"
        time.sleep(max(0.0, outage.seconds - (time.monotonic() - began)))
        outage.start(stack)
        ended = time.monotonic()
        assert trickle.wait_until(lambda a: sum(x.at > ended + 3 for x in a) >= 10, 15)
    ok = check_answers(trickle, (began, ended))
    _took, status, ready = readyz(url)
    assert status == 200, ready
    check_books(stack, customer_id, {a.headers["x-poolrelay-request-id"] for a in ok})
    assert "Internal Server Error" not in log.read_text()


# --- c. the worker lives through both ----------------------------------------------------------


def run_job(redis_url: str, name: str, timeout: float = 20) -> Any:
    """Enqueue arq job ``name`` on ``redis_url`` and wait for its result (the worker runs it)."""
    from arq.connections import RedisSettings, create_pool

    async def main() -> Any:
        pool = await create_pool(RedisSettings.from_dsn(redis_url))
        try:
            job = await pool.enqueue_job(name)
            assert job is not None
            return await job.result(timeout=timeout, poll_delay=0.1)
        finally:
            await pool.aclose()

    return asyncio.run(main())


def test_worker_survives_a_redis_restart_and_a_database_outage(stack: Stack) -> None:
    proc, log = stack.spawn("worker", "worker", POOLRELAY_LOG_LEVEL="INFO")
    try:
        first = run_job(stack.redis.url, "reconcile_billing")
        assert first["discrepancies"] == [], first

        stack.redis.kill()
        time.sleep(1.5)  # the worker's poll fails meanwhile
        stack.redis.start()
        after_restart = run_job(stack.redis.url, "reconcile_billing", timeout=30)
        assert after_restart["discrepancies"] == [], after_restart
        assert proc.poll() is None, log.read_text()

        stack.proxy.stop()
        try:
            skipped = run_job(stack.redis.url, "reconcile_billing")
        finally:
            stack.proxy.start()
        assert skipped == {"skipped": "database unreachable"}, skipped
        assert proc.poll() is None, log.read_text()
        again = run_job(stack.redis.url, "reconcile_billing")
        assert again["discrepancies"] == [], again
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    text = log.read_text()
    assert code == 0, text
    assert text.count("redis unreachable") == 1, text  # one line for the outage ...
    assert text.count("redis reachable again") == 1, text  # ... and one when it ended
    # one line per skipped run: the test's own, and a cron run that fell in the outage
    skipped_runs = text.count("reconcile_billing ● {'skipped': 'database unreachable'}")
    assert 1 <= skipped_runs <= 2, text
    assert text.count("job reconcile_billing skipped: database unreachable") == skipped_runs, text
    assert "Traceback" not in text, text


# --- d. streams across a Redis restart ---------------------------------------------------------


@dataclass
class Stream:
    request_id: str | None = None
    events: list[str] = field(default_factory=list)
    error: str | None = None
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


def open_stream(url: str, key: str) -> Stream:
    stream = Stream()

    def run() -> None:
        try:
            with httpx.stream(
                "POST",
                f"{url}/v1/messages",
                headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                json={
                    "model": MODEL,
                    "max_tokens": 64,
                    "stream": True,
                    "messages": [{"role": "user", "content": "reply with 16 words"}],
                },
                timeout=60,
            ) as response:
                stream.request_id = response.headers.get("x-poolrelay-request-id")
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        stream.events.append(line[7:])
                        if line == "event: content_block_delta":
                            stream.started.set()
        except httpx.HTTPError as exc:
            stream.error = f"{type(exc).__name__}: {exc}"
        finally:
            stream.started.set()
            stream.done.set()

    threading.Thread(target=run, daemon=True).start()
    return stream


def reconcile_now(stack: Stack, heartbeat: int) -> dict[str, Any]:
    """Reconciliation as the worker runs it, from this process (no start-up time)."""
    from app.settings import Settings
    from app.state import build_services
    from workers.tasks import reconcile_billing

    env = stack.env
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=env["POOLRELAY_DATABASE_URL"],
        redis_url=env["POOLRELAY_REDIS_URL"],
        encryption_keys=env["POOLRELAY_ENCRYPTION_KEYS"],
        admin_token=env["POOLRELAY_ADMIN_TOKEN"],
        key_file=env["POOLRELAY_KEY_FILE"],
        heartbeat_seconds=heartbeat,
    )

    async def main() -> dict[str, Any]:
        services = build_services(settings)
        try:
            return await reconcile_billing({"services": services, "worker": True})
        finally:
            await services.aclose()

    return asyncio.run(main())


def heartbeats(stack: Stack) -> dict[str, int]:
    """The relays' heartbeat keys in the private Redis, with their remaining lives (ms)."""
    import redis

    client = redis.Redis.from_url(stack.redis.url)
    try:
        return {k.decode(): int(client.pttl(k)) for k in client.keys("poolrelay:instance:*")}
    finally:
        client.close()


def test_streams_across_a_redis_restart_are_charged_once(stack: Stack, fake: FakeUpstream) -> None:
    # Heartbeats of 30 s (renewed every 10 s): after the restart the live relay has no
    # heartbeat for ~10 s, and reconciliation runs inside that window — the case where it
    # must not take a missing heartbeat for a dead relay.
    beat = 30
    url, _log = stack.serve(POOLRELAY_HEARTBEAT_SECONDS=str(beat))
    customer_id, key = create_customer(url, "streams", 5_000_000)
    fake.fault(CREDENTIAL, "slow_stream", delay=0.8)  # 22 events: ~18 s a stream
    streams = [open_stream(url, key) for _ in range(10)]
    for stream in streams:
        assert stream.started.wait(20), "a stream did not start"
    assert not any(s.error for s in streams), [s.error for s in streams]

    # restart Redis just after the relay's heartbeat (its next one is ~10 s away)
    deadline = time.monotonic() + 15
    while not any(ttl > (beat - 0.5) * 1000 for ttl in heartbeats(stack).values()):
        assert time.monotonic() < deadline, heartbeats(stack)
        time.sleep(0.02)
    stack.redis.restart()  # the streams' progress records, the heartbeat, all gone
    first = reconcile_now(stack, beat)
    second = stack.reconcile(POOLRELAY_HEARTBEAT_SECONDS=str(beat))
    assert heartbeats(stack) == {}, "the relay beat again before reconciliation had run"
    ended = [(s.events, s.error) for s in streams if s.done.is_set()]
    assert not ended, f"streams ended before reconciliation ran: {ended}"
    for report in (first, second):
        assert report["holds_released"] == 0, report
        assert report["holds_settled"] == 0, report

    for stream in streams:
        assert stream.done.wait(40), "a stream did not end"
    for stream in streams:
        assert stream.error is None, stream.error
        assert stream.events[-1] == "message_stop", stream.events
        assert "error" not in stream.events, stream.events
    ids = {s.request_id for s in streams if s.request_id is not None}
    assert len(ids) == 10
    check_books(stack, customer_id, ids)
    statuses = stack.sql("SELECT id, status FROM request_log WHERE id = ANY(%s)", sorted(ids))
    assert sorted(status for _, status in statuses) == ["ok"] * 10, statuses
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "\npoolrelay_charged_without_hold_total 0.0" in metrics, "a stream lost its hold"
