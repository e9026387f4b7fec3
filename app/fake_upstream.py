"""A sandbox upstream that speaks the Anthropic Messages API ("fake upstream").

poolrelay's tests, its benchmarks and new users without an Anthropic key point the relay's
upstream accounts at this app instead of ``https://api.anthropic.com``. It answers like
Anthropic does (see ``spec/anthropic-wire.md``): the same JSON bodies, the same SSE byte format,
the same error shapes, ``request-id`` / ``anthropic-organization-id`` headers and per-credential
``anthropic-ratelimit-*`` headers. Everything it generates is deterministic and cheap, so that
benchmarks can push thousands of requests per second through it.

Run it with ``poolrelay fake-upstream [--host H] [--port 8081]`` (which calls :func:`run`), or
mount :func:`create_fake_app` in-process, e.g.
``httpx.AsyncClient(transport=httpx.ASGITransport(app=create_fake_app()))``.
All state lives in a :class:`FakeState` stored as ``app.state.fake``, so two apps in one
process share nothing.

Anthropic endpoints (credential in ``x-api-key`` or ``Authorization: Bearer``; any credential
is accepted unless a fault is scripted for it; a missing one gets 401)
-------------------------------------------------------------------------------------------
- ``POST /v1/messages`` (any query string, e.g. ``?beta=true``): JSON, or SSE with
  ``"stream": true``. The reply is ``"Hello from the fake upstream. You said: <first words of
  the last user text>"`` plus filler words; one output token per word. ``reply with N words``
  in the last user text asks for exactly N words. ``max_tokens`` and ``stop_sequences`` are
  honoured. With ``tools`` (and ``tool_choice`` not ``none``, and the last user turn not a
  ``tool_result``) the reply is a short text plus a ``tool_use`` block whose input is built
  from the tool's schema (required properties only). Input tokens are estimated as
  ``ceil(chars / 4)`` of the prompt text (+3 per message, 1,000 per image or document), never
  more than the UTF-8 byte length of the body. ``cache_control`` breakpoints (on tools, system
  blocks, message blocks, or top level) are simulated per (credential, model, prefix): the
  first request writes the prefix (``cache_creation_input_tokens`` split by TTL in
  ``cache_creation``), later ones within the TTL read the longest cached prefix
  (``cache_read_input_tokens``). There is no minimum cacheable length.
- ``POST /v1/messages/count_tokens`` -> ``{"input_tokens": N}`` (the same estimate).
- ``GET /v1/models`` (``limit``, ``after_id``, ``before_id``) and ``GET /v1/models/{id}``.

Rate limits: per credential, families ``requests`` (default 4,000), ``input-tokens``
(2,000,000), ``output-tokens`` (400,000) and ``tokens`` (input + output limits), refilled at the
next minute boundary. A message consumes 1 request, its uncached input (``input_tokens`` +
cache writes; cache reads do not count, as at Anthropic) and its output tokens. Token
``remaining`` values are rounded down to the nearest 1,000, requests are exact. A request that
would take a family below zero gets 429 ``rate_limit_error`` with ``retry-after``.
count_tokens and models consume nothing but carry the headers too. Benchmarks that push more
than 4,000 requests a minute through one credential should raise the limits first, e.g.
``POST /_fake/limits {"key": "*", "requests_limit": 1000000000}``.

Control API (not Anthropic's; no auth; JSON in and out)
-------------------------------------------------------
- ``POST /_fake/faults`` ``{"key": "<credential>" | "*", "fault": KIND, "times": N | null,
  "retry_after": 30, "delay": seconds, "after_events": 4, "paths": "messages" | "all"}``
  -> ``{"ok": true}``. One fault per key (a new one replaces the old); a key's own fault takes
  precedence over ``"*"``. ``times: null`` (default) lasts until cleared. Faults hit
  ``/v1/messages`` only, unless ``"paths": "all"`` (then count_tokens and models too). KIND:

  - ``rate_limit``: 429 ``rate_limit_error``, ``retry-after: <retry_after>``,
    ``x-should-retry: true``, ``anthropic-ratelimit-requests-remaining: 0``.
  - ``unauthorized``: 401 ``authentication_error`` "invalid x-api-key".
  - ``forbidden``: 403 ``permission_error``.
  - ``no_credit``: 400 ``invalid_request_error`` "Your credit balance is too low ...".
  - ``error``: any status with ``"status"``, ``"error_type"`` and ``"message"`` from the
    control request (e.g. a 404 ``not_found_error``), Anthropic-shaped.
  - ``server_error``: 500 ``api_error``. ``overloaded``: 529 ``overloaded_error``.
  - ``slow``: waits ``delay`` (default 1 s) before the response headers, and between SSE deltas.
  - ``slow_stream``: headers at once, then ``delay`` (default 1 s) between SSE events (a JSON
    reply is delayed by ``delay`` once).
  - ``mid_stream_error``: a 200 SSE stream that sends ``after_events`` events (default 4,
    counting ``message_start``; never reaching ``message_delta``), then ``event: error`` with
    ``overloaded_error``, then ends. A non-streaming request gets 529 ``overloaded_error``.
  - ``hang``: waits ``delay`` (default 3600 s), then answers normally; the wait ends early if
    the client goes away.
  - ``disconnect``: closes the connection without any response. Under uvicorn the socket is
    closed (clients see "server disconnected without sending a response"). In-process
    (e.g. ``httpx.ASGITransport``) there is no socket: the app raises
    ``httpx.RemoteProtocolError``, which reaches the client as the same exception (with
    ``raise_app_exceptions=False`` the client gets a 500 instead).

- ``GET /_fake/faults`` -> ``{"faults": {key: {...}}}``; ``DELETE /_fake/faults[?key=K]`` clears
  all faults (or one key's).
- ``POST /_fake/limits`` ``{"key": "<credential>" | "*", "requests_limit"?, "tokens_limit"?,
  "input_tokens_limit"?, "output_tokens_limit"?, "remaining"?: {"requests"|"tokens"|
  "input-tokens"|"output-tokens": n}, "reset_in"?: seconds}`` -> ``{"ok": true, ...}``. Setting a
  limit refills that family to the new limit; ``tokens`` follows input + output unless set
  itself. ``remaining`` overrides what is left, and then the window lasts until the first
  minute boundary at least 30 s away (or ``reset_in`` seconds), so a test cannot race the
  refill. ``"*"`` changes the defaults and every known credential.
- ``POST /_fake/reset`` -> ``{"ok": true}``: forget faults, limits, cache, stats and log.
- ``GET /_fake/stats`` -> ``{"requests": {credential: n}, "total": n, "by_path": {path: n}}``:
  ``requests``/``total`` count ``/v1/messages`` requests (every one that arrived, whatever its
  outcome; a missing credential counts under ``""``); ``by_path`` counts every ``/v1/*`` path.
- ``GET /_fake/requests?limit=50`` -> a JSON array of the most recent requests, oldest first
  (ring buffer of 200): ``{"method", "path", "query" (raw query string), "headers"
  (lower-cased names; repeated headers joined with ", "), "body" (parsed JSON, or null when
  unparsable, absent or over 1 MiB), "body_bytes", "credential" (or null), "request_id",
  "status" (null while unanswered, 0 for a scripted disconnect)}``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import httpx
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = ["FAULT_KINDS", "MODELS", "FakeState", "Fault", "create_fake_app", "get_state", "run"]

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

MAX_BODY_BYTES: Final = 32 * 1024 * 1024
REQUEST_LOG_SIZE: Final = 200
LOGGED_BODY_MAX_BYTES: Final = 1024 * 1024
CACHE_MAX_ENTRIES: Final = 50_000
BUCKET_MAX_ENTRIES: Final = 100_000
DEFAULT_REPLY_WORDS: Final = 20
ECHO_WORDS: Final = 8
MSG_OVERHEAD_CHARS: Final = 12  # 3 tokens per message
MEDIA_CHARS: Final = 4000  # 1,000 tokens per image or document
JSON_PIECE_CHARS: Final = 12
TTL_SECONDS: Final = {"5m": 300.0, "1h": 3600.0}

FAMILIES: Final = ("requests", "tokens", "input-tokens", "output-tokens")
DEFAULT_LIMITS: Final = {
    "requests": 4000,
    "tokens": 2_400_000,
    "input-tokens": 2_000_000,
    "output-tokens": 400_000,
}
_LIMIT_FIELDS: Final = {
    "requests_limit": "requests",
    "tokens_limit": "tokens",
    "input_tokens_limit": "input-tokens",
    "output_tokens_limit": "output-tokens",
}

FAULT_KINDS: Final = frozenset(
    {
        "rate_limit",
        "unauthorized",
        "forbidden",
        "no_credit",
        "server_error",
        "overloaded",
        "slow",
        "slow_stream",
        "mid_stream_error",
        "hang",
        "disconnect",
        "error",
    }
)
# kind -> (status, error type, message)
_ERROR_FAULTS: Final[dict[str, tuple[int, str, str]]] = {
    "rate_limit": (
        429,
        "rate_limit_error",
        "This request would exceed your organization's rate limit. For details, refer to: "
        "https://docs.claude.com/en/api/rate-limits. You can see the response headers for "
        "current usage. Please reduce the prompt length or the maximum tokens requested, or "
        "try again later.",
    ),
    "unauthorized": (401, "authentication_error", "invalid x-api-key"),
    "forbidden": (
        403,
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    "no_credit": (
        400,
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
        "Billing to upgrade or purchase credits.",
    ),
    "server_error": (500, "api_error", "Internal server error"),
    "overloaded": (529, "overloaded_error", "Overloaded"),
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One entry of ``GET /v1/models`` (sandbox values)."""

    id: str
    display_name: str
    created_at: str
    max_input_tokens: int
    max_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "model",
            "id": self.id,
            "display_name": self.display_name,
            "created_at": self.created_at,
            "max_input_tokens": self.max_input_tokens,
            "max_tokens": self.max_tokens,
        }


