"""app.sandbox: per-credential rate limits and scripted faults."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from starlette.applications import Starlette

from app.sandbox import MODELS, get_state
from tests.sandbox.helpers import (
    AUTH,
    KEY,
    ORDER,
    SSE_CT,
    assert_error,
    auth,
    body,
    fault,
    parse_sse,
    post,
    streamed_text,
)

pytestmark = pytest.mark.anyio


# --------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------


async def test_rate_limit_headers_fall_with_use(client: httpx.AsyncClient) -> None:
    r1 = await post(client, body("reply with 10 words"))
    h = r1.headers
    assert h["anthropic-ratelimit-requests-limit"] == "4000"
    assert h["anthropic-ratelimit-requests-remaining"] == "3999"
    assert h["anthropic-ratelimit-input-tokens-limit"] == "2000000"
    assert h["anthropic-ratelimit-output-tokens-limit"] == "400000"
    assert h["anthropic-ratelimit-tokens-limit"] == "2400000"
    assert h["anthropic-ratelimit-input-tokens-remaining"] == "1999000"  # rounded down
    reset = h["anthropic-ratelimit-requests-reset"]
    assert len(reset) == 20 and reset.endswith(":00Z") and reset[10] == "T"
    for family in ("tokens", "input-tokens", "output-tokens"):
        assert h[f"anthropic-ratelimit-{family}-reset"] == reset
    r2 = await post(client, body("reply with 10 words"))
    assert r2.headers["anthropic-ratelimit-requests-remaining"] == "3998"
    # another credential has its own bucket
    r3 = await post(client, body(), headers=auth("sk-ant-api03-other"))
    assert r3.headers["anthropic-ratelimit-requests-remaining"] == "3999"

    r = await client.post(
        "/_fake/limits",
        json={"key": KEY, "input_tokens_limit": 10_000, "remaining": {"input-tokens": 5_500}},
    )
    assert r.json()["ok"] is True
    r = await post(client, body("reply with 10 words"))
    assert r.headers["anthropic-ratelimit-input-tokens-limit"] == "10000"
    assert r.headers["anthropic-ratelimit-input-tokens-remaining"] == "5000"
    assert r.headers["anthropic-ratelimit-tokens-limit"] == "410000"


async def test_rate_limit_429_at_zero(client: httpx.AsyncClient, fake_app: Starlette) -> None:
    await client.post("/_fake/limits", json={"key": KEY, "requests_limit": 2})
    for expected in ("1", "0"):
        r = await post(client, body())
        assert r.status_code == 200
        assert r.headers["anthropic-ratelimit-requests-remaining"] == expected
    r = await post(client, body())
    assert_error(r, 429, "rate_limit_error")
    assert 1 <= int(r.headers["retry-after"]) <= 90
    assert r.headers["x-should-retry"] == "true"
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert (await post(client, body(), headers=auth("sk-ant-api03-fresh"))).status_code == 200

    # the window ends: everything refills
    get_state(fake_app).buckets[KEY].reset_at = 0
    r = await post(client, body())
    assert r.status_code == 200
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "1"

    # token families: output tokens that would not fit
    await client.post("/_fake/limits", json={"key": KEY, "remaining": {"output_tokens": 5}})
    assert_error(await post(client, body("reply with 6 words")), 429, "rate_limit_error")
    assert (await post(client, body("reply with 5 words"))).status_code == 200

    # "*" changes the defaults for new credentials
    await client.post("/_fake/limits", json={"key": "*", "tokens_limit": 1000})
    r = await post(client, body(), headers=auth("sk-ant-api03-newcomer"))
    assert r.headers["anthropic-ratelimit-tokens-limit"] == "1000"
    r = await client.post("/_fake/limits", json={"key": KEY, "requests_limit": -1})
    assert r.status_code == 400 and r.json()["ok"] is False


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


async def test_rate_limit_fault(client: httpx.AsyncClient) -> None:
    await fault(client, fault="rate_limit", times=1, retry_after=7)
    r = await post(client, body())
    data = assert_error(r, 429, "rate_limit_error")
    assert "rate limit" in data["error"]["message"]
    assert r.headers["retry-after"] == "7"
    assert r.headers["x-should-retry"] == "true"
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert (await post(client, body())).status_code == 200  # times=1 used up


@pytest.mark.parametrize(
    ("kind", "status", "error_type", "message"),
    [
        ("unauthorized", 401, "authentication_error", "invalid x-api-key"),
        ("forbidden", 403, "permission_error", None),
        (
            "no_credit",
            400,
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
            "Billing to upgrade or purchase credits.",
        ),
        ("server_error", 500, "api_error", None),
        ("overloaded", 529, "overloaded_error", "Overloaded"),
    ],
)
async def test_error_faults(
    client: httpx.AsyncClient, kind: str, status: int, error_type: str, message: str | None
) -> None:
    await fault(client, fault=kind, times=2)
    for stream in (False, True):
        r = await post(client, body(stream=stream))
        data = assert_error(r, status, error_type)
        assert r.headers["content-type"] == "application/json"
        if message is not None:
            assert data["error"]["message"] == message
    assert (await post(client, body())).status_code == 200


async def test_fault_scoping_and_control(client: httpx.AsyncClient) -> None:
    await client.post("/_fake/faults", json={"key": "*", "fault": "overloaded"})
    await fault(client, fault="forbidden")
    assert (await post(client, body())).status_code == 403  # own key beats "*"
    assert (await post(client, body(), headers=auth("sk-ant-api03-b"))).status_code == 529
    for _ in range(3):  # times: null lasts until cleared
        assert (await post(client, body(), headers=auth("sk-ant-api03-c"))).status_code == 529
    # probes are untouched by default
    probe = await post(client, body(), path="/v1/messages/count_tokens")
    assert probe.status_code == 200
    assert (await client.get("/v1/models", headers=AUTH)).status_code == 200
    listed = (await client.get("/_fake/faults")).json()["faults"]
    assert listed[KEY]["fault"] == "forbidden" and listed["*"]["times"] is None

    r = await client.delete("/_fake/faults")
    assert r.json() == {"ok": True}
    assert (await post(client, body())).status_code == 200

    await fault(client, fault="unauthorized", paths="all")
    assert_error(
        await post(client, body(), path="/v1/messages/count_tokens"), 401, "authentication_error"
    )
    assert_error(await client.get("/v1/models", headers=AUTH), 401, "authentication_error")
    assert_error(
        await client.get(f"/v1/models/{MODELS[0].id}", headers=AUTH), 401, "authentication_error"
    )
    await client.delete("/_fake/faults", params={"key": KEY})
    assert (await client.get("/v1/models", headers=AUTH)).status_code == 200

    for bad in (
        {"key": KEY, "fault": "nope"},
        {"fault": "overloaded"},
        {"key": KEY, "fault": "slow", "delay": -1},
        {"key": KEY, "fault": "overloaded", "times": 0},
        {"key": KEY, "fault": "overloaded", "paths": "some"},
    ):
        r = await client.post("/_fake/faults", json=bad)
        assert r.status_code == 400 and r.json()["ok"] is False


async def test_slow_faults(client: httpx.AsyncClient) -> None:
    await fault(client, fault="slow", delay=0.02, times=2)
    t = time.perf_counter()
    assert (await post(client, body())).status_code == 200
    assert time.perf_counter() - t >= 0.02
    t = time.perf_counter()
    r = await post(client, body("reply with 3 words", stream=True))
    assert time.perf_counter() - t >= 0.02 * 3  # before headers + between 3 deltas
    assert streamed_text(parse_sse(r.content)) == "Hello from the"

    await fault(client, fault="slow_stream", delay=0.01, times=1)
    t = time.perf_counter()
    r = await post(client, body("reply with 2 words", stream=True))
    events = parse_sse(r.content)
    assert len(events) == 8
    assert time.perf_counter() - t >= 0.01 * 7  # between every event
    assert events[-1][0] == "message_stop"


async def test_paced_fault(client: httpx.AsyncClient) -> None:
    """``paced``: no wait before the headers or the first delta, ``delay`` between deltas."""
    await fault(client, fault="paced", delay=0.01, times=2)
    t = time.perf_counter()
    assert (await post(client, body("reply with 5 words"))).status_code == 200
    assert time.perf_counter() - t < 0.5  # a JSON reply is not paced
    t = time.perf_counter()
    r = await post(client, body("reply with 6 words", stream=True))
    assert time.perf_counter() - t >= 0.01 * 5  # between 6 deltas
    events = parse_sse(r.content)
    assert [n for n, _ in events] == [
        *ORDER,
        *["content_block_delta"] * 6,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert streamed_text(events) == "Hello from the fake upstream. You"
    assert (await client.get("/_fake/faults")).json()["faults"] == {}


async def test_mid_stream_error(client: httpx.AsyncClient) -> None:
    await fault(client, fault="mid_stream_error", times=3)
    r = await post(client, body(stream=True))
    assert r.status_code == 200 and r.headers["content-type"] == SSE_CT
    events = parse_sse(r.content)
    assert [n for n, _ in events] == [*ORDER, "content_block_delta", "error"]
    assert events[-1][1] == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0

    await fault(client, fault="mid_stream_error", after_events=6, times=1)
    events = parse_sse((await post(client, body("reply with 2 words", stream=True))).content)
    names = [n for n, _ in events]
    assert "message_delta" not in names and "message_stop" not in names
    assert names[-1] == "error" and len(names) <= 7

    await fault(client, fault="mid_stream_error", times=1)
    assert_error(await post(client, body()), 529, "overloaded_error")  # not streaming


async def test_hang_and_disconnect_in_process(client: httpx.AsyncClient) -> None:
    await fault(client, fault="hang", times=1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(post(client, body()), 0.05)
    await fault(client, fault="hang", delay=0.01, times=1)
    assert (await post(client, body())).status_code == 200

    await fault(client, fault="disconnect", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, body(stream=True))
    assert (await post(client, body())).status_code == 200
