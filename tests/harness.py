"""Real servers on 127.0.0.1 for the tests: the fake upstream and the relay, each in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import uvicorn

from app.settings import Settings

T = TypeVar("T")
ADMIN_TOKEN = "test-admin-token"
# Contract §5: the fields of an account in the admin API (and `accounts list --json`).
ACCOUNT_FIELDS = frozenset(
    {
        "id",
        "name",
        "group",
        "base_url",
        "status",
        "quarantine_reason",
        "quarantined_until",
        "in_flight",
        "headroom",
        "last_error",
        "fingerprint",
    }
)


def _free_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only then.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ThreadServer:
    """uvicorn serving an ASGI app from a background thread with its own event loop."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = _free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # surfaced by start()
            self.error = exc
        finally:
            loop.close()

    def start_thread(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"server failed to start: {self.error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 30 s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        with contextlib.suppress(OSError):
            self.sock.close()

    def call(self, factory: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        """Run a coroutine on the server's event loop (where its database and Redis live)."""
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(factory(), self.loop)  # type: ignore[arg-type]
        return future.result(timeout)


class FakeUpstream(ThreadServer):
    @classmethod
    def start(cls) -> FakeUpstream:
        from app.sandbox import create_fake_app

        server = cls(create_fake_app())
        server.start_thread()
        return server

    def control(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.url}/_fake/{path}", timeout=10, **kwargs)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        self.control("POST", "reset")

    def fault(self, key: str, fault: str, **extra: Any) -> None:
        self.control("POST", "faults", json={"key": key, "fault": fault, **extra})

    def clear_faults(self) -> None:
        self.control("DELETE", "faults")

    def limits(self, key: str, **limits: Any) -> None:
        self.control("POST", "limits", json={"key": key, **limits})

    def add_model(self, model_id: str, **fields: Any) -> None:
        """One more model the sandbox knows (it refuses unknown ones, as Anthropic does)."""
        self.control("POST", "models", json={"id": model_id, **fields})

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("GET", "stats")
        return result

    def count(self, key: str) -> int:
        return int(self.stats()["requests"].get(key, 0))

    def requests(self, limit: int = 50) -> list[dict[str, Any]]:
        data = self.control("GET", "requests", params={"limit": limit})
        return list(data["requests"] if isinstance(data, dict) else data)


class RelayServer(ThreadServer):
    settings: Settings

    @classmethod
    def start(cls, settings: Settings) -> RelayServer:
        from app.main import create_app

        server = cls(create_app(settings, print_token=lambda _t: None))
        server.settings = settings
        server.start_thread()
        return server

    @property
    def services(self) -> Any:
        return self.app.state.services

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def create_customer(
        self, *, balance_usd: str | None = "10", name: str = "acme", **extra: Any
    ) -> tuple[str, str]:
        """A customer with a key (and a top-up): returns (customer_id, key)."""
        with self.admin() as admin:
            customer = (
                admin.post("/admin/customers", json={"name": name, **extra})
                .raise_for_status()
                .json()
            )
            key = (
                admin.post(f"/admin/customers/{customer['id']}/keys", json={"name": "k"})
                .raise_for_status()
                .json()
            )
            if balance_usd is not None:
                admin.post(
                    f"/admin/customers/{customer['id']}/topups", json={"amount_usd": balance_usd}
                ).raise_for_status()
        return customer["id"], key["key"]

    def customer(self, customer_id: str) -> dict[str, Any]:
        with self.admin() as admin:
            result: dict[str, Any] = (
                admin.get(f"/admin/customers/{customer_id}").raise_for_status().json()
            )
            return result

    def ledger(self, customer_id: str) -> list[dict[str, Any]]:
        with self.admin() as admin:
            items: list[dict[str, Any]] = []
            cursor = None
            while True:
                params: dict[str, Any] = {"limit": 100}
                if cursor:
                    params["cursor"] = cursor
                page = (
                    admin.get(f"/admin/customers/{customer_id}/ledger", params=params)
                    .raise_for_status()
                    .json()
                )
                items.extend(page["items"])
                cursor = page["next_cursor"]
                if not cursor:
                    return items

    def add_account(self, name: str, credential: str, base_url: str, **kwargs: Any) -> str:
        from pool import accounts as account_repo
        from pool.crypto import Secret

        async def add() -> str:
            async with self.services.db.transaction() as session:
                account = await account_repo.add_account(
                    session,
                    self.services.cipher,
                    name=name,
                    credential=Secret(credential),
                    base_url=base_url,
                    **kwargs,
                )
            self.services.directory.invalidate()
            return str(account.id)

        return self.call(add)

    def reconcile(self) -> dict[str, Any]:
        from workers.tasks import reconcile_billing

        services = self.services
        result: dict[str, Any] = self.call(lambda: reconcile_billing({"services": services}))
        return result


def eventually(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.05) -> bool:
    """Whether ``predicate`` comes true within ``timeout`` seconds (polled every ``step``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def test_settings(env: dict[str, str], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": env["POOLRELAY_DATABASE_URL"],
        "redis_url": env["POOLRELAY_REDIS_URL"],
        "key_file": env["POOLRELAY_KEY_FILE"],
        "admin_token": ADMIN_TOKEN,
        "reconcile_interval_seconds": 3600,
        "health_interval_seconds": 3600,
    }
    if env.get("POOLRELAY_ENCRYPTION_KEYS"):
        values["encryption_keys"] = env["POOLRELAY_ENCRYPTION_KEYS"]
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# --- PostgreSQL: one migrated template per session, a clone per test --------------------------


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@contextlib.contextmanager
def _admin_conn(url: str) -> Iterator[Any]:
    import psycopg

    conn = psycopg.connect(
        _with_db(url, "postgres").replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )
    try:
        yield conn
    finally:
        conn.close()


def pg_template(url: str) -> str:
    import secrets

    from app.migrate import upgrade

    name = "pr_tmpl_" + secrets.token_hex(4)
    with _admin_conn(url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    upgrade(_with_db(url, name))
    return name


def pg_clone(url: str, template: str, name: str) -> str:
    with _admin_conn(url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return _with_db(url, name)


def pg_drop(url: str, name: str) -> None:
    with _admin_conn(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``poolrelay worker`` in a session of its own, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
