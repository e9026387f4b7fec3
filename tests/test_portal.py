"""The customer portal at ``/portal``, loaded in headless Chromium (Debian's ``chromium``).

As for the operator dashboard (tests/test_dashboard.py, whose browser helpers this reuses), the
page is public and static; every figure on it comes from ``/v1/me/*`` with the customer key from
the URL fragment or the sign-in form. Two customers use the relay; the page signed in with the
first one's key shows its balance, limits, sessions and requests and nothing of the second's.
The screenshot goes to ``tests/artifacts/portal.png`` (a copy is ``docs/portal.png``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.harness import ADMIN_TOKEN, FakeUpstream, RelayServer
from tests.test_dashboard import (
    Dom,
    address_bar,
    assert_strict_csp,
    chromium_binary,
    png_size,
    run_chromium,
)

ARTIFACTS = Path(__file__).parent / "artifacts"
UPSTREAM_KEY = "sk-ant-api03-portal-primary-0001"
MODEL = "claude-haiku-4-5"
ALICE = "Initech Portal Co"
BOB = "Umbrella Secret Corp"
ALICE_SESSIONS = ["3c1f8a52-aaaa-4d0e-9b7a-5e2f1c0d9a11", "8e2d4b61-bbbb-4f1a-8c3d-6a7b8c9d0e22"]
BOB_SESSION = "0d9c8b7a-cccc-4e5f-9a1b-2c3d4e5f6a33"
SYSTEM = [
    {"type": "text", "text": "Portal system prompt. " * 80, "cache_control": {"type": "ephemeral"}}
]


@pytest.fixture(autouse=True)
def _chromium() -> str:
    """Look for the browser before any server or data is set up."""
    return chromium_binary()


def send(relay: RelayServer, key: str, session: str | None, text: str, **extra: Any) -> str:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    if session:
        headers["x-claude-code-session-id"] = session
    response = httpx.post(
        f"{relay.url}/v1/messages",
        headers=headers,
        json={
            "model": MODEL,
            "max_tokens": 40,
            "messages": [{"role": "user", "content": text}],
            **extra,
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.headers["x-poolrelay-request-id"]


def me(relay: RelayServer, key: str, path: str, **params: Any) -> Any:
    response = httpx.get(
        f"{relay.url}{path}", headers={"x-api-key": key}, params=params, timeout=10
    )
    return response.raise_for_status().json()


@pytest.fixture
def customers(relay: RelayServer, fake: FakeUpstream) -> dict[str, Any]:
    relay.add_account("portal-a", UPSTREAM_KEY, fake.url)
    alice_id, _first_key = relay.create_customer(balance_usd="12.5", name=ALICE)
    bob_id, bob_key = relay.create_customer(balance_usd="3.210987", name=BOB)
    with relay.admin() as admin:
        alice_key = (
            admin.post(
                f"/admin/customers/{alice_id}/keys",
                json={
                    "name": "laptop",
                    "rpm": 120,
                    "tpm": 400000,
                    "max_concurrency": 4,
                    "daily_budget_usd": "5",
                    "monthly_budget_usd": "80",
                    "allowed_models": ["claude-haiku-4-5*", "claude-sonnet-4-5*"],
                    "expires_at": "2027-06-30T00:00:00Z",
                },
            )
            .raise_for_status()
            .json()["key"]
        )
    alice_requests = [
        send(relay, alice_key, ALICE_SESSIONS[0], "first turn", system=SYSTEM),
        send(relay, alice_key, ALICE_SESSIONS[0], "second turn", system=SYSTEM),
        send(relay, alice_key, None, "no session"),
    ]
    sdk = anthropic.Anthropic(
        api_key=alice_key,
        base_url=relay.url,
        max_retries=0,
        default_headers={"x-claude-code-session-id": ALICE_SESSIONS[1]},
    )
    with sdk.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=40,
        messages=[{"role": "user", "content": "a streamed answer"}],
    ) as stream:
        stream.get_final_message()
        alice_requests.append(stream.response.headers["x-poolrelay-request-id"])
    sdk.close()
    bob_requests = [send(relay, bob_key, BOB_SESSION, "bob's secret") for _ in range(2)]
    deadline = time.monotonic() + 10
    while any(r["status"] == "in_flight" for r in me(relay, alice_key, "/v1/me/requests")["items"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return {
        "alice": (alice_id, alice_key),
        "bob": (bob_id, bob_key),
        "alice_requests": alice_requests,
        "bob_requests": bob_requests,
    }


def test_portal_shows_the_customer_s_own_data(
    relay: RelayServer, customers: dict[str, Any], tmp_path: Path
) -> None:
    _alice_id, alice_key = customers["alice"]
    bob_id, bob_key = customers["bob"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "portal.png"
    shot.unlink(missing_ok=True)

    html = run_chromium(f"{relay.url}/portal#key={alice_key}", tmp_path, screenshot=shot)
    dom = Dom(html)

    assert dom.tagged("body", data_state="ready"), dom.tagged("body")
    assert dom.hidden("login")
    for section in ("balance", "limits", "usage", "sessions", "requests"):
        assert not dom.hidden(section), section
    assert alice_key not in html

    # Balance, held and available: the API's decimal strings, verbatim.
    mine = me(relay, alice_key, "/v1/me")
    assert mine["balance_usd"] != "12.500000"  # it paid for its requests
    assert dom.text["balance-usd"].strip() == f"${mine['balance_usd']}"
    assert dom.text["held-usd"].strip() == f"${mine['held_usd']}"
    assert dom.text["available-usd"].strip() == f"${mine['available_usd']}"
    assert ALICE in dom.text["who"]

    # The key's limits.
    limits = dom.text["limits-body"]
    for shown in (
        "120 requests / minute",
        "400,000 tokens / minute",
        "4 requests at once",
        "$5.000000",
        "$80.000000",
        "claude-haiku-4-5*, claude-sonnet-4-5*",
        "2027-06-30",
    ):
        assert shown in limits, (shown, limits)

    # Sessions with their cost and cache hit ratio, as the API gives them.
    sessions = me(relay, alice_key, "/v1/me/sessions")["items"]
    assert [s["session_id"] for s in sessions] == ALICE_SESSIONS[::-1]
    for s in sessions:
        row = dom.tagged("tr", data_session_id=s["session_id"])
        assert row, s["session_id"]
    cached = next(s for s in sessions if s["session_id"] == ALICE_SESSIONS[0])
    assert cached["cache_read_tokens"] > 0
    text = dom.text["sessions-body"]
    for s in sessions:
        assert s["session_id"] in text and f"${s['cost_usd']}" in text
    assert f"{float(cached['cache_hit_ratio']) * 100:.1f}%" in text

    # Recent requests with their cost.
    requests = {r["request_id"]: r for r in me(relay, alice_key, "/v1/me/requests")["items"]}
    recent = dom.text["requests-body"]
    for request_id in customers["alice_requests"]:
        assert dom.tagged("tr", data_request_id=request_id)
        assert request_id in recent
        assert f"${requests[request_id]['cost_usd']}" in recent

    # Charts by day and by model, their bars from the API's cost strings.
    by_model = me(relay, alice_key, "/v1/me/usage", group_by="model")
    assert dom.tagged("svg", id="chart-day") and dom.tagged("svg", id="chart-model")
    assert len(by_model["items"]) == 2
    for item in by_model["items"]:
        bars = dom.tagged("rect", data_model=item["model"])
        assert bars and bars[0]["data-cost"] == item["cost_usd"], item
    assert len([e for e in dom.elements if e[0] == "rect" and "data-day" in e[1]]) == 30
    assert f"${by_model['totals']['cost_usd']}" in dom.text["usage-body"]

    # Nothing of the other customer: name, id, balance, session, requests, key.
    bob = relay.customer(bob_id)
    shown = " ".join(dom.text.values())
    for secret in (
        BOB,
        bob_id,
        bob["balance_usd"],
        BOB_SESSION,
        bob_key,
        *customers["bob_requests"],
    ):
        assert secret not in html and secret not in shown, secret

    # The key left the address bar (history.replaceState) once the page had read it.
    assert address_bar(f"{relay.url}/portal#key={alice_key}", tmp_path) == f"{relay.url}/portal"

    data = shot.read_bytes()
    assert png_size(data) == (1400, 1000)
    assert len(data) > 10_000, f"screenshot is only {len(data)} bytes"


def test_portal_page_is_static_and_signs_in_by_form_only_with_a_valid_key(
    relay: RelayServer, customers: dict[str, Any], tmp_path: Path
) -> None:
    alice_id, alice_key = customers["alice"]
    response = httpx.get(f"{relay.url}/portal", timeout=10)
    assert response.status_code == 200
    body = response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert "access-control-allow-origin" not in response.headers
    for secret in (alice_key, alice_id, ALICE, BOB, *ALICE_SESSIONS, BOB_SESSION):
        assert secret not in body
    signed = httpx.get(f"{relay.url}/portal", headers={"x-api-key": alice_key}, timeout=10)
    assert signed.content == response.content

    # The dashboard's strict CSP: the page's own inline script and style by hash, nothing else.
    csp = assert_strict_csp(response.headers["content-security-policy"], body)
    assert csp["form-action"] == ["'none'"]
    assert set(re.findall(r"https?://[^\"' ]+", body)) == {"http://www.w3.org/2000/svg"}

    # Without a key: the sign-in form and nothing else.
    dom = Dom(run_chromium(f"{relay.url}/portal", tmp_path))
    assert dom.tagged("body", data_state="login")
    assert not dom.hidden("login")
    for section in ("balance", "limits", "usage", "sessions", "requests"):
        assert dom.hidden(section), section
    assert ALICE not in " ".join(dom.text.values())

    # A wrong key: the API says 401 and the page goes back to the sign-in form, visibly.
    dom = Dom(run_chromium(f"{relay.url}/portal#key=sk-pr-{'z' * 43}", tmp_path))
    assert dom.tagged("body", data_state="login")
    assert "rejected" in dom.text["login-msg"]
    assert ALICE not in " ".join(dom.text.values())


def test_dashboard_sessions_panel(
    relay: RelayServer, customers: dict[str, Any], tmp_path: Path
) -> None:
    """The operator dashboard lists sessions across customers, from /admin/sessions."""
    alice_id, _alice_key = customers["alice"]
    bob_id, _bob_key = customers["bob"]
    with relay.admin() as admin:
        listed = admin.get("/admin/sessions", params={"limit": 10}).raise_for_status().json()
    assert {(s["customer_id"], s["session_id"]) for s in listed["items"]} == {
        (alice_id, ALICE_SESSIONS[0]),
        (alice_id, ALICE_SESSIONS[1]),
        (bob_id, BOB_SESSION),
    }
    dom = Dom(run_chromium(f"{relay.url}/admin/ui#token={ADMIN_TOKEN}", tmp_path))
    assert dom.tagged("body", data_state="ready"), dom.tagged("body")
    assert not dom.hidden("sessions")
    panel = dom.text["sessions-body"]
    for s in listed["items"]:
        assert dom.tagged("tr", data_session_id=s["session_id"], data_customer_id=s["customer_id"])
        assert s["session_id"] in panel and f"${s['cost_usd']}" in panel
    assert ALICE in panel and BOB in panel  # customers by name