# Newest first, as Anthropic lists them.
MODELS: Final[tuple[ModelInfo, ...]] = (
    ModelInfo("claude-fable-5", "Claude Fable 5", "2026-09-30T00:00:00Z", 1_000_000, 128_000),
    ModelInfo("claude-sonnet-5", "Claude Sonnet 5", "2026-08-12T00:00:00Z", 1_000_000, 64_000),
    ModelInfo("claude-opus-5", "Claude Opus 5", "2026-07-24T00:00:00Z", 1_000_000, 128_000),
    ModelInfo("claude-opus-4-8", "Claude Opus 4.8", "2026-06-10T00:00:00Z", 1_000_000, 128_000),
    ModelInfo("claude-opus-4-7", "Claude Opus 4.7", "2026-04-16T00:00:00Z", 1_000_000, 128_000),
    ModelInfo("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z", 1_000_000, 64_000),
    ModelInfo("claude-opus-4-6", "Claude Opus 4.6", "2026-02-05T00:00:00Z", 1_000_000, 128_000),
    ModelInfo(
        "claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z", 200_000, 64_000
    ),
    ModelInfo(
        "claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z", 200_000, 64_000
    ),
    ModelInfo(
        "claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z", 200_000, 64_000
    ),
)
MODEL_ALIASES: Final = {
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-opus-4-5": "claude-opus-4-5-20251101",
}
_MODELS_BY_ID: Final = {m.id: m for m in MODELS}
_MODEL_INDEX: Final = {m.id: i for i, m in enumerate(MODELS)}

_GREETING: Final = ("Hello", "from", "the", "fake", "upstream.", "You", "said:")
_FILLER_TEXT: Final = (
    "This is a deterministic sandbox reply from poolrelay so that clients see a realistic "
    "stream of text deltas and usage numbers without calling Anthropic."
)
_FILLER: Final = tuple(_FILLER_TEXT.split())
_REPLY_WITH_RE: Final = re.compile(r"reply with (\d{1,6}) words?", re.IGNORECASE)

# Stream event kinds (how pacing and mid-stream errors treat them).
_EV_OTHER: Final = 0
_EV_DELTA: Final = 1
_EV_END: Final = 2  # message_delta and message_stop

_JSON_CT: Final = (b"content-type", b"application/json")
_SSE_CT: Final = b"text/event-stream; charset=utf-8"
_RL_HEADER_NAMES: Final = {
    fam: (
        f"anthropic-ratelimit-{fam}-limit".encode(),
        f"anthropic-ratelimit-{fam}-remaining".encode(),
        f"anthropic-ratelimit-{fam}-reset".encode(),
    )
    for fam in FAMILIES
}
_DELTA_HEAD: Final = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)
_JSON_DELTA_HEAD: Final = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":'
)
_DELTA_TAIL: Final = b"}}\n\n"
_PING: Final = b'event: ping\ndata: {"type":"ping"}\n\n'
_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_MID_STREAM_ERROR: Final = (
    b'event: error\ndata: {"type":"error","error":'
    b'{"type":"overloaded_error","message":"Overloaded"}}\n\n'
)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


_ID_TABLE: Final = bytes.maketrans(b"+/", b"xQ")


def _new_id(prefix: str, n: int = 22) -> str:
    """``prefix`` + ``n`` random alphanumeric characters (fast; not a secret)."""
    return prefix + base64.b64encode(os.urandom(n))[:n].translate(_ID_TABLE).decode()


def _tokens(chars: int) -> int:
    return (chars + 3) // 4


