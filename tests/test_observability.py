"""Prometheus metrics and the structured per-request log event."""

from __future__ import annotations

import logging

import httpx
import orjson
import pytest

from app.logs import JsonFormatter
from tests.harness import FakeUpstream, RelayServer

UPSTREAM_KEY = "sk-ant-api03-observe-key-0001"


def test_metrics_after_traffic(relay: RelayServer, fake: FakeUpstream) -> None:
    relay.add_account("observed", UPSTREAM_KEY, fake.url)
    _customer, key = relay.create_customer()
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    for _ in range(2):
        assert (
            httpx.post(
                f"{relay.url}/v1/messages",
                headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                json=body,
            ).status_code
            == 200
        )
    assert (
        httpx.post(f"{relay.url}/v1/messages", headers={"x-api-key": "nope"}, json=body).status_code
        == 401
    )
    text = httpx.get(f"{relay.url}/metrics").text
    assert (
        'poolrelay_requests_total{model="claude-haiku-4-5-20251001",route="messages",status="ok"} 2.0'
        in text
    )
    assert 'status="refused_401"' in text
    assert 'poolrelay_account_headroom_ratio{account="observed",family="requests"}' in text
    assert 'poolrelay_account_in_flight{account="observed"} 0.0' in text
    assert "poolrelay_holds_outstanding 0.0" in text
    assert "poolrelay_relay_overhead_seconds_count" in text
    assert "poolrelay_time_to_first_byte_seconds_bucket" in text
    charged = next(
        line for line in text.splitlines() if line.startswith("poolrelay_charged_microusd_total")
    )
    assert float(charged.split()[-1]) > 0
    assert UPSTREAM_KEY not in text and key not in text


def test_one_json_event_per_request_without_secrets(
    relay: RelayServer, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    relay.add_account("observed", UPSTREAM_KEY, fake.url)
    customer_id, key = relay.create_customer()
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "secret text"}],
    }
    with caplog.at_level(logging.INFO, logger="poolrelay.request"):
        r = httpx.post(
            f"{relay.url}/v1/messages",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            json=body,
        )
    events = [rec for rec in caplog.records if getattr(rec, "event", None) == "request"]
    assert len(events) == 1
    line = JsonFormatter().format(events[0])
    event = orjson.loads(line)
    assert event["request_id"] == r.headers["x-poolrelay-request-id"]
    assert event["upstream_request_id"] == r.headers["request-id"]
    assert event["customer_id"] == customer_id
    assert event["account_id"].startswith("acc_")
    assert event["status"] == "ok" and event["cost_micros"] > 0
    assert isinstance(event["duration_ms"], int) and isinstance(event["ttfb_ms"], int)
    assert key not in line and UPSTREAM_KEY not in line and "secret text" not in line


def test_failover_and_quarantine_metrics(relay: RelayServer, fake: FakeUpstream) -> None:
    bad, good = "sk-ant-api03-observe-bad-0001", "sk-ant-api03-observe-good-001"
    relay.add_account("bad", bad, fake.url, weight=5)
    relay.add_account("good", good, fake.url)
    fake.fault(bad, "unauthorized")
    _customer, key = relay.create_customer()
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert (
        httpx.post(
            f"{relay.url}/v1/messages",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            json=body,
        ).status_code
        == 200
    )
    text = httpx.get(f"{relay.url}/metrics").text
    assert 'poolrelay_failovers_total{reason="credential_invalid"} 1.0' in text
    assert 'poolrelay_quarantines_total{reason="credential_invalid"} 1.0' in text
    assert "poolrelay_upstream_latency_seconds_count 2.0" in text
