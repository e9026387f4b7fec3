"""The admin API (contract §5) and ``/v1/me`` through HTTP against a real relay.

Each test reuses one relay (the ``relay`` fixture) for many checks, so the file stays fast on
both backends. Money is compared as exact decimal strings / integer micro-USD, never floats.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from tests.harness import ACCOUNT_FIELDS, FakeUpstream, RelayServer

MODEL = "claude-haiku-4-5"
CUSTOMER_FIELDS = {
    "id",
    "name",
    "status",
    "price_multiplier",
    "balance_usd",
    "held_usd",
    "low_balance_usd",
    "available_usd",
    "created_at",
}
KEY_FIELDS = {
    "id",
    "customer_id",
    "name",
    "prefix",
    "status",
    "rpm",
    "tpm",
    "daily_budget_usd",
    "monthly_budget_usd",
    "allowed_models",
    "expires_at",
    "created_at",
    "last_used_at",
}
ENTRY_FIELDS = {"id", "kind", "amount_usd", "balance_after_usd", "request_id", "memo", "created_at"}
PRICE_FIELDS = {
    "model",
    "input_usd_per_mtok",
    "output_usd_per_mtok",
    "cache_write_5m_usd_per_mtok",
    "cache_write_1h_usd_per_mtok",
    "cache_read_usd_per_mtok",
}
TOTALS_FIELDS = {
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "cost_usd",
}


T = TypeVar("T")
R = TypeVar("R")
POOL_LIMITS = httpx.Limits(max_connections=16, max_keepalive_connections=16)
JSON = {"content-type": "application/json"}


def fan_out(call: Callable[[T], R], items: Sequence[T], workers: int = 8) -> list[R]:
    """Many independent requests at once: each one is latency-bound, not CPU-bound."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(call, items))


def upstream_key() -> str:
    return "sk-ant-api03-" + secrets.token_urlsafe(24)


def micros(usd: str) -> int:
    """An exact decimal USD string as integer micro-USD (test-side, independent of billing)."""
    value = Decimal(usd) * 1_000_000
    assert value == value.to_integral_value(), usd
    return int(value)


def assert_usd6(value: object) -> None:
    assert isinstance(value, str), value
    whole, _, fraction = value.lstrip("-").partition(".")
    assert whole.isdigit() and len(fraction) == 6 and fraction.isdigit(), value


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body: dict[str, Any] = response.json()
    assert body["type"] == "error", body
    assert body["error"]["type"] == error_type, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body


