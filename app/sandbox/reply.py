"""What the sandbox answers: a deterministic reply planned from the request body.

The reply is ``"Hello from the fake upstream. You said: <first words of the last user text>"``
plus filler words, one output token per word; ``reply with N words`` in the last user text asks
for exactly N words. ``max_tokens`` and ``stop_sequences`` are honoured. With ``tools`` (and
``tool_choice`` not ``none``, and the last user turn not a ``tool_result``) the reply is a short
text plus a ``tool_use`` block whose input is built from the tool's schema (required
properties only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from app.sandbox.common import new_id, tokens

DEFAULT_REPLY_WORDS: Final = 20
ECHO_WORDS: Final = 8

_GREETING: Final = ("Hello", "from", "the", "fake", "upstream.", "You", "said:")
_FILLER_TEXT: Final = (
    "This is a deterministic sandbox reply from poolrelay so that clients see a realistic "
    "stream of text deltas and usage numbers without calling Anthropic."
)
_FILLER: Final = tuple(_FILLER_TEXT.split())
_REPLY_WITH_RE: Final = re.compile(r"reply with (\d{1,6}) words?", re.IGNORECASE)


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    input: Any
    json: str


@dataclass(slots=True)
class Reply:
    pieces: list[str]  # text deltas: "Hello", " from", ...
    tool: ToolCall | None
    stop_reason: str
    stop_sequence: str | None
    output_tokens: int


def content_text(content: Any) -> str:
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
                parts.append(content_text(block.get("content")))
        elif isinstance(block, str):
            parts.append(block)
    return " ".join(p for p in parts if p)


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


def _tool_reply(
    tools: list[Any], choice: Any, choice_type: Any, stops: list[str], max_tokens: int
) -> Reply:
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
        return Reply(pieces, None, "stop_sequence", stop, max(1, len(pieces)))
    tool_json = orjson.dumps(tool_input).decode()
    total = len(words) + max(1, tokens(len(tool_json)))
    if total <= max_tokens:
        call = ToolCall(new_id("toolu_01"), name, tool_input, tool_json)
        return Reply(pieces, call, "tool_use", None, total)
    pieces = pieces[:max_tokens]
    return Reply(pieces, None, "max_tokens", None, max(1, len(pieces)))


def plan_reply(body: dict[str, Any]) -> Reply:
    """The reply to a validated Messages body."""
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

    tools = body.get("tools")
    choice = body.get("tool_choice")
    choice_type = choice.get("type") if isinstance(choice, dict) else "auto"
    if isinstance(tools, list) and tools and choice_type != "none" and not after_tool_result:
        return _tool_reply(tools, choice, choice_type, stops, max_tokens)

    user_text = content_text(user_content)
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
        return Reply(pieces, None, "stop_sequence", stop, max(1, len(pieces)))
    return Reply(pieces, None, stop_reason, None, len(pieces))
