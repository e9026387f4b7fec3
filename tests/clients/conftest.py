"""Shared fixtures of the client tests: a relay in front of a pool of two sandbox accounts, a
funded customer key, the admin views the tests compare with what the sandbox saw, and the
pinned JavaScript clients (installed once per machine, see ``tests/clients/node.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import pytest

from tests.clients.node import NodeSetupError, NodeTools, ensure_installed
from tests.harness import FakeUpstream, RelayServer
from tests.system import require_program, unavailable

T = TypeVar("T")

MODEL = "claude-haiku-4-5"
MODEL_ID = "claude-haiku-4-5-20251001"
"""What the alias resolves to (the sandbox's, and Anthropic's, dated id)."""
ACCOUNT_KEYS = ("sk-ant-api03-clients-alpha-0001", "sk-ant-api03-clients-bravo-0002")
BALANCE_USD = "10"


@dataclass
class Pool:
    relay: RelayServer
    fake: FakeUpstream
    customer_id: str
    key: str
    accounts: dict[str, str] = field(default_factory=dict)
    """account id -> the sandbox credential it holds"""

    @property
    def url(self) -> str:
        return self.relay.url

    def requests_log(self, **params: Any) -> list[dict[str, Any]]:
        """This customer's rows of ``GET /admin/requests``, oldest first."""
        items: list[dict[str, Any]] = []
        cursor = None
        with self.relay.admin() as admin:
            while True:
                query: dict[str, Any] = {"customer_id": self.customer_id, "limit": 100, **params}
                if cursor:
                    query["cursor"] = cursor
                page = admin.get("/admin/requests", params=query).raise_for_status().json()
                items.extend(page["items"])
                cursor = page["next_cursor"]
                if not cursor:
                    return items[::-1]

    def message_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.requests_log() if r["endpoint"] == "messages"]

    def usage_entries(self) -> list[dict[str, Any]]:
        return [e for e in self.relay.ledger(self.customer_id) if e["kind"] == "usage"]

    def spent_micros(self) -> int:
        balance = Decimal(self.relay.customer(self.customer_id)["balance_usd"])
        return int((Decimal(BALANCE_USD) - balance) * 1_000_000)

    def upstream_messages(self) -> list[dict[str, Any]]:
        """The ``/v1/messages`` requests the sandbox received (oldest first)."""
        return [r for r in self.fake.requests(limit=200) if r["path"] == "/v1/messages"]


def wait_for(probe: Callable[[], T | None], *, timeout: float = 5.0, what: str = "it") -> T:
    """Poll ``probe`` until it returns something truthy (settlement runs just after a response)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def pool(relay: RelayServer, fake: FakeUpstream) -> Pool:
    """Two sandbox accounts and a customer with a funded key (``$10``)."""
    accounts = {
        relay.add_account(f"sandbox-{i}", credential, fake.url): credential
        for i, credential in enumerate(ACCOUNT_KEYS, start=1)
    }
    customer_id, key = relay.create_customer(balance_usd=BALANCE_USD, name="clients")
    return Pool(relay, fake, customer_id, key, accounts)


@pytest.fixture(scope="session")
def node_tools() -> NodeTools:
    """The pinned npm packages, installed into the cache on first use (skips without node and
    npm, or when the install fails; fails instead under ``POOLRELAY_CI=1``)."""
    require_program("node", install_hint="apt-get install nodejs")
    require_program("npm", install_hint="apt-get install npm")
    try:
        return ensure_installed()
    except NodeSetupError as exc:
        unavailable(f"the JavaScript client tests need npm packages: {exc}")