class Refusals:
    """Collects every bad input that was not refused as expected, to report them all at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, response: httpx.Response, status: int, error_type: str, what: object) -> None:
        try:
            assert_error(response, status, error_type)
        except (AssertionError, ValueError, KeyError, TypeError) as exc:
            self.problems.append(f"{what!r}: {exc}")

    def check_all(
        self,
        client: httpx.Client,
        calls: Sequence[tuple[str, str, dict[str, Any]]],
        status: int = 400,
        error_type: str = "invalid_request_error",
    ) -> None:
        """Send (method, path, httpx kwargs) calls at once; each must be refused as given."""
        responses = fan_out(lambda c: client.request(c[0], c[1], **c[2]), calls)
        for call, response in zip(calls, responses, strict=True):
            self.check(response, status, error_type, call)

    def assert_none(self) -> None:
        assert not self.problems, "\n".join(self.problems)


@pytest.fixture
def admin(relay: RelayServer) -> Iterator[httpx.Client]:
    with relay.admin() as client:
        yield client


def new_customer(admin: httpx.Client, name: str = "acme", **extra: Any) -> dict[str, Any]:
    response = admin.post("/admin/customers", json={"name": name, **extra})
    assert response.status_code == 201, response.text
    customer: dict[str, Any] = response.json()
    return customer


def new_key(admin: httpx.Client, customer_id: str, **body: Any) -> dict[str, Any]:
    response = admin.post(f"/admin/customers/{customer_id}/keys", json={"name": "k", **body})
    assert response.status_code == 201, response.text
    key: dict[str, Any] = response.json()
    return key


def topup(admin: httpx.Client, customer_id: str, amount: object, **kwargs: Any) -> httpx.Response:
    return admin.post(
        f"/admin/customers/{customer_id}/topups", json={"amount_usd": amount}, **kwargs
    )


def all_pages(admin: httpx.Client, path: str, limit: int, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query: dict[str, Any] = {"limit": limit, **params}
        if cursor is not None:
            query["cursor"] = cursor
        response = admin.get(path, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) >= {"items", "next_cursor"}
        assert len(page["items"]) <= limit
        items.extend(page["items"])
        cursor = page["next_cursor"]
        pages += 1
        assert pages < 1000
        if not cursor:
            return items


def ledger(admin: httpx.Client, customer_id: str) -> list[dict[str, Any]]:
    return all_pages(admin, f"/admin/customers/{customer_id}/ledger", 100)


def balance_micros(admin: httpx.Client, customer_id: str) -> int:
    response = admin.get(f"/admin/customers/{customer_id}")
    assert response.status_code == 200, response.text
    return micros(response.json()["balance_usd"])


def assert_balance_is_ledger_sum(admin: httpx.Client, customer_id: str) -> None:
    entries = ledger(admin, customer_id)
    assert balance_micros(admin, customer_id) == sum(micros(e["amount_usd"]) for e in entries)


def message(
    relay: RelayServer,
    key: str,
    *,
    model: str = MODEL,
    text: str = "hello",
    max_tokens: int = 16,
    **extra: Any,
) -> httpx.Response:
    return httpx.post(
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
            **extra,
        },
        timeout=30,
    )


def poll(
    probe: Callable[[], httpx.Response], done: Callable[[httpx.Response], bool], within: float
) -> tuple[httpx.Response, float]:
    """Call ``probe`` until ``done``; returns the last response and when (s) it was sent.

    Stops at the first request sent after ``within`` seconds, so the caller can assert that the
    change took effect in time.
    """
    start = time.monotonic()
    while True:
        sent = time.monotonic() - start
        response = probe()
        if done(response) or sent > within:
            return response, sent
        time.sleep(0.02)


def expected_cost_micros(usage: dict[str, Any], price: dict[str, str]) -> int:
    """Usage priced by a price view (USD per Mtok), rounded up once to a whole micro-USD."""
    creation = usage.get("cache_creation") or {}
    write_5m = creation.get("ephemeral_5m_input_tokens")
    write_1h = creation.get("ephemeral_1h_input_tokens", 0)
    if write_5m is None:
        write_5m = usage.get("cache_creation_input_tokens", 0) - write_1h
    total: Decimal = (
        usage["input_tokens"] * Decimal(price["input_usd_per_mtok"])
        + usage["output_tokens"] * Decimal(price["output_usd_per_mtok"])
        + write_5m * Decimal(price["cache_write_5m_usd_per_mtok"])
        + write_1h * Decimal(price["cache_write_1h_usd_per_mtok"])
        + usage.get("cache_read_input_tokens", 0) * Decimal(price["cache_read_usd_per_mtok"])
    )  # USD per Mtok x tokens = micro-USD
    return math.ceil(total)


# --- authentication, health, docs --------------------------------------------------------------

ADMIN_ENDPOINTS = [
    ("GET", "/admin/customers"),
    ("POST", "/admin/customers"),
    ("GET", "/admin/customers/cus_x"),
    ("PATCH", "/admin/customers/cus_x"),
    ("POST", "/admin/customers/cus_x/keys"),
    ("GET", "/admin/customers/cus_x/keys"),
    ("DELETE", "/admin/keys/key_x"),
    ("POST", "/admin/customers/cus_x/topups"),
    ("POST", "/admin/customers/cus_x/adjustments"),
    ("GET", "/admin/customers/cus_x/ledger"),
    ("GET", "/admin/usage"),
    ("GET", "/admin/requests"),
    ("GET", "/admin/accounts"),
    ("POST", "/admin/accounts/acc_x/enable"),
    ("POST", "/admin/accounts/acc_x/disable"),
    ("GET", "/admin/prices"),
    ("PUT", "/admin/prices/claude-x"),
]


def test_admin_endpoints_need_the_admin_token(relay: RelayServer, admin: httpx.Client) -> None:
    customer = new_customer(admin, "before-auth-checks")
    body = {"name": "intruder", "amount_usd": "5", "memo": "x", "input_usd_per_mtok": "1"}
    attempts = [
        (method, path, headers)
        for method, path in ADMIN_ENDPOINTS
        for headers in (
            {},
            {"authorization": "Bearer wrong-token"},
            {"authorization": "Bearer"},
            {"authorization": "Basic dGVzdC1hZG1pbi10b2tlbg=="},
            {"x-api-key": "test-admin-token"},  # the admin token is not a customer header
        )
    ]
    with httpx.Client(base_url=relay.url, timeout=30, limits=POOL_LIMITS) as anon:
        responses = fan_out(lambda a: anon.request(a[0], a[1], headers=a[2], json=body), attempts)
        for attempt, response in zip(attempts, responses, strict=True):
            assert response.status_code == 401, (attempt, response.text)
            assert_error(response, 401, "authentication_error")
            assert "test-admin-token" not in response.text
        # a customer key is not an admin token either
        key = new_key(admin, customer["id"])["key"]
        response = anon.get("/admin/customers", headers={"authorization": f"Bearer {key}"})
        assert_error(response, 401, "authentication_error")
        # nothing was created by the refused calls
        names = [c["name"] for c in all_pages(admin, "/admin/customers", 100)]
        assert names == ["before-auth-checks"]

        # health needs no token
        assert anon.get("/healthz").status_code == 200
        ready = anon.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ok"
        # docs are served, and the schema documents the admin API
        docs = anon.get("/docs")
        assert docs.status_code == 200 and "html" in docs.headers["content-type"]
        schema = anon.get("/openapi.json")
        assert schema.status_code == 200
        paths = schema.json()["paths"]
        for path in (
            "/admin/customers",
            "/admin/customers/{customer_id}",
            "/admin/customers/{customer_id}/keys",
            "/admin/keys/{key_id}",
            "/admin/customers/{customer_id}/topups",
            "/admin/customers/{customer_id}/adjustments",
            "/admin/customers/{customer_id}/ledger",
            "/admin/usage",
            "/admin/requests",
            "/admin/accounts",
            "/admin/prices",
        ):
            assert path in paths, path
    # the right token works, both as Bearer and case-insensitively on the scheme
    assert admin.get("/admin/customers").status_code == 200
    response = httpx.get(
        f"{relay.url}/admin/customers",
        headers={"authorization": "bearer test-admin-token"},
        timeout=30,
    )
    assert response.status_code == 200


# --- customers -------------------------------------------------------------------------------


def test_customers_create_get_list_patch(admin: httpx.Client) -> None:
    created = new_customer(admin, "first", price_multiplier="1.25")
    assert set(created) == CUSTOMER_FIELDS
    assert created["id"] and created["name"] == "first" and created["status"] == "active"
    assert created["price_multiplier"] == "1.25"
    for field in ("balance_usd", "held_usd", "available_usd"):
        assert created[field] == "0.000000"
    assert datetime.fromisoformat(created["created_at"].replace("Z", "+00:00")).tzinfo
    default = new_customer(admin, "second")
    assert default["price_multiplier"] == "1"
    # a JSON number multiplier is read exactly
    assert new_customer(admin, "third", price_multiplier=2)["price_multiplier"] == "2"
    assert new_customer(admin, "fourth", price_multiplier=0.5)["price_multiplier"] == "0.5"

    got = admin.get(f"/admin/customers/{created['id']}")
    assert got.status_code == 200 and got.json() == created

    # top-ups show up in balance and available
    assert topup(admin, created["id"], "12.5").status_code == 201
    got_json = admin.get(f"/admin/customers/{created['id']}").json()
    assert got_json["balance_usd"] == "12.500000"
    assert got_json["available_usd"] == "12.500000"
    assert got_json["held_usd"] == "0.000000"

    # PATCH name, status, price_multiplier (each alone and together)
    patched = admin.patch(f"/admin/customers/{created['id']}", json={"name": "renamed"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["name"] == "renamed" and patched.json()["price_multiplier"] == "1.25"
    patched = admin.patch(
        f"/admin/customers/{created['id']}",
        json={"status": "suspended", "price_multiplier": "0.800"},
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert set(body) == CUSTOMER_FIELDS
    assert body["status"] == "suspended" and body["price_multiplier"] == "0.8"
    assert body["name"] == "renamed" and body["balance_usd"] == "12.500000"
    assert admin.get(f"/admin/customers/{created['id']}").json() == body
    patched = admin.patch(f"/admin/customers/{created['id']}", json={"status": "active"})
    assert patched.json()["status"] == "active"
    assert admin.patch(f"/admin/customers/{created['id']}", json={}).status_code == 200

    # unknown ids
    for method, path, body_json in (
        ("GET", "/admin/customers/cus_nope", None),
        ("PATCH", "/admin/customers/cus_nope", {"name": "x"}),
        ("POST", "/admin/customers/cus_nope/keys", {"name": "x"}),
        ("GET", "/admin/customers/cus_nope/keys", None),
        ("POST", "/admin/customers/cus_nope/topups", {"amount_usd": "1"}),
        ("POST", "/admin/customers/cus_nope/adjustments", {"amount_usd": "1", "memo": "m"}),
        ("GET", "/admin/customers/cus_nope/ledger", None),
        ("DELETE", "/admin/keys/key_nope", None),
    ):
        assert_error(admin.request(method, path, json=body_json), 404, "not_found_error")


def test_customer_list_pagination(admin: httpx.Client) -> None:
    ids = {c["id"] for c in fan_out(lambda i: new_customer(admin, f"c{i}"), range(7))}
    walks = fan_out(lambda limit: all_pages(admin, "/admin/customers", limit), (1, 3, 7, 100))
    for items in walks:
        assert len(items) == 7 and {c["id"] for c in items} == ids  # each exactly once
        for item in items:
            assert set(item) == CUSTOMER_FIELDS
    first = admin.get("/admin/customers", params={"limit": 3}).json()
    assert len(first["items"]) == 3 and first["next_cursor"]
    second = admin.get(
        "/admin/customers", params={"limit": 3, "cursor": first["next_cursor"]}
    ).json()
    assert len(second["items"]) == 3
    assert not {c["id"] for c in first["items"]} & {c["id"] for c in second["items"]}
    assert len(admin.get("/admin/customers").json()["items"]) == 7  # default limit covers 7
    some = next(iter(ids))
    refusals = Refusals()
    refusals.check_all(
        admin,
        [
            ("GET", "/admin/customers", {"params": {"limit": bad}})
            for bad in ("0", "101", "-1", "abc", "1.5")
        ]
        + [
            ("GET", path, {"params": {"limit": bad}})
            for path in (
                f"/admin/customers/{some}/keys",
                f"/admin/customers/{some}/ledger",
                "/admin/requests",
            )
            for bad in ("0", "101")
        ],
    )
    refusals.assert_none()


BAD_CUSTOMER_BODIES: list[Any] = [
    {},
    {"name": ""},
    {"name": "   "},
    {"name": None},
    {"name": 5},
    {"name": "x" * 201},
    {"name": "ok", "extra": 1},
    {"name": "ok", "balance_usd": "100"},
    {"name": "ok", "price_multiplier": "-1"},
    {"name": "ok", "price_multiplier": "0"},
    {"name": "ok", "price_multiplier": "abc"},
    {"name": "ok", "price_multiplier": "1e3"},
    {"name": "ok", "price_multiplier": "NaN"},
    {"name": "ok", "price_multiplier": "1.0000001"},
    {"name": "ok", "price_multiplier": "100000"},
    {"name": "ok", "price_multiplier": True},
    {"name": "ok", "price_multiplier": [1]},
    {"name": "ok", "price_multiplier": -1},
    [],
    "name",
    None,
]
BAD_RAW_BODIES = [
    b'{"name": "ok", "price_multiplier": 1e309}',
    b'{"name": "ok", "price_multiplier": -1e309}',
    b'{"name": "ok", "price_multiplier": NaN}',
    b'{"name": "ok"',
    b"",
    b"\xff\xfe",
]


def test_bad_customer_bodies_are_400_and_create_nothing(admin: httpx.Client) -> None:
    refusals = Refusals()
    refusals.check_all(
        admin,
        [("POST", "/admin/customers", {"json": body}) for body in BAD_CUSTOMER_BODIES]
        + [
            ("POST", "/admin/customers", {"content": raw, "headers": JSON})
            for raw in BAD_RAW_BODIES
        ],
    )
    refusals.assert_none()
    assert admin.get("/admin/customers").json()["items"] == []

    customer = new_customer(admin, "target", price_multiplier="2")
    path = f"/admin/customers/{customer['id']}"
    patches = (
        {"status": "deleted"},
        {"status": "ACTIVE"},
        {"name": ""},
        {"price_multiplier": "-1"},
        {"price_multiplier": "abc"},
        {"price_multiplier": "0"},
        {"price_multiplier": True},
        {"unknown": 1},
        {"balance_usd": "1000"},
    )
    refusals.check_all(
        admin,
        [("PATCH", path, {"json": patch}) for patch in patches]
        + [("PATCH", path, {"content": b'{"price_multiplier": 1e309}', "headers": JSON})],
    )
    refusals.assert_none()
    assert admin.get(f"/admin/customers/{customer['id']}").json() == customer
    assert len(admin.get("/admin/customers").json()["items"]) == 1


# --- keys ------------------------------------------------------------------------------------


@pytest.fixture
def served(relay: RelayServer, fake: FakeUpstream) -> tuple[RelayServer, FakeUpstream, str]:
    """A relay with one upstream account on the fake; returns the account's credential."""
    credential = upstream_key()
    relay.add_account("primary", credential, fake.url)
    return relay, fake, credential


