"""Claude Code (the pinned ``@anthropic-ai/claude-code`` CLI) through the relay to the sandbox.

Each run is ``claude -p <prompt> --output-format json`` with nothing but the relay to talk to:
a throwaway ``HOME`` and working directory, a clean environment (none of the developer's
``ANTHROPIC_*``/``CLAUDE_*`` variables), ``ANTHROPIC_BASE_URL`` and ``ANTHROPIC_API_KEY`` set as a
customer would, non-essential traffic (telemetry, updates, error reports) switched off.

``--tools ""`` runs the CLI without its built-in tools: the sandbox answers every request that
offers tools with a ``tool_use`` block, so with its default tools a one-line prompt sets off an
agent loop of hundreds of calls (sub-agents calling tools) instead of one answer.
``--model claude-haiku-4-5`` keeps the bill small and priced.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.clients.conftest import MODEL, Pool, wait_for
from tests.clients.node import NodeTools, run_bounded

RUN_TIMEOUT = 60.0


@pytest.fixture
def claude_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    (home / "tmp").mkdir()
    return home


def run_claude(
    tools: NodeTools,
    home: Path,
    base_url: str,
    api_key: str,
    prompt: str,
    *extra: str,
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": api_key,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1",
    }
    args = [str(tools.claude), "-p", prompt, "--output-format", "json", "--model", MODEL]
    args += ["--tools", "", *extra]
    return run_bounded(args, timeout=timeout, env=env, cwd=home / "work")


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, (
        f"claude exited {proc.returncode}\nstdout: {proc.stdout[-3000:]}\n"
        f"stderr: {proc.stderr[-3000:]}"
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    assert result["type"] == "result" and result["is_error"] is False, result
    return result


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def settled_rows(pool: Pool, count: int) -> list[dict[str, Any]]:
    """The customer's ``messages`` rows once ``count`` of them exist and all have finished."""

    def probe() -> list[dict[str, Any]] | None:
        rows = pool.message_rows()
        done = len(rows) >= count and all(r["finished_at"] for r in rows)
        if done and len(pool.usage_entries()) >= count:
            return rows
        return None

    return wait_for(probe, what=f"{count} settled requests")


def test_prompt_is_billed_once_per_upstream_call(
    node_tools: NodeTools, pool: Pool, claude_home: Path
) -> None:
    result = result_of(run_claude(node_tools, claude_home, pool.url, pool.key, "Say hello"))
    assert "Hello from the fake upstream" in result["result"]
    session_id = result["session_id"]

    upstream = pool.upstream_messages()
    calls = pool.fake.stats()["total"]
    assert calls >= 1 and len(upstream) == calls
    for seen in upstream:
        assert seen["credential"] in pool.accounts.values()
        assert pool.key not in json.dumps(seen)
        assert seen["headers"]["anthropic-version"] == "2023-06-01"
        assert seen["headers"]["user-agent"].startswith("claude-cli/")
        assert seen["headers"].get("x-claude-code-session-id") == session_id

    rows = settled_rows(pool, calls)
    assert len(rows) == calls, rows
    assert all(r["status"] == "ok" and r["http_status"] == 200 for r in rows), rows
    assert sorted(r["upstream_request_id"] for r in rows) == sorted(
        s["request_id"] for s in upstream
    )
    entries = pool.usage_entries()
    assert len(entries) == calls, entries
    assert sorted(e["request_id"] for e in entries) == sorted(r["id"] for r in rows)
    charged = -sum(micros(e["amount_usd"]) for e in entries)
    assert charged == sum(micros(r["cost_usd"]) for r in rows) == pool.spent_micros() > 0
    # Claude Code prices the usage it was sent at Anthropic's list prices, as the relay does
    # (each request rounded up to a whole micro-USD).
    claude_micros = Decimal(str(result["total_cost_usd"])) * 1_000_000
    assert claude_micros <= charged <= claude_micros + calls, (charged, result["total_cost_usd"])
    assert pool.relay.customer(pool.customer_id)["held_usd"] == "0.000000"


def test_request_log_names_the_claude_code_session(
    node_tools: NodeTools, pool: Pool, claude_home: Path
) -> None:
    result = result_of(run_claude(node_tools, claude_home, pool.url, pool.key, "Which session?"))
    rows = settled_rows(pool, pool.fake.stats()["total"])
    # Contract §5: the request log shows the session of every request.
    assert {r.get("session_id") for r in rows} == {result["session_id"]}, rows


def test_resumed_conversation_stays_on_its_account(
    node_tools: NodeTools, pool: Pool, claude_home: Path
) -> None:
    first = result_of(run_claude(node_tools, claude_home, pool.url, pool.key, "First turn"))
    session_id = first["session_id"]
    rows = settled_rows(pool, pool.fake.stats()["total"])
    served = {r["account_id"] for r in rows}
    assert len(served) == 1, rows
    (account,) = served
    other = next(a for a in pool.accounts if a != account)
    # Make the first account the less attractive one (40 % of its requests left, far from
    # "nearly exhausted"): from the second turn's response on, the relay sees the other account
    # with more headroom, and the conversation must stay where its prompt cache is all the same.
    pool.fake.limits(pool.accounts[account], remaining={"requests": 1600})

    for turn in ("Second turn", "Third turn"):
        again = result_of(
            run_claude(node_tools, claude_home, pool.url, pool.key, turn, "--resume", session_id)
        )
        assert again["session_id"] == session_id

    calls = pool.fake.stats()["total"]
    rows = settled_rows(pool, calls)
    assert len(rows) == calls >= 3
    assert {r["account_id"] for r in rows} == {account}, [(r["id"], r["account_id"]) for r in rows]
    upstream = pool.upstream_messages()
    assert {s["credential"] for s in upstream} == {pool.accounts[account]}
    assert {s["headers"].get("x-claude-code-session-id") for s in upstream} == {session_id}
    assert len(upstream[-1]["body"]["messages"]) >= 5  # the whole conversation went along

    # Control: a request with no conversation to follow goes by headroom, to the other account.
    response = httpx.post(
        f"{pool.url}/v1/messages",
        headers={"x-api-key": pool.key, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert pool.upstream_messages()[-1]["credential"] == pool.accounts[other]


def test_wrong_key_fails_at_once(node_tools: NodeTools, pool: Pool, claude_home: Path) -> None:
    wrong = "sk-pr-" + "w" * 43
    started = time.monotonic()
    try:
        proc = run_claude(node_tools, claude_home, pool.url, wrong, "hi", timeout=30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"claude was still retrying a wrong key after {exc.timeout:.0f} s")
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert elapsed < 15, f"a wrong key took {elapsed:.1f} s to fail: {output[-2000:]}"
    assert "api key" in output.lower(), output[-2000:]
    assert wrong not in output
    assert pool.fake.stats()["total"] == 0
