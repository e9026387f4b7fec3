"""Test harness: the suite runs on the embedded defaults (SQLite + fakeredis) and, when
``POOLRELAY_TEST_DATABASE_URL`` / ``POOLRELAY_TEST_REDIS_URL`` are set, on PostgreSQL + Redis.

Servers run for real on 127.0.0.1 (uvicorn in a background thread): the fake upstream once per
session, a relay per test that needs one. Each test gets a fresh database (on PostgreSQL a clone
of a migrated template database) and a flushed Redis database.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    FakeUpstream,
    RelayServer,
    pg_clone,
    pg_drop,
    pg_template,
    test_settings,
)

PG_URL = os.environ.get("POOLRELAY_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("POOLRELAY_TEST_REDIS_URL")

needs_postgres = pytest.mark.skipif(
    not PG_URL,
    reason="runs on PostgreSQL: set POOLRELAY_TEST_DATABASE_URL (CI's second pass does)",
)
needs_postgres_and_redis = pytest.mark.skipif(
    not (PG_URL and REDIS_URL),
    reason="runs on PostgreSQL + Redis: set POOLRELAY_TEST_DATABASE_URL and "
    "POOLRELAY_TEST_REDIS_URL (CI's second pass does)",
)


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream.start()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_upstream: FakeUpstream) -> FakeUpstream:
    fake_upstream.reset()
    return fake_upstream


@pytest.fixture(scope="session")
def pg_template_db() -> Iterator[str | None]:
    if not PG_URL:
        yield None
        return
    name = pg_template(PG_URL)
    yield name
    pg_drop(PG_URL, name)


@pytest.fixture
def database_url(tmp_path: Path, pg_template_db: str | None) -> Iterator[str]:
    if PG_URL and pg_template_db:
        name = "pr_test_" + secrets.token_hex(6)
        url = pg_clone(PG_URL, pg_template_db, name)
        yield url
        pg_drop(PG_URL, name)
    else:
        yield f"sqlite:///{tmp_path / 'poolrelay.db'}"


@pytest.fixture
def redis_url() -> str:
    if REDIS_URL:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        client.flushdb()
        client.close()
        return REDIS_URL
    return "memory://"


@pytest.fixture
def settings_env(
    tmp_path: Path, database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The environment a CLI command in this test sees (same database as the relay)."""
    env = {
        "POOLRELAY_DATABASE_URL": database_url,
        "POOLRELAY_REDIS_URL": redis_url,
        "POOLRELAY_KEY_FILE": str(tmp_path / "poolrelay.key"),
        "POOLRELAY_ADMIN_TOKEN": "test-admin-token",
        "POOLRELAY_ENCRYPTION_KEYS": "",
    }
    if not database_url.startswith("sqlite"):
        from cryptography.fernet import Fernet

        env["POOLRELAY_ENCRYPTION_KEYS"] = Fernet.generate_key().decode()
    else:
        del env["POOLRELAY_ENCRYPTION_KEYS"]
        monkeypatch.delenv("POOLRELAY_ENCRYPTION_KEYS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return env


@pytest.fixture
def relay(settings_env: dict[str, str], fake: FakeUpstream) -> Iterator[RelayServer]:
    server = RelayServer.start(test_settings(settings_env))
    yield server
    server.stop()


@pytest.fixture
def start_relay(settings_env: dict[str, str], fake: FakeUpstream) -> Iterator[Any]:
    """Start a relay with settings overrides (stopped at the end of the test)."""
    started: list[RelayServer] = []

    def start(**overrides: Any) -> RelayServer:
        server = RelayServer.start(test_settings(settings_env, **overrides))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
