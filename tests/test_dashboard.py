"""The operator dashboard at ``/admin/ui``, loaded in headless Chromium (Debian's ``chromium``).

Chromium is driven by its command line: ``--dump-dom`` for what the page rendered after its
scripts ran (``--virtual-time-budget`` lets the fetches and timers settle) and ``--screenshot``
for ``tests/artifacts/dashboard.png``. The page itself is public and carries no data; every
figure on it comes from the admin API with the token from the URL fragment.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import struct
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import ADMIN_TOKEN, FakeUpstream, RelayServer
from tests.system import require_program

ARTIFACTS = Path(__file__).parent / "artifacts"
PRIMARY_KEY = "sk-ant-api03-dashboard-primary-0001"
SPARE_KEY = "sk-ant-api03-dashboard-spare-0002"
PRIMARY = "pool-alpha-01"
SPARE = "pool-bravo-02"
CUSTOMER = "Acme Rockets Ltd"
HOSTILE_NAME = '<img src=x onerror="alert(1)">Globex & "Co"'
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
    "--window-size=1400,1000",
]


def chromium_binary() -> str:
    """Debian's ``chromium``: the test skips without it (fails under ``POOLRELAY_CI=1``)."""
    return require_program(
        ("chromium", "chromium-browser"),
        install_hint="apt-get update && apt-get install -y chromium",
    )


@pytest.fixture(autouse=True)
def _chromium() -> str:
    """Look for the browser before any server or data is set up."""
    return chromium_binary()


def run_chromium(url: str, workdir: Path, screenshot: Path | None = None) -> str:
    """Load ``url`` in a fresh headless profile and return the DOM after the scripts ran."""
    profile = workdir / f"chromium-{time.monotonic_ns()}"
    profile.mkdir(parents=True)
    args = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    args += ["--dump-dom", url]
    env = {**os.environ, "HOME": str(profile)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=90, env=env, check=False)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    assert "<html" in proc.stdout, f"no DOM dumped; stderr: {proc.stderr[-2000:]}"
    return proc.stdout


