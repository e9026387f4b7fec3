"""app.sandbox: count_tokens, models, the control API, and a live uvicorn server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
import uvicorn

from app.sandbox import create_fake_app
from tests.sandbox.helpers import (
    AUTH,
    KEY,
    SSE_CT,
    VERSION,
    WEATHER_TOOL,
    assert_error,
    auth,
    body,
    fault,
    parse_sse,
    post,
)

pytestmark = pytest.mark.anyio

TOKEN = "sk-ant-oat01-test-token"


# --------------------------------------------------------------------------------------------
# Other endpoints and the control API
# --------------------------------------------------------------------------------------------


async def test_count_tokens(client: httpx.AsyncClient) -> None:
    payload = body("some text " * 30, system="Be brief.", tools=[WEATHER_TOOL])
    r = await post(client, payload, path="/v1/messages/count_tokens", params={"beta": "true"})
    assert r.status_code == 200
    assert list(r.json()) == ["input_tokens"]
    n = r.json()["input_tokens"]
    assert "anthropic-ratelimit-requests-remaining" in r.headers
    usage = (await post(client, payload)).json()["usage"]
    assert usage["input_tokens"] == n
    no_max = {k: v for k, v in payload.items() if k != "max_tokens"}
    assert (await post(client, no_max, path="/v1/messages/count_tokens")).json()[
        "input_tokens"
    ] == n
    r = await client.post("/v1/messages/count_tokens", json=payload)
    assert_error(r, 401, "authentication_error", authenticated=False)
    r = await post(client, {"model": "x"}, path="/v1/messages/count_tokens")
    assert_error(r, 400, "invalid_request_error")


async def test_models(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models", headers=AUTH)
    page = r.json()
    assert list(page) == ["data", "has_more", "first_id", "last_id"]
    ids = [m["id"] for m in page["data"]]
    for required in (
        "claude-opus-4-8",
        "claude-opus-4-7",
        "claude-opus-4-6",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5-20251001",
        "claude-sonnet-5",
        "claude-fable-5",
    ):
        assert required in ids
    assert page["has_more"] is False and (page["first_id"], page["last_id"]) == (ids[0], ids[-1])
    first = page["data"][0]
    assert first["type"] == "model" and first["display_name"] and first["created_at"].endswith("Z")

    p1 = (await client.get("/v1/models", params={"limit": 3}, headers=AUTH)).json()
    assert [m["id"] for m in p1["data"]] == ids[:3] and p1["has_more"] is True
    p2 = (
        await client.get("/v1/models", params={"limit": 3, "after_id": p1["last_id"]}, headers=AUTH)
    ).json()
    assert [m["id"] for m in p2["data"]] == ids[3:6]
    back = (
        await client.get("/v1/models", params={"limit": 2, "before_id": ids[3]}, headers=AUTH)
    ).json()
    assert [m["id"] for m in back["data"]] == ids[1:3] and back["has_more"] is True
    assert_error(await client.get("/v1/models?limit=0", headers=AUTH), 400, "invalid_request_error")

    one = (await client.get("/v1/models/claude-sonnet-5", headers=AUTH)).json()
    assert one["id"] == "claude-sonnet-5" and one["type"] == "model"
    alias = (await client.get("/v1/models/claude-haiku-4-5", headers=AUTH)).json()
    assert alias["id"] == "claude-haiku-4-5-20251001"
    assert_error(await client.get("/v1/models/claude-nope", headers=AUTH), 404, "not_found_error")
    assert_error(await client.get("/v1/models"), 401, "authentication_error", authenticated=False)


async def test_stats_requests_and_reset(client: httpx.AsyncClient) -> None:
    headers = {**AUTH, "Anthropic-Beta": "a-1,b-2", "X-Claude-Code-Session-Id": "s1"}
    await post(client, body(), headers=headers, params={"beta": "true"})
    await post(
        client, body(), headers={"authorization": f"Bearer {TOKEN}", "anthropic-version": VERSION}
    )
    await post(client, body(), path="/v1/messages/count_tokens")
    await client.get("/v1/models", headers=AUTH)
    await client.post("/v1/messages", json=body())  # no credential

    stats = (await client.get("/_fake/stats")).json()
    assert stats == {
        "requests": {KEY: 1, TOKEN: 1, "": 1},
        "total": 3,
        "by_path": {"/v1/messages": 3, "/v1/messages/count_tokens": 1, "/v1/models": 1},
    }
    log = (await client.get("/_fake/requests")).json()
    assert len(log) == 5
    first = log[0]
    assert set(first) >= {"method", "path", "query", "headers", "body", "credential"}
    assert first["body_bytes"] == len(orjson.dumps(body()))
    assert (first["method"], first["path"], first["query"]) == ("POST", "/v1/messages", "beta=true")
    assert first["headers"]["anthropic-beta"] == "a-1,b-2"
    assert first["headers"]["x-claude-code-session-id"] == "s1"
    assert first["headers"]["x-api-key"] == KEY
    assert first["body"] == body() and first["credential"] == KEY and first["status"] == 200
    assert log[1]["credential"] == TOKEN and "x-api-key" not in log[1]["headers"]
    assert log[3]["method"] == "GET" and log[3]["body"] is None
    assert log[4]["credential"] is None and log[4]["status"] == 401
    assert (await client.get("/_fake/requests", params={"limit": 2})).json() == log[-2:]

    for _ in range(205):
        await client.get("/v1/models/claude-fable-5", headers=AUTH)
    assert len((await client.get("/_fake/requests", params={"limit": 1000})).json()) == 200

    await fault(client, fault="overloaded")
    assert (await client.post("/_fake/reset")).json() == {"ok": True}
    assert (await client.get("/_fake/stats")).json() == {"requests": {}, "total": 0, "by_path": {}}
    assert (await client.get("/_fake/requests")).json() == []
    assert (await post(client, body())).status_code == 200


async def test_apps_do_not_share_state() -> None:
    a, b = create_fake_app(), create_fake_app()
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://a") as ca,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=b), base_url="http://b") as cb,
    ):
        await fault(ca, fault="overloaded")
        assert (await post(ca, body())).status_code == 529
        rb = await post(cb, body())
        assert rb.status_code == 200
        ra = await post(ca, body(), headers=auth("sk-ant-api03-x"))
        assert ra.headers["anthropic-organization-id"] != rb.headers["anthropic-organization-id"]
        assert (await cb.get("/_fake/stats")).json()["total"] == 1


# --------------------------------------------------------------------------------------------
# A real server (uvicorn, uvloop + httptools): streaming, disconnect, hang
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    config = uvicorn.Config(
        create_fake_app(),
        host="127.0.0.1",
        port=0,
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


def test_live_server_streams_disconnects_and_hangs(live_url: str) -> None:
    with httpx.Client(base_url=live_url, timeout=5) as c:
        c.post("/_fake/reset")
        c.post("/_fake/faults", json={"key": "*", "fault": "slow_stream", "delay": 0.03})
        arrivals: list[float] = []
        buf = b""
        start = time.perf_counter()
        with c.stream(
            "POST", "/v1/messages", json=body("reply with 2 words", stream=True), headers=AUTH
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"] == SSE_CT
            assert r.headers["request-id"].startswith("req_")
            for chunk in r.iter_raw():
                arrivals.append(time.perf_counter() - start)
                buf += chunk
        assert [n for n, _ in parse_sse(buf)][-1] == "message_stop"
        assert len(arrivals) >= 4 and arrivals[0] < arrivals[-1] - 0.1  # really streamed

        c.post("/_fake/faults", json={"key": "*", "fault": "disconnect", "times": 1})
        with pytest.raises(httpx.RemoteProtocolError):
            c.post("/v1/messages", json=body(), headers=AUTH)
        assert c.post("/v1/messages", json=body(), headers=AUTH).status_code == 200

        c.post("/_fake/faults", json={"key": "*", "fault": "hang", "times": 1})
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/messages", json=body(), headers=AUTH, timeout=0.1)
        assert c.post("/v1/messages", json=body(), headers=AUTH).status_code == 200
        assert c.get("/_fake/stats").json()["total"] == 5
