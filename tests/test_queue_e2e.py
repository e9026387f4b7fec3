"""Wait, do not refuse (issue 13, item 2; contract §7), end to end: the anthropic SDK and httpx
→ relay → sandbox upstream.

A request whose only obstacle is a concurrency cap (an account's ``max_concurrency``, or its
key's) waits first come first served for up to ``QUEUE_SECONDS`` and goes the moment a slot
frees; then, and only then, 429 with ``retry-after`` naming the limit. A request refused for
credit never waits; a waiting client that disconnects leaves the queue; the wait is in
``x-poolrelay-queue-ms`` and the request log. Runs on the embedded defaults and on PostgreSQL +
Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import anthropic
import httpx
import httpx2
import pytest

from tests.conftest import needs_postgres_and_redis
from tests.harness import FakeUpstream, RelayServer, eventually

MODEL = "claude-haiku-4-5"
KEY_A = "sk-ant-api03-queue-aaaa-000000000001"
KEY_B = "sk-ant-api03-queue-bbbb-000000000002"
POOL_QUEUE = "poolrelay:{pool}:wq"
QUEUE_MS = "x-poolrelay-queue-ms"


def payload(text: str, *, stream: bool = False, max_tokens: int = 16) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }


async def post(
    relay: RelayServer, key: str, body: dict[str, Any], *, client_timeout: float = 30
) -> tuple[httpx.Response, bytes, float]:
    """One request read whole: (response, body, seconds it took)."""
    started = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=relay.url, timeout=client_timeout) as client,
        client.stream(
            "POST",
            "/v1/messages",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            json=body,
        ) as response,
    ):
        content = await response.aread()
    return response, content, time.monotonic() - started


def log_row(relay: RelayServer, request_id: str) -> dict[str, Any]:
    with relay.admin() as admin:
        row: dict[str, Any] = admin.get(f"/admin/requests/{request_id}").raise_for_status().json()
    return row


def redis_call(relay: RelayServer, name: str, *args: Any) -> Any:
    async def run() -> Any:
        return await getattr(relay.services.redis, name)(*args)

    return relay.call(run)


def waiting(relay: RelayServer, kind: str) -> float:
    """``poolrelay_queue_waiting{kind}`` of the relay process."""
    value: float = relay.services.metrics.queue_depth.labels(kind)._value.get()
    return value


def in_flight(relay: RelayServer) -> dict[str, int]:
    with relay.admin() as admin:
        items = admin.get("/admin/accounts").raise_for_status().json()["items"]
    return {item["name"]: item["in_flight"] for item in items}


def settled(relay: RelayServer, customer_id: str) -> bool:
    return relay.customer(customer_id)["held_usd"] == "0.000000"


def add_key(relay: RelayServer, customer_id: str, **policy: Any) -> tuple[str, str]:
    """A second key of the customer: (key id, key)."""
    with relay.admin() as admin:
        key = (
            admin.post(f"/admin/customers/{customer_id}/keys", json={"name": "capped", **policy})
            .raise_for_status()
            .json()
        )
    return key["id"], key["key"]


def key_slots_taken(relay: RelayServer, key_id: str) -> int:
    return int(redis_call(relay, "zcard", f"poolrelay:kc:{{{key_id}}}:h"))


# --- the pool's caps --------------------------------------------------------------------------


def leaver_and_stayer(
    relay: RelayServer, key: str, kind: str, queue: str
) -> tuple[dict[str, Any], httpx.Response, httpx.Response, bytes]:
    """A holder streams (~2.1 s) in the only slot of ``kind`` ("pool" or "key"); a leaver
    waits and gives up after 0.6 s; a stayer waits behind it. What the wait gauge and the
    Redis ``queue`` showed with both waiting and after the leaver left, the holder's response
    and the stayer's response and body."""
    seen: dict[str, Any] = {}

    async def main() -> tuple[Any, Any]:
        holder = asyncio.create_task(post(relay, key, payload("holder", stream=True)))
        await asyncio.sleep(0.3)
        leaver = asyncio.create_task(
            post(relay, key, payload("leaver", stream=True), client_timeout=0.6)
        )
        await asyncio.sleep(0.1)
        stayer = asyncio.create_task(post(relay, key, payload("stayer", stream=True)))
        await asyncio.to_thread(eventually, lambda: waiting(relay, kind) == 2, 0.4)
        seen["both waiting"] = (waiting(relay, kind), redis_call(relay, "zcard", queue))
        with pytest.raises(httpx.ReadTimeout):
            await leaver
        # the holder still streams meanwhile
        await asyncio.to_thread(eventually, lambda: waiting(relay, kind) == 1, 1.0)
        seen["one left"] = (waiting(relay, kind), redis_call(relay, "zcard", queue))
        seen["holder still running"] = not holder.done()
        return await holder, await stayer

    (held, _, _), (stayed, stayed_body, _) = asyncio.run(main())
    return seen, held, stayed, stayed_body


