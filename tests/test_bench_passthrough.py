"""The benchmark's bare passthrough (``tests/bench/passthrough.py``) relays faithfully: its
figures are a baseline only if it does the same forwarding work as the relay."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.bench.passthrough import Passthrough
from tests.harness import FakeUpstream, ThreadServer

CREDENTIAL = "sk-ant-api03-passthrough-test-0001"
BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 32,
    "messages": [{"role": "user", "content": "Hi"}],
}


@pytest.fixture
def passthrough(fake: FakeUpstream) -> Iterator[ThreadServer]:
    server = ThreadServer(Passthrough(fake.url, CREDENTIAL))
    server.start_thread()
    yield server
    server.stop()


def test_json_with_the_configured_credential(fake: FakeUpstream, passthrough: ThreadServer) -> None:
    response = httpx.post(
        passthrough.url + "/v1/messages",
        json=BODY,
        headers={"x-api-key": "sk-pr-customer-key", "anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.json()["type"] == "message"
    assert fake.count(CREDENTIAL) == 1
    assert fake.count("sk-pr-customer-key") == 0
    assert not any(k.startswith("anthropic-ratelimit-") for k in response.headers)


def test_stream_relayed_to_the_end(fake: FakeUpstream, passthrough: ThreadServer) -> None:
    with httpx.stream(
        "POST",
        passthrough.url + "/v1/messages",
        json={**BODY, "stream": True},
        headers={"x-api-key": "unused", "anthropic-version": "2023-06-01"},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    assert text.count("event: message_start") == 1
    assert text.count("event: message_stop") == 1


def test_other_paths_are_not_relayed(fake: FakeUpstream, passthrough: ThreadServer) -> None:
    assert httpx.get(passthrough.url + "/ready", timeout=10).status_code == 200
    assert httpx.get(passthrough.url + "/v1/models", timeout=10).status_code == 404
    assert fake.stats()["total"] == 0
