"""The dashboard with a ``readonly`` token (issue 15B): every panel loads, including the failed
webhook deliveries and the last audit entries; nothing on the page writes. Headless Chromium,
as in ``tests/test_dashboard.py`` (whose helpers and data this reuses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.oversight import delivery
from tests.harness import RelayServer
from tests.test_dashboard import ARTIFACTS, Dom, _chromium, png_size, populated, run_chromium
from workers import notify

_ = (_chromium, populated)  # fixtures


def test_dashboard_with_a_readonly_token_shows_failed_deliveries_and_the_audit_log(
    relay: RelayServer, populated: dict[str, Any], tmp_path: Path
) -> None:
    with relay.admin() as admin:
        ro = admin.post("/admin/admin-tokens", json={"role": "readonly", "name": "finance"})
        token = ro.json()["token"]
        hook = admin.post(
            "/admin/webhooks",
            json={"url": "http://127.0.0.1:9/closed", "events": ["customer.balance_low"]},
        ).json()
        customer = populated["customer"]
        admin.patch(
            f"/admin/customers/{customer['id']}", json={"low_balance_usd": "1000"}
        ).raise_for_status()
    services = relay.services
    relay.call(lambda: notify.notify_transitions({"services": services}))
    relay.call(lambda: delivery.deliver_due(services.db, services.cipher))
    with relay.admin() as admin:
        failed = admin.get("/admin/webhook-deliveries", params={"failed": "true"}).json()
        audit = admin.get("/admin/audit", params={"limit": 10}).json()["items"]
    assert failed["items"] and failed["items"][0]["webhook_id"] == hook["id"]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard-readonly.png"
    shot.unlink(missing_ok=True)
    html = run_chromium(f"{relay.url}/admin/ui#token={token}", tmp_path, screenshot=shot)
    dom = Dom(html)
    assert dom.tagged("body", data_state="ready"), dom.tagged("body")
    assert token not in html
    for section in ("pool", "customers", "usage", "requests", "webhooks", "audit"):
        assert not dom.hidden(section), section
        assert "Could not load" not in dom.text[f"{section}-body"], dom.text[f"{section}-body"]

    deliveries = dom.text["webhooks-body"]
    attempt = failed["items"][0]
    assert "customer.balance_low" in deliveries and attempt["event_id"] in deliveries
    assert "ConnectError" in deliveries
    assert dom.tagged("tr", data_attempt_id=str(attempt["id"]))

    entries = dom.text["audit-body"]
    for row in audit:
        assert dom.tagged("tr", data_audit_id=str(row["id"]))
    assert "webhook.create" in entries and "admin_token.create" in entries
    assert "customer.update" in entries and "bootstrap" in entries
    assert "whsec_" not in html  # the prefix "pra-xxxx" of a token may show; never the token

    data = shot.read_bytes()
    assert png_size(data) == (1400, 1000) and len(data) > 10_000