def _next_minute(now: float) -> int:
    return (int(now) // 60 + 1) * 60


_RFC3339_CACHE: dict[int, bytes] = {}


def _rfc3339(ts: int) -> bytes:
    value = _RFC3339_CACHE.get(ts)
    if value is None:
        if len(_RFC3339_CACHE) > 256:
            _RFC3339_CACHE.clear()
        value = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)).encode()
        _RFC3339_CACHE[ts] = value
    return value


def _sse(name: bytes, payload: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _str_len(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def _json_chars(value: Any) -> int:
    """Characters of every key and scalar in a JSON value (tool schemas, tool inputs)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(k) + _json_chars(v) for k, v in value.items() if k != "cache_control")
    if isinstance(value, list):
        return sum(_json_chars(v) for v in value)
    if value is None or isinstance(value, bool):
        return 0
    return len(str(value))


def _block_chars(block: Any) -> int:
    if isinstance(block, str):
        return len(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "text":
        return _str_len(block.get("text"))
    if kind in ("image", "document"):
        return MEDIA_CHARS
    if kind == "tool_result":
        return _content_chars(block.get("content"))
    if kind == "tool_use":
        return _str_len(block.get("name")) + _json_chars(block.get("input"))
    if kind == "thinking":
        return _str_len(block.get("thinking"))
    return sum(_json_chars(v) for k, v in block.items() if k not in ("type", "cache_control"))


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(_block_chars(b) for b in content)
    return 0


def _content_text(content: Any) -> str:
    """The plain text of a message content (text blocks and tool results)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in content:
        if isinstance(block, dict):
            kind = block.get("type")
            if kind == "text":
                text = block.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif kind == "tool_result":
                parts.append(_content_text(block.get("content")))
        elif isinstance(block, str):
            parts.append(block)
    return " ".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------
# Prompt analysis and caching
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Prompt:
    chars: int
    # (chars up to and including this unit, hash tag, payload) for every cacheable unit
    units: list[tuple[int, str, Any]]
    # (unit index, ttl) of each cache_control breakpoint, in prompt order
    breakpoints: list[tuple[int, str]]


def _ttl_of(cache_control: Any) -> str | None:
    if not isinstance(cache_control, dict):
        return None
    return "1h" if cache_control.get("ttl") == "1h" else "5m"


def _analyze(body: dict[str, Any]) -> _Prompt:
    """Walk the prompt in cache order (tools, system, messages), counting characters."""
    units: list[tuple[int, str, Any]] = []
    bps: list[tuple[int, str]] = []
    chars = 0

    def add(tag: str, payload: Any) -> None:
        units.append((chars, tag, payload))
        if isinstance(payload, dict):
            ttl = _ttl_of(payload.get("cache_control"))
            if ttl is not None:
                bps.append((len(units) - 1, ttl))

    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                chars += (
                    _str_len(tool.get("name"))
                    + _str_len(tool.get("description"))
                    + _json_chars(tool.get("input_schema"))
                )
            add("t", tool)
    system = body.get("system")
    if isinstance(system, str):
        if system:
            chars += len(system)
            add("s", system)
    elif isinstance(system, list):
        for block in system:
            chars += _block_chars(block)
            add("s", block)
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            chars += MSG_OVERHEAD_CHARS
            tag = "m:" + str(message.get("role"))
            content = message.get("content")
            if isinstance(content, list) and content:
                for i, block in enumerate(content):
                    chars += _block_chars(block)
                    add(tag if i == 0 else "b", block)
            else:
                chars += _content_chars(content)
                add(tag, content)
    top_ttl = _ttl_of(body.get("cache_control"))
    if top_ttl is not None and units and (not bps or bps[-1][0] != len(units) - 1):
        bps.append((len(units) - 1, top_ttl))
    return _Prompt(chars, units, bps)


@dataclass(slots=True)
class _CachePlan:
    read: int
    write_5m: int
    write_1h: int
    store: list[tuple[tuple[str, bytes], float]]  # (key, ttl seconds) to (re)write on commit


def _prefix_digests(model: str, units: list[tuple[int, str, Any]], upto: int) -> list[bytes]:
    h = hashlib.blake2b(model.encode(), digest_size=16)
    out: list[bytes] = []
    for _, tag, payload in units[: upto + 1]:
        if isinstance(payload, dict) and "cache_control" in payload:
            payload = {k: v for k, v in payload.items() if k != "cache_control"}
        h.update(b"\x00" + tag.encode() + b"\x00")
        h.update(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))
        out.append(h.copy().digest())
    return out


# --------------------------------------------------------------------------------------------
# Reply generation
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _ToolCall:
    id: str
    name: str
    input: Any
    json: str


@dataclass(slots=True)
class _Reply:
    pieces: list[str]  # text deltas: "Hello", " from", ...
    tool: _ToolCall | None
    stop_reason: str
    stop_sequence: str | None
    output_tokens: int


def sample_from_schema(schema: Any, depth: int = 0) -> Any:
    """A plausible value for a JSON schema (required object properties only)."""
    if not isinstance(schema, dict) or depth > 8:
        return "Paris"
    if "const" in schema:
        return schema["const"]
    for key in ("enum", "examples"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return options[0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return sample_from_schema(options[0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and "properties" in schema:
        kind = "object"
    if kind == "object":
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = schema.get("required")
        names = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
        return {name: sample_from_schema(props.get(name), depth + 1) for name in names}
    if kind == "array":
        items = schema.get("items")
        return [sample_from_schema(items, depth + 1)] if isinstance(items, dict) else []
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "Paris"


def _pieces(words: list[str]) -> list[str]:
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _cut_at_stop(pieces: list[str], stops: list[str]) -> tuple[list[str], str | None]:
    if not stops:
        return pieces, None
    text = "".join(pieces)
    best = -1
    found: str | None = None
    for stop in stops:
        pos = text.find(stop)
        if pos >= 0 and (best < 0 or pos < best):
            best, found = pos, stop
    if found is None:
        return pieces, None
    out: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) >= best:
            rest = piece[: best - used]
            if rest:
                out.append(rest)
            break
        out.append(piece)
        used += len(piece)
    return out, found


def _plan_reply(body: dict[str, Any]) -> _Reply:
    max_tokens: int = body["max_tokens"]
    raw_stops = body.get("stop_sequences")
    stops = [s for s in raw_stops if isinstance(s, str) and s] if raw_stops else []

    user_content: Any = None
    for message in reversed(body["messages"]):
        if isinstance(message, dict) and message.get("role") == "user":
            user_content = message.get("content")
            break
    after_tool_result = isinstance(user_content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in user_content
    )
    user_text = _content_text(user_content)

    tools = body.get("tools")
    choice = body.get("tool_choice")
    choice_type = choice.get("type") if isinstance(choice, dict) else "auto"
    if isinstance(tools, list) and tools and choice_type != "none" and not after_tool_result:
        tool: Any = None
        if choice_type == "tool" and isinstance(choice, dict):
            tool = next(
                (t for t in tools if isinstance(t, dict) and t.get("name") == choice.get("name")),
                None,
            )
            name = str(choice.get("name"))
        else:
            tool = tools[0]
            name = str(tool.get("name")) if isinstance(tool, dict) else "tool"
        schema = tool.get("input_schema") if isinstance(tool, dict) else None
        tool_input = sample_from_schema(schema) if isinstance(schema, dict) else {}
        if not isinstance(tool_input, dict):
            tool_input = {}
        words = ["Let", "me", "call", "the", name, "tool."]
        pieces, stop = _cut_at_stop(_pieces(words), stops)
        if stop is not None:
            return _Reply(pieces, None, "stop_sequence", stop, max(1, len(pieces)))
        tool_json = orjson.dumps(tool_input).decode()
        total = len(words) + max(1, _tokens(len(tool_json)))
        if total <= max_tokens:
            call = _ToolCall(_new_id("toolu_01"), name, tool_input, tool_json)
            return _Reply(pieces, call, "tool_use", None, total)
        pieces = pieces[:max_tokens]
        return _Reply(pieces, None, "max_tokens", None, max(1, len(pieces)))

    match = _REPLY_WITH_RE.search(user_text)
    wanted = max(1, int(match.group(1))) if match else DEFAULT_REPLY_WORDS
    stop_reason = "end_turn"
    if wanted > max_tokens:
        wanted = max_tokens
        stop_reason = "max_tokens"
    base = [*_GREETING, *user_text[:400].split()[:ECHO_WORDS]]
    if wanted <= len(base):
        words = base[:wanted]
    else:
        n_filler = len(_FILLER)
        words = base + [_FILLER[i % n_filler] for i in range(wanted - len(base))]
    pieces, stop = _cut_at_stop(_pieces(words), stops)
    if stop is not None:
        return _Reply(pieces, None, "stop_sequence", stop, max(1, len(pieces)))
    return _Reply(pieces, None, stop_reason, None, len(pieces))


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Fault:
    """A scripted failure for one credential (or ``"*"``)."""

    kind: str
    times: int | None = None
    retry_after: float = 30.0
    delay: float | None = None
    after_events: int = 4
    all_paths: bool = False
    status: int = 500
    error_type: str = "api_error"
    message: str = "Scripted error"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error_type": self.error_type,
            "message": self.message,
            "fault": self.kind,
            "times": self.times,
            "retry_after": self.retry_after,
            "delay": self.delay,
            "after_events": self.after_events,
            "paths": "all" if self.all_paths else "messages",
        }


class _Bucket:
    """Rate-limit counters of one credential for the current window."""

    __slots__ = ("limits", "remaining", "reset_at", "tokens_explicit")

    def __init__(self, limits: dict[str, int], tokens_explicit: bool, now: float) -> None:
        self.limits = dict(limits)
        self.remaining = dict(limits)
        self.reset_at = _next_minute(now)
        self.tokens_explicit = tokens_explicit

    def refresh(self, now: float) -> None:
        if now >= self.reset_at:
            self.remaining = dict(self.limits)
            self.reset_at = _next_minute(now)

    def set_limit(self, family: str, value: int) -> None:
        self.limits[family] = value
        self.remaining[family] = value
        if family == "tokens":
            self.tokens_explicit = True
        elif family in ("input-tokens", "output-tokens") and not self.tokens_explicit:
            combined = self.limits["input-tokens"] + self.limits["output-tokens"]
            self.limits["tokens"] = combined
            self.remaining["tokens"] = combined

    def exceeded(self, input_tokens: int, output_tokens: int) -> str | None:
        """The first family this request would take below zero, else consume and None."""
        need = (1, input_tokens + output_tokens, input_tokens, output_tokens)
        remaining = self.remaining
        for family, amount in zip(FAMILIES, need, strict=True):
            if remaining[family] - amount < 0:
                return family
        for family, amount in zip(FAMILIES, need, strict=True):
            remaining[family] -= amount
        return None

    def headers(self, requests_reset: int | None = None) -> list[tuple[bytes, bytes]]:
        reset = _rfc3339(self.reset_at)
        out: list[tuple[bytes, bytes]] = []
        for family in FAMILIES:
            limit_name, remaining_name, reset_name = _RL_HEADER_NAMES[family]
            remaining = max(0, self.remaining[family])
            family_reset = reset
            if family == "requests":
                if requests_reset is not None:
                    remaining = 0
                    family_reset = _rfc3339(requests_reset)
            else:
                remaining = remaining // 1000 * 1000
            out.append((limit_name, str(self.limits[family]).encode()))
            out.append((remaining_name, str(remaining).encode()))
            out.append((reset_name, family_reset))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "limits": dict(self.limits),
            "remaining": dict(self.remaining),
            "reset": _rfc3339(self.reset_at).decode(),
        }


class FakeState:
    """Everything one fake upstream app remembers (stored as ``app.state.fake``)."""

    def __init__(self) -> None:
        self.org_id: str = str(uuid.uuid4())
        self.org_header: tuple[bytes, bytes] = (
            b"anthropic-organization-id",
            self.org_id.encode(),
        )
        self.faults: dict[str, Fault] = {}
        self.default_limits: dict[str, int] = dict(DEFAULT_LIMITS)
        self.default_tokens_explicit = False
        self.buckets: dict[str, _Bucket] = {}
        self.cache: dict[tuple[str, bytes], tuple[float, float]] = {}
        self.requests_by_key: dict[str, int] = {}
        self.by_path: dict[str, int] = {}
        self.total = 0
        self.log: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)

    def reset(self) -> None:
        """Forget everything but the organization id."""
        self.faults.clear()
        self.default_limits = dict(DEFAULT_LIMITS)
        self.default_tokens_explicit = False
        self.buckets.clear()
        self.cache.clear()
        self.requests_by_key.clear()
        self.by_path.clear()
        self.total = 0
        self.log.clear()

    # -- bookkeeping ---------------------------------------------------------------------------

    def record(
        self,
        request: Request,
        path: str,
        body: Any,
        body_bytes: int,
        credential: str | None,
        request_id: str,
        is_messages: bool,
    ) -> dict[str, Any]:
        self.by_path[path] = self.by_path.get(path, 0) + 1
        if is_messages:
            key = credential or ""
            self.requests_by_key[key] = self.requests_by_key.get(key, 0) + 1
            self.total += 1
        headers: dict[str, str] = {}
        for raw_name, raw_value in request.scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        entry: dict[str, Any] = {
            "method": request.method,
            "path": path,
            "query": request.scope["query_string"].decode("latin-1"),
            "headers": headers,
            "body": body if body_bytes <= LOGGED_BODY_MAX_BYTES else None,
            "body_bytes": body_bytes,
            "credential": credential,
            "request_id": request_id,
            "status": None,
        }
        self.log.append(entry)
        return entry

    def bucket(self, credential: str, now: float) -> _Bucket:
        bucket = self.buckets.get(credential)
        if bucket is None:
            if len(self.buckets) >= BUCKET_MAX_ENTRIES:
                del self.buckets[next(iter(self.buckets))]
            bucket = _Bucket(self.default_limits, self.default_tokens_explicit, now)
            self.buckets[credential] = bucket
        else:
            bucket.refresh(now)
        return bucket

    def take_fault(self, credential: str, is_messages: bool) -> Fault | None:
        """The fault that applies to this request, counting down its ``times``."""
        for key in (credential, "*"):
            fault = self.faults.get(key)
            if fault is None or not (is_messages or fault.all_paths):
                continue
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self.faults[key]
            return fault
        return None

    # -- prompt cache ---------------------------------------------------------------------------

    def cache_plan(self, credential: str, model: str, prompt: _Prompt, total: int) -> _CachePlan:
        bps = prompt.breakpoints
        last = bps[-1][0]
        digests = _prefix_digests(model, prompt.units, last)
        now = time.monotonic()
        units = prompt.units
        cache = self.cache

        read_pos = 0
        hit: tuple[tuple[str, bytes], float] | None = None
        for i in range(last, -1, -1):
            key = (credential, digests[i])
            entry = cache.get(key)
            if entry is not None and entry[0] > now:
                read_pos = _tokens(units[i][0])
                hit = (key, entry[1])
                break

        writes = {"5m": 0, "1h": 0}
        prev = 0
        for index, ttl in bps:
            pos = _tokens(units[index][0])
            start = max(prev, read_pos)
            if pos > start:
                writes[ttl] += pos - start
            prev = max(prev, pos)

        read = min(read_pos, total)
        write_1h = min(writes["1h"], total - read)
        write_5m = min(writes["5m"], total - read - write_1h)
        store = [((credential, digests[i]), TTL_SECONDS[ttl]) for i, ttl in bps]
        if hit is not None:
            store.append(hit)
        return _CachePlan(read, write_5m, write_1h, store)

    def cache_commit(self, plan: _CachePlan) -> None:
        now = time.monotonic()
        cache = self.cache
        for key, ttl in plan.store:
            cache.pop(key, None)
            cache[key] = (now + ttl, ttl)
        while len(cache) > CACHE_MAX_ENTRIES:
            del cache[next(iter(cache))]


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


class _RawResponse(Response):
    """A response with pre-encoded headers (skips Starlette's header building)."""

    def __init__(self, body: bytes, status_code: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status_code
        self.background = None
        self.body = body
        headers.append((b"content-length", str(len(body)).encode()))
        headers.append(_JSON_CT)
        self.raw_headers = headers


class _NoResponse(Response):
    """Sends nothing: the connection is gone or was closed on purpose."""

    def __init__(self) -> None:
        self.status_code = 499
        self.background = None
        self.body = b""
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


async def _pause(receive: Receive, seconds: float) -> bool:
    """Sleep ``seconds``, waking early if the client disconnects. True if it did."""
    if seconds <= 0:
        return False
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return True
    except TimeoutError:
        return False


class _SSEResponse(Response):
    """Streams pre-planned SSE events one ``send`` per event, optionally paced.

    Like Starlette's ``StreamingResponse`` fed by a generator, minus its per-response
    disconnect-listener task: a disconnect is noticed while pausing between events.
    """

    def __init__(
        self,
        events: Iterator[tuple[int, bytes]],
        headers: list[tuple[bytes, bytes]],
        gap: float = 0.0,
        gap_all_events: bool = False,
        error_after: int | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.body = b""
        headers.append((b"content-type", _SSE_CT))
        headers.append((b"cache-control", b"no-cache"))
        self.raw_headers = headers
        self.events = events
        self.gap = gap
        self.gap_all_events = gap_all_events
        self.error_after = error_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        gap = self.gap
        error_after = self.error_after
        seen_delta = False
        for sent, (kind, data) in enumerate(self.events):
            if error_after is not None and (sent >= error_after or kind == _EV_END):
                data = _MID_STREAM_ERROR
                kind = _EV_END
            if gap > 0:
                pace = sent > 0 if self.gap_all_events else (kind == _EV_DELTA and seen_delta)
                if pace and await _pause(receive, gap):
                    return
            seen_delta = seen_delta or kind == _EV_DELTA
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if data is _MID_STREAM_ERROR:
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _usage(
    input_tokens: int, plan: _CachePlan | None, output_tokens: int, full: bool = True
) -> dict[str, Any]:
    write_5m = plan.write_5m if plan else 0
    write_1h = plan.write_1h if plan else 0
    usage: dict[str, Any] = {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": write_5m + write_1h,
        "cache_read_input_tokens": plan.read if plan else 0,
    }
    if full:
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": write_5m,
            "ephemeral_1h_input_tokens": write_1h,
        }
    usage["output_tokens"] = output_tokens
    if full:
        usage["service_tier"] = "standard"
    return usage


def _sse_events(
    msg_id: str, model: str, reply: _Reply, input_tokens: int, plan: _CachePlan | None
) -> Iterator[tuple[int, bytes]]:
    start_message: dict[str, Any] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(input_tokens, plan, 1),
    }
    yield _EV_OTHER, _sse(b"message_start", {"type": "message_start", "message": start_message})
    yield (
        _EV_OTHER,
        _sse(
            b"content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
    )
    yield _EV_OTHER, _PING
    for piece in reply.pieces:
        yield _EV_DELTA, _DELTA_HEAD + orjson.dumps(piece) + _DELTA_TAIL
    yield _EV_OTHER, _sse(b"content_block_stop", {"type": "content_block_stop", "index": 0})
    tool = reply.tool
    if tool is not None:
        block = {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}
        yield (
            _EV_OTHER,
            _sse(
                b"content_block_start",
                {"type": "content_block_start", "index": 1, "content_block": block},
            ),
        )
        yield _EV_DELTA, _JSON_DELTA_HEAD + b'""' + _DELTA_TAIL
        text = tool.json
        for i in range(0, len(text), JSON_PIECE_CHARS):
            chunk = orjson.dumps(text[i : i + JSON_PIECE_CHARS])
            yield _EV_DELTA, _JSON_DELTA_HEAD + chunk + _DELTA_TAIL
        yield _EV_OTHER, _sse(b"content_block_stop", {"type": "content_block_stop", "index": 1})
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
        "usage": _usage(input_tokens, plan, reply.output_tokens, full=False),
    }
    yield _EV_END, _sse(b"message_delta", delta)
    yield _EV_END, _MESSAGE_STOP


def _message_json(
    msg_id: str, model: str, reply: _Reply, input_tokens: int, plan: _CachePlan | None
) -> bytes:
    content: list[dict[str, Any]] = [{"type": "text", "text": "".join(reply.pieces)}]
    if reply.tool is not None:
        tool = reply.tool
        content.append({"type": "tool_use", "id": tool.id, "name": tool.name, "input": tool.input})
    return orjson.dumps(
        {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": _usage(input_tokens, plan, reply.output_tokens),
        }
    )


def _find_connection() -> tuple[Any, Any] | None:
    """The (request cycle, socket transport) of the current uvicorn request, if any.

    uvicorn runs each request in a task whose coroutine is ``RequestResponseCycle.run_asgi``;
    that cycle holds the connection's transport. Anything else (in-process transports, other
    servers) yields None.
    """
    task = asyncio.current_task()
    if task is None:
        return None
    frame = getattr(task.get_coro(), "cr_frame", None)
    if frame is None:
        return None
    owner = frame.f_locals.get("self")
    transport = getattr(owner, "transport", None)
    if transport is not None and hasattr(transport, "close") and hasattr(transport, "is_closing"):
        return owner, transport
    return None


def _invalid(message: str) -> tuple[int, str, str]:
    return 400, "invalid_request_error", message


def _validate(body: Any, *, need_max_tokens: bool) -> tuple[int, str, str] | None:
    if not isinstance(body, dict):
        return _invalid("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        return _invalid("model: Field required")
    if not isinstance(model, str) or not model:
        return _invalid("model: Input should be a valid string")
    if need_max_tokens:
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            return _invalid("max_tokens: Field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return _invalid("max_tokens: Input should be an integer greater than or equal to 1")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            return _invalid("stream: Input should be a valid boolean")
    messages = body.get("messages")
    if messages is None:
        return _invalid("messages: Field required")
    if not isinstance(messages, list):
        return _invalid("messages: Input should be a valid list")
    if not messages:
        return _invalid("messages: at least one message is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return _invalid(f"messages.{i}: each message needs a role and content")
        if message["role"] not in ("user", "assistant", "system"):
            return _invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
    ):
        return _invalid("stop_sequences: Input should be a valid list of strings")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        return _invalid("tools: Input should be a valid list")
    return None


def _credential(request: Request) -> str | None:
    headers = request.headers
    key = headers.get("x-api-key")
    if key:
        return key
    auth = headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        token = auth[7:].strip()
        if token:
            return token
    return None


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


def _ok(payload: Any, status_code: int = 200) -> Response:
    return _RawResponse(orjson.dumps(payload), status_code, [])


def _bad_control(message: str) -> Response:
    return _ok({"ok": False, "error": message}, 400)


async def _control_body(request: Request) -> dict[str, Any] | Response:
    """A control request's JSON object, or the 400 that refuses it."""
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return _bad_control("body must be JSON")
    if not isinstance(data, dict):
        return _bad_control("body must be a JSON object")
    return data


def _number(value: Any, name: str, *, integer: bool = False) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    if integer and not isinstance(value, int):
        raise ValueError(f"{name} must be a non-negative integer")
    return value


class _Handlers:
    def __init__(self, state: FakeState) -> None:
        self.state = state

    # -- shared ---------------------------------------------------------------------------------

    def _base_headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        return [(b"request-id", request_id.encode()), self.state.org_header]

    def _error(
        self,
        entry: dict[str, Any] | None,
        request_id: str,
        credential: str | None,
        status: int,
        error_type: str,
        message: str,
        extra: list[tuple[bytes, bytes]] | None = None,
        requests_reset: int | None = None,
    ) -> Response:
        headers = self._base_headers(request_id)
        headers.extend(self.state.bucket(credential or "", time.time()).headers(requests_reset))
        if extra:
            headers.extend(extra)
        should_retry = status in (408, 409, 429) or status >= 500
        headers.append((b"x-should-retry", b"true" if should_retry else b"false"))
        body = orjson.dumps(
            {
                "type": "error",
                "error": {"type": error_type, "message": message},
                "request_id": request_id,
            }
        )
        if entry is not None:
            entry["status"] = status
        return _RawResponse(body, status, headers)

    async def _fault_response(
        self,
        fault: Fault,
        entry: dict[str, Any],
        request_id: str,
        credential: str,
        receive: Receive,
        streaming_possible: bool,
    ) -> Response | None:
        """Apply a fault that ends the request; None when the request goes on."""
        kind = fault.kind
        spec = _ERROR_FAULTS.get(kind)
        if kind == "error":
            spec = (fault.status, fault.error_type, fault.message)
        if spec is not None:
            status, error_type, message = spec
            extra: list[tuple[bytes, bytes]] = []
            requests_reset: int | None = None
            if kind == "rate_limit":
                seconds = fault.retry_after
                value = str(int(seconds)) if float(seconds).is_integer() else str(seconds)
                extra.append((b"retry-after", value.encode()))
                requests_reset = int(time.time() + seconds + 0.999)
            return self._error(
                entry, request_id, credential, status, error_type, message, extra, requests_reset
            )
        if kind == "disconnect":
            entry["status"] = 0
            return await self._disconnect()
        if kind == "hang":
            if await _pause(receive, 3600.0 if fault.delay is None else fault.delay):
                return _NoResponse()
        elif kind == "slow" or (kind == "slow_stream" and not streaming_possible):
            if await _pause(receive, 1.0 if fault.delay is None else fault.delay):
                return _NoResponse()
        elif kind == "mid_stream_error" and not streaming_possible:
            return self._error(entry, request_id, credential, 529, "overloaded_error", "Overloaded")
        return None

    async def _disconnect(self) -> Response:
        connection = _find_connection()
        if connection is None:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        cycle, transport = connection
        transport.close()
        # Let the server see the connection go, so that it neither sends nor logs anything.
        for _ in range(50):
            await asyncio.sleep(0)
            if getattr(cycle, "disconnected", True):
                break
        return _NoResponse()

    def _start(
        self, request: Request, path: str, body: Any, body_bytes: int, is_messages: bool
    ) -> tuple[str, str | None, dict[str, Any]]:
        request_id = _new_id("req_011C", 20)
        credential = _credential(request)
        entry = self.state.record(
            request, path, body, body_bytes, credential, request_id, is_messages
        )
        return request_id, credential, entry

    def _missing_credential(self, entry: dict[str, Any], request_id: str) -> Response:
        return self._error(
            entry, request_id, None, 401, "authentication_error", "x-api-key header is required"
        )

    # -- Anthropic endpoints --------------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        state = self.state
        raw = await request.body()
        body: Any
        parse_error: str | None = None
        if len(raw) > MAX_BODY_BYTES:
            body, parse_error = None, "too large"
        else:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                body, parse_error = None, f"There was an error parsing the body: {exc}"
        request_id, credential, entry = self._start(request, "/v1/messages", body, len(raw), True)
        if credential is None:
            return self._missing_credential(entry, request_id)

        gap = 0.0
        gap_all_events = False
        error_after: int | None = None
        fault = state.take_fault(credential, True)
        if fault is not None:
            wants_stream = isinstance(body, dict) and body.get("stream") is True
            early = await self._fault_response(
                fault, entry, request_id, credential, request.receive, wants_stream
            )
            if early is not None:
                return early
            if fault.kind == "slow":
                gap = 1.0 if fault.delay is None else fault.delay
            elif fault.kind == "slow_stream":
                gap = 1.0 if fault.delay is None else fault.delay
                gap_all_events = True
            elif fault.kind == "mid_stream_error":
                error_after = fault.after_events

        if parse_error is not None:
            if body is None and len(raw) > MAX_BODY_BYTES:
                return self._error(
                    entry,
                    request_id,
                    credential,
                    413,
                    "request_too_large",
                    "Request exceeds the maximum allowed number of bytes.",
                )
            return self._error(
                entry, request_id, credential, 400, "invalid_request_error", parse_error
            )
        problem = _validate(body, need_max_tokens=True)
        if problem is not None:
            return self._error(entry, request_id, credential, *problem)

        model_sent: str = body["model"]
        model = MODEL_ALIASES.get(model_sent, model_sent)
        prompt = _analyze(body)
        total = max(1, min(_tokens(prompt.chars), len(raw)))
        plan = state.cache_plan(credential, model, prompt, total) if prompt.breakpoints else None
        cached = (plan.read + plan.write_5m + plan.write_1h) if plan else 0
        input_tokens = total - cached
        reply = _plan_reply(body)

        now = time.time()
        bucket = state.bucket(credential, now)
        ratelimited_input = input_tokens + (plan.write_5m + plan.write_1h if plan else 0)
        family = bucket.exceeded(ratelimited_input, reply.output_tokens)
        if family is not None:
            wait = max(1, int(bucket.reset_at - now + 0.999))
            message = (
                f"This request would exceed your organization's rate limit of "
                f"{bucket.limits[family]:,} {family.replace('-', ' ')} per minute. For details, "
                "refer to: https://docs.claude.com/en/api/rate-limits. You can see the response "
                "headers for current usage. Please reduce the prompt length or the maximum "
                "tokens requested, or try again later."
            )
            return self._error(
                entry,
                request_id,
                credential,
                429,
                "rate_limit_error",
                message,
                [(b"retry-after", str(wait).encode())],
            )
        if plan is not None:
            state.cache_commit(plan)

        headers = self._base_headers(request_id)
        headers.extend(bucket.headers())
        msg_id = _new_id("msg_01")
        entry["status"] = 200
        if body.get("stream") is True:
            events = _sse_events(msg_id, model, reply, input_tokens, plan)
            return _SSEResponse(events, headers, gap, gap_all_events, error_after)
        if gap_all_events and await _pause(request.receive, gap):
            return _NoResponse()
        return _RawResponse(_message_json(msg_id, model, reply, input_tokens, plan), 200, headers)

    async def _probe_prologue(
        self, request: Request, path: str, body: Any, body_bytes: int = 0
    ) -> tuple[str, str | None, dict[str, Any], Response | None]:
        request_id, credential, entry = self._start(request, path, body, body_bytes, False)
        if credential is None:
            return request_id, None, entry, self._missing_credential(entry, request_id)
        fault = self.state.take_fault(credential, False)
        if fault is not None:
            early = await self._fault_response(
                fault, entry, request_id, credential, request.receive, False
            )
            if early is not None:
                return request_id, credential, entry, early
        return request_id, credential, entry, None

    def _json_ok(
        self, entry: dict[str, Any], request_id: str, credential: str, payload: Any
    ) -> Response:
        headers = self._base_headers(request_id)
        headers.extend(self.state.bucket(credential, time.time()).headers())
        entry["status"] = 200
        return _RawResponse(orjson.dumps(payload), 200, headers)

    async def count_tokens(self, request: Request) -> Response:
        raw = await request.body()
        body: Any = None
        parse_error: str | None = None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            parse_error = f"There was an error parsing the body: {exc}"
        path = "/v1/messages/count_tokens"
        request_id, credential, entry, early = await self._probe_prologue(
            request, path, body, len(raw)
        )
        if early is not None:
            return early
        assert credential is not None
        if parse_error is not None:
            return self._error(
                entry, request_id, credential, 400, "invalid_request_error", parse_error
            )
        problem = _validate(body, need_max_tokens=False)
        if problem is not None:
            return self._error(entry, request_id, credential, *problem)
        total = max(1, min(_tokens(_analyze(body).chars), len(raw)))
        return self._json_ok(entry, request_id, credential, {"input_tokens": total})

    async def list_models(self, request: Request) -> Response:
        request_id, credential, entry, early = await self._probe_prologue(
            request, "/v1/models", None
        )
        if early is not None:
            return early
        assert credential is not None
        params = request.query_params
        try:
            limit = int(params.get("limit", "20"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            return self._error(
                entry,
                request_id,
                credential,
                400,
                "invalid_request_error",
                "limit: Input should be between 1 and 1000",
            )
        start, end = 0, len(MODELS)
        after_id, before_id = params.get("after_id"), params.get("before_id")
        if after_id is not None:
            if after_id not in _MODEL_INDEX:
                return self._error(
                    entry, request_id, credential, 400, "invalid_request_error", "after_id: unknown"
                )
            start = _MODEL_INDEX[after_id] + 1
            end = min(len(MODELS), start + limit)
        elif before_id is not None:
            if before_id not in _MODEL_INDEX:
                return self._error(
                    entry,
                    request_id,
                    credential,
                    400,
                    "invalid_request_error",
                    "before_id: unknown",
                )
            end = _MODEL_INDEX[before_id]
            start = max(0, end - limit)
        else:
            end = min(len(MODELS), limit)
        page = MODELS[start:end]
        has_more = end < len(MODELS) if before_id is None else start > 0
        payload = {
            "data": [m.to_json() for m in page],
            "has_more": has_more,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }
        return self._json_ok(entry, request_id, credential, payload)

    async def get_model(self, request: Request) -> Response:
        model_id: str = request.path_params["model_id"]
        request_id, credential, entry, early = await self._probe_prologue(
            request, f"/v1/models/{model_id}", None
        )
        if early is not None:
            return early
        assert credential is not None
        info = _MODELS_BY_ID.get(MODEL_ALIASES.get(model_id, model_id))
        if info is None:
            return self._error(
                entry, request_id, credential, 404, "not_found_error", f"model: {model_id}"
            )
        return self._json_ok(entry, request_id, credential, info.to_json())

    async def not_found(self, request: Request, exc: Exception) -> Response:
        request_id = _new_id("req_011C", 20)
        headers = self._base_headers(request_id)
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        error_type, message = "not_found_error", "Not found"
        if status == 405:
            error_type, message = "invalid_request_error", "Method not allowed"
        body = {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": request_id,
        }
        return _RawResponse(orjson.dumps(body), status, headers)

    # -- control API ----------------------------------------------------------------------------

    async def set_fault(self, request: Request) -> Response:
        data = await _control_body(request)
        if isinstance(data, Response):
            return data
        key = data.get("key")
        kind = data.get("fault")
        if not isinstance(key, str) or not key:
            return _bad_control("key must be a credential or '*'")
        if kind not in FAULT_KINDS:
            return _bad_control(f"fault must be one of {sorted(FAULT_KINDS)}")
        paths = data.get("paths", "messages")
        if paths not in (None, "messages", "all"):
            return _bad_control("paths must be 'messages' or 'all'")
        try:
            times = _number(data.get("times"), "times", integer=True)
            retry_after = _number(data.get("retry_after"), "retry_after")
            delay = _number(data.get("delay"), "delay")
            after_events = _number(data.get("after_events"), "after_events", integer=True)
        except ValueError as exc:
            return _bad_control(str(exc))
        if times is not None and times < 1:
            return _bad_control("times must be at least 1 (or null)")
        status = data.get("status", 500)
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            return _bad_control("status must be an integer from 400 to 599")
        error_type = data.get("error_type", "api_error")
        message = data.get("message", "Scripted error")
        if not isinstance(error_type, str) or not isinstance(message, str):
            return _bad_control("error_type and message must be strings")
        self.state.faults[key] = Fault(
            kind=str(kind),
            times=None if times is None else int(times),
            retry_after=30.0 if retry_after is None else float(retry_after),
            delay=None if delay is None else float(delay),
            after_events=4 if after_events is None else int(after_events),
            all_paths=paths == "all",
            status=status,
            error_type=error_type,
            message=message,
        )
        return _ok({"ok": True})

    async def list_faults(self, request: Request) -> Response:
        return _ok({"faults": {k: f.to_json() for k, f in self.state.faults.items()}})

    async def clear_faults(self, request: Request) -> Response:
        key = request.query_params.get("key")
        if key is None:
            self.state.faults.clear()
        else:
            self.state.faults.pop(key, None)
        return _ok({"ok": True})

    async def set_limits(self, request: Request) -> Response:
        data = await _control_body(request)
        if isinstance(data, Response):
            return data
        key = data.get("key")
        if not isinstance(key, str) or not key:
            return _bad_control("key must be a credential or '*'")
        limits: dict[str, int] = {}
        remaining: dict[str, int] = {}
        try:
            for field_name, family in _LIMIT_FIELDS.items():
                value = _number(data.get(field_name), field_name, integer=True)
                if value is not None:
                    limits[family] = int(value)
            raw_remaining = data.get("remaining") or {}
            if not isinstance(raw_remaining, dict):
                raise ValueError("remaining must be an object")
            for name, value in raw_remaining.items():
                family = str(name).replace("_", "-")
                if family not in FAMILIES:
                    raise ValueError(f"remaining: unknown family {name!r}")
                number = _number(value, f"remaining.{name}", integer=True)
                if number is not None:
                    remaining[family] = int(number)
            reset_in = _number(data.get("reset_in"), "reset_in")
        except ValueError as exc:
            return _bad_control(str(exc))

        state = self.state
        now = time.time()
        if key == "*":
            targets = list(state.buckets.values())
            probe = _Bucket(state.default_limits, state.default_tokens_explicit, now)
            for family in ("tokens", "input-tokens", "output-tokens", "requests"):
                if family in limits:
                    probe.set_limit(family, limits[family])
            state.default_limits = dict(probe.limits)
            state.default_tokens_explicit = probe.tokens_explicit
        else:
            targets = [state.bucket(key, now)]
        for bucket in targets:
            # "tokens" first, so that an explicit tokens limit is not recomputed afterwards.
            for family in ("tokens", "input-tokens", "output-tokens", "requests"):
                if family in limits:
                    bucket.set_limit(family, limits[family])
            if remaining or reset_in is not None:
                bucket.remaining.update(remaining)
                if reset_in is not None:
                    bucket.reset_at = int(now + float(reset_in) + 0.999)
                else:
                    bucket.reset_at = _next_minute(now + 30)
        if key == "*":
            return _ok({"ok": True, "limits": dict(state.default_limits)})
        return _ok({"ok": True, **targets[0].to_json()})

    async def reset(self, request: Request) -> Response:
        self.state.reset()
        return _ok({"ok": True})

    async def stats(self, request: Request) -> Response:
        state = self.state
        return _ok(
            {
                "requests": dict(state.requests_by_key),
                "total": state.total,
                "by_path": dict(state.by_path),
            }
        )

    async def requests(self, request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "50"))
        except ValueError:
            return _bad_control("limit must be an integer")
        limit = max(0, min(limit, REQUEST_LOG_SIZE))
        log = list(self.state.log)
        return _ok(log[len(log) - limit :] if limit else [])


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def create_fake_app() -> Starlette:
    """A new fake upstream app with its own :class:`FakeState` (``app.state.fake``)."""
    state = FakeState()
    h = _Handlers(state)
    routes = [
        Route("/v1/messages", h.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", h.count_tokens, methods=["POST"]),
        Route("/v1/models", h.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", h.get_model, methods=["GET"]),
        Route("/_fake/faults", h.set_fault, methods=["POST"]),
        Route("/_fake/faults", h.list_faults, methods=["GET"]),
        Route("/_fake/faults", h.clear_faults, methods=["DELETE"]),
        Route("/_fake/limits", h.set_limits, methods=["POST"]),
        Route("/_fake/reset", h.reset, methods=["POST"]),
        Route("/_fake/stats", h.stats, methods=["GET"]),
        Route("/_fake/requests", h.requests, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: h.not_found, 405: h.not_found})
    app.state.fake = state
    return app


def get_state(app: Starlette) -> FakeState:
    """The :class:`FakeState` of an app made by :func:`create_fake_app`."""
    state = app.state.fake
    assert isinstance(state, FakeState)
    return state


def run(host: str = "127.0.0.1", port: int = 8081) -> None:
    """Serve a fake upstream with uvicorn (uvloop and httptools when installed)."""
    import uvicorn

    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    uvicorn.run(
        create_fake_app(),
        host=host,
        port=port,
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
