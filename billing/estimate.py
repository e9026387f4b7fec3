"""The hold: an upper bound of a request's cost, computed from its body before forwarding.

The relay holds ``hold_micros(body, price, multiplier)`` against the customer's balance and
settles the real cost afterwards (contract §6). The hold is the exact cost
(:func:`billing.pricing.cost_micros`) of a *worst-case usage*:

- every input token is billed at the highest input-side rate the request can incur
  (:func:`input_rate_for`): the 1-hour cache-write rate if any breakpoint has ``ttl: "1h"``, the
  5-minute rate if there is any breakpoint, else the plain input rate (cache reads included in
  the comparison, in case a custom price makes them dearer);
- the input count is :func:`estimate_input_tokens_upper`;
- the output count is ``max_tokens`` (thinking included, it is a hard cap);
- web searches are ``max_uses`` of each web-search server tool (10 when absent);
- the long-context tier applies when the input bound is above the price's threshold, and the
  ``inference_geo: "us"`` / ``speed: "fast"`` modifiers when the body asks for them;
- × the customer's multiplier, rounded up once.

Since every real usage with at most that many input tokens, output tokens and searches costs
no more, the hold covers the charge whenever the input bound holds.

**The input bound.** A token covers at least one byte of UTF-8 text, so the UTF-8 byte length
of a text bounds its tokens. The estimate counts the bytes of every string in ``system``,
``messages`` (text, ``tool_use`` names and inputs, ``tool_result`` content, ``thinking`` and
``redacted_thinking`` data, unknown blocks in full), ``tools`` (names, descriptions, schemas, keys
included) and the other top-level fields, plus fixed allowances:

=============================  =========  ==================================================
item                           tokens     why
=============================  =========  ==================================================
each message, each block       16         role and block framing
each tool                      64         tool framing
any tools present              1_000      Anthropic's tool-use system prompt (~350 today)
each server tool (typed)       2_000      its definition is Anthropic's, not in the body
each MCP server                10_000     its tool definitions are fetched, not in the body
``image`` block                5_000      ≤ ~1,600 at standard resolution; high-res models ~4,800
``document``, PDF/url/file     100_000    pages are unknown without parsing the PDF; this
                                          covers ~30 dense pages; text documents count bytes
web search, per possible use   10_000     results are fed back as input
web fetch, per possible use    25_000     or the tool's ``max_content_tokens`` when given
=============================  =========  ==================================================

Base64 image and PDF data are never counted as text. The bound is strict for text; images,
PDFs and server-tool loops are allowances (a server-tool loop re-sends its context per step).
The input bound is capped at :data:`MAX_INPUT_TOKENS` (twice the largest context window): the
upstream refuses anything larger, so a hold above it would only refuse requests for the wrong
reason. A body that is not an object, or whose ``messages`` is not a list, is estimated from the
byte length of the whole body. ``max_tokens`` missing or invalid holds
:data:`FALLBACK_MAX_TOKENS`; it is capped at :data:`MAX_OUTPUT_TOKENS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final

from billing.pricing import Price, Usage, cost_micros

__all__ = [
    "BLOCK_OVERHEAD_TOKENS",
    "DEFAULT_SERVER_TOOL_MAX_USES",
    "DOCUMENT_TOKENS",
    "FALLBACK_MAX_TOKENS",
    "IMAGE_TOKENS",
    "MAX_INPUT_TOKENS",
    "MAX_OUTPUT_TOKENS",
    "estimate_input_tokens_upper",
    "hold_micros",
    "input_rate_for",
    "web_search_max_uses",
    "worst_case_usage",
]

BLOCK_OVERHEAD_TOKENS: Final = 16
TOOL_OVERHEAD_TOKENS: Final = 64
TOOL_SYSTEM_PROMPT_TOKENS: Final = 1_000
SERVER_TOOL_DEFINITION_TOKENS: Final = 2_000
MCP_SERVER_TOKENS: Final = 10_000
IMAGE_TOKENS: Final = 5_000
DOCUMENT_TOKENS: Final = 100_000
WEB_SEARCH_INPUT_TOKENS_PER_USE: Final = 10_000
WEB_FETCH_INPUT_TOKENS_PER_USE: Final = 25_000
DEFAULT_SERVER_TOOL_MAX_USES: Final = 10
MAX_INPUT_TOKENS: Final = 2_000_000
MAX_OUTPUT_TOKENS: Final = 1_000_000
FALLBACK_MAX_TOKENS: Final = 128_000

# Breakpoint levels, ordered: the highest one found decides the input rate.
_NO_BREAKPOINT: Final = 0
_TTL_5M: Final = 1
_TTL_1H: Final = 2


def _text_bytes(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _value_bytes(value: object) -> int:
    """Bytes of every string (keys included) in a JSON-like value, plus its punctuation.

    Iterative, so arbitrarily deep values cannot overflow the stack. Numbers count their digits.
    """
    total = 0
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += _text_bytes(item) + 2
        elif isinstance(item, Mapping):
            total += 2
            for key, child in item.items():
                total += (_text_bytes(key) if isinstance(key, str) else 8) + 4
                stack.append(child)
        elif isinstance(item, list | tuple):
            total += 2 + len(item)
            stack.extend(item)
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2  # ≥ its decimal digits and sign
        else:
            total += 32
    return total


def _level(cache_control: object) -> int:
    if cache_control is None:
        return _NO_BREAKPOINT
    if isinstance(cache_control, Mapping) and cache_control.get("ttl") == "1h":
        return _TTL_1H
    return _TTL_5M


class _Scan:
    """One pass over a request body: the input bound, the breakpoint level, server tools."""

    __slots__ = ("level", "tokens", "web_searches")

    def __init__(self) -> None:
        self.tokens = 0
        self.level = _NO_BREAKPOINT
        self.web_searches = 0

    def block(self, block: object) -> None:
        self.tokens += BLOCK_OVERHEAD_TOKENS
        if not isinstance(block, Mapping):
            self.tokens += _value_bytes(block)
            return
        cache_control = block.get("cache_control")
        if cache_control is not None:
            self.level = max(self.level, _level(cache_control))
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if isinstance(text, str):
                self.tokens += _text_bytes(text)
                citations = block.get("citations")
                if citations is not None:
                    self.tokens += _value_bytes(citations)
                return
        elif kind == "image":
            self.tokens += IMAGE_TOKENS
            return
        elif kind == "document":
            self.document(block)
            return
        elif kind == "tool_result":
            self.tokens += _value_bytes(block.get("tool_use_id"))
            self.content(block.get("content"))
            return
        self.tokens += _value_bytes(block)  # thinking, tool_use, search results, unknown kinds

    def document(self, block: Mapping[Any, Any]) -> None:
        for field in ("title", "context", "citations"):
            if field in block:
                self.tokens += _value_bytes(block[field])
        source = block.get("source")
        kind = source.get("type") if isinstance(source, Mapping) else None
        if kind == "text" and isinstance(source, Mapping):
            self.tokens += _value_bytes(source.get("data"))
        elif kind == "content" and isinstance(source, Mapping):
            self.content(source.get("content"))
        else:  # base64 / url / file PDFs and anything unknown
            self.tokens += DOCUMENT_TOKENS

    def content(self, content: object) -> None:
        if isinstance(content, str):
            self.tokens += BLOCK_OVERHEAD_TOKENS + _text_bytes(content)
        elif isinstance(content, list):
            for block in content:
                self.block(block)
        elif content is not None:
            self.tokens += BLOCK_OVERHEAD_TOKENS + _value_bytes(content)

    def tools(self, tools: object) -> None:
        """Count the tools' bytes and framing, then their allowances."""
        self.tokens += _value_bytes(tools)
        if isinstance(tools, list):
            self.tokens += TOOL_OVERHEAD_TOKENS * len(tools)
        self.tool_allowances(tools)

    def tool_allowances(self, tools: object) -> None:
        """Breakpoints and allowances of ``tools``, without their bytes."""
        if not isinstance(tools, list):
            return
        if tools:
            self.tokens += TOOL_SYSTEM_PROMPT_TOKENS
        for tool in tools:
            if not isinstance(tool, Mapping):
                continue
            cache_control = tool.get("cache_control")
            if cache_control is not None:
                self.level = max(self.level, _level(cache_control))
            kind = tool.get("type")
            if not isinstance(kind, str) or kind == "custom":
                continue
            self.tokens += SERVER_TOOL_DEFINITION_TOKENS
            if kind.startswith("web_search"):
                uses = _max_uses(tool)
                self.web_searches += uses
                self.tokens += uses * WEB_SEARCH_INPUT_TOKENS_PER_USE
            elif kind.startswith("web_fetch"):
                per_use = _positive_int(tool.get("max_content_tokens"))
                self.tokens += _max_uses(tool) * (per_use or WEB_FETCH_INPUT_TOKENS_PER_USE)

    def mcp_servers(self, servers: object) -> None:
        if isinstance(servers, list):
            self.tokens += len(servers) * MCP_SERVER_TOKENS