def test_a_request_waits_for_the_accounts_slot_then_goes(
    start_relay: Any, fake: FakeUpstream
) -> None:
    relay = start_relay()  # QUEUE_SECONDS: the default 30
    relay.add_account("capped", KEY_A, fake.url, max_concurrency=1)
    customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "slow_stream", delay=0.2)  # a stream takes ~1.4 s

    async def main() -> tuple[Any, Any, float, str]:
        first = asyncio.create_task(post(relay, key, payload("first", stream=True)))
        await asyncio.sleep(0.3)
        assert not first.done()
        started = time.monotonic()
        async with (
            anthropic.AsyncAnthropic(
                api_key=key, base_url=relay.url, max_retries=0, timeout=30
            ) as client,
            client.messages.stream(
                model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "second"}]
            ) as s,
        ):
            text = "".join([t async for t in s.text_stream])
            headers = s.response.headers
        return await first, headers, time.monotonic() - started, text

    (first, first_body, _), second_headers, took, text = asyncio.run(main())
    assert first.status_code == 200 and first_body.count(b"event: message_stop") == 1
    assert first.headers[QUEUE_MS] == "0"
    assert text  # the second stream was served in full, after waiting
    queue_ms = int(second_headers[QUEUE_MS])
    assert 500 <= queue_ms <= took * 1000
    assert log_row(relay, first.headers["x-poolrelay-request-id"])["queue_ms"] == 0
    row = log_row(relay, second_headers["x-poolrelay-request-id"])
    assert row["status"] == "ok" and row["queue_ms"] == queue_ms
    assert eventually(lambda: settled(relay, customer_id))
    assert in_flight(relay)["capped"] == 0 and waiting(relay, "pool") == 0
    scraped = httpx.get(f"{relay.url}/metrics").text
    assert 'poolrelay_queue_waiting{kind="pool"} 0.0' in scraped
    assert 'poolrelay_queue_waiting{kind="key"} 0.0' in scraped
    assert 'poolrelay_queue_wait_seconds_count{kind="pool",result="granted"} 1.0' in scraped


def test_the_wait_times_out_in_a_429_naming_the_concurrency_limit(
    start_relay: Any, fake: FakeUpstream
) -> None:
    relay = start_relay(queue_seconds=0.5)
    relay.add_account("capped", KEY_A, fake.url, max_concurrency=1)
    customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "slow_stream", delay=0.3)  # ~2.1 s

    async def main() -> tuple[Any, Any]:
        holder = asyncio.create_task(post(relay, key, payload("holder", stream=True)))
        await asyncio.sleep(0.3)
        refused = await post(relay, key, payload("refused"))
        return refused, await holder

    (refused, body, took), (held, _, _) = asyncio.run(main())
    assert held.status_code == 200
    assert refused.status_code == 429
    error = httpx.Response(429, content=body).json()
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    assert "concurrency limit" in error["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-should-retry"] == "true"
    assert 450 <= int(refused.headers[QUEUE_MS]) <= took * 1000
    assert took >= 0.45
    row = log_row(relay, refused.headers["x-poolrelay-request-id"])
    assert row["http_status"] == 429 and row["queue_ms"] >= 450 and row["cost_usd"] == "0.000000"
    assert eventually(lambda: settled(relay, customer_id))
    assert redis_call(relay, "zcard", POOL_QUEUE) == 0
    debits = [e for e in relay.ledger(customer_id) if e["kind"] == "usage"]
    assert len(debits) == 1  # only the holder was charged


