"""Deadlines that hold: an upstream that never answers, a client that leaves while the upstream
thinks, a stream that breaks, a stream that runs too long.

- Each attempt waits for the response headers only so long (``header_budget``): a hanging
  account is an account failure (its connection closed, its breaker counting it) and the
  request fails over within ``REQUEST_DEADLINE``; a non-streaming request may wait as long as
  its answer is expected to take.
- A client that goes away before the upstream answered stops the attempt at once: the hold,
  the lease and the upstream connection go back.
- A stream the upstream breaks counts toward the account's circuit breaker (a client
  disconnect does not).
- A stream still running ``MAX_REQUEST_SECONDS`` after it arrived ends with one error event
  and is charged what it used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from app.relay.forward import HeaderBudget, header_budget
from app.settings import Settings
from tests.harness import FakeUpstream, RelayServer, eventually

MODEL = "claude-haiku-4-5"
KEY_A = "sk-ant-api03-deadline-aaaa-0000000001"
KEY_B = "sk-ant-api03-deadline-bbbb-0000000002"
HEADERS = {"anthropic-version": "2023-06-01"}


def body(*, stream: bool = False, max_tokens: int = 16, text: str = "Hello deadline") -> Any:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }


def post(relay: RelayServer, key: str, payload: Any, timeout: float = 15) -> httpx.Response:
    return httpx.post(
        f"{relay.url}/v1/messages",
        headers={**HEADERS, "x-api-key": key},
        json=payload,
        timeout=timeout,
    )


def accounts(relay: RelayServer) -> dict[str, dict[str, Any]]:
    with relay.admin() as admin:
        items = admin.get("/admin/accounts").raise_for_status().json()["items"]
    return {item["name"]: item for item in items}


def breaker(relay: RelayServer) -> dict[str, int]:
    """Failures counted by each account's circuit breaker (since its last reset or trip)."""
    redis = relay.services.redis

    async def read() -> dict[Any, Any]:
        return await redis.hgetall("poolrelay:{pool}:cb")  # type: ignore[no-any-return]

    raw = relay.call(read)
    out: dict[str, int] = {}
    for name, value in raw.items():
        name = name.decode() if isinstance(name, bytes) else name
        value = value.decode() if isinstance(value, bytes) else value
        out[name] = int(value.split("|")[0])
    return out


def open_upstream_requests(fake: FakeUpstream, credential: str) -> int:
    """Requests from ``credential`` the sandbox is still serving on an open connection."""

    async def count() -> int:
        found = 0
        for protocol in list(fake.server.server_state.connections):
            cycle = getattr(protocol, "cycle", None)
            if cycle is None or cycle.response_complete or cycle.disconnected:
                continue
            if (b"x-api-key", credential.encode()) in cycle.scope["headers"]:
                found += 1
        return found

    return fake.call(count)


def held_usd(relay: RelayServer, customer_id: str) -> str:
    return str(relay.customer(customer_id)["held_usd"])


