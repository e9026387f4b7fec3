"""The TypeScript SDK (the pinned ``@anthropic-ai/sdk``) through the relay to the sandbox.

Each test runs one case of ``js/anthropic_sdk.mjs`` in node and asserts on the JSON it prints:
what the SDK returned (or the API error it raised) and every HTTP attempt it made.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.clients.conftest import MODEL, MODEL_ID, Pool, wait_for
from tests.clients.node import NodeTools, run_bounded

SCRIPT = Path(__file__).parent / "js" / "anthropic_sdk.mjs"


def run_sdk(
    tools: NodeTools, pool: Pool, case: str, *, key: str | None = None, max_retries: int = 0
) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "POOLRELAY_SDK_ENTRY": str(tools.sdk_entry),
        "RELAY_URL": pool.url,
        "RELAY_KEY": key or pool.key,
        "MAX_RETRIES": str(max_retries),
    }
    proc = run_bounded([tools.node, str(SCRIPT), case], timeout=60, env=env)
    assert proc.returncode == 0, f"node exited {proc.returncode}: {proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result["error"]
    return result


def micros(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000)


def test_create(node_tools: NodeTools, pool: Pool) -> None:
    result = ok(run_sdk(node_tools, pool, "create"))
    message = result["message"]
    assert message["type"] == "message" and message["model"] == MODEL_ID
    assert "Hello from TypeScript" in message["content"][0]["text"]
    assert message["usage"]["input_tokens"] > 0 and message["usage"]["output_tokens"] > 0
    assert result["request_id"].startswith("req_")
    entries = wait_for(pool.usage_entries, what="the usage debit")
    assert len(entries) == 1
    assert entries[0]["request_id"] == result["poolrelay_request_id"]
    assert entries[0]["amount_usd"] == f"-{result['cost_usd']}"
    assert pool.fake.stats()["total"] == 1
    assert [a["retry_count"] for a in result["attempts"]] == ["0"]
    seen = pool.upstream_messages()[-1]
    assert seen["body"]["model"] == MODEL  # forwarded as the SDK wrote it
    assert seen["headers"]["x-stainless-lang"] == "js"
    sent_version = result["attempts"][0]["anthropic_version"]
    assert sent_version and seen["headers"]["anthropic-version"] == sent_version
    assert seen["credential"] in pool.accounts.values()


def test_stream(node_tools: NodeTools, pool: Pool) -> None:
    result = ok(run_sdk(node_tools, pool, "stream"))
    assert "Stream from TypeScript" in result["text"]
    assert result["text"] == result["final_text"]
    message = result["message"]
    assert message["model"] == MODEL_ID
    assert message["stop_reason"] in ("end_turn", "max_tokens")
    assert result["request_id"].startswith("req_")
    usage = message["usage"]
    entries = wait_for(pool.usage_entries, what="the usage debit")
    assert [e["request_id"] for e in entries] == [result["poolrelay_request_id"]]
    # Haiku 4.5: $1 / $5 per million input / output tokens.
    assert pool.spent_micros() == usage["input_tokens"] * 1 + usage["output_tokens"] * 5
    assert pool.relay.customer(pool.customer_id)["held_usd"] == "0.000000"


def test_tools(node_tools: NodeTools, pool: Pool) -> None:
    message = ok(run_sdk(node_tools, pool, "tools"))["message"]
    assert message["stop_reason"] == "tool_use"
    calls = [b for b in message["content"] if b["type"] == "tool_use"]
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert calls[0]["id"].startswith("toolu_") and isinstance(calls[0]["input"]["city"], str)
    sent = pool.upstream_messages()[-1]["body"]
    assert sent["tools"][0]["name"] == "get_weather"


def test_count_tokens_is_free(node_tools: NodeTools, pool: Pool) -> None:
    result = ok(run_sdk(node_tools, pool, "count_tokens"))
    assert result["counted"]["input_tokens"] > 0
    rows = wait_for(pool.requests_log, what="the count_tokens row")
    assert [(r["endpoint"], r["cost_usd"]) for r in rows] == [("count_tokens", "0.000000")]
    assert pool.usage_entries() == []
    assert pool.fake.stats()["by_path"].get("/v1/messages/count_tokens") == 1


def test_models_list(node_tools: NodeTools, pool: Pool) -> None:
    ids = ok(run_sdk(node_tools, pool, "models"))["ids"]
    assert MODEL_ID in ids
    assert len(ids) == len(set(ids)) > 1  # the SDK paged through them all


def test_model_by_alias(node_tools: NodeTools, pool: Pool) -> None:
    # Contract §4: GET /v1/models/{id} accepts an alias and answers with what it resolves to.
    model = ok(run_sdk(node_tools, pool, "model_alias"))["model"]
    assert model["type"] == "model" and model["id"] == MODEL_ID


def test_wrong_key_is_an_authentication_error(node_tools: NodeTools, pool: Pool) -> None:
    result = run_sdk(node_tools, pool, "create", key="sk-pr-" + "x" * 43, max_retries=2)
    error = result["error"]
    assert error["is_authentication_error"] and error["status"] == 401, error
    assert error["type"] == "authentication_error"
    assert error["requestID"] and error["requestID"].startswith("req_"), error
    assert error["should_retry"] == "false"
    assert len(result["attempts"]) == 1, result["attempts"]  # not retried
    assert pool.fake.stats()["total"] == 0


def retried(node_tools: NodeTools, pool: Pool, fault: str, **extra: Any) -> dict[str, Any]:
    """Script ``fault`` on every account, make one SDK call with ``maxRetries: 2``."""
    pool.fake.fault("*", fault, **extra)
    result = run_sdk(node_tools, pool, "create", max_retries=2)
    assert "error" in result, result
    assert [a["retry_count"] for a in result["attempts"]] == ["0", "1", "2"], result["attempts"]
    rows = wait_for(lambda: [*pool.message_rows()][2:] and pool.message_rows(), what="3 rows")
    assert len(rows) == 3, rows  # one per SDK attempt, none of them billed
    assert pool.usage_entries() == []
    assert pool.relay.customer(pool.customer_id)["held_usd"] == "0.000000"
    return dict(result["error"])


def test_sdk_retries_an_overloaded_pool(node_tools: NodeTools, pool: Pool) -> None:
    error = retried(node_tools, pool, "overloaded")
    assert error["is_overloaded_error"] and error["status"] == 529, error
    assert error["type"] == "overloaded_error"
    assert error["requestID"] and error["should_retry"] == "true", error


def test_sdk_retries_a_rate_limited_pool(node_tools: NodeTools, pool: Pool) -> None:
    error = retried(node_tools, pool, "rate_limit", retry_after=1)
    assert error["is_rate_limit_error"] and error["status"] == 429, error
    assert error["type"] == "rate_limit_error"
    assert error["requestID"] and error["should_retry"] == "true", error


def test_batch_results_through_the_relay(node_tools: NodeTools, pool: Pool) -> None:
    result = ok(run_sdk(node_tools, pool, "batch"))
    batch = result["batch"]
    assert batch["processing_status"] == "ended"
    assert batch["results_url"] == f"{pool.url}/v1/messages/batches/{batch['id']}/results"
    assert sorted(r["custom_id"] for r in result["results"]) == ["ts-1", "ts-2"]
    assert {r["result"]["message"]["usage"]["service_tier"] for r in result["results"]} == {"batch"}
    assert result["listed"] == [batch["id"]]
    paths = [a["path"] for a in result["attempts"]]
    assert f"/v1/messages/batches/{batch['id']}/results" in paths


def test_files_through_the_relay(node_tools: NodeTools, pool: Pool) -> None:
    result = ok(run_sdk(node_tools, pool, "files"))
    uploaded = result["uploaded"]
    assert uploaded["filename"] == "notes.txt"
    assert result["listed"] == [uploaded["id"]]
    assert result["content"] == "notes from TypeScript"
    assert result["deleted"]["id"] == uploaded["id"]