def test_queue_seconds_0_refuses_at_once(start_relay: Any, fake: FakeUpstream) -> None:
    relay = start_relay(queue_seconds=0)
    relay.add_account("capped", KEY_A, fake.url, max_concurrency=1)
    customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "slow_stream", delay=0.3)

    async def main() -> tuple[Any, Any]:
        holder = asyncio.create_task(post(relay, key, payload("holder", stream=True)))
        await asyncio.sleep(0.3)
        refused = await post(relay, key, payload("refused"))
        return refused, await holder

    (refused, body, took), (held, _, _) = asyncio.run(main())
    assert held.status_code == 200
    assert refused.status_code == 429 and took < 1.0  # a wait would last ~1.8 s
    assert "concurrency limit" in body.decode()
    assert refused.headers[QUEUE_MS] == "0" and refused.headers["retry-after"]
    assert eventually(lambda: settled(relay, customer_id))


def test_a_request_refused_for_credit_never_waits(start_relay: Any, fake: FakeUpstream) -> None:
    relay = start_relay()  # would wait 30 s for a slot
    relay.add_account("capped", KEY_A, fake.url, max_concurrency=1)
    _rich_id, rich = relay.create_customer(balance_usd="5", name="rich")
    poor_id, poor = relay.create_customer(balance_usd="0.000001", name="poor")
    fake.fault(KEY_A, "slow_stream", delay=0.4)  # ~2.8 s

    async def main() -> tuple[Any, Any]:
        holder = asyncio.create_task(post(relay, rich, payload("holder", stream=True)))
        await asyncio.sleep(0.3)
        refused = [await post(relay, poor, payload("poor", stream=s)) for s in (False, True)]
        return refused, await holder

    refused, (held, _, _) = asyncio.run(main())
    assert held.status_code == 200
    for response, body, took in refused:
        assert response.status_code == 400 and took < 1.5, took  # a wait: ~2.5 s
        assert "credit balance is too low" in body.decode()
    assert redis_call(relay, "zcard", POOL_QUEUE) == 0
    assert settled(relay, poor_id) and relay.customer(poor_id)["balance_usd"] == "0.000001"


def test_a_waiting_client_that_disconnects_leaves_the_queue(
    start_relay: Any, fake: FakeUpstream
) -> None:
    relay = start_relay()
    relay.add_account("capped", KEY_A, fake.url, max_concurrency=1)
    customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "slow_stream", delay=0.3)  # ~2.1 s
    seen, held, stayed, stayed_body = leaver_and_stayer(relay, key, "pool", POOL_QUEUE)
    assert seen["both waiting"] == (2, 2)
    assert seen["one left"] == (1, 1) and seen["holder still running"]
    assert held.status_code == 200
    assert stayed.status_code == 200 and stayed_body.count(b"event: message_stop") == 1
    assert int(stayed.headers[QUEUE_MS]) > 500
    assert eventually(lambda: settled(relay, customer_id))
    assert in_flight(relay)["capped"] == 0 and waiting(relay, "pool") == 0
    with relay.admin() as admin:
        rows = admin.get("/admin/requests").raise_for_status().json()["items"]
    statuses = sorted(r["status"] for r in rows)
    assert statuses == ["client_disconnect", "ok", "ok"]
    debits = [e for e in relay.ledger(customer_id) if e["kind"] == "usage"]
    assert len(debits) == 2  # the leaver was never sent upstream, nor charged
    assert fake.count(KEY_A) == 2