def failovers(relay: RelayServer, reason: str) -> float:
    text = httpx.get(f"{relay.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'poolrelay_failovers_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def requests_log(relay: RelayServer, customer_id: str) -> list[dict[str, Any]]:
    with relay.admin() as admin:
        page = admin.get("/admin/requests", params={"customer_id": customer_id}).json()
    return list(page["items"])


# --- the header budget ------------------------------------------------------------------------


def test_header_budget_follows_the_rule() -> None:
    settings = Settings(_env_file=None, request_deadline=120, upstream_read_timeout=600)  # type: ignore[call-arg]
    # streaming (and the small endpoints): what is left of REQUEST_DEADLINE
    assert header_budget(settings, streaming=True, max_tokens=64000) == HeaderBudget(120)
    assert header_budget(settings, streaming=False, max_tokens=None) == HeaderBudget(120)
    # non-streaming: max(REQUEST_DEADLINE, min(UPSTREAM_READ_TIMEOUT, 3600 s × max_tokens / 128000))
    small = header_budget(settings, streaming=False, max_tokens=1024)
    assert small.total == 120 and small.floor == pytest.approx(28.8)
    medium = header_budget(settings, streaming=False, max_tokens=12800)
    assert medium.total == pytest.approx(360) and medium.floor == pytest.approx(360)
    huge = header_budget(settings, streaming=False, max_tokens=64000)
    assert huge.total == 600 and huge.floor == 600

    # Each attempt: an even share of what is left among the attempts left, at least the floor.
    streaming = HeaderBudget(120)
    assert streaming.attempt(120, 3) == pytest.approx(40)
    assert streaming.attempt(80, 2) == pytest.approx(40)
    assert streaming.attempt(40, 1) == pytest.approx(40)
    assert small.attempt(120, 3) == pytest.approx(40)
    assert small.attempt(60, 3) == pytest.approx(28.8)  # a 1024-token answer is not cut short
    assert small.attempt(10, 1) == pytest.approx(10)  # never beyond the budget
    assert medium.attempt(360, 3) == pytest.approx(360)
    assert streaming.attempt(-1, 2) == 0


def test_a_non_streaming_request_waits_as_long_as_its_answer_may_take(
    start_relay: Callable[..., RelayServer], fake: FakeUpstream
) -> None:
    relay = start_relay(request_deadline=0.6)
    relay.add_account("slow", KEY_A, fake.url, weight=3)
    relay.add_account("good", KEY_B, fake.url)
    _, key = relay.create_customer()
    fake.fault(KEY_A, "hang", delay=1.5)  # answers after 1.5 s
    # 1024 tokens may take 28.8 s to write: the slow account's answer is waited for
    started = time.monotonic()
    r = post(relay, key, body(max_tokens=1024))
    assert r.status_code == 200, r.text
    assert time.monotonic() - started >= 1.4
    assert (fake.count(KEY_A), fake.count(KEY_B)) == (1, 0)
    # the same wait on a stream is a hang: failed over within the 0.6 s deadline
    started = time.monotonic()
    r = post(relay, key, body(stream=True, max_tokens=1024))
    assert r.status_code == 200 and b"message_stop" in r.content
    assert time.monotonic() - started < 1.4
    assert (fake.count(KEY_A), fake.count(KEY_B)) == (2, 1)


# --- a hanging account ------------------------------------------------------------------------


def test_a_hanging_account_is_failed_over_within_the_deadline_and_counted(
    start_relay: Callable[..., RelayServer], fake: FakeUpstream
) -> None:
    relay = start_relay(request_deadline=1.5)
    relay.add_account("hang", KEY_A, fake.url, weight=3)  # preferred while in service
    relay.add_account("good", KEY_B, fake.url)
    customer_id, key = relay.create_customer()
    fake.fault(KEY_A, "hang", delay=60)
    for i, stream in enumerate((False, True, False)):
        started = time.monotonic()
        r = post(relay, key, body(stream=stream, text=f"hang {i}"))
        elapsed = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert b"message_stop" in r.content if stream else r.json()["type"] == "message"
        assert elapsed < 1.5, f"failover took {elapsed:.2f} s"
        assert fake.count(KEY_A) == i + 1 and fake.count(KEY_B) == i + 1
        # the hanging attempt's connection was closed (the sandbox saw it go)
        assert eventually(lambda: open_upstream_requests(fake, KEY_A) == 0, 2.0)
        if i < 2:
            assert breaker(relay).get(accounts(relay)["hang"]["id"]) == i + 1
    # the third timeout within the breaker's window quarantines it
    hanging = accounts(relay)["hang"]
    assert hanging["status"] == "quarantined"
    assert hanging["quarantine_reason"] == "upstream_errors"
    assert "HeaderTimeout" in hanging["last_error"]
    assert hanging["in_flight"] == 0
    assert failovers(relay, "timeout") == 3
    assert held_usd(relay, customer_id) == "0.000000"


def test_when_every_account_hangs_the_customer_gets_529_within_the_deadline(
    start_relay: Callable[..., RelayServer], fake: FakeUpstream
) -> None:
    relay = start_relay(request_deadline=1.0, max_attempts=2)
    relay.add_account("a", KEY_A, fake.url)
    relay.add_account("b", KEY_B, fake.url)
    customer_id, key = relay.create_customer()
    fake.fault("*", "hang", delay=60)
    started = time.monotonic()
    r = post(relay, key, body(stream=True))
    assert time.monotonic() - started < 2.0
    assert r.status_code == 529
    assert r.json()["error"]["type"] == "overloaded_error"
    assert r.headers["x-should-retry"] == "true"
    assert (fake.count(KEY_A), fake.count(KEY_B)) == (1, 1)
    ids = {a["id"] for a in accounts(relay).values()}
    assert all(breaker(relay).get(i) == 1 for i in ids)
    assert eventually(lambda: open_upstream_requests(fake, KEY_A) == 0, 2.0)
    assert eventually(lambda: open_upstream_requests(fake, KEY_B) == 0, 2.0)
    assert held_usd(relay, customer_id) == "0.000000"
    [logged] = requests_log(relay, customer_id)
    assert logged["status"] == "failed" and logged["http_status"] == 529


# --- the client leaves while the upstream hangs -----------------------------------------------


@pytest.mark.parametrize(
    ("path", "stream"),
    [("/v1/messages", False), ("/v1/messages", True), ("/v1/chat/completions", False)],
)
def test_a_client_that_leaves_while_the_upstream_hangs_releases_everything_at_once(
    relay: RelayServer, fake: FakeUpstream, path: str, stream: bool
) -> None:
    relay.add_account("a", KEY_A, fake.url)
    customer_id, key = relay.create_customer()
    fake.fault(KEY_A, "hang", delay=60)
    payload = body(stream=stream)
    if path == "/v1/chat/completions":
        payload = {"model": MODEL, "max_tokens": 16, "messages": payload["messages"]}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and hangs up
        httpx.post(
            f"{relay.url}{path}",
            headers={**HEADERS, "x-api-key": key},
            json=payload,
            timeout=httpx.Timeout(10, read=1.0),
        )
    left = time.monotonic()
    assert eventually(lambda: held_usd(relay, customer_id) == "0.000000", 2.0), "hold kept"
    assert time.monotonic() - left < 2.0
    assert accounts(relay)["a"]["in_flight"] == 0
    assert eventually(lambda: open_upstream_requests(fake, KEY_A) == 0, 2.0), "upstream kept"
    [logged] = requests_log(relay, customer_id)
    assert logged["status"] == "client_disconnect"
    assert "before the upstream answered" in logged["error"]
    assert logged["cost_usd"] == "0.000000"
    # the client's leaving is not the account's fault
    assert accounts(relay)["a"]["status"] == "active"
    assert breaker(relay) == {}
    # and the relay goes on serving
    fake.clear_faults()
    assert post(relay, key, body()).status_code == 200


# --- streams that break or run too long -------------------------------------------------------


def stream_events(relay: RelayServer, key: str, payload: Any) -> tuple[str, list[bytes]]:
    with httpx.stream(
        "POST",
        f"{relay.url}/v1/messages",
        headers={**HEADERS, "x-api-key": key},
        json=payload,
        timeout=30,
    ) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_raw())
        return r.headers["x-poolrelay-request-id"], [e for e in raw.split(b"\n\n") if e]


