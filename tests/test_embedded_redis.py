"""The command line on the embedded ``memory://`` Redis sees and acts on the running server's
live pool state (``app/embedded_redis.py``): the server shares its in-process fakeredis on a Unix
socket beside the database (mode 0600, removed on shutdown, a stale one replaced), and
``accounts list`` / ``accounts enable`` go through it; with no server running the command line
falls back to the database's copy.

These tests always use ``memory://`` (on the PostgreSQL + Redis variant too: there the database
is PostgreSQL and the socket lives in ``/tmp/poolrelay-<uid>/``).
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import embedded_redis
from app.cli import main
from pool.scheduler import Lease
from tests import harness
from tests.harness import FakeUpstream, RelayServer

pytestmark = pytest.mark.skipif(not embedded_redis.SUPPORTED, reason="needs Unix sockets")

MODEL = "claude-haiku-4-5"
KEY_A = "sk-ant-api03-embedded-aaaa-000000001"
KEY_B = "sk-ant-api03-embedded-bbbb-000000002"


@pytest.fixture
def env(settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``settings_env`` on the embedded Redis, whatever the suite's backend."""
    monkeypatch.setenv("POOLRELAY_REDIS_URL", "memory://")
    return {**settings_env, "POOLRELAY_REDIS_URL": "memory://"}


@pytest.fixture
def server(env: dict[str, str], fake: FakeUpstream) -> Iterator[RelayServer]:
    relay = RelayServer.start(harness.test_settings(env))
    yield relay
    relay.stop()


def sock_of(env: dict[str, str]) -> Path:
    return embedded_redis.socket_path(harness.test_settings(env))


def cli(*args: str, capsys: pytest.CaptureFixture[str], stdin: str = "") -> tuple[int, str, str]:
    """``poolrelay ARGS`` in-process (the environment is the test's)."""
    capsys.readouterr()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(args))
    finally:
        sys.stdin = saved
    out, err = capsys.readouterr()
    return code, out, err