def test_no_default_account_cap_40_concurrent_requests_all_succeed(
    relay: RelayServer, fake: FakeUpstream
) -> None:
    relay.add_account("a", KEY_A, fake.url)
    relay.add_account("b", KEY_B, fake.url)
    customer_id, key = relay.create_customer(balance_usd="50")

    async def main() -> list[str]:
        async with anthropic.AsyncAnthropic(
            api_key=key, base_url=relay.url, max_retries=0, timeout=60
        ) as client:

            async def one(i: int) -> str:
                message = await client.messages.create(
                    model=MODEL, max_tokens=8, messages=[{"role": "user", "content": f"hi {i}"}]
                )
                return message.id

            return list(await asyncio.gather(*(one(i) for i in range(48))))

    ids = asyncio.run(main())
    assert len(set(ids)) == 48
    assert eventually(lambda: settled(relay, customer_id))


def test_the_sdk_retries_a_timed_out_wait_after_retry_after(
    start_relay: Any, fake: FakeUpstream
) -> None:
    relay = start_relay(queue_seconds=0.3)
    relay.add_account("capped", KEY_A, fake.url, max_concurrency=1)
    _customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "slow_stream", delay=0.2)  # ~1.4 s
    sent: list[float] = []
    answers: list[tuple[int, str | None]] = []

    def on_request(request: httpx2.Request) -> None:
        sent.append(time.monotonic())

    def on_response(response: httpx2.Response) -> None:
        answers.append((response.status_code, response.headers.get("retry-after")))

    holder = threading.Thread(
        target=lambda: asyncio.run(post(relay, key, payload("holder", stream=True)))
    )
    holder.start()
    time.sleep(0.2)
    hooks: Any = {"request": [on_request], "response": [on_response]}
    with httpx2.Client(event_hooks=hooks) as http:
        client = anthropic.Anthropic(
            api_key=key, base_url=relay.url, max_retries=3, timeout=30, http_client=http
        )
        message = client.messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "retried"}]
        )
    holder.join(30)
    assert message.type == "message"
    assert answers[0][0] == 429 and answers[0][1] is not None
    assert answers[-1][0] == 200 and len(answers) >= 2
    # each retry came after the retry-after the 429 gave (the SDK's own first backoff is
    # at most 0.5 s)
    for (status, retry_after), gap in zip(
        answers, [b - a for a, b in itertools.pairwise(sent)], strict=False
    ):
        assert status == 429 and retry_after is not None
        assert gap >= int(retry_after) + 0.3 - 0.05  # retry-after, plus the 0.3 s wait


# --- the key's cap ----------------------------------------------------------------------------


def test_a_key_at_its_max_concurrency_waits_then_goes(start_relay: Any, fake: FakeUpstream) -> None:
    relay = start_relay()
    relay.add_account("wide", KEY_A, fake.url)  # no account cap: only the key's
    customer_id, _ = relay.create_customer(balance_usd="5")
    key_id, key = add_key(relay, customer_id, max_concurrency=1)
    fake.fault(KEY_A, "slow_stream", delay=0.2)

    async def main() -> tuple[Any, Any]:
        first = asyncio.create_task(post(relay, key, payload("first", stream=True)))
        await asyncio.sleep(0.3)
        assert key_slots_taken(relay, key_id) == 1
        second = await post(relay, key, payload("second", stream=True))
        return await first, second

    (first, _, _), (second, body, took) = asyncio.run(main())
    assert first.status_code == 200 and second.status_code == 200
    assert body.count(b"event: message_stop") == 1
    queue_ms = int(second.headers[QUEUE_MS])
    assert 500 <= queue_ms <= took * 1000
    assert log_row(relay, second.headers["x-poolrelay-request-id"])["queue_ms"] == queue_ms
    assert fake.count(KEY_A) == 2
    assert eventually(lambda: key_slots_taken(relay, key_id) == 0)
    assert waiting(relay, "key") == 0 and eventually(lambda: settled(relay, customer_id))


