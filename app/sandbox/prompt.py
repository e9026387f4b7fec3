"""Reading a prompt: its size in characters (the token estimate) and its cacheable units.

Input tokens are estimated as ``ceil(chars / 4)`` of the prompt text, +3 per message and 1,000
per image or document. The prompt is walked in cache order (``tools`` → ``system`` →
``messages``); every block is a unit, and each ``cache_control`` marks a breakpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

MSG_OVERHEAD_CHARS: Final = 12  # 3 tokens per message
MEDIA_CHARS: Final = 4000  # 1,000 tokens per image or document


def str_len(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def json_chars(value: Any) -> int:
    """Characters of every key and scalar in a JSON value (tool schemas, tool inputs)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(k) + json_chars(v) for k, v in value.items() if k != "cache_control")
    if isinstance(value, list):
        return sum(json_chars(v) for v in value)
    if value is None or isinstance(value, bool):
        return 0
    return len(str(value))


def block_chars(block: Any) -> int:
    if isinstance(block, str):
        return len(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "text":
        return str_len(block.get("text"))
    if kind in ("image", "document"):
        return MEDIA_CHARS
    if kind == "tool_result":
        return content_chars(block.get("content"))
    if kind == "tool_use":
        return str_len(block.get("name")) + json_chars(block.get("input"))
    if kind == "thinking":
        return str_len(block.get("thinking"))
    return sum(json_chars(v) for k, v in block.items() if k not in ("type", "cache_control"))


def content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(block_chars(b) for b in content)
    return 0


@dataclass(slots=True)
class Prompt:
    chars: int
    # (chars up to and including this unit, hash tag, payload) for every cacheable unit
    units: list[tuple[int, str, Any]]
    # (unit index, ttl) of each cache_control breakpoint, in prompt order
    breakpoints: list[tuple[int, str]]


def ttl_of(cache_control: Any) -> str | None:
    if not isinstance(cache_control, dict):
        return None
    return "1h" if cache_control.get("ttl") == "1h" else "5m"


def analyze(body: dict[str, Any]) -> Prompt:
    """Walk the prompt in cache order (tools, system, messages), counting characters."""
    units: list[tuple[int, str, Any]] = []
    bps: list[tuple[int, str]] = []
    chars = 0

    def add(tag: str, payload: Any) -> None:
        units.append((chars, tag, payload))
        if isinstance(payload, dict):
            ttl = ttl_of(payload.get("cache_control"))
            if ttl is not None:
                bps.append((len(units) - 1, ttl))

    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                chars += (
                    str_len(tool.get("name"))
                    + str_len(tool.get("description"))
                    + json_chars(tool.get("input_schema"))
                )
            add("t", tool)
    system = body.get("system")
    if isinstance(system, str):
        if system:
            chars += len(system)
            add("s", system)
    elif isinstance(system, list):
        for block in system:
            chars += block_chars(block)
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
                    chars += block_chars(block)
                    add(tag if i == 0 else "b", block)
            else:
                chars += content_chars(content)
                add(tag, content)
    top_ttl = ttl_of(body.get("cache_control"))
    if top_ttl is not None and units and (not bps or bps[-1][0] != len(units) - 1):
        bps.append((len(units) - 1, top_ttl))
    return Prompt(chars, units, bps)