def test_keys_create_list_and_fields(relay: RelayServer, admin: httpx.Client) -> None:
    customer = new_customer(admin)
    created = new_key(
        admin,
        customer["id"],
        name="ci",
        rpm=60,
        tpm=100000,
        daily_budget_usd="5",
        monthly_budget_usd="50.5",
        allowed_models=["claude-haiku-4-5"],
        expires_at="2099-01-01T00:00:00Z",
    )
    assert KEY_FIELDS | {"key"} <= set(created)
    assert "key_hash" not in created and "hash" not in created
    plaintext = created["key"]
    assert plaintext.startswith("sk-pr-")
    tail = plaintext[len("sk-pr-") :]
    assert len(tail) >= 40
    assert all(c.isascii() and (c.isalnum() or c in "-_") for c in tail)
    assert created["customer_id"] == customer["id"] and created["name"] == "ci"
    assert created["status"] == "active"
    assert created["rpm"] == 60 and created["tpm"] == 100000
    assert created["daily_budget_usd"] == "5.000000"
    assert created["monthly_budget_usd"] == "50.500000"
    assert created["allowed_models"] == ["claude-haiku-4-5"]
    assert created["expires_at"].startswith("2099-01-01T00:00:00")
    assert created["last_used_at"] is None
    assert plaintext.startswith(created["prefix"]) and len(created["prefix"]) < len(plaintext)

    plain = new_key(admin, customer["id"])
    assert plain["key"] != plaintext
    for field in ("rpm", "tpm", "daily_budget_usd", "monthly_budget_usd", "allowed_models"):
        assert plain[field] is None, field
    assert plain["expires_at"] is None

    listed = admin.get(f"/admin/customers/{customer['id']}/keys")
    assert listed.status_code == 200
    page = listed.json()
    assert page["next_cursor"] is None
    assert {k["id"] for k in page["items"]} == {created["id"], plain["id"]}
    for item in page["items"]:
        assert set(item) >= KEY_FIELDS
        assert "key" not in item and "key_hash" not in item and "hash" not in item
    text = listed.text
    assert plaintext not in text and plain["key"] not in text
    from billing.customers import hash_key

    assert hash_key(plaintext) not in text
    one_by_one = all_pages(admin, f"/admin/customers/{customer['id']}/keys", 1)
    assert {k["id"] for k in one_by_one} == {created["id"], plain["id"]}

    # the key's last use is recorded
    me = httpx.get(f"{relay.url}/v1/me", headers={"x-api-key": plain["key"]}, timeout=30)
    assert me.status_code == 200, me.text

    refusals = Refusals()
    bad_keys = (
        {"rpm": 0},
        {"rpm": -5},
        {"rpm": "abc"},
        {"tpm": 0},
        {"daily_budget_usd": "-1"},
        {"daily_budget_usd": "abc"},
        {"monthly_budget_usd": "1.0000001"},
        {"allowed_models": "claude-haiku-4-5"},
        {"allowed_models": [""]},
        {"allowed_models": [5]},
        {"expires_at": "not a date"},
        {"name": ""},
        {"unexpected": True},
        {"key": "sk-pr-" + "a" * 43},
        {"daily_budget_usd": True},
    )
    keys_path = f"/admin/customers/{customer['id']}/keys"
    refusals.check_all(admin, [("POST", keys_path, {"json": bad}) for bad in bad_keys])
    refusals.assert_none()
    assert len(admin.get(f"/admin/customers/{customer['id']}/keys").json()["items"]) == 2