def _positive_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _max_uses(tool: Mapping[Any, Any]) -> int:
    value = tool.get("max_uses")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, 1_000)
    return DEFAULT_SERVER_TOOL_MAX_USES


_WALKED: Final = frozenset({"system", "messages", "tools"})


def _scan(body: Mapping[str, Any] | object) -> _Scan:
    scan = _Scan()
    if not isinstance(body, Mapping) or not isinstance(body.get("messages"), list):
        scan.tokens = _value_bytes(body) + BLOCK_OVERHEAD_TOKENS
        scan.level = _deep_level(body)
        if isinstance(body, Mapping):  # the allowances of what can still be read
            scan.tool_allowances(body.get("tools"))
            scan.mcp_servers(body.get("mcp_servers"))
        return scan
    scan.level = _level(body.get("cache_control"))
    system = body.get("system")
    if system is not None:
        scan.content(system)
    for message in body["messages"]:
        scan.tokens += BLOCK_OVERHEAD_TOKENS
        if isinstance(message, Mapping):
            scan.tokens += _value_bytes(message.get("role"))
            scan.content(message.get("content"))
        else:
            scan.tokens += _value_bytes(message)
    if "tools" in body:
        scan.tools(body["tools"])
    scan.mcp_servers(body.get("mcp_servers"))
    for key, value in body.items():  # tool_choice, output_config.format, context_management, ...
        if key not in _WALKED:
            scan.tokens += _value_bytes(value)
    return scan


