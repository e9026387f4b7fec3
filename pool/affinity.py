"""Affinity: which requests should go back to the account that served a previous one.

The upstream prompt cache lives on one account, so requests of one conversation should keep
landing on the account that served it. :func:`affinity_key` derives the key; the scheduler
maps it to an account in Redis for ``ttl`` seconds.

Sources, first match wins:

1. the ``x-claude-code-session-id`` header (Claude Code sends it on every request);
2. ``metadata.user_id`` in the body;
3. only when the body has ``cache_control`` breakpoints (top level, tools, system blocks,
   message content blocks): a hash of the part of the cacheable prefix that stays the same
   from one request of a conversation to the next — the canonical JSON of what comes up to
   and including the **first** breakpoint when it is in ``tools`` or ``system``; when the first
   breakpoint is in the messages (or is the top-level one, which marks the last block), of
   ``tools`` + ``system`` + the first message (up to its breakpoint, when the breakpoint is in
   it). A conversation moves its message breakpoint forward every turn, so keying on the
   last breakpoint would give every turn a new key and lose the account that holds the
   conversation's cache; its tools, system prompt and first message do not change.

The key is a hash of (source, customer id, value): customers never share a key and no user data
reaches Redis key names. ``ttl`` follows the prompt-cache TTL: 3600 s when any breakpoint asks
for ``"ttl": "1h"``, else 300 s. A malformed body never raises; it only yields fewer sources.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["LONG_TTL", "SESSION_HEADER", "SHORT_TTL", "affinity_key", "session_id"]

SESSION_HEADER = "x-claude-code-session-id"
SHORT_TTL = 300
LONG_TTL = 3600


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _session_header(headers: Mapping[str, str]) -> str | None:
    value = headers.get(SESSION_HEADER)
    if value is None:
        for name, val in headers.items():
            if name.lower() == SESSION_HEADER:
                value = val
                break
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _user_id(body: Mapping[str, Any]) -> str | None:
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping):
        user_id = metadata.get("user_id")
        if isinstance(user_id, str) and user_id:
            return user_id
    return None


SESSION_MAX_CHARS = 200


def session_id(headers: Mapping[str, str], body: Mapping[str, Any] | None) -> str | None:
    """The client's session: the ``x-claude-code-session-id`` header, else the session part
    of ``metadata.user_id`` in Claude Code's formats (``user_<hex>_account_<uuid>_session_<uuid>``,
    or the JSON string ``{"device_id", "account_uuid", "session_id"}``), else None. A value the
    request log could not store (over 200 characters, control characters) counts as none."""
    value = _session_header(headers)
    if value is None and body is not None:
        user_id = _user_id(body)
        if user_id is not None:
            value = _session_in_user_id(user_id)
    if value is None or len(value) > SESSION_MAX_CHARS or not value.isprintable():
        return None
    return value


def _session_in_user_id(user_id: str) -> str | None:
    if user_id.startswith("{"):
        try:
            parsed = orjson.loads(user_id)
        except orjson.JSONDecodeError:
            return None
        found = parsed.get("session_id") if isinstance(parsed, dict) else None
        return found if isinstance(found, str) and found else None
    _, marker, rest = user_id.rpartition("_session_")
    return rest if marker and rest else None


def _marker(block: Any) -> Mapping[str, Any] | None:
    if isinstance(block, Mapping):
        cache_control = block.get("cache_control")
        if isinstance(cache_control, Mapping):
            return cache_control
    return None


def _blocks(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


_Breakpoint = tuple[str, int, int]


def _breakpoints(body: Mapping[str, Any]) -> tuple[_Breakpoint | None, bool]:
    """(where the first breakpoint is, whether any breakpoint asks for the 1h TTL)."""
    first: _Breakpoint | None = None
    long_ttl = False

    def mark(block: Any, where: _Breakpoint) -> None:
        nonlocal first, long_ttl
        marker = _marker(block)
        if marker is not None:
            first = first or where
            long_ttl = long_ttl or marker.get("ttl") == "1h"

    for i, tool in enumerate(_blocks(body.get("tools"))):
        mark(tool, ("tools", i, 0))
    for i, block in enumerate(_blocks(body.get("system"))):
        mark(block, ("system", i, 0))
    for i, message in enumerate(_blocks(body.get("messages"))):
        content = message.get("content") if isinstance(message, Mapping) else None
        for j, block in enumerate(_blocks(content)):
            mark(block, ("messages", i, j))
    mark(body, ("all", 0, 0))
    return first, long_ttl


def _unmarked(blocks: list[Any]) -> list[Any]:
    """The blocks without their ``cache_control`` markers: a breakpoint that moves on (as a
    conversation's does every turn) changes no content, so it must not change the key."""
    return [
        {k: v for k, v in block.items() if k != "cache_control"}
        if isinstance(block, Mapping)
        else block
        for block in blocks
    ]


def _prefix_json(body: Mapping[str, Any], first: _Breakpoint) -> bytes:
    """Canonical JSON of the conversation's stable prefix (module docstring, source 3)."""
    tools = _unmarked(_blocks(body.get("tools")))
    system = body.get("system")
    system = _unmarked(system) if isinstance(system, list) else system
    messages = _blocks(body.get("messages"))
    where, i, j = first
    prefix: dict[str, Any]
    if where == "tools":
        prefix = {"tools": tools[: i + 1]}
    elif where == "system":
        prefix = {"tools": tools, "system": _blocks(system)[: i + 1]}
    else:
        opening: Any = messages[0] if messages else None
        if isinstance(opening, Mapping):
            content = opening.get("content")
            if isinstance(content, list):
                content = _unmarked(content[: j + 1] if where == "messages" and i == 0 else content)
            opening = {**opening, "content": content}
        prefix = {"tools": tools, "system": system, "first_message": opening}
    return orjson.dumps(prefix, option=orjson.OPT_SORT_KEYS)


def affinity_key(
    *, customer_id: str, headers: Mapping[str, str], body: Mapping[str, Any]
) -> tuple[str, int] | None:
    """``(key, ttl_seconds)`` for this request, or None when nothing ties it to an account."""
    if not isinstance(body, Mapping):
        body = {}
    try:
        first, long_ttl = _breakpoints(body)
    except (TypeError, ValueError, AttributeError):
        first, long_ttl = None, False
    ttl = LONG_TTL if long_ttl else SHORT_TTL
    customer = customer_id.encode()
    session = _session_header(headers)
    if session is not None:
        return _digest(b"session", customer, session.encode(errors="replace")), ttl
    user_id = _user_id(body)
    if user_id is not None:
        return _digest(b"user", customer, user_id.encode(errors="replace")), ttl
    if first is not None:
        try:
            prefix = _prefix_json(body, first)
        except (TypeError, ValueError, AttributeError):
            return None
        return _digest(b"prefix", customer, prefix), ttl
    return None
