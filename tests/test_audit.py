"""The audit log (contract §5): every admin API and CLI write appends one row in the write's
own transaction (actor: the admin token's name, or ``cli``); ``GET /admin/audit`` pages it
newest first and filters by actor and action; it never holds a credential, a customer key, a
token or a webhook secret."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest

from app.db import Database
from app.oversight import audit
from app.oversight.models import AuditEntry
from tests.harness import FakeUpstream, RelayServer
from tests.test_cli import Cli, cli, database_text

_ = cli  # the fixture

UPSTREAM_KEY = "sk-ant-api03-audit-credential-000000000001"


def all_audit(admin: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": 3, **params, **({"cursor": cursor} if cursor else {})}
        page = admin.get("/admin/audit", params=query).raise_for_status().json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def test_api_and_cli_writes_are_audited_without_secrets(
    relay: RelayServer, fake: FakeUpstream, cli: Cli, database_url: str
) -> None:
    secrets_seen: list[str] = []
    with relay.admin() as admin:
        customer = admin.post("/admin/customers", json={"name": "acme"}).json()
        cid = customer["id"]
        key = admin.post(f"/admin/customers/{cid}/keys", json={"name": "k"}).json()
        secrets_seen.append(key["key"])
        admin.post(
            f"/admin/customers/{cid}/topups",
            json={"amount_usd": "10", "memo": "first"},
            headers={"idempotency-key": "t1"},
        ).raise_for_status()
        replay = admin.post(
            f"/admin/customers/{cid}/topups",
            json={"amount_usd": "10", "memo": "first"},
            headers={"idempotency-key": "t1"},
        )
        assert replay.headers.get("idempotent-replayed") == "true"
        admin.post(
            f"/admin/customers/{cid}/adjustments", json={"amount_usd": "-1.5", "memo": "fix"}
        ).raise_for_status()
        admin.patch(f"/admin/customers/{cid}", json={"name": "acme2", "low_balance_usd": "2"})
        admin.put(
            "/admin/prices/claude-test-1",
            json={"input_usd_per_mtok": "1", "output_usd_per_mtok": "5"},
        ).raise_for_status()
        admin.put("/admin/aliases/fast", json={"model": "claude-haiku-4-5"}).raise_for_status()
        admin.delete("/admin/aliases/fast").raise_for_status()
        admin.delete(f"/admin/keys/{key['id']}").raise_for_status()
        hook = admin.post(
            "/admin/webhooks", json={"url": "http://127.0.0.1:9/", "events": ["account.restored"]}
        ).json()
        secrets_seen.append(hook["secret"])
        admin.delete(f"/admin/webhooks/{hook['id']}").raise_for_status()
        token = admin.post("/admin/admin-tokens", json={"role": "readonly", "name": "ro"}).json()
        secrets_seen.append(token["token"])
        admin.delete(f"/admin/admin-tokens/{token['id']}").raise_for_status()
        # failed writes leave no row
        assert (
            admin.post("/admin/customers/cus_nope/topups", json={"amount_usd": "1"}).status_code
            == 404
        )
        assert admin.patch(f"/admin/customers/{cid}", json={"status": "bogus"}).status_code == 400
        assert admin.delete("/admin/keys/key_nope").status_code == 404
    # the CLI: its rows name the actor "cli"
    account_out = cli.ok(
        "accounts", "add", "--name", "up1", "--base-url", fake.url, stdin=UPSTREAM_KEY + "\n"
    )
    account_id = re.search(r"\((acc_\w+)\)", account_out)
    assert account_id, account_out
    secrets_seen.append(UPSTREAM_KEY)
    with relay.admin() as admin:
        r = admin.post(f"/admin/accounts/{account_id.group(1)}/disable")
        assert r.status_code == 200
    cli.ok("accounts", "enable", "up1")
    cli.ok("accounts", "set-credential", "up1", stdin=UPSTREAM_KEY[:-1] + "2\n")
    created = cli.ok("customers", "create", "clico", "--topup", "3")
    cli_key = re.search(r"^key: (\S+)$", created, re.M)
    assert cli_key
    secrets_seen.append(cli_key.group(1))
    cli.ok("topup", "clico", "2", "--memo", "more")
    more = cli.ok("keys", "create", "clico", "--name", "second")
    more_key = re.search(r"^key: (\S+)$", more, re.M)
    assert more_key
    secrets_seen.append(more_key.group(1))
    made = cli.ok("admin-tokens", "create", "--role", "admin", "--name", "ops")
    ops_token = re.search(r"^token: (\S+)$", made, re.M)
    assert ops_token
    secrets_seen.append(ops_token.group(1))
    cli.ok("admin-tokens", "revoke", "ops")
    cli.ok("accounts", "remove", "up1")

    with relay.admin() as admin:
        rows = all_audit(admin)
    actions = [(r["actor"], r["action"]) for r in reversed(rows)]  # oldest first
    assert actions == [
        ("bootstrap", "customer.create"),
        ("bootstrap", "key.create"),
        ("bootstrap", "topup.create"),
        ("bootstrap", "adjustment.create"),
        ("bootstrap", "customer.update"),
        ("bootstrap", "price.put"),
        ("bootstrap", "alias.put"),
        ("bootstrap", "alias.delete"),
        ("bootstrap", "key.revoke"),
        ("bootstrap", "webhook.create"),
        ("bootstrap", "webhook.delete"),
        ("bootstrap", "admin_token.create"),
        ("bootstrap", "admin_token.revoke"),
        ("cli", "account.create"),
        ("bootstrap", "account.disable"),
        ("cli", "account.enable"),
        ("cli", "account.set_credential"),
        ("cli", "customer.create"),
        ("cli", "key.create"),
        ("cli", "topup.create"),
        ("cli", "topup.create"),
        ("cli", "key.create"),
        ("cli", "admin_token.create"),
        ("cli", "admin_token.revoke"),
        ("cli", "account.remove"),
    ]
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    by_action = {r["action"]: r for r in reversed(rows)}  # the last of each
    first_topup = next(r for r in reversed(rows) if r["action"] == "topup.create")
    assert first_topup["target"] == f"customer:{cid}"
    assert first_topup["before"] == {"balance_usd": "0.000000"}
    assert first_topup["after"]["amount_usd"] == "10.000000"
    update = by_action["customer.update"]
    assert update["before"]["name"] == "acme" and update["after"]["name"] == "acme2"
    assert update["before"]["low_balance_usd"] is None
    assert update["after"]["low_balance_usd"] == "2.000000"
    revoke = by_action["key.revoke"]
    assert revoke["before"]["status"] == "active" and revoke["after"]["status"] == "revoked"
    assert by_action["alias.delete"]["after"] is None
    cred = by_action["account.set_credential"]
    assert cred["before"]["fingerprint"] != cred["after"]["fingerprint"]
    for row in rows:
        assert set(row) == {"id", "actor", "action", "target", "before", "after", "created_at"}

    # filters
    with relay.admin() as admin:
        only_cli = all_audit(admin, actor="cli")
        assert only_cli and {r["actor"] for r in only_cli} == {"cli"}
        key_rows = all_audit(admin, action="key.create")
        assert len(key_rows) == 3
        assert {r["action"] for r in all_audit(admin, action="account.*")} == {
            "account.create",
            "account.disable",
            "account.enable",
            "account.set_credential",
            "account.remove",
        }
        bad = admin.get("/admin/audit", params={"cursor": "zz"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert admin.get("/admin/audit", params={"limit": 0}).status_code == 400

    # no secret anywhere in the log, nor anything shaped like one
    text = json.dumps(rows)
    for secret in secrets_seen:
        assert secret not in text
    assert not re.search(r"sk-pr-[A-Za-z0-9_\-]{16,}", text)
    assert not re.search(r"sk-ant-api03-[A-Za-z0-9_\-]{16,}", text)
    assert '"key":' not in text and '"secret":' not in text and '"token":' not in text
    assert "credential_ciphertext" not in text and "secret_encrypted" not in text
    stored = database_text(database_url)  # nor the database (hashes and ciphertext only)
    assert hook["secret"].encode() not in stored and token["token"].encode() not in stored


def test_scrub_drops_secret_fields_and_secret_looking_text() -> None:
    value = {
        "key": "sk-pr-" + "a" * 40,
        "nested": [{"secret": "x", "note": "token pra-" + "b" * 43 + " leaked"}],
        "prefix": "sk-pr-abcd",
        "Token": "t",
    }
    assert audit.scrub(value) == {
        "nested": [{"note": "token [redacted] leaked"}],
        "prefix": "sk-pr-abcd",
    }


def test_a_failed_write_leaves_no_row(database_url: str) -> None:
    from app.migrate import upgrade

    if database_url.startswith("sqlite"):
        upgrade(database_url)

    async def run() -> None:
        db = Database(database_url)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                async with db.transaction() as session:
                    audit.act_as(session, "cli")
                    await audit.record(session, "customer.create", "customer:x", after={"a": 1})
                    raise RuntimeError("boom")
            async with db.transaction() as session:
                assert await audit.entries(session) == []
                audit.act_as(session, "cli")
                await audit.record(session, "customer.create", "customer:y", after={"a": 1})
            async with db.transaction() as session:
                rows = await audit.entries(session)
            assert [(r.actor, r.target) for r in rows] == [("cli", "customer:y")]
            assert isinstance(rows[0], AuditEntry)
            with pytest.raises(RuntimeError, match="without an actor"):
                async with db.transaction() as session:
                    await audit.record(session, "x", None)
        finally:
            await db.dispose()

    asyncio.run(run())