def test_revoked_expired_and_suspended_keys(
    served: tuple[RelayServer, FakeUpstream, str], admin: httpx.Client
) -> None:
    relay, fake, credential = served
    customer = new_customer(admin)
    assert topup(admin, customer["id"], "10").status_code == 201
    doomed = new_key(admin, customer["id"], name="doomed")
    kept = new_key(admin, customer["id"], name="kept")
    assert message(relay, doomed["key"]).status_code == 200
    assert message(relay, kept["key"]).status_code == 200  # warms the per-process auth cache

    # revocation: refused within 1 s of the DELETE returning
    revoked = admin.delete(f"/admin/keys/{doomed['id']}")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked" and "key" not in revoked.json()
    response, sent = poll(
        lambda: message(relay, doomed["key"]), lambda r: r.status_code == 401, within=1.0
    )
    assert_error(response, 401, "authentication_error")
    assert sent <= 1.0, f"revoked key still served {sent:.2f} s after the DELETE"
    assert_error(message(relay, doomed["key"]), 401, "authentication_error")
    listed = {
        k["id"]: k for k in admin.get(f"/admin/customers/{customer['id']}/keys").json()["items"]
    }
    assert listed[doomed["id"]]["status"] == "revoked"
    assert listed[kept["id"]]["status"] == "active"
    # revoking again is harmless
    assert admin.delete(f"/admin/keys/{doomed['id']}").json()["status"] == "revoked"
    assert message(relay, kept["key"]).status_code == 200

    # an expired key is refused; an unexpired one works
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    expired = new_key(admin, customer["id"], name="expired", expires_at=past)
    assert_error(message(relay, expired["key"]), 401, "authentication_error")
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert (
        message(relay, new_key(admin, customer["id"], expires_at=future)["key"]).status_code == 200
    )

    # suspension: 403 permission_error within 1 s; re-activation restores service
    before = fake.count(credential)
    patched = admin.patch(f"/admin/customers/{customer['id']}", json={"status": "suspended"})
    assert patched.status_code == 200
    response, sent = poll(
        lambda: message(relay, kept["key"]), lambda r: r.status_code == 403, within=1.0
    )
    assert_error(response, 403, "permission_error")
    assert sent <= 1.0, f"suspended customer still served {sent:.2f} s after the PATCH"
    assert_error(message(relay, kept["key"]), 403, "permission_error")
    after_suspension = fake.count(credential)
    assert admin.patch(f"/admin/customers/{customer['id']}", json={"status": "active"}).is_success
    response, sent = poll(
        lambda: message(relay, kept["key"]), lambda r: r.status_code == 200, within=1.0
    )
    assert response.status_code == 200 and sent <= 1.0
    # refused requests never reached the upstream (only polls that were served did)
    assert fake.count(credential) - before >= 1
    assert fake.count(credential) == after_suspension + 1
    assert_balance_is_ledger_sum(admin, customer["id"])
    # a key that served requests shows when it was last used (contract §5 key fields)
    keys_path = f"/admin/customers/{customer['id']}/keys"
    response, _sent = poll(
        lambda: admin.get(keys_path),
        lambda r: any(k["id"] == kept["id"] and k["last_used_at"] for k in r.json()["items"]),
        within=2.0,
    )
    listed = {k["id"]: k for k in response.json()["items"]}
    assert listed[kept["id"]]["last_used_at"] is not None, "last_used_at is never recorded"


# --- top-ups and adjustments -------------------------------------------------------------------