def cli_process(*args: str) -> tuple[int, str, str]:
    """``poolrelay ARGS`` in a process of its own, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def listing(*, capsys: pytest.CaptureFixture[str] | None = None) -> dict[str, dict[str, Any]]:
    if capsys is None:
        code, out, err = cli_process("accounts", "list", "--json")
    else:
        code, out, err = cli("accounts", "list", "--json", capsys=capsys)
    assert code == 0, (out, err)
    return {view["name"]: view for view in json.loads(out)}


def ask(relay: RelayServer, key: str) -> httpx.Response:
    return httpx.post(
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


def live_states(relay: RelayServer, *account_ids: str) -> dict[str, Any]:
    services = relay.services
    return relay.call(lambda: services.scheduler.states(list(account_ids)))


def lease_on_server(relay: RelayServer) -> Lease:
    services = relay.services

    async def lease() -> Lease:
        await services.directory.reload()
        return await services.scheduler.acquire(
            services.directory.candidates(None), expected_tokens=100
        )

    return relay.call(lease)


# --- the tests --------------------------------------------------------------------------------


def test_cli_sees_and_changes_the_servers_live_state(
    server: RelayServer, env: dict[str, str], fake: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    a_id = server.add_account("a", KEY_A, fake.url)
    b_id = server.add_account("b", KEY_B, fake.url)
    _customer, key = server.create_customer()

    # A's credential is refused: the server quarantines it and fails over to B
    fake.fault(KEY_A, "unauthorized")
    for _ in range(3):
        assert ask(server, key).status_code == 200
    assert live_states(server, a_id)[a_id].reason == "credential_invalid"
    assert fake.count(KEY_A) == 1
    lease = lease_on_server(server)  # a request in flight on B
    assert lease.account_id == b_id

    # a separate `poolrelay` process sees the live state: quarantine, in-flight, headroom
    views = listing()
    assert views["a"]["live"] is True and views["b"]["live"] is True
    assert views["a"]["status"] == "quarantined"
    assert views["a"]["quarantine_reason"] == "credential_invalid"
    assert views["b"]["status"] == "active"
    assert views["b"]["in_flight"] == 1
    assert views["b"]["headroom"], views["b"]  # from the fake's anthropic-ratelimit-* headers
    assert any(h["limit"] for h in views["b"]["headroom"].values())
    code, table, err = cli_process("accounts", "list")
    assert code == 0, err
    assert "no server is running" not in table and "quarantined" in table

    # the lease ends: the command line sees it at once
    server.call(lambda: server.services.scheduler.release(lease))
    assert listing(capsys=capsys)["b"]["in_flight"] == 0

    # `accounts enable` lifts the quarantine in the server's own Redis, at once (no request
    # came in since, so the server's account directory has not reloaded on its own)
    fake.clear_faults()
    code, out, err = cli_process("accounts", "enable", "a")
    assert code == 0 and "enabled" in out, err
    assert not live_states(server, a_id)[a_id].quarantined
    assert listing(capsys=capsys)["a"]["status"] == "active"
    before = fake.count(KEY_A)
    for _ in range(6):
        assert ask(server, key).status_code == 200
    assert fake.count(KEY_A) > before  # A is back in service

    # `accounts check` clears a quarantine in the server's Redis as well (in-process CLI)
    services = server.services
    server.call(lambda: services.scheduler.quarantine(a_id, "upstream_errors", None, "boom"))
    assert listing(capsys=capsys)["a"]["status"] == "quarantined"
    code, out, err = cli("accounts", "check", "a", capsys=capsys)
    assert code == 0 and "ok" in out, err
    assert not live_states(server, a_id)[a_id].quarantined


def test_socket_is_private_removed_on_shutdown_and_then_the_database_copy_shows(
    env: dict[str, str], fake: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sock_of(env)
    assert not path.exists()
    relay = RelayServer.start(harness.test_settings(env))
    try:
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        if path.parent == embedded_redis.RUNTIME_DIR / f"poolrelay-{os.geteuid()}":
            assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
        else:
            assert path.parent == Path(env["POOLRELAY_DATABASE_URL"][len("sqlite:///") :]).parent
        a_id = relay.add_account("a", KEY_A, fake.url)
        _customer, key = relay.create_customer()
        fake.fault(KEY_A, "unauthorized")
        assert ask(relay, key).status_code != 200  # the only account: refused, quarantined
        assert listing(capsys=capsys)["a"]["status"] == "quarantined"
    finally:
        relay.stop()
    assert not path.exists()
    fake.clear_faults()

    # no server: the command line still works, on the database's durable copy
    views = listing(capsys=capsys)
    assert views["a"]["live"] is False
    assert views["a"]["status"] == "quarantined"
    assert views["a"]["quarantine_reason"] == "credential_invalid"
    assert views["a"]["in_flight"] == 0 and views["a"]["headroom"] == {}
    code, table, _ = cli("accounts", "list", capsys=capsys)
    assert code == 0 and "no server is running" in table
    code, out, err = cli("accounts", "enable", "a", capsys=capsys)
    assert code == 0 and "enabled" in out, err
    assert listing(capsys=capsys)["a"]["status"] == "active"
    assert not path.exists()  # the command line never creates the socket

    # a server started again serves it again, and the enabled account is in service
    relay = RelayServer.start(harness.test_settings(env))
    try:
        assert path.exists()
        assert ask(relay, key).status_code == 200
        views = listing(capsys=capsys)
        assert views["a"]["live"] is True and views["a"]["status"] == "active"
        assert a_id == views["a"]["id"]
    finally:
        relay.stop()


def test_a_stale_socket_is_replaced_and_a_live_one_left_alone(
    env: dict[str, str], fake: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sock_of(env)
    if path.parent.name.startswith("poolrelay-"):
        path.parent.mkdir(mode=0o700, exist_ok=True)
    # what a killed server leaves behind: a socket file nobody listens on
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()
    assert path.exists() and not embedded_redis.answers(path)
    views = listing(capsys=capsys)  # the command line takes it for no server
    assert views == {}

    first = RelayServer.start(harness.test_settings(env))
    try:
        assert embedded_redis.answers(path)
        a_id = first.add_account("a", KEY_A, fake.url)
        services = first.services
        first.call(lambda: services.scheduler.quarantine(a_id, "permission_denied", None))
        # a second server on the same database (not supported) leaves the live socket alone
        second = RelayServer.start(harness.test_settings(env))
        inode = os.stat(path).st_ino
        second.stop()
        assert path.exists() and os.stat(path).st_ino == inode
        assert listing(capsys=capsys)["a"]["status"] == "quarantined"  # still the first's
    finally:
        first.stop()
    assert not path.exists()


def test_a_file_in_the_way_is_kept_and_an_unusable_socket_is_reported(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = sock_of(env)
    if path.parent.name.startswith("poolrelay-"):
        path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text("mine")
    relay = RelayServer.start(harness.test_settings(env))  # serves all the same
    try:
        assert httpx.get(f"{relay.url}/readyz", timeout=10).status_code == 200
        assert path.read_text() == "mine"
        assert listing(capsys=capsys) == {}
    finally:
        relay.stop()
    assert path.read_text() == "mine"
    path.unlink()

    # something listens but hangs up at once (as the server does to another user): the
    # command line says so on standard error and goes on with the database's copy
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    listener.listen()
    listener.settimeout(10)

    def hang_up() -> None:
        with pytest.raises(OSError), listener:
            while True:
                conn, _ = listener.accept()
                conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        code, out, err = cli("accounts", "list", capsys=capsys)
        assert code == 0, err
        assert "warning" in err and "closed the connection" in err
        assert "no accounts" in out
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
        path.unlink()


def test_socket_path_fits_a_socket_address(tmp_path: Path) -> None:
    from app.settings import Settings

    def path_for(url: str) -> Path:
        return embedded_redis.socket_path(Settings(_env_file=None, database_url=url))  # type: ignore[call-arg]

    short = path_for(f"sqlite:///{tmp_path}/poolrelay.db")
    assert short == tmp_path / "poolrelay.db.redis.sock"
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    long = path_for(f"sqlite:///{deep}/poolrelay.db")
    assert long.parent == embedded_redis.RUNTIME_DIR / f"poolrelay-{os.geteuid()}"
    assert len(os.fsencode(long)) <= embedded_redis.PATH_MAX_BYTES
    assert long != path_for(f"sqlite:///{deep}/other.db")
    assert long == path_for(f"sqlite:///{deep}/../{deep.name}/poolrelay.db")  # one file, one path
    pg = path_for("postgresql://u:secret@db.example/poolrelay")
    assert pg.parent == long.parent and "secret" not in str(pg)
    assert pg == path_for("postgresql://u:other@db.example/poolrelay")


def test_a_long_database_path_puts_the_socket_in_a_private_directory(
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    url = f"sqlite:///{deep}/poolrelay.db"
    monkeypatch.setenv("POOLRELAY_DATABASE_URL", url)
    env = {**env, "POOLRELAY_DATABASE_URL": url}
    path = sock_of(env)
    assert path.parent == embedded_redis.RUNTIME_DIR / f"poolrelay-{os.geteuid()}"
    relay = RelayServer.start(harness.test_settings(env))
    try:
        assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        a_id = relay.add_account("a", KEY_A, "http://127.0.0.1:9")
        services = relay.services
        relay.call(lambda: services.scheduler.quarantine(a_id, "upstream_billing", None))
        views = listing(capsys=capsys)
        assert views["a"]["live"] is True and views["a"]["quarantine_reason"] == "upstream_billing"
    finally:
        relay.stop()
    assert not path.exists()


def test_stopping_does_not_wait_on_an_idle_cli_connection(
    env: dict[str, str], fake: FakeUpstream
) -> None:
    relay = RelayServer.start(harness.test_settings(env))
    import redis

    client = redis.Redis(unix_socket_path=os.fspath(sock_of(env)), socket_timeout=10)
    try:
        assert client.ping()
        started = time.monotonic()
        relay.stop()
        assert time.monotonic() - started < 10
        assert not relay.thread.is_alive()
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        client.close()


def test_the_async_server_and_the_socket_share_lua_scripts(
    server: RelayServer, env: dict[str, str]
) -> None:
    import redis

    services = server.services
    script = "return redis.call('incrby', KEYS[1], ARGV[1])"
    sha = server.call(lambda: services.redis.script_load(script))
    client = redis.Redis(unix_socket_path=os.fspath(sock_of(env)), socket_timeout=10)
    try:
        assert client.evalsha(sha, 1, "poolrelay:test:n", 2) == 2
        assert server.call(lambda: services.redis.evalsha(sha, 1, "poolrelay:test:n", 3)) == 5
        assert client.get("poolrelay:test:n") == b"5"
    finally:
        client.close()