def test_a_key_wait_times_out_in_a_429_naming_the_keys_limit(
    start_relay: Any, fake: FakeUpstream
) -> None:
    relay = start_relay(queue_seconds=0.5)
    relay.add_account("wide", KEY_A, fake.url)
    customer_id, other_key = relay.create_customer(balance_usd="5")
    key_id, key = add_key(relay, customer_id, max_concurrency=1)
    fake.fault(KEY_A, "slow_stream", delay=0.3)

    async def main() -> tuple[Any, Any, Any]:
        holder = asyncio.create_task(post(relay, key, payload("holder", stream=True)))
        await asyncio.sleep(0.3)
        refused = await post(relay, key, payload("refused"))
        # the customer's other key has no cap: it is not held up
        other = await post(relay, other_key, payload("other", stream=True))
        return refused, other, await holder

    (refused, body, took), (other, _, _), (held, _, _) = asyncio.run(main())
    assert held.status_code == 200 and other.status_code == 200
    assert other.headers[QUEUE_MS] == "0"
    assert refused.status_code == 429 and took >= 0.45
    error = httpx.Response(429, content=body).json()["error"]
    assert error["type"] == "rate_limit_error"
    assert "API key is at its concurrency limit" in error["message"]
    assert refused.headers["retry-after"] and int(refused.headers[QUEUE_MS]) >= 450
    assert log_row(relay, refused.headers["x-poolrelay-request-id"])["queue_ms"] >= 450
    assert eventually(lambda: key_slots_taken(relay, key_id) == 0)
    assert eventually(lambda: settled(relay, customer_id))


def test_a_client_waiting_for_its_keys_slot_that_disconnects_leaves_the_queue(
    start_relay: Any, fake: FakeUpstream
) -> None:
    relay = start_relay()
    relay.add_account("wide", KEY_A, fake.url)
    customer_id, _ = relay.create_customer(balance_usd="5")
    key_id, key = add_key(relay, customer_id, max_concurrency=1)
    fake.fault(KEY_A, "slow_stream", delay=0.3)  # ~2.1 s
    key_queue = f"poolrelay:kc:{{{key_id}}}:wq"
    seen, held, stayed, body = leaver_and_stayer(relay, key, "key", key_queue)
    assert seen["both waiting"] == (2, 2)
    assert seen["one left"] == (1, 1) and seen["holder still running"]
    assert held.status_code == 200 and stayed.status_code == 200
    assert body.count(b"event: message_stop") == 1 and int(stayed.headers[QUEUE_MS]) > 500
    assert eventually(lambda: key_slots_taken(relay, key_id) == 0)
    assert eventually(lambda: settled(relay, customer_id))
    assert fake.count(KEY_A) == 2  # the leaver was never sent upstream
    debits = [e for e in relay.ledger(customer_id) if e["kind"] == "usage"]
    assert len(debits) == 2