def test_topup_idempotency(admin: httpx.Client, relay: RelayServer) -> None:
    customer = new_customer(admin)
    cid = customer["id"]
    first = topup(admin, cid, "25.50", headers={"Idempotency-Key": "order-1"})
    assert first.status_code == 201, first.text
    entry = first.json()
    assert set(entry) >= ENTRY_FIELDS
    assert entry["kind"] == "topup" and entry["amount_usd"] == "25.500000"
    assert entry["balance_after_usd"] == "25.500000" and entry["request_id"] is None
    replay = topup(admin, cid, "25.50", headers={"Idempotency-Key": "order-1"})
    assert replay.status_code in (200, 201), replay.text
    assert replay.json() == entry
    # "25.5" is the same amount as "25.50"
    same = topup(admin, cid, "25.5", headers={"Idempotency-Key": "order-1"})
    assert same.status_code in (200, 201) and same.json() == entry
    assert balance_micros(admin, cid) == 25_500_000
    conflict = topup(admin, cid, "30", headers={"Idempotency-Key": "order-1"})
    assert_error(conflict, 409, "invalid_request_error")
    assert balance_micros(admin, cid) == 25_500_000
    assert len(ledger(admin, cid)) == 1

    # the same idempotency key on another customer is another top-up
    other = new_customer(admin, "other")
    assert topup(admin, other["id"], "1", headers={"Idempotency-Key": "order-1"}).status_code == 201
    assert balance_micros(admin, other["id"]) == 1_000_000

    # 20 concurrent first attempts with one key credit exactly once
    results: list[httpx.Response] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def attempt() -> None:
        with relay.admin() as client:
            barrier.wait(timeout=30)
            response = topup(client, cid, "1.000001", headers={"Idempotency-Key": "race"})
        with lock:
            results.append(response)

    threads = [threading.Thread(target=attempt) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 20
    assert all(r.status_code in (200, 201) for r in results), [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    assert {orjson.dumps(r.json()) for r in results} == {orjson.dumps(results[0].json())}
    assert balance_micros(admin, cid) == 26_500_001
    assert [e["kind"] for e in ledger(admin, cid)] == ["topup", "topup"]

    # without the header, two calls credit twice
    assert topup(admin, cid, "2").status_code == 201
    assert topup(admin, cid, "2").status_code == 201
    assert balance_micros(admin, cid) == 30_500_001

    # JSON numbers are read exactly
    ten = topup(admin, cid, 10)
    assert ten.status_code == 201 and ten.json()["amount_usd"] == "10.000000"
    half = topup(admin, cid, 2.5)
    assert half.status_code == 201 and half.json()["amount_usd"] == "2.500000"
    tenth = topup(admin, cid, 0.1)
    assert tenth.status_code == 201 and tenth.json()["amount_usd"] == "0.100000"
    assert balance_micros(admin, cid) == 43_100_001
    assert_balance_is_ledger_sum(admin, cid)

    # bad amounts change nothing
    entries_before = ledger(admin, cid)
    refusals = Refusals()
    bad_amounts: tuple[object, ...] = (
        "0",
        "0.000000",
        "-5",
        "abc",
        "1.0000001",
        "1e3",
        "",
        " ",
        "NaN",
        "Infinity",
        "+5",
        ".5",
        "5.",
        "1_000",
        "10000000000000",
        True,
        None,
        [5],
        {"usd": 5},
        0,
        -1,
    )
    topups = f"/admin/customers/{cid}/topups"
    refusals.check_all(
        admin,
        [("POST", topups, {"json": {"amount_usd": bad}}) for bad in bad_amounts]
        + [
            ("POST", topups, {"content": raw, "headers": JSON})
            for raw in (
                b'{"amount_usd": 1e309}',
                b'{"amount_usd": 1.0000001}',
                b'{"amount_usd": "5"',
            )
        ]
        + [
            ("POST", topups, {"json": extra})
            for extra in ({"amount_usd": "5", "kind": "adjustment"}, {"memo": "no amount"})
        ],
    )
    refusals.assert_none()
    # an invalid amount with an idempotency key does not burn the key
    assert_error(
        topup(admin, cid, "abc", headers={"Idempotency-Key": "later"}), 400, "invalid_request_error"
    )
    assert ledger(admin, cid) == entries_before
    assert balance_micros(admin, cid) == 43_100_001
    assert topup(admin, cid, "1", headers={"Idempotency-Key": "later"}).status_code == 201


def test_adjustments_and_ledger(admin: httpx.Client) -> None:
    customer = new_customer(admin)
    cid = customer["id"]
    assert topup(admin, cid, "10", headers={"Idempotency-Key": "t1"}).status_code == 201
    down = admin.post(
        f"/admin/customers/{cid}/adjustments", json={"amount_usd": "-2.25", "memo": "refund fix"}
    )
    assert down.status_code == 201, down.text
    entry = down.json()
    assert entry["kind"] == "adjustment" and entry["amount_usd"] == "-2.250000"
    assert entry["balance_after_usd"] == "7.750000" and entry["memo"] == "refund fix"
    up = admin.post(
        f"/admin/customers/{cid}/adjustments", json={"amount_usd": "0.000001", "memo": "goodwill"}
    )
    assert up.status_code == 201 and up.json()["balance_after_usd"] == "7.750001"
    number = admin.post(f"/admin/customers/{cid}/adjustments", json={"amount_usd": -1, "memo": "n"})
    assert number.status_code == 201 and number.json()["amount_usd"] == "-1.000000"
    # an adjustment may take the balance below zero (an operator correction)
    deep = admin.post(
        f"/admin/customers/{cid}/adjustments", json={"amount_usd": "-20", "memo": "chargeback"}
    )
    assert deep.status_code == 201 and deep.json()["balance_after_usd"] == "-13.249999"
    customer_now = admin.get(f"/admin/customers/{cid}").json()
    assert customer_now["balance_usd"] == "-13.249999"

    before = ledger(admin, cid)
    refusals = Refusals()
    bad_adjustments = (
        {"amount_usd": "5"},
        {"amount_usd": "5", "memo": ""},
        {"amount_usd": "5", "memo": "   "},
        {"amount_usd": "5", "memo": None},
        {"amount_usd": "0", "memo": "zero"},
        {"amount_usd": "abc", "memo": "m"},
        {"amount_usd": "-1.0000001", "memo": "m"},
        {"amount_usd": "--1", "memo": "m"},
        {"memo": "m"},
        {"amount_usd": "1", "memo": "m", "kind": "topup"},
        {"amount_usd": True, "memo": "m"},
    )
    adjustments = f"/admin/customers/{cid}/adjustments"
    refusals.check_all(admin, [("POST", adjustments, {"json": bad}) for bad in bad_adjustments])
    refusals.assert_none()
    assert ledger(admin, cid) == before

    # the ledger: newest first, every field, signed amounts, running balances
    for i in range(5):
        assert topup(admin, cid, f"1.{i}").status_code == 201
    entries = ledger(admin, cid)
    assert len(entries) == 10
    for item in entries:
        assert set(item) >= ENTRY_FIELDS
        assert item["kind"] in ("topup", "adjustment", "usage")
        assert_usd6(item["amount_usd"])
        assert_usd6(item["balance_after_usd"])
    assert [e["kind"] for e in entries] == ["topup"] * 5 + ["adjustment"] * 4 + ["topup"]
    assert [e["amount_usd"] for e in entries[:5]] == [
        "1.400000",
        "1.300000",
        "1.200000",
        "1.100000",
        "1.000000",
    ]
    stamps = [e["created_at"] for e in entries]
    assert stamps == sorted(stamps, reverse=True)
    running = 0
    for item in reversed(entries):
        running += micros(item["amount_usd"])
        assert micros(item["balance_after_usd"]) == running, item
    assert balance_micros(admin, cid) == running
    assert_balance_is_ledger_sum(admin, cid)

    # cursor pagination of the ledger walks every entry once, in the same order
    for limit in (1, 2, 4):
        assert all_pages(admin, f"/admin/customers/{cid}/ledger", limit) == entries
    first = admin.get(f"/admin/customers/{cid}/ledger", params={"limit": 4}).json()
    assert first["items"] == entries[:4] and first["next_cursor"]
    second = admin.get(
        f"/admin/customers/{cid}/ledger", params={"limit": 4, "cursor": first["next_cursor"]}
    ).json()
    assert second["items"] == entries[4:8]
    bad_cursor = admin.get(f"/admin/customers/{cid}/ledger", params={"cursor": "not-a-cursor"})
    assert_error(bad_cursor, 400, "invalid_request_error")


# --- prices ----------------------------------------------------------------------------------


def test_prices_list_and_put(admin: httpx.Client) -> None:
    listed = admin.get("/admin/prices")
    assert listed.status_code == 200
    rows = {row["model"]: row for row in listed.json()["items"]}
    for row in rows.values():
        assert set(row) >= PRICE_FIELDS
    haiku = rows["claude-haiku-4-5"]
    assert haiku["input_usd_per_mtok"] == "1" and haiku["output_usd_per_mtok"] == "5"
    assert haiku["cache_write_5m_usd_per_mtok"] == "1.25"
    assert haiku["cache_write_1h_usd_per_mtok"] == "2"
    assert haiku["cache_read_usd_per_mtok"] == "0.1"
    sonnet = rows["claude-sonnet-4-6"]
    assert (sonnet["input_usd_per_mtok"], sonnet["output_usd_per_mtok"]) == ("3", "15")
    assert sonnet["cache_read_usd_per_mtok"] == "0.3"

    full = {
        "input_usd_per_mtok": "0.8",
        "output_usd_per_mtok": "4",
        "cache_write_5m_usd_per_mtok": "1",
        "cache_write_1h_usd_per_mtok": "1.6",
        "cache_read_usd_per_mtok": "0.08",
    }
    created = admin.put("/admin/prices/claude-new-1", json=full)
    assert created.status_code in (200, 201), created.text
    assert {k: created.json()[k] for k in PRICE_FIELDS} == {"model": "claude-new-1", **full}
    replaced = admin.put(
        "/admin/prices/claude-new-1",
        json={"input_usd_per_mtok": "2", "output_usd_per_mtok": "10.5"},
    )
    assert replaced.status_code == 200, replaced.text
    # a re-created-from-scratch row answers the same status as the first creation
    recreated = admin.put("/admin/prices/claude-new-2", json=full)
    assert recreated.status_code == created.status_code
    row = replaced.json()
    assert row["input_usd_per_mtok"] == "2" and row["output_usd_per_mtok"] == "10.5"
    # cache rates not given default from the input rate (5m x1.25, 1h x2, read x0.1)
    assert row["cache_write_5m_usd_per_mtok"] == "2.5"
    assert row["cache_write_1h_usd_per_mtok"] == "4"
    assert row["cache_read_usd_per_mtok"] == "0.2"
    listed_rows = {r["model"]: r for r in admin.get("/admin/prices").json()["items"]}
    assert {k: listed_rows["claude-new-1"][k] for k in PRICE_FIELDS} == {
        k: row[k] for k in PRICE_FIELDS
    }
    # JSON integers are exact too; zero (a free model) is allowed
    free = admin.put(
        "/admin/prices/claude-free", json={"input_usd_per_mtok": 0, "output_usd_per_mtok": 0}
    )
    assert free.status_code in (200, 201) and free.json()["output_usd_per_mtok"] == "0"

    before = admin.get("/admin/prices").json()
    bad_prices: tuple[object, ...] = (
        {},
        {"input_usd_per_mtok": "1"},
        {"output_usd_per_mtok": "1"},
        {"input_usd_per_mtok": "-1", "output_usd_per_mtok": "1"},
        {"input_usd_per_mtok": "abc", "output_usd_per_mtok": "1"},
        {"input_usd_per_mtok": "1", "output_usd_per_mtok": "1e2"},
        {"input_usd_per_mtok": "1", "output_usd_per_mtok": "1.0000001"},
        {"input_usd_per_mtok": "1", "output_usd_per_mtok": True},
        {"input_usd_per_mtok": "1", "output_usd_per_mtok": [1]},
        {"input_usd_per_mtok": "1", "output_usd_per_mtok": "5", "cache_read_usd_per_mtok": "-1"},
        [],
        "1",
    )
    refusals = Refusals()
    refusals.check_all(
        admin,
        [
            ("PUT", f"/admin/prices/{model}", {"json": bad})
            for model in ("claude-new-1", "claude-bad-new")
            for bad in bad_prices
        ]
        + [
            (
                "PUT",
                "/admin/prices/claude%20spaced",
                {"json": {"input_usd_per_mtok": "1", "output_usd_per_mtok": "1"}},
            ),
            (
                "PUT",
                "/admin/prices/claude-new-1",
                {
                    "content": b'{"input_usd_per_mtok": 1e309, "output_usd_per_mtok": "1"}',
                    "headers": JSON,
                },
            ),
        ],
    )
    refusals.assert_none()
    assert admin.get("/admin/prices").json() == before


def test_new_price_row_prices_dated_ids_longest_prefix_wins(
    served: tuple[RelayServer, FakeUpstream, str], admin: httpx.Client
) -> None:
    relay, fake, _credential = served
    # models the sandbox does not know (it refuses unknown models, as Anthropic does)
    fake.add_model("claude-test-9-20990101")
    fake.add_model("claude-test-9-20880101")
    customer = new_customer(admin)
    assert topup(admin, customer["id"], "100").status_code == 201
    key = new_key(admin, customer["id"])["key"]

    unpriced = message(relay, key, model="claude-test-9-20990101")
    assert_error(unpriced, 400, "invalid_request_error")
    assert "claude-test-9" in unpriced.json()["error"]["message"]

    base = {"input_usd_per_mtok": "7", "output_usd_per_mtok": "11.5"}
    created = admin.put("/admin/prices/claude-test-9", json=base)
    assert created.status_code in (200, 201), created.text
    price = created.json()
    response = message(relay, key, model="claude-test-9-20990101", text="price me please")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "claude-test-9-20990101"
    cost = expected_cost_micros(body["usage"], price)
    assert response.headers["x-poolrelay-cost-usd"] == f"{Decimal(cost) / 1_000_000:.6f}"
    assert cost == body["usage"]["input_tokens"] * 7 + math.ceil(
        Decimal(body["usage"]["output_tokens"]) * Decimal("11.5")
    )

    # a longer prefix wins over a shorter one
    longer = admin.put(
        "/admin/prices/claude-test-9-2099",
        json={"input_usd_per_mtok": "70", "output_usd_per_mtok": "115"},
    )
    assert longer.status_code in (200, 201)
    longer_row = longer.json()
    response = message(relay, key, model="claude-test-9-20990101", text="price me please")
    assert response.status_code == 200
    cost_long = expected_cost_micros(response.json()["usage"], longer_row)
    assert response.headers["x-poolrelay-cost-usd"] == f"{Decimal(cost_long) / 1_000_000:.6f}"
    assert cost_long > cost
    # a sibling id only matches the shorter row
    response = message(relay, key, model="claude-test-9-20880101", text="price me please")
    assert response.status_code == 200
    cost_short = expected_cost_micros(response.json()["usage"], price)
    assert response.headers["x-poolrelay-cost-usd"] == f"{Decimal(cost_short) / 1_000_000:.6f}"
    # the customer's multiplier applies on top, rounded up once
    patched = admin.patch(
        f"/admin/customers/{customer['id']}", json={"price_multiplier": "1.333333"}
    )
    assert patched.status_code == 200
    time.sleep(1.1)  # the per-process key cache (<= 1 s) carries the multiplier
    response = message(relay, key, model="claude-test-9-20880101", text="price me please")
    usage = response.json()["usage"]
    exact = (
        Decimal(usage["input_tokens"]) * 7 + Decimal(usage["output_tokens"]) * Decimal("11.5")
    ) * Decimal("1.333333")
    assert (
        response.headers["x-poolrelay-cost-usd"] == f"{Decimal(math.ceil(exact)) / 1_000_000:.6f}"
    )
    assert_balance_is_ledger_sum(admin, customer["id"])


# --- accounts --------------------------------------------------------------------------------


def test_accounts_never_show_credentials_and_disable_enable(
    served: tuple[RelayServer, FakeUpstream, str], admin: httpx.Client
) -> None:
    relay, fake, credential = served
    customer = new_customer(admin)
    assert topup(admin, customer["id"], "10").status_code == 201
    key = new_key(admin, customer["id"])["key"]
    assert message(relay, key).status_code == 200  # headroom seen from the upstream

    listed = admin.get("/admin/accounts")
    assert listed.status_code == 200
    assert credential not in listed.text and credential[-12:] not in listed.text
    assert "ciphertext" not in listed.text.lower()

    async def stored_ciphertext() -> str:
        from pool import accounts as account_repo

        async with relay.services.db.transaction() as session:
            rows = await account_repo.list_accounts(session)
        return str(rows[0].credential_ciphertext)

    ciphertext = relay.call(stored_ciphertext)
    assert len(ciphertext) > 40 and ciphertext not in listed.text
    assert ciphertext[:40] not in listed.text
    page = listed.json()
    assert page["next_cursor"] is None and len(page["items"]) == 1
    account = page["items"][0]
    assert set(account) >= ACCOUNT_FIELDS
    assert account["name"] == "primary" and account["base_url"] == fake.url
    assert account["status"] == "active" and account["quarantine_reason"] is None
    assert account["fingerprint"] == "sk-ant-…" + credential[-4:]
    assert isinstance(account["in_flight"], int) and account["in_flight"] == 0
    assert isinstance(account["headroom"], dict)
    assert "group" in account and account["group"] is None

    disabled = admin.post(f"/admin/accounts/{account['id']}/disable")
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["status"] == "disabled"
    assert credential not in disabled.text and "ciphertext" not in disabled.text.lower()
    before = fake.count(credential)
    response = message(relay, key)
    assert_error(response, 529, "overloaded_error")
    assert fake.count(credential) == before
    assert admin.get("/admin/accounts").json()["items"][0]["status"] == "disabled"
    # a refused request is not charged
    assert [e["kind"] for e in ledger(admin, customer["id"])] == ["usage", "topup"]
    assert admin.get(f"/admin/customers/{customer['id']}").json()["held_usd"] == "0.000000"

    enabled = admin.post(f"/admin/accounts/{account['id']}/enable")
    assert enabled.status_code == 200 and enabled.json()["status"] == "active"
    assert message(relay, key).status_code == 200
    assert fake.count(credential) == before + 1

    for path in ("/admin/accounts/acc_nope/enable", "/admin/accounts/acc_nope/disable"):
        assert_error(admin.post(path), 404, "not_found_error")
    assert admin.get("/admin/accounts").json()["items"][0]["status"] == "active"


def test_every_list_is_paginated(relay: RelayServer, admin: httpx.Client) -> None:
    """Contract §5: lists are paginated with ``cursor`` and ``limit`` (1-100)."""
    for i in range(3):
        relay.add_account(f"acct-{i}", upstream_key(), "http://127.0.0.1:9")
    customer = new_customer(admin)
    for _ in range(3):
        new_key(admin, customer["id"])
        assert topup(admin, customer["id"], "1").status_code == 201
    lists = {
        "/admin/customers": 1,
        f"/admin/customers/{customer['id']}/keys": 3,
        f"/admin/customers/{customer['id']}/ledger": 3,
        "/admin/accounts": 3,
        "/admin/prices": len(admin.get("/admin/prices", params={"limit": 100}).json()["items"]),
    }
    problems: list[str] = []
    for path, total in lists.items():
        everything = admin.get(path, params={"limit": 100}).json()
        if len(everything["items"]) != total:
            problems.append(f"{path}?limit=100: {len(everything['items'])} items, not {total}")
        first = admin.get(path, params={"limit": 2}).json()
        if len(first["items"]) > 2 or (total > 2 and not first["next_cursor"]):
            problems.append(
                f"{path}?limit=2 answered {len(first['items'])} items, "
                f"next_cursor={first['next_cursor']!r}"
            )
            continue
        walked = all_pages(admin, path, 2)
        if walked != everything["items"]:
            problems.append(f"{path}: walking pages of 2 does not give every item once")
        for bad in ("0", "101"):
            status = admin.get(path, params={"limit": bad}).status_code
            if status != 400:
                problems.append(f"{path}?limit={bad} -> {status}, not 400")
    assert not problems, "\n".join(problems)


# --- usage, the request log, /v1/me ------------------------------------------------------------


def test_usage_requests_and_me(
    served: tuple[RelayServer, FakeUpstream, str], admin: httpx.Client
) -> None:
    relay, _fake, _credential = served
    customer = new_customer(admin)
    cid = customer["id"]
    assert topup(admin, cid, "20").status_code == 201
    key_a = new_key(admin, cid, name="a", rpm=100, daily_budget_usd="9")
    key_b = new_key(admin, cid, name="b")
    other = new_customer(admin, "other")
    assert topup(admin, other["id"], "5").status_code == 201
    other_key = new_key(admin, other["id"])["key"]

    cached_system = [
        {
            "type": "text",
            "text": "You are a careful assistant. " * 40,
            "cache_control": {"type": "ephemeral"},
        }
    ]
    calls: list[tuple[str, str, dict[str, Any]]] = [
        (key_a["key"], MODEL, {}),
        (key_a["key"], MODEL, {"system": cached_system}),
        (key_a["key"], MODEL, {"system": cached_system}),
        (key_b["key"], "claude-sonnet-4-6", {}),
        (key_b["key"], "claude-sonnet-4-6", {"stream": False}),
    ]
    responses: list[httpx.Response] = []
    for key, model, extra in calls:
        response = message(relay, key, model=model, text="count this usage", **extra)
        assert response.status_code == 200, response.text
        responses.append(response)
    assert message(relay, other_key).status_code == 200  # another customer's usage

    usages = [r.json()["usage"] for r in responses]
    expected = {
        "requests": len(responses),
        "input_tokens": sum(u["input_tokens"] for u in usages),
        "output_tokens": sum(u["output_tokens"] for u in usages),
        "cache_write_tokens": sum(u.get("cache_creation_input_tokens") or 0 for u in usages),
        "cache_read_tokens": sum(u.get("cache_read_input_tokens") or 0 for u in usages),
        "cost_usd": f"{Decimal(sum(micros(r.headers['x-poolrelay-cost-usd']) for r in responses)) / 1_000_000:.6f}",
    }
    assert expected["cache_write_tokens"] > 0 and expected["cache_read_tokens"] > 0
    result = admin.get("/admin/usage", params={"customer_id": cid})
    assert result.status_code == 200, result.text
    totals = result.json()["totals"]
    assert set(totals) >= TOTALS_FIELDS
    assert {k: totals[k] for k in TOTALS_FIELDS} == expected
    # the balance moved by exactly the reported costs
    assert balance_micros(admin, cid) == 20_000_000 - micros(expected["cost_usd"])
    assert_balance_is_ledger_sum(admin, cid)
    usage_entries = [e for e in ledger(admin, cid) if e["kind"] == "usage"]
    request_ids = [r.headers["x-poolrelay-request-id"] for r in responses]
    assert sorted(e["request_id"] for e in usage_entries) == sorted(request_ids)
    by_request = {e["request_id"]: e for e in usage_entries}
    for response in responses:
        entry = by_request[response.headers["x-poolrelay-request-id"]]
        assert entry["amount_usd"] == "-" + response.headers["x-poolrelay-cost-usd"]

    everyone = admin.get("/admin/usage").json()["totals"]
    assert everyone["requests"] == len(responses) + 1

    by_model = admin.get("/admin/usage", params={"customer_id": cid, "group_by": "model"})
    assert by_model.status_code == 200
    model_items = by_model.json()["items"]
    assert {item["model"] for item in model_items} == {r.json()["model"] for r in responses}
    for item in model_items:
        mine = [r for r in responses if r.json()["model"] == item["model"]]
        assert item["requests"] == len(mine)
        assert item["output_tokens"] == sum(r.json()["usage"]["output_tokens"] for r in mine)
        assert micros(item["cost_usd"]) == sum(
            micros(r.headers["x-poolrelay-cost-usd"]) for r in mine
        )
    by_day = admin.get("/admin/usage", params={"customer_id": cid, "group_by": "day"}).json()
    assert len(by_day["items"]) == 1
    assert by_day["items"][0]["day"] == datetime.now(UTC).date().isoformat()
    assert by_day["items"][0]["requests"] == len(responses)
    by_key = admin.get("/admin/usage", params={"customer_id": cid, "group_by": "key"}).json()
    counts = {item["key_id"]: item["requests"] for item in by_key["items"]}
    assert counts == {key_a["id"]: 3, key_b["id"]: 2}
    only_b = admin.get("/admin/usage", params={"key_id": key_b["id"]}).json()["totals"]
    assert only_b["requests"] == 2
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    later = admin.get("/admin/usage", params={"customer_id": cid, "from": tomorrow}).json()
    assert later["totals"]["requests"] == 0 and later["totals"]["cost_usd"] == "0.000000"
    for bad in ({"group_by": "color"}, {"group_by": "model,nope"}, {"from": "yesterday"}):
        assert_error(admin.get("/admin/usage", params=bad), 400, "invalid_request_error")

    # the request log: ids, tokens, cost, status, upstream request id; no bodies
    log = admin.get("/admin/requests", params={"customer_id": cid, "limit": 100})
    assert log.status_code == 200
    assert "count this usage" not in log.text and "careful assistant" not in log.text
    rows = {row["id"]: row for row in log.json()["items"]}
    assert set(rows) == set(request_ids)
    for response in responses:
        row = rows[response.headers["x-poolrelay-request-id"]]
        usage = response.json()["usage"]
        assert row["status"] == "ok"
        assert row["upstream_request_id"] == response.headers["request-id"]
        assert row["input_tokens"] == usage["input_tokens"]
        assert row["output_tokens"] == usage["output_tokens"]
        assert row["cache_read_tokens"] == (usage.get("cache_read_input_tokens") or 0)
        assert row["cost_usd"] == response.headers["x-poolrelay-cost-usd"]
        assert "request_body" not in row and "response_body" not in row
    paged = all_pages(admin, "/admin/requests", 2, customer_id=cid)
    assert sorted(r["id"] for r in paged) == sorted(request_ids)
    assert_error(
        admin.get("/admin/requests", params={"group_by": "model"}), 400, "invalid_request_error"
    )

    # /v1/me and /v1/me/usage with a customer key
    me = httpx.get(f"{relay.url}/v1/me", headers={"x-api-key": key_a["key"]}, timeout=30)
    assert me.status_code == 200, me.text
    me_body = me.json()
    now = admin.get(f"/admin/customers/{cid}").json()
    for field in ("balance_usd", "held_usd", "available_usd"):
        assert me_body[field] == now[field]
        assert_usd6(me_body[field])
    limits = me_body["limits"]
    assert limits["rpm"] == 100 and limits["daily_budget_usd"] == "9.000000"
    assert "tpm" in limits and "monthly_budget_usd" in limits
    assert key_a["key"] not in me.text
    bearer = httpx.get(
        f"{relay.url}/v1/me", headers={"authorization": f"Bearer {key_b['key']}"}, timeout=30
    )
    assert bearer.status_code == 200 and bearer.json()["balance_usd"] == now["balance_usd"]
    my_usage = httpx.get(
        f"{relay.url}/v1/me/usage", headers={"x-api-key": key_b["key"]}, timeout=30
    )
    assert my_usage.status_code == 200
    assert {k: my_usage.json()["totals"][k] for k in TOTALS_FIELDS} == expected
    grouped = httpx.get(
        f"{relay.url}/v1/me/usage",
        params={"group_by": "key"},
        headers={"x-api-key": key_b["key"]},
        timeout=30,
    ).json()
    assert {item["key_id"]: item["requests"] for item in grouped["items"]} == counts
    others = httpx.get(f"{relay.url}/v1/me/usage", headers={"x-api-key": other_key}, timeout=30)
    assert others.json()["totals"]["requests"] == 1
    for params in ({"group_by": "customer"}, {"group_by": "bogus"}, {"to": "soon"}):
        response = httpx.get(
            f"{relay.url}/v1/me/usage", params=params, headers={"x-api-key": key_b["key"]}
        )
        assert_error(response, 400, "invalid_request_error")
    for headers in ({}, {"x-api-key": "sk-pr-" + "x" * 43}, {"x-api-key": "nonsense"}):
        for path in ("/v1/me", "/v1/me/usage"):
            assert_error(
                httpx.get(f"{relay.url}{path}", headers=headers, timeout=30),
                401,
                "authentication_error",
            )


# --- no input produces a 500 --------------------------------------------------------------------


def test_garbage_never_produces_a_500(
    served: tuple[RelayServer, FakeUpstream, str], admin: httpx.Client
) -> None:
    relay, _fake, _credential = served
    customer = new_customer(admin)
    cid = customer["id"]
    assert topup(admin, cid, "5").status_code == 201
    key = new_key(admin, cid)
    json_headers = {"content-type": "application/json"}
    garbage_bodies: list[bytes] = [
        b"",
        b"null",
        b"[]",
        b"123",
        b'"str"',
        b"{",
        b"\xff\xfe\x00",
        b'{"name": {"nested": 1}}',
        b'{"name": "a\\u0000b"}',
        b'{"name": "ok", "price_multiplier": "1' + b"0" * 5000 + b'"}',
        b'{"amount_usd": "9' * 3 + b'"}',
        b'{"amount_usd": 1e400, "memo": "m"}',
        b'{"amount_usd": "1", "memo": "' + b"m" * 600 + b'"}',
        b'{"amount_usd": "1", "memo": "nul\\u0000"}',
        b'{"input_usd_per_mtok": {"a": 1}, "output_usd_per_mtok": null}',
        b'{"rpm": 1e100, "expires_at": "9999-99-99"}',
        b'{"expires_at": 1e20}',
        b'{"allowed_models": [null]}',
        b'{"status": ["active"]}',
    ]
    targets = [
        ("POST", "/admin/customers"),
        ("PATCH", f"/admin/customers/{cid}"),
        ("POST", f"/admin/customers/{cid}/keys"),
        ("POST", f"/admin/customers/{cid}/topups"),
        ("POST", f"/admin/customers/{cid}/adjustments"),
        ("PUT", "/admin/prices/claude-fuzz"),
    ]
    # (method, url, body, headers)
    calls: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        (method, path, raw, json_headers) for method, path in targets for raw in garbage_bodies
    ]
    odd_ids = ["%00", "a%00b", "x" * 500, "..%2F..%2Fetc", "%E2%9C%93", "%FF", "'%20OR%201=1--"]
    odd_body = b'{"amount_usd": "1", "name": "x", "input_usd_per_mtok": "1"}'
    for odd in odd_ids:
        for method, path in (
            ("GET", f"/admin/customers/{odd}"),
            ("PATCH", f"/admin/customers/{odd}"),
            ("GET", f"/admin/customers/{odd}/ledger"),
            ("GET", f"/admin/customers/{odd}/keys"),
            ("POST", f"/admin/customers/{odd}/topups"),
            ("DELETE", f"/admin/keys/{odd}"),
            ("POST", f"/admin/accounts/{odd}/enable"),
            ("PUT", f"/admin/prices/{odd}"),
        ):
            calls.append((method, path, odd_body, json_headers))
    queries = [
        "/admin/customers?limit=99999999999999999999999",
        "/admin/customers?cursor=" + "z" * 300,
        "/admin/customers?cursor=%00",
        f"/admin/customers/{cid}/ledger?cursor=99999999999999999999999",
        f"/admin/customers/{cid}/ledger?cursor=-1",
        f"/admin/customers/{cid}/ledger?cursor=%00",
        "/admin/usage?from=2026-13-45",
        "/admin/usage?from=9999-12-31T23:59:59&to=0001-01-01",
        "/admin/usage?to=9999-12-31",
        "/admin/usage?from=0001-01-01",
        "/admin/usage?group_by=,,,",
        "/admin/usage?group_by=model,model",
        "/admin/usage?customer_id=%00",
        "/admin/requests?cursor=%00",
        "/admin/requests?status=%00&model=%FF",
        "/admin/requests?limit=abc",
        "/admin/requests/nope",
        "/admin/nope",
        "/admin/customers/" + cid + "/nope",
    ]
    calls += [("GET", query, None, {}) for query in queries]
    # customer side
    customer_headers = {"x-api-key": key["key"], "anthropic-version": "2023-06-01"}
    for customer_raw in [
        *garbage_bodies,
        b'{"model": ["x"], "max_tokens": 5, "messages": []}',
        b'{"model": "claude-haiku-4-5", "max_tokens": 1e400, "messages": []}',
        b'{"model": "claude-haiku-4-5", "max_tokens": 99999999999999999999999, "messages": []}',
        b'{"model": "claude-haiku-4-5", "max_tokens": 5, "messages": "hi"}',
        b'{"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": 5}]}',
        b'{"model": "\\u0000", "max_tokens": 5, "messages": []}',
    ]:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            calls.append(("POST", path, customer_raw, {**customer_headers, **json_headers}))
    for query in (
        "/v1/me/usage?from=%00",
        "/v1/me/usage?to=9999-12-31",
        "/v1/me/usage?group_by=%FF",
        "/v1/models?limit=abc",
        "/v1/models?limit=-1&after_id=%00",
        "/v1/models/%00",
        "/v1/nope",
    ):
        calls.append(("GET", query, None, customer_headers))

    with httpx.Client(base_url=relay.url, timeout=30, limits=POOL_LIMITS) as client:
        admin_auth = {"authorization": admin.headers["authorization"]}

        def send(call: tuple[str, str, bytes | None, dict[str, str]]) -> httpx.Response | str:
            method, path, raw, headers = call
            if path.startswith("/admin/"):
                headers = {**admin_auth, **headers}
            # A kept-alive connection the server had closed: try once more on a fresh one.
            with contextlib.suppress(httpx.TransportError):
                return client.request(method, path, content=raw, headers=headers)
            try:
                return httpx.request(method, f"{relay.url}{path}", content=raw, headers=headers)
            except httpx.TransportError as exc:  # the server dropped the connection
                return f"{type(exc).__name__}: {exc}"

        responses = fan_out(send, calls)
    problems: list[str] = []
    for (method, path, raw, _headers), response in zip(calls, responses, strict=True):
        what = f"{method} {path[:80]} {(raw or b'')[:60]!r}"
        if isinstance(response, str):
            problems.append(f"{what} -> {response}")
        elif response.status_code >= 500:
            problems.append(f"{what} -> {response.status_code} {response.text[:200]}")
        elif response.status_code >= 400:
            body = response.json()
            assert body["type"] == "error" and body["error"]["type"], what
    assert not problems, "\n".join(problems)
    assert_balance_is_ledger_sum(admin, cid)


def test_a_write_is_committed_before_its_answer_is_sent(
    relay: RelayServer, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 201 for a top-up must mean the top-up is in the ledger: the admin request's
    transaction commits before the response leaves. Commits are made slow here, so that an
    answer sent before its commit would be read, from another connection, ahead of it."""
    import sqlalchemy as sa

    from app.db import sync_url

    db = relay.services.db
    transaction = db.transaction

    @contextlib.asynccontextmanager
    async def slow_commit() -> Any:
        async with transaction() as session:
            yield session
            await asyncio.sleep(0.5)  # the commit happens when this block exits

    customer = new_customer(admin)
    monkeypatch.setattr(db, "transaction", slow_commit)
    response = topup(admin, customer["id"], "10")
    assert response.status_code == 201
    engine = sa.create_engine(sync_url(relay.settings.database_url))
    try:
        with engine.connect() as conn:
            entries = conn.execute(
                sa.text("SELECT count(*) FROM ledger_entries WHERE customer_id = :c"),
                {"c": customer["id"]},
            ).scalar_one()
    finally:
        engine.dispose()
    assert entries == 1