def test_mid_stream_failures_count_toward_the_breaker_and_a_disconnect_does_not(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    account_id = relay.add_account("a", KEY_A, fake.url)
    _, key = relay.create_customer()
    for i in (1, 2):
        fake.fault(KEY_A, "mid_stream_error", after_events=3)
        _, events = stream_events(relay, key, body(stream=True))
        assert sum(e.startswith(b"event: error") for e in events) == 1
        assert eventually(lambda i=i: breaker(relay).get(account_id) == i, 2.0)  # type: ignore[misc]
        assert accounts(relay)["a"]["status"] == "active"
    # a client that leaves mid-stream is no failure of the account
    fake.fault(KEY_A, "slow_stream", delay=0.2)
    with httpx.stream(
        "POST",
        f"{relay.url}/v1/messages",
        headers={**HEADERS, "x-api-key": key},
        json=body(stream=True, max_tokens=200, text="reply with 60 words"),
        timeout=30,
    ) as r:
        seen = b""
        for chunk in r.iter_raw():
            seen += chunk
            if seen.count(b"content_block_delta") >= 2:
                break
    time.sleep(0.5)
    assert breaker(relay).get(account_id) == 2
    # the third broken stream within the window trips it
    fake.fault(KEY_A, "mid_stream_error", after_events=3)
    stream_events(relay, key, body(stream=True))
    assert eventually(lambda: accounts(relay)["a"]["status"] == "quarantined", 2.0)
    assert accounts(relay)["a"]["quarantine_reason"] == "upstream_errors"


def test_a_stream_past_max_request_seconds_ends_with_one_error_event_and_is_charged(
    start_relay: Callable[..., RelayServer], fake: FakeUpstream
) -> None:
    relay = start_relay(max_request_seconds=1.0)
    account_id = relay.add_account("a", KEY_A, fake.url)
    customer_id, key = relay.create_customer()
    fake.fault(KEY_A, "slow_stream", delay=0.2)  # 60 words: ~12 s
    started = time.monotonic()
    request_id, events = stream_events(
        relay, key, body(stream=True, max_tokens=200, text="reply with 60 words")
    )
    assert 0.9 < time.monotonic() - started < 3.0
    errors = [e for e in events if e.startswith(b"event: error")]
    assert len(errors) == 1
    assert events[-1] == errors[0], "the error event is the stream's last"
    error = orjson.loads(errors[0].split(b"data: ", 1)[1])
    assert error["error"]["type"] == "api_error"
    assert "longest time the relay allows" in error["error"]["message"]
    assert not any(e.startswith(b"event: message_stop") for e in events)
    # charged what it used, nothing held, and logged as cut short by the relay
    assert eventually(lambda: held_usd(relay, customer_id) == "0.000000", 2.0)
    debits = [e for e in relay.ledger(customer_id) if e["kind"] == "usage"]
    assert len(debits) == 1 and debits[0]["request_id"] == request_id
    assert debits[0]["amount_usd"].startswith("-")
    with relay.admin() as admin:
        logged = admin.get(f"/admin/requests/{request_id}").json()
    assert logged["status"] == "upstream_error"
    assert "MAX_REQUEST_SECONDS" in logged["error"]
    # the relay ended it: not the account's failure
    assert breaker(relay).get(account_id) is None
    assert accounts(relay)["a"]["status"] == "active"
    assert eventually(lambda: open_upstream_requests(fake, KEY_A) == 0, 2.0)