def address_bar(url: str, workdir: Path) -> str:
    """The page's URL once its script ran (read over the DevTools HTTP endpoint)."""
    profile = workdir / f"chromium-{time.monotonic_ns()}"
    profile.mkdir(parents=True)
    args = [
        chromium_binary(),
        *(flag for flag in CHROMIUM_FLAGS if not flag.startswith("--virtual-time-budget")),
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        url,
    ]
    env = {**os.environ, "HOME": str(profile)}
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        current = ""
        while time.monotonic() < deadline:
            port_file = profile / "DevToolsActivePort"
            if port_file.exists() and port_file.read_text().strip():
                port = port_file.read_text().split()[0]
                try:
                    targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                except httpx.HTTPError:
                    targets = []
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    current = str(pages[0]["url"])
                    if "#" not in current and current.startswith("http"):
                        return current
            time.sleep(0.1)
        return current
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Dom(HTMLParser):
    """The dumped DOM: every element's attributes, and the text under each element with an id."""

    VOID = frozenset(
        {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "wbr"}
    )

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.by_id: dict[str, dict[str, str]] = {}
        self.text: dict[str, str] = {}
        self._open: list[str | None] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.elements.append((tag, values))
        if "id" in values:
            self.by_id[values["id"]] = values
            self.text.setdefault(values["id"], "")
        if tag not in self.VOID:
            self._open.append(values.get("id"))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.elements.append((tag, values))

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element_id in self._open:
            if element_id is not None:
                self.text[element_id] += data + " "

    def hidden(self, element_id: str) -> bool:
        return "hidden" in self.by_id[element_id]

    def tagged(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [
            values
            for name, values in self.elements
            if name == tag and all(values.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


def page_response(relay: RelayServer) -> httpx.Response:
    response = httpx.get(f"{relay.url}/admin/ui", timeout=10)
    if response.status_code == 404:
        pytest.fail(
            "GET /admin/ui is 404: app/main.py must mount the dashboard router, "
            "app.include_router(admin_ui.router), WITHOUT the require_admin dependency"
        )
    assert response.status_code == 200, (
        f"/admin/ui must be public (the page has no data): got {response.status_code}"
    )
    return response


def send(relay: RelayServer, key: str, model: str, *, stream: bool = False) -> str:
    response = httpx.post(
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={
            "model": model,
            "max_tokens": 24,
            "stream": stream,
            "messages": [{"role": "user", "content": f"dashboard {model}"}],
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.headers["x-poolrelay-request-id"]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def populated(relay: RelayServer, fake: FakeUpstream) -> dict[str, Any]:
    """A pool of two accounts (one quarantined), two customers and a few billed requests."""
    for credential in (PRIMARY_KEY, SPARE_KEY):
        fake.limits(credential, requests_limit=10)
    primary = relay.add_account(PRIMARY, PRIMARY_KEY, fake.url)
    spare = relay.add_account(SPARE, SPARE_KEY, fake.url)
    customer_id, key = relay.create_customer(balance_usd="10", name=CUSTOMER)
    relay.create_customer(balance_usd="2.5", name=HOSTILE_NAME)
    request_ids = [send(relay, key, "claude-haiku-4-5")]
    # After the pool has seen both accounts (a first sighting starts an account afresh).
    services = relay.services
    relay.call(
        lambda: services.scheduler.quarantine(
            spare, "rate_limited", time.time() + 300, "429 rate_limit_error: slow down"
        )
    )
    request_ids += [
        send(relay, key, "claude-sonnet-4-5"),
        send(relay, key, "claude-haiku-4-5", stream=True),
        send(relay, key, "claude-haiku-4-5"),
    ]
    with relay.admin() as admin:
        accounts = admin.get("/admin/accounts").raise_for_status().json()["items"]
    return {
        "primary": primary,
        "spare": spare,
        "accounts": {a["name"]: a for a in accounts},
        "customer": relay.customer(customer_id),
        "request_ids": request_ids,
    }


def assert_strict_csp(policy: str, body: str) -> dict[str, list[str]]:
    """The operator pages' CSP: nothing by default, fetches to the same origin only, never
    framed, and exactly the page's own inline scripts and styles, by hash. Returns the
    policy's directives."""
    csp = {part.split()[0]: part.split()[1:] for part in policy.split(";")}
    assert csp["default-src"] == ["'none'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    for kind in ("script", "style"):
        blocks = re.findall(rf"<{kind}>(.*?)</{kind}>", body, re.DOTALL)
        assert blocks, kind
        hashes = [
            "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
            for b in blocks
        ]
        assert csp[f"{kind}-src"] == hashes
    assert "unsafe-inline" not in policy
    return csp


def test_dashboard_renders_live_data(
    relay: RelayServer, populated: dict[str, Any], tmp_path: Path
) -> None:
    page_response(relay)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)

    html = run_chromium(f"{relay.url}/admin/ui#token={ADMIN_TOKEN}", tmp_path, screenshot=shot)
    dom = Dom(html)

    assert dom.tagged("body", data_state="ready"), dom.tagged("body")
    assert dom.hidden("login")
    for section in ("pool", "customers", "usage", "requests"):
        assert not dom.hidden(section), section
    assert ADMIN_TOKEN not in html

    # Pool health: names, status with reason, headroom bars, in-flight, last error, fingerprint.
    accounts = populated["accounts"]
    assert accounts[PRIMARY]["status"] == "active"
    assert accounts[SPARE]["status"] == "quarantined"
    for name, account in accounts.items():
        row = dom.text[f"account-{account['id']}"]
        assert name in row and account["status"] in row and account["fingerprint"] in row
        seen = account["headroom"].get("requests")  # an account not used yet has none
        if seen:
            assert f"{seen['remaining']:,} / {seen['limit']:,}" in row
        else:
            assert "no limits seen yet" in row
        cap = account["max_concurrency"]  # none by default: the count alone
        assert (f"{account['in_flight']} / {cap}" if cap else f" {account['in_flight']} ") in row
    spare = dom.text[f"account-{populated['spare']}"]
    assert "rate_limited" in spare and "until" in spare
    assert "429 rate_limit_error: slow down" in spare
    assert accounts[PRIMARY]["headroom"]["requests"]["limit"] == 10  # it served requests
    bars = dom.tagged("div", **{"class": "bar", "data-family": "requests"})
    assert bars and all("remaining" in b["title"] for b in bars)

    # Customers: the API's decimal strings, verbatim; a hostile name is text, not markup.
    customers = dom.text["customers-body"]
    customer = populated["customer"]
    assert CUSTOMER in customers
    assert customer["balance_usd"] != "10.000000"
    assert f"${customer['balance_usd']}" in customers
    assert f"${customer['available_usd']}" in customers
    assert HOSTILE_NAME in customers
    assert not dom.tagged("img"), "API data was parsed as HTML"
    assert "&lt;img src=x" in html

    # Recent requests: every request id, with model, status and ttfb.
    recent = dom.text["requests-body"]
    for request_id in populated["request_ids"]:
        assert request_id in recent
        assert dom.tagged("tr", data_request_id=request_id)
    assert "claude-sonnet-4-5-20250929" in recent and " ms" in recent

    # Charts: SVG bars by day and by model, their lengths from the API's cost strings.
    with relay.admin() as admin:
        by_day = admin.get("/admin/usage", params={"group_by": "day"}).raise_for_status().json()
        by_model = admin.get("/admin/usage", params={"group_by": "model"}).raise_for_status().json()
    assert by_day["totals"]["requests"] == 4
    today = by_day["items"][-1]
    assert dom.tagged("svg", id="chart-day") and dom.tagged("svg", id="chart-model")
    day_bars = dom.tagged("rect", data_day=today["day"])
    assert day_bars and day_bars[0]["data-cost"] == today["cost_usd"]
    assert len([r for r in dom.elements if r[0] == "rect" and "data-day" in r[1]]) == 14
    for item in by_model["items"]:
        bars = dom.tagged("rect", data_model=item["model"])
        assert bars and bars[0]["data-cost"] == item["cost_usd"], item
    assert f"${by_day['totals']['cost_usd']}" in dom.text["usage-body"]

    # The token left the address bar (history.replaceState) once the page had read it.
    assert address_bar(f"{relay.url}/admin/ui#token={ADMIN_TOKEN}", tmp_path) == (
        f"{relay.url}/admin/ui"
    )

    data = shot.read_bytes()
    assert png_size(data) == (1400, 1000)
    assert len(data) > 10_000, f"screenshot is only {len(data)} bytes"


def test_login_form_without_token_and_no_data_through_the_page(
    relay: RelayServer, populated: dict[str, Any], tmp_path: Path
) -> None:
    response = page_response(relay)
    body = response.text

    # The page is static: no token, no data, the same bytes whoever asks.
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert ADMIN_TOKEN not in body
    for secret in (PRIMARY, SPARE, CUSTOMER, populated["primary"], PRIMARY_KEY, SPARE_KEY):
        assert secret not in body
    authed = httpx.get(
        f"{relay.url}/admin/ui", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )
    assert authed.content == response.content

    # A strict CSP that admits exactly the page's inline script and style, by hash.
    assert_strict_csp(response.headers["content-security-policy"], body)

    # The data is still behind the admin token.
    for path in (
        "/admin/accounts",
        "/admin/customers",
        "/admin/usage?group_by=day",
        "/admin/usage?group_by=model",
        "/admin/requests?limit=20",
    ):
        for headers in ({}, {"authorization": "Bearer wrong-token"}):
            denied = httpx.get(f"{relay.url}{path}", headers=headers, timeout=10)
            assert denied.status_code == 401, (path, headers, denied.text)
            assert PRIMARY not in denied.text and CUSTOMER not in denied.text

    # In the browser, without a fragment: the sign-in form and nothing else.
    dom = Dom(run_chromium(f"{relay.url}/admin/ui", tmp_path))
    assert dom.tagged("body", data_state="login")
    assert not dom.hidden("login")
    for section in ("pool", "customers", "usage", "requests"):
        assert dom.hidden(section), section
    shown = " ".join(dom.text.values())
    assert PRIMARY not in shown and CUSTOMER not in shown
    assert not dom.tagged("tr", data_account_id=populated["primary"])

    # A wrong token: the API says 401 and the page goes back to the sign-in form, visibly.
    dom = Dom(run_chromium(f"{relay.url}/admin/ui#token=wrong-token", tmp_path))
    assert dom.tagged("body", data_state="login")
    assert not dom.hidden("login")
    assert "rejected" in dom.text["login-msg"]
    assert PRIMARY not in " ".join(dom.text.values())
