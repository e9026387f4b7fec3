"""The ``poolrelay`` command line (contract §3), in-process and through the real console script.

In-process runs call ``app.cli.main([...])`` with the ``settings_env`` environment (same database
as the ``relay`` fixture, when a test uses both). A few subprocess runs check the installed
``poolrelay`` script itself: ``--help``, a credential piped on standard input, a bad-input exit,
and ``serve`` refusing to start on PostgreSQL without explicit secrets.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from app.cli import main
from app.db import sync_url
from pool.crypto import CredentialCipher
from pool.errors import CredentialError
from tests.harness import ACCOUNT_FIELDS, FakeUpstream, RelayServer

MODEL = "claude-haiku-4-5"


def upstream_key() -> str:
    return "sk-ant-api03-" + secrets.token_urlsafe(24)


class Cli:
    """Runs ``poolrelay`` in-process; keeps every output so tests can search all of it."""

    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.transcript: list[str] = []

    def __call__(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        self.capsys.readouterr()
        self.monkeypatch.setattr("sys.stdin", io.StringIO(stdin if stdin is not None else ""))
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = self.capsys.readouterr()
        self.transcript += [captured.out, captured.err]
        return code, captured.out, captured.err

    def ok(self, *args: str, stdin: str | None = None) -> str:
        code, out, err = self(*args, stdin=stdin)
        assert code == 0, (args, code, out, err)
        return out

    def fails(self, *args: str, stdin: str | None = None) -> str:
        """A refused command: non-zero exit and exactly one line on standard error."""
        code, out, err = self(*args, stdin=stdin)
        assert code != 0, (args, out, err)
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].strip(), (args, err)
        assert "Traceback" not in err and "Traceback" not in out
        return lines[0]

    def accounts(self) -> dict[str, dict[str, Any]]:
        views: list[dict[str, Any]] = json.loads(self.ok("accounts", "list", "--json"))
        return {view["name"]: view for view in views}

    def everything(self) -> str:
        return "\n".join(self.transcript)


@pytest.fixture
def cli(
    settings_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    return Cli(capsys, monkeypatch)


def query(database_url: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(sync_url(database_url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def database_text(database_url: str) -> bytes:
    """Every byte the database holds (SQLite: the files; PostgreSQL: every row as text)."""
    if database_url.startswith("sqlite"):
        path = Path(database_url.split("///", 1)[1])
        return b"".join(
            p.read_bytes()
            for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
            if p.exists()
        )
    tables = [
        row[0]
        for row in query(database_url, "SELECT tablename FROM pg_tables WHERE schemaname='public'")
    ]
    assert "upstream_accounts" in tables
    chunks = []
    for table in tables:
        chunks += [str(row[0]) for row in query(database_url, f'SELECT t::text FROM "{table}" t')]
    return "\n".join(chunks).encode()


def count(database_url: str, table: str) -> int:
    return int(query(database_url, f"SELECT count(*) FROM {table}")[0][0])


def balance(database_url: str, customer: str) -> int:
    rows = query(
        database_url,
        "SELECT balance_micros FROM customers WHERE id = :ref OR name = :ref",
        ref=customer,
    )
    assert len(rows) == 1
    return int(rows[0][0])


def message(relay: RelayServer, key: str) -> httpx.Response:
    return httpx.post(
        f"{relay.url}/v1/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


def poll_status(probe: Callable[[], httpx.Response], status: int, within: float) -> float:
    """Seconds until ``probe`` answered ``status``; fails after ``within`` seconds."""
    start = time.monotonic()
    while True:
        sent = time.monotonic() - start
        response = probe()
        if response.status_code == status:
            return sent
        assert sent <= within, f"still {response.status_code} after {sent:.1f} s: {response.text}"
        time.sleep(0.1)


# --- help ----------------------------------------------------------------------------------

COMMANDS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("serve",): ("--host", "--port"),
    ("worker",): (),
    ("migrate",): (),
    ("accounts", "add"): (
        "--name",
        "--base-url",
        "--group",
        "--models",
        "--max-concurrency",
        "--weight",
    ),
    ("accounts", "list"): ("--json",),
    ("accounts", "disable"): ("name",),
    ("accounts", "enable"): ("name",),
    ("accounts", "remove"): ("name",),
    ("accounts", "check"): ("name",),
    ("accounts", "set-credential"): ("name",),
    ("encryption", "rotate"): (),
    ("customers", "create"): ("name", "--topup"),
    ("keys", "create"): ("customer", "--name"),
    ("topup",): ("customer", "usd", "--memo"),
    ("fake-upstream",): ("--port",),
}


def test_help_documents_every_command(cli: Cli) -> None:
    top = cli.ok("--help")
    assert top.startswith("usage: poolrelay")
    for name in ("serve", "worker", "migrate", "accounts", "encryption", "customers", "keys"):
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", top, re.MULTILINE), (name, top)
    assert "topup" in top and "fake-upstream" in top
    groups = {command[0] for command in COMMANDS if len(command) == 2}
    for group in groups:
        out = cli.ok(group, "--help")
        for command in COMMANDS:
            if command[0] == group:
                # every sub-command is listed with a line of help
                assert re.search(rf"^\s+{re.escape(command[1])}\s+\S", out, re.MULTILINE), (
                    command,
                    out,
                )
    for command, options in COMMANDS.items():
        out = cli.ok(*command, "--help")
        assert out.startswith(f"usage: poolrelay {' '.join(command)}"), out
        for option in options:
            assert option in out, (command, option, out)
    # and a bad invocation is refused with a reason naming the problem, not a traceback
    code, _out, err = cli("accounts", "add")
    assert code != 0 and "--name" in err and "Traceback" not in err
    code, _out, err = cli("frobnicate")
    assert code != 0 and "frobnicate" in err


# --- the installed console script -------------------------------------------------------------


def test_console_script(
    cli: Cli, settings_env: dict[str, str], database_url: str, fake: FakeUpstream, tmp_path: Path
) -> None:
    script = shutil.which("poolrelay")
    assert script, "the poolrelay console script is not installed"
    cli.ok("migrate")  # so that the processes below do not race to create the schema
    credential = upstream_key()
    env = dict(os.environ)
    bare = tmp_path / "bare"
    bare.mkdir()
    serve_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("POOLRELAY_") or k in ("POOLRELAY_REDIS_URL",)
    }
    serve_env["POOLRELAY_DATABASE_URL"] = "postgresql://poolrelay@127.0.0.1:9/nowhere"
    serve_env["POOLRELAY_PORT"] = "1"  # never reached: it must refuse before listening
    started = time.monotonic()
    procs = {
        "help": subprocess.Popen(
            [script, "--help"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
        "add": subprocess.Popen(
            [script, "accounts", "add", "--name", "piped", "--base-url", fake.url],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        "bad": subprocess.Popen(
            [script, "topup", "no-such-customer", "5"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        "serve": subprocess.Popen(
            [script, "serve"],
            env=serve_env,
            cwd=bare,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    }
    results: dict[str, tuple[int, str, str]] = {}
    for name, proc in procs.items():
        stdin = credential + "\n" if name == "add" else None
        out, err = proc.communicate(input=stdin, timeout=60)
        results[name] = (proc.returncode, out, err)
    elapsed = time.monotonic() - started

    code, out, err = results["help"]
    assert code == 0 and out.startswith("usage: poolrelay"), err
    for name in ("serve", "accounts", "customers", "keys", "topup", "encryption", "migrate"):
        assert name in out

    code, out, err = results["add"]
    assert code == 0, (out, err)
    assert "piped" in out and "sk-ant-…" + credential[-4:] in out
    assert credential not in out + err
    views = cli.accounts()
    assert views["piped"]["fingerprint"] == "sk-ant-…" + credential[-4:]
    assert "ok" in cli.ok("accounts", "check", "piped")
    assert fake.stats()["by_path"].get("/v1/models", 0) >= 1

    code, out, err = results["bad"]
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "no-such-customer" in err, err

    code, out, err = results["serve"]
    assert code != 0, (out, err)
    message_text = out + err
    assert "POOLRELAY_ENCRYPTION_KEYS" in message_text, message_text
    assert "POOLRELAY_ADMIN_TOKEN" in message_text, message_text
    assert "Traceback" not in message_text
    assert len(err.strip().splitlines()) == 1, err  # a one-line reason
    assert elapsed < 30
    assert credential not in database_text(database_url).decode("utf-8", "replace")


# --- accounts --------------------------------------------------------------------------------


def test_accounts_commands(cli: Cli, database_url: str, fake: FakeUpstream) -> None:
    assert "migrations applied" in cli.ok("migrate")
    assert "no accounts" in cli.ok("accounts", "list")
    assert json.loads(cli.ok("accounts", "list", "--json")) == []

    first = upstream_key()
    out = cli.ok(
        "accounts",
        "add",
        "--name",
        "alpha",
        "--base-url",
        fake.url + "/",
        "--group",
        "ws-1",
        "--models",
        "claude-haiku-*,claude-sonnet-*",
        "--max-concurrency",
        "4",
        "--weight",
        "2",
        stdin=first + "\n",
    )
    assert "alpha" in out and "sk-ant-…" + first[-4:] in out
    views = cli.accounts()
    alpha = views["alpha"]
    assert set(alpha) >= ACCOUNT_FIELDS
    assert alpha["status"] == "active" and alpha["group"] == "ws-1"
    assert alpha["base_url"] == fake.url  # the trailing slash is dropped
    assert alpha["fingerprint"] == "sk-ant-…" + first[-4:]
    assert alpha["quarantine_reason"] is None and alpha["in_flight"] == 0
    table = cli.ok("accounts", "list")
    assert "alpha" in table and alpha["id"] in table and "sk-ant-…" + first[-4:] in table
    assert "active" in table

    # refused adds: duplicate name, /v1 base URL, bad URL, no credential; nothing is created
    reason = cli.fails("accounts", "add", "--name", "alpha", "--base-url", fake.url, stdin="x\n")
    assert "alpha" in reason
    other = upstream_key()
    reason = cli.fails(
        "accounts", "add", "--name", "beta", "--base-url", fake.url + "/v1", stdin=other + "\n"
    )
    assert "/v1" in reason
    cli.fails(
        "accounts", "add", "--name", "beta", "--base-url", fake.url + "/v1/", stdin=other + "\n"
    )
    cli.fails("accounts", "add", "--name", "beta", "--base-url", "ftp://x", stdin=other + "\n")
    cli.fails("accounts", "add", "--name", "beta", stdin="\n")
    cli.fails("accounts", "add", "--name", "beta", stdin="")
    cli.fails("accounts", "add", "--name", "beta", stdin="two words\n")
    cli.fails("accounts", "add", "--name", "beta", "--max-concurrency", "0", stdin=other + "\n")
    cli.fails("accounts", "add", "--name", "beta", "--weight", "-1", stdin=other + "\n")
    assert set(cli.accounts()) == {"alpha"}
    assert count(database_url, "upstream_accounts") == 1

    # disable / enable
    assert "disabled" in cli.ok("accounts", "disable", "alpha")
    assert cli.accounts()["alpha"]["status"] == "disabled"
    assert "enabled" in cli.ok("accounts", "enable", alpha["id"])  # by id too
    assert cli.accounts()["alpha"]["status"] == "active"

    # check: a free probe; a revoked credential fails with a non-zero exit
    out = cli.ok("accounts", "check", "alpha")
    assert "ok" in out
    messages_before = fake.stats()["total"]
    fake.fault(first, "unauthorized", paths="all")
    reason = cli.fails("accounts", "check", "alpha")
    assert "401" in reason or "authentication" in reason or "invalid" in reason, reason
    assert fake.stats()["total"] == messages_before  # never a billed message
    fake.clear_faults()

    # set-credential replaces it; the old one is no longer used
    second = upstream_key()
    out = cli.ok("accounts", "set-credential", "alpha", stdin=second + "\n")
    assert "sk-ant-…" + second[-4:] in out
    assert cli.accounts()["alpha"]["fingerprint"] == "sk-ant-…" + second[-4:]
    fake.fault(first, "unauthorized", paths="all")
    assert "ok" in cli.ok("accounts", "check", "alpha")
    fake.clear_faults()
    cli.fails("accounts", "set-credential", "alpha", stdin="\n")
    assert cli.accounts()["alpha"]["fingerprint"] == "sk-ant-…" + second[-4:]

    # unknown accounts: one line, non-zero, nothing changed
    for command in ("disable", "enable", "remove", "check"):
        assert "nope" in cli.fails("accounts", command, "nope")
    cli.fails("accounts", "set-credential", "nope", stdin=upstream_key() + "\n")

    # remove keeps history; the name can be used again
    assert "removed" in cli.ok("accounts", "remove", "alpha")
    assert cli.accounts() == {}
    cli.fails("accounts", "check", "alpha")
    cli.fails("accounts", "enable", "alpha")
    assert count(database_url, "upstream_accounts") == 1  # the row is kept
    third = upstream_key()
    cli.ok("accounts", "add", "--name", "alpha", "--base-url", fake.url, stdin=third + "\n")
    assert cli.accounts()["alpha"]["fingerprint"] == "sk-ant-…" + third[-4:]
    assert count(database_url, "upstream_accounts") == 2

    # no credential in any output, in the JSON listing, or in the database in plaintext
    transcript = cli.everything()
    stored = database_text(database_url).decode("utf-8", "replace")
    for credential in (first, second, third, other):
        assert credential not in transcript
        assert credential not in stored
        assert credential[7:] not in stored  # not even without its prefix
    assert "ciphertext" not in transcript


def test_encryption_rotate(
    cli: Cli,
    settings_env: dict[str, str],
    database_url: str,
    fake: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    credential = upstream_key()
    cli.ok("accounts", "add", "--name", "rot", "--base-url", fake.url, stdin=credential + "\n")
    if settings_env.get("POOLRELAY_ENCRYPTION_KEYS"):
        old = settings_env["POOLRELAY_ENCRYPTION_KEYS"]
    else:  # embedded: the key file created on first use holds the old key
        key_file = Path(settings_env["POOLRELAY_KEY_FILE"])
        assert key_file.stat().st_mode & 0o777 == 0o600
        old = key_file.read_text().strip()
    new = Fernet.generate_key().decode()

    def ciphertext() -> str:
        rows = query(database_url, "SELECT credential_ciphertext FROM upstream_accounts")
        assert len(rows) == 1
        return str(rows[0][0])

    before = ciphertext()
    assert CredentialCipher([old.encode()]).decrypt(before).reveal() == credential

    # with only the new key, the old ciphertext cannot be read: check fails, one line
    monkeypatch.setenv("POOLRELAY_ENCRYPTION_KEYS", new)
    reason = cli.fails("accounts", "check", "rot")
    assert "decrypt" in reason or "key" in reason, reason

    monkeypatch.setenv("POOLRELAY_ENCRYPTION_KEYS", f"{new},{old}")
    out = cli.ok("encryption", "rotate")
    assert "1" in out
    after = ciphertext()
    assert after != before
    assert CredentialCipher([new.encode()]).decrypt(after).reveal() == credential
    with pytest.raises(CredentialError):
        CredentialCipher([old.encode()]).decrypt(after)

    monkeypatch.setenv("POOLRELAY_ENCRYPTION_KEYS", new)
    assert "ok" in cli.ok("accounts", "check", "rot")
    seen = fake.requests(limit=5)
    assert any(r["credential"] == credential for r in seen)
    assert credential not in cli.everything()

    # a bad key setting is a one-line refusal, not a traceback
    monkeypatch.setenv("POOLRELAY_ENCRYPTION_KEYS", "not-a-fernet-key")
    cli.fails("accounts", "list")


# --- customers, keys, top-ups, and a running relay ---------------------------------------------


def test_customers_keys_topups_and_a_running_relay(
    relay: RelayServer, cli: Cli, database_url: str, fake: FakeUpstream
) -> None:
    credential = upstream_key()
    cli.ok("accounts", "add", "--name", "main", "--base-url", fake.url, stdin=credential + "\n")

    out = cli.ok("customers", "create", "acme", "--topup", "5")
    keys = re.findall(r"^key: (sk-pr-[A-Za-z0-9_-]+)$", out, re.MULTILINE)
    assert len(keys) == 1, out
    key = keys[0]
    assert len(key) >= len("sk-pr-") + 40
    assert out.count(key) == 1  # printed once
    assert "5.000000" in out
    customer_id = re.findall(r"^customer: (\S+)", out, re.MULTILINE)[0]
    assert balance(database_url, customer_id) == 5_000_000
    assert key not in database_text(database_url).decode("utf-8", "replace")  # stored hashed

    # the key works against the running relay (same database)
    me = httpx.get(f"{relay.url}/v1/me", headers={"x-api-key": key}, timeout=30)
    assert me.status_code == 200, me.text
    assert me.json()["balance_usd"] == "5.000000"
    # (an account added by the CLI reaches the running relay within 5 s)
    poll_status(lambda: message(relay, key), 200, within=5.0)
    served = message(relay, key)
    assert served.status_code == 200, served.text
    assert balance(database_url, customer_id) < 5_000_000

    out = cli.ok("keys", "create", "acme", "--name", "second")
    second = re.findall(r"^key: (sk-pr-[A-Za-z0-9_-]+)$", out, re.MULTILINE)
    assert len(second) == 1 and second[0] != key
    assert httpx.get(f"{relay.url}/v1/me", headers={"x-api-key": second[0]}).status_code == 200
    cli.ok("keys", "create", customer_id)  # by id too
    assert count(database_url, "customer_keys") == 3

    # top-ups: by name or id, memo, idempotency key
    start = balance(database_url, customer_id)
    out = cli.ok("topup", "acme", "2.50", "--memo", "x")
    assert "2.500000" in out
    assert balance(database_url, customer_id) == start + 2_500_000
    memos = query(
        database_url,
        "SELECT memo, amount_micros FROM ledger_entries WHERE customer_id = :c AND kind = 'topup'"
        " ORDER BY id",
        c=customer_id,
    )
    assert [tuple(row) for row in memos][-1] == ("x", 2_500_000)
    cli.ok("topup", customer_id, "1", "--idempotency-key", "inv-7")
    replay = cli.ok("topup", customer_id, "1", "--idempotency-key", "inv-7")
    assert "replay" in replay or "already" in replay
    assert balance(database_url, customer_id) == start + 3_500_000
    reason = cli.fails("topup", customer_id, "2", "--idempotency-key", "inv-7")
    assert reason

    # bad input: one line, non-zero, nothing changed
    customers_before = count(database_url, "customers")
    ledger_before = count(database_url, "ledger_entries")
    keys_before = count(database_url, "customer_keys")
    balance_before = balance(database_url, customer_id)
    assert "abc" in cli.fails("topup", "acme", "abc")
    for args in (
        ("topup", "acme", "abc"),
        ("topup", "acme", "0"),
        ("topup", "acme", "-5"),
        ("topup", "acme", "1.0000001"),
        ("topup", "acme", "1e3"),
        ("topup", "nobody", "5"),
        ("keys", "create", "nobody"),
        ("customers", "create", "zed", "--topup", "abc"),
        ("customers", "create", "zed", "--topup", "-1"),
        ("customers", "create", "zed", "--price-multiplier", "-1"),
        ("customers", "create", "   "),
        ("accounts", "disable", "nope"),
    ):
        cli.fails(*args)
    assert count(database_url, "customers") == customers_before
    assert count(database_url, "ledger_entries") == ledger_before
    assert count(database_url, "customer_keys") == keys_before
    assert balance(database_url, customer_id) == balance_before

    # a running relay picks up account changes made by the CLI within 5 s
    cli.ok("accounts", "disable", "main")
    took = poll_status(lambda: message(relay, key), 529, within=5.0)
    assert took <= 5.0
    before = fake.count(credential)
    assert message(relay, key).status_code == 529
    assert fake.count(credential) == before
    cli.ok("accounts", "enable", "main")
    took = poll_status(lambda: message(relay, key), 200, within=5.0)
    assert took <= 5.0
    assert credential not in cli.everything()
