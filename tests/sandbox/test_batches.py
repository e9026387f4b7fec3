"""The sandbox's Message Batches: scripted time, deterministic results, per-credential scope."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from app.sandbox import get_state
from tests.sandbox.helpers import AUTH, KEY, auth, body

pytestmark = pytest.mark.anyio
OTHER = "sk-ant-api03-other-key-bbbb"


def batch_body(*texts: str, **params: Any) -> dict[str, Any]:
    return {
        "requests": [
            {"custom_id": f"row-{i}", "params": body(text, **params)}
            for i, text in enumerate(texts)
        ]
    }


async def wait_ended(client: httpx.AsyncClient, batch_id: str, key: str = KEY) -> dict[str, Any]:
    for _ in range(100):
        got = (await client.get(f"/v1/messages/batches/{batch_id}", headers=auth(key))).json()
        if got["processing_status"] == "ended":
            return dict(got)
        await asyncio.sleep(0.02)
    raise AssertionError("the batch did not end")


@pytest.fixture
def quick(fake_app: Starlette) -> Starlette:
    get_state(fake_app).batches.processing_seconds = 0.05
    return fake_app


async def test_create_processes_and_ends_with_batch_usage(
    quick: Starlette, client: httpx.AsyncClient
) -> None:
    r = await client.post("/v1/messages/batches", headers=AUTH, json=batch_body("hi", "there"))
    assert r.status_code == 200, r.text
    batch = r.json()
    assert batch["id"].startswith("msgbatch_")
    assert batch["type"] == "message_batch"
    assert batch["processing_status"] == "in_progress"
    assert batch["results_url"] is None
    assert sum(batch["request_counts"].values()) == 2
    ended = await wait_ended(client, batch["id"])
    assert ended["request_counts"] == {
        "processing": 0,
        "succeeded": 2,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert ended["results_url"] == f"http://fake/v1/messages/batches/{batch['id']}/results"
    assert ended["ended_at"] and ended["expires_at"] > ended["created_at"]
    r = await client.get(ended["results_url"], headers=AUTH)
    assert r.status_code == 200
    lines = [orjson.loads(line) for line in r.content.splitlines()]
    assert [line["custom_id"] for line in lines] == ["row-0", "row-1"]
    for line in lines:
        message = line["result"]["message"]
        assert line["result"]["type"] == "succeeded"
        assert message["usage"]["service_tier"] == "batch"
        assert message["model"] == "claude-sonnet-4-6"
    # deterministic: the same params give the same usage as a Messages request
    single = (await client.post("/v1/messages", headers=AUTH, json=body("hi"))).json()
    assert lines[0]["result"]["message"]["usage"]["input_tokens"] == single["usage"]["input_tokens"]
    assert (
        lines[0]["result"]["message"]["usage"]["output_tokens"] == single["usage"]["output_tokens"]
    )


async def test_errored_expired_and_unknown_model_lines(
    quick: Starlette, client: httpx.AsyncClient
) -> None:
    requests = batch_body("fine", "please [batch:error]", "late [batch:expire]")["requests"]
    requests.append({"custom_id": "bad-model", "params": body("x", model="claude-nope-1")})
    r = await client.post("/v1/messages/batches", headers=AUTH, json={"requests": requests})
    batch = await wait_ended(client, r.json()["id"])
    assert batch["request_counts"]["succeeded"] == 1
    assert batch["request_counts"]["errored"] == 2
    assert batch["request_counts"]["expired"] == 1
    lines = {
        line["custom_id"]: line["result"]
        for line in map(
            orjson.loads,
            (await client.get(batch["results_url"], headers=AUTH)).content.splitlines(),
        )
    }
    assert lines["row-1"]["error"]["error"]["type"] == "api_error"
    assert lines["row-2"] == {"type": "expired"}
    assert lines["bad-model"]["error"]["error"]["type"] == "not_found_error"


async def test_cancel_keeps_what_finished_and_delete_only_after_end(
    fake_app: Starlette, client: httpx.AsyncClient
) -> None:
    get_state(fake_app).batches.processing_seconds = 1.5
    r = await client.post("/v1/messages/batches", headers=AUTH, json=batch_body("a", "b", "c"))
    batch_id = r.json()["id"]
    r = await client.delete(f"/v1/messages/batches/{batch_id}", headers=AUTH)
    assert r.status_code == 400
    await asyncio.sleep(0.7)  # the first of three lines is done at 0.5 s, the second at 1 s
    r = await client.post(f"/v1/messages/batches/{batch_id}/cancel", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["processing_status"] == "canceling"
    assert r.json()["cancel_initiated_at"]
    ended = await wait_ended(client, batch_id)
    assert ended["request_counts"]["succeeded"] == 1
    assert ended["request_counts"]["canceled"] == 2
    r = await client.post(f"/v1/messages/batches/{batch_id}/cancel", headers=AUTH)
    assert r.status_code == 400
    r = await client.delete(f"/v1/messages/batches/{batch_id}", headers=AUTH)
    assert r.json() == {"id": batch_id, "type": "message_batch_deleted"}
    r = await client.get(f"/v1/messages/batches/{batch_id}", headers=AUTH)
    assert r.status_code == 404


async def test_scoped_to_the_credential(quick: Starlette, client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages/batches", headers=AUTH, json=batch_body("mine"))
    batch_id = r.json()["id"]
    for method, path in (
        ("GET", ""),
        ("POST", "/cancel"),
        ("DELETE", ""),
        ("GET", "/results"),
    ):
        r = await client.request(
            method, f"/v1/messages/batches/{batch_id}{path}", headers=auth(OTHER)
        )
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["type"] == "not_found_error"
    r = await client.get("/v1/messages/batches", headers=auth(OTHER))
    assert r.json()["data"] == []


async def test_list_pages_newest_first(quick: Starlette, client: httpx.AsyncClient) -> None:
    ids = []
    for i in range(5):
        r = await client.post("/v1/messages/batches", headers=AUTH, json=batch_body(f"n{i}"))
        ids.append(r.json()["id"])
    newest = list(reversed(ids))
    r = await client.get("/v1/messages/batches", headers=AUTH, params={"limit": 2})
    page = r.json()
    assert [b["id"] for b in page["data"]] == newest[:2]
    assert page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == (newest[0], newest[1])
    r = await client.get(
        "/v1/messages/batches", headers=AUTH, params={"limit": 10, "after_id": newest[1]}
    )
    assert [b["id"] for b in r.json()["data"]] == newest[2:]
    assert r.json()["has_more"] is False
    r = await client.get(
        "/v1/messages/batches", headers=AUTH, params={"limit": 2, "before_id": newest[3]}
    )
    assert [b["id"] for b in r.json()["data"]] == newest[1:3]
    assert r.json()["has_more"] is True
    r = await client.get("/v1/messages/batches", headers=AUTH, params={"limit": 0})
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({}, "requests: Field required"),
        ({"requests": []}, "at least 1 item"),
        ({"requests": [{"custom_id": "a b", "params": body()}]}, "custom_id"),
        (
            {
                "requests": [
                    {"custom_id": "a", "params": body()},
                    {"custom_id": "a", "params": body()},
                ]
            },
            "Duplicate custom_id",
        ),
        (
            {"requests": [{"custom_id": "a", "params": {"model": "x"}}]},
            "requests.0.params.max_tokens",
        ),
        ({"requests": [{"custom_id": "a", "params": body(stream=True)}]}, "streaming"),
    ],
)
async def test_create_refuses_bad_bodies(
    client: httpx.AsyncClient, payload: dict[str, Any], needle: str
) -> None:
    r = await client.post("/v1/messages/batches", headers=AUTH, json=payload)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert needle in r.json()["error"]["message"]


async def test_control_sets_processing_time(fake_app: Starlette, client: httpx.AsyncClient) -> None:
    r = await client.post("/_fake/batches", json={"processing_seconds": 0})
    assert r.json()["processing_seconds"] == 0
    r = await client.post("/v1/messages/batches", headers=AUTH, json=batch_body("now"))
    got = await client.get(f"/v1/messages/batches/{r.json()['id']}", headers=AUTH)
    assert got.json()["processing_status"] == "ended"