def _deep_level(value: object) -> int:
    """The highest breakpoint level anywhere in a value (used for malformed bodies)."""
    level = _NO_BREAKPOINT
    stack: list[object] = [value]
    while stack and level < _TTL_1H:
        item = stack.pop()
        if isinstance(item, Mapping):
            if item.get("cache_control") is not None:
                level = max(level, _level(item.get("cache_control")))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return level


def estimate_input_tokens_upper(body: Mapping[str, Any]) -> int:
    """An upper bound of the request's total input tokens (see the module docstring)."""
    return min(_scan(body).tokens, MAX_INPUT_TOKENS)


def _rate_candidates(price: Price, level: int) -> list[tuple[int, str]]:
    candidates = [(price.input, "input"), (price.cache_read, "read")]
    if level >= _TTL_5M:
        candidates.append((price.cache_write_5m, "5m"))
    if level >= _TTL_1H:
        candidates.append((price.cache_write_1h, "1h"))
    return candidates


def input_rate_for(body: Mapping[str, Any], price: Price) -> int:
    """The highest input-side rate (micro-USD per Mtok) this request can incur."""
    return max(rate for rate, _ in _rate_candidates(price, _scan(body).level))


def web_search_max_uses(body: Mapping[str, Any]) -> int:
    """How many web searches the request may run: the sum of its web-search tools' max_uses."""
    return _scan(body).web_searches


def _max_tokens(body: object) -> int:
    value = body.get("max_tokens") if isinstance(body, Mapping) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, MAX_OUTPUT_TOKENS)
    return FALLBACK_MAX_TOKENS


def _text_field(body: object, key: str) -> str | None:
    value = body.get(key) if isinstance(body, Mapping) else None
    return value if isinstance(value, str) else None


def worst_case_usage(body: Mapping[str, Any], price: Price) -> Usage:
    """The most expensive usage this request could report, under the bounds above."""
    scan = _scan(body)
    tokens = min(scan.tokens, MAX_INPUT_TOKENS)
    _, kind = max(_rate_candidates(price, scan.level))
    return Usage(
        input_tokens=tokens if kind == "input" else 0,
        cache_read_input_tokens=tokens if kind == "read" else 0,
        cache_write_5m_tokens=tokens if kind == "5m" else 0,
        cache_write_1h_tokens=tokens if kind == "1h" else 0,
        output_tokens=_max_tokens(body),
        web_search_requests=scan.web_searches,
        inference_geo=_text_field(body, "inference_geo"),
        speed=_text_field(body, "speed"),
    )


def hold_micros(body: Mapping[str, Any], price: Price, multiplier: Decimal) -> int:
    """The amount to hold before forwarding: the exact cost of :func:`worst_case_usage`."""
    return cost_micros(worst_case_usage(body, price), price, multiplier)