def test_a_keys_slot_comes_back_on_every_path(start_relay: Any, fake: FakeUpstream) -> None:
    """With QUEUE_SECONDS 0, a slot left behind would refuse the next request at once."""
    relay = start_relay(queue_seconds=0, max_attempts=2)
    relay.add_account("a", KEY_A, fake.url)
    customer_id, _ = relay.create_customer(balance_usd="5")
    key_id, key = add_key(relay, customer_id, max_concurrency=1)

    def free() -> None:
        assert eventually(lambda: key_slots_taken(relay, key_id) == 0), "the key slot leaked"

    def ok() -> None:
        response, _, _ = asyncio.run(post(relay, key, payload("ok")))
        assert response.status_code == 200
        free()

    ok()  # JSON answered
    response, body, _ = asyncio.run(post(relay, key, payload("stream", stream=True)))
    assert response.status_code == 200 and b"message_stop" in body
    free()  # stream ended
    rejected = {**payload("x"), "messages": []}
    response, _, _ = asyncio.run(post(relay, key, rejected))
    assert response.status_code == 400  # rejected upstream on its merits
    free()
    fake.fault(KEY_A, "server_error")
    response, _, _ = asyncio.run(post(relay, key, payload("fails")))
    assert response.status_code >= 500  # every attempt failed
    free()
    fake.clear_faults()
    ok()

    # the client leaves while the upstream thinks (before the headers)
    fake.fault(KEY_A, "hang", delay=30)
    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(post(relay, key, payload("hang"), client_timeout=0.5))
    free()
    fake.clear_faults()

    # the client leaves mid-stream
    fake.fault(KEY_A, "slow_stream", delay=0.3)

    async def leave_mid_stream() -> None:
        async with (
            httpx.AsyncClient(base_url=relay.url, timeout=30) as client,
            client.stream(
                "POST",
                "/v1/messages",
                headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                json=payload("leave", stream=True),
            ) as r,
        ):
            async for _chunk in r.aiter_raw():
                break

    asyncio.run(leave_mid_stream())
    free()
    fake.clear_faults()
    ok()
    assert eventually(lambda: settled(relay, customer_id))


# --- other clients, other processes ------------------------------------------------------------


def test_the_openai_edge_waits_and_refuses_alike(start_relay: Any, fake: FakeUpstream) -> None:
    import openai

    relay = start_relay(queue_seconds=0.4)
    relay.add_account("capped", KEY_A, fake.url, max_concurrency=1)
    customer_id, key = relay.create_customer(balance_usd="5")
    fake.fault(KEY_A, "slow_stream", delay=0.3)  # ~2.1 s

    async def main() -> tuple[Any, Any]:
        holder = asyncio.create_task(post(relay, key, payload("holder", stream=True)))
        await asyncio.sleep(0.3)
        client = openai.AsyncOpenAI(api_key=key, base_url=f"{relay.url}/v1", max_retries=0)
        try:
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(
                    model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                )
        finally:
            await client.close()
        return caught.value, await holder

    error, (held, _, _) = asyncio.run(main())
    assert held.status_code == 200
    assert error.status_code == 429
    assert "concurrency limit" in error.message
    assert error.response.headers["retry-after"]
    assert int(error.response.headers[QUEUE_MS]) >= 350
    assert eventually(lambda: settled(relay, customer_id))


@needs_postgres_and_redis
def test_a_waiter_in_one_process_is_woken_by_a_slot_freed_in_another(
    start_relay: Any, fake: FakeUpstream
) -> None:
    """Two relay processes (two services, one Redis): first come, first served across them."""
    one, two = start_relay(), start_relay()
    one.add_account("capped", KEY_A, fake.url, max_concurrency=1)
    two.services.directory.invalidate()
    customer_id, key = one.create_customer(balance_usd="5")
    fake.fault(KEY_A, "slow_stream", delay=0.2)  # ~1.4 s

    async def main() -> tuple[Any, Any]:
        holder = asyncio.create_task(post(one, key, payload("holder", stream=True)))
        await asyncio.sleep(0.3)
        waiter = await post(two, key, payload("waiter", stream=True))
        return await holder, waiter

    (held, _, _), (waited, body, took) = asyncio.run(main())
    assert held.status_code == 200 and waited.status_code == 200
    assert body.count(b"event: message_stop") == 1
    assert 500 <= int(waited.headers[QUEUE_MS]) <= took * 1000
    assert waiting(two, "pool") == 0 and in_flight(one)["capped"] == 0
    assert eventually(lambda: settled(one, customer_id))
