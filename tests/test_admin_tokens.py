"""Admin tokens with roles (contract §3 ``admin-tokens``, §5): the bootstrap token is ``admin``,
a ``readonly`` token reads every ``/admin/*`` endpoint and the dashboard's data and is refused
every write with 403 ``permission_error``; revocation holds at once; tokens are stored hashed."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from app.db import sync_url
from app.main import create_app
from tests.harness import ADMIN_TOKEN, RelayServer
from tests.test_cli import Cli, cli, database_text, query

_ = cli  # the fixture


def _client(relay: RelayServer, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=relay.url, headers={"authorization": f"Bearer {token}"}, timeout=30
    )


def _create(cli: Cli, *args: str) -> tuple[str, str]:
    out = cli.ok("admin-tokens", "create", *args)
    token = re.search(r"^token: (\S+)$", out, re.M)
    token_id = re.search(r"^admin token: (\S+) ", out, re.M)
    assert token and token_id, out
    return token_id.group(1), token.group(1)


# Every /admin route that reads, with a path the route accepts (ids filled in by the test).
READS = [
    "/admin/customers",
    "/admin/customers/{customer_id}",
    "/admin/customers/{customer_id}/keys",
    "/admin/customers/{customer_id}/ledger",
    "/admin/accounts",
    "/admin/prices",
    "/admin/aliases",
    "/admin/usage",
    "/admin/requests",
    "/admin/audit",
    "/admin/admin-tokens",
    "/admin/webhooks",
]


def _writes(ids: dict[str, str]) -> list[tuple[str, str, Any]]:
    c = ids["customer_id"]
    return [
        ("POST", "/admin/customers", {"name": "x"}),
        ("PATCH", f"/admin/customers/{c}", {"name": "y"}),
        ("POST", f"/admin/customers/{c}/keys", {"name": "k2"}),
        ("DELETE", f"/admin/keys/{ids['key_id']}", None),
        ("POST", f"/admin/customers/{c}/topups", {"amount_usd": "5"}),
        ("POST", f"/admin/customers/{c}/adjustments", {"amount_usd": "-1", "memo": "m"}),
        ("PUT", "/admin/prices/claude-haiku-4-5", {"input_usd_per_mtok": "1"}),
        ("PUT", "/admin/aliases/fast", {"model": "claude-haiku-4-5"}),
        ("DELETE", "/admin/aliases/fast", None),
        ("POST", "/admin/accounts/acc_x/enable", None),
        ("POST", "/admin/accounts/acc_x/disable", None),
        ("POST", "/admin/admin-tokens", {"role": "admin"}),
        ("DELETE", f"/admin/admin-tokens/{ids['token_id']}", None),
        ("POST", "/admin/webhooks", {"url": "http://127.0.0.1:9/", "events": ["account.restored"]}),
        ("DELETE", "/admin/webhooks/whk_x", None),
    ]


def test_readonly_reads_everything_and_writes_nothing(relay: RelayServer, cli: Cli) -> None:
    ro_id, ro_token = _create(cli, "--role", "readonly", "--name", "finance")
    with relay.admin() as admin:
        customer = admin.post("/admin/customers", json={"name": "acme"}).json()
        key = admin.post(f"/admin/customers/{customer['id']}/keys", json={"name": "k"}).json()
        admin.post(f"/admin/customers/{customer['id']}/topups", json={"amount_usd": "10"})
        before_audit = admin.get("/admin/audit", params={"limit": 100}).json()["items"]
        before_customer = admin.get(f"/admin/customers/{customer['id']}").json()
    ids = {"customer_id": customer["id"], "key_id": key["id"], "token_id": ro_id}
    with _client(relay, ro_token) as ro:
        for path in READS:
            r = ro.get(path.format(**ids))
            assert r.status_code == 200, (path, r.status_code, r.text)
        for method, path, body in _writes(ids):
            r = (
                ro.request(method, path, json=body)
                if body is not None
                else ro.request(method, path)
            )
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            error = r.json()
            assert error["type"] == "error"
            assert error["error"]["type"] == "permission_error", error
            assert "read-only" in error["error"]["message"]
        # every write route the app has (today's and tomorrow's), whatever its path parameters
        for route in relay.app.routes:
            path = getattr(route, "path", "")
            if not path.startswith("/admin/") or path == "/admin/ui":
                continue
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            for method in sorted(getattr(route, "methods", set()) - {"GET", "HEAD", "OPTIONS"}):
                r = ro.request(method, concrete, json={})
                assert r.status_code == 403, (method, path, r.status_code, r.text)
                assert r.json()["error"]["type"] == "permission_error"
    with relay.admin() as admin:
        # nothing moved: no audit row, no balance change, the key still active
        assert admin.get("/admin/audit", params={"limit": 100}).json()["items"] == before_audit
        assert admin.get(f"/admin/customers/{customer['id']}").json() == before_customer
        keys = admin.get(f"/admin/customers/{customer['id']}/keys").json()["items"]
        assert keys[0]["status"] == "active"
        # the dashboard page itself is public; its data comes from the reads above
        assert admin.get("/admin/ui").status_code == 200


def test_tokens_cli_and_api_revocation_and_hashing(
    relay: RelayServer, cli: Cli, settings_env: dict[str, str]
) -> None:
    admin_id, admin_token = _create(cli, "--role", "admin", "--name", "ops")
    with _client(relay, admin_token) as ops:
        created = ops.post("/admin/customers", json={"name": "by-ops"})
        assert created.status_code == 201
        made = ops.post("/admin/admin-tokens", json={"role": "readonly", "name": "support"})
        assert made.status_code == 201, made.text
        support = made.json()
        assert support["role"] == "readonly" and support["token"].startswith("pra-")
        listed = ops.get("/admin/admin-tokens").json()["items"]
        names = {t["name"]: t for t in listed}
        assert {"bootstrap", "ops", "support"} <= set(names)
        assert names["bootstrap"]["role"] == "admin"
        assert all("token" not in t and "token_hash" not in t for t in listed)
        # a duplicate name and a bad role are 400 and create nothing
        dup = ops.post("/admin/admin-tokens", json={"role": "admin", "name": "support"})
        assert dup.status_code == 400 and dup.json()["error"]["type"] == "invalid_request_error"
        bad = ops.post("/admin/admin-tokens", json={"role": "root"})
        assert bad.status_code == 400
    with _client(relay, support["token"]) as sup:
        assert sup.get("/admin/customers").status_code == 200
    # revoked through the API: refused on the very next request (no cache)
    with relay.admin() as admin:
        r = admin.delete(f"/admin/admin-tokens/{support['id']}")
        assert r.status_code == 200 and r.json()["status"] == "revoked"
    with _client(relay, support["token"]) as sup:
        r = sup.get("/admin/customers")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # revoked through the CLI (a separate process's view of the same database)
    out = cli.ok("admin-tokens", "revoke", admin_id)
    assert "revoked" in out
    with _client(relay, admin_token) as ops:
        assert ops.get("/admin/customers").status_code == 401
    listing = cli.ok("admin-tokens", "list")
    assert "bootstrap" in listing and "support" in listing and "revoked" in listing
    line = cli.fails("admin-tokens", "revoke", "adt_nope")
    assert "not found" in line
    assert cli.fails("admin-tokens", "create", "--role", "root").startswith("poolrelay")
    # stored hashed: no plaintext token anywhere in the database, its SHA-256 is
    url = settings_env["POOLRELAY_DATABASE_URL"]
    stored = database_text(url)
    for token in (admin_token, support["token"], ADMIN_TOKEN):
        assert token.encode() not in stored
    hashes = {row[0] for row in query(url, "SELECT token_hash FROM admin_tokens")}
    assert hashlib.sha256(admin_token.encode()).hexdigest() in hashes
    assert hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest() in hashes


def test_first_start_token_is_the_admin_bootstrap(
    settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.harness import test_settings

    printed: list[str] = []
    # first-start generation is for the embedded defaults (PostgreSQL requires ADMIN_TOKEN)
    sqlite_url = "sqlite:///" + str(Path(settings_env["POOLRELAY_KEY_FILE"]).parent / "first.db")
    settings = test_settings(
        settings_env, admin_token=None, database_url=sqlite_url, redis_url="memory://"
    )
    server = RelayServer(create_app(settings, print_token=printed.append))
    server.settings = settings
    server.start_thread()
    try:
        assert len(printed) == 1 and printed[0].startswith("pra-")
        with _client(server, printed[0]) as admin:
            tokens = admin.get("/admin/admin-tokens").json()["items"]
            assert [(t["name"], t["role"]) for t in tokens] == [("bootstrap", "admin")]
            assert admin.post("/admin/customers", json={"name": "x"}).status_code == 201
        with _client(server, ADMIN_TOKEN) as other:
            assert other.get("/admin/customers").status_code == 401
    finally:
        server.stop()
    # a second start prints nothing and keeps the same token
    again = RelayServer(create_app(settings, print_token=printed.append))
    again.settings = settings
    again.start_thread()
    try:
        assert len(printed) == 1
        with _client(again, printed[0]) as admin:
            assert admin.get("/admin/customers").status_code == 200
    finally:
        again.stop()


def test_an_install_from_before_roles_keeps_its_first_start_token(
    settings_env: dict[str, str],
) -> None:
    """Before migration 0011 the first-start token's digest lived in ``app_meta``."""
    from app.migrate import upgrade
    from tests.harness import test_settings

    url = "sqlite:///" + str(Path(settings_env["POOLRELAY_KEY_FILE"]).parent / "legacy.db")
    upgrade(url, "0007")
    old_token = "pra-" + "L" * 43
    engine = sa.create_engine(sync_url(url))
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO app_meta (key, value) VALUES ('admin_token_sha256', :v)"),
            {"v": hashlib.sha256(old_token.encode()).hexdigest()},
        )
    engine.dispose()
    printed: list[str] = []
    settings = test_settings(
        settings_env, admin_token=None, database_url=url, redis_url="memory://"
    )
    server = RelayServer(create_app(settings, print_token=printed.append))
    server.settings = settings
    server.start_thread()
    try:
        assert printed == []
        with _client(server, old_token) as admin:
            tokens = admin.get("/admin/admin-tokens").json()["items"]
            assert [(t["name"], t["role"], t["status"]) for t in tokens] == [
                ("bootstrap", "admin", "active")
            ]
    finally:
        server.stop()
