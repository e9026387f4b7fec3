"""OpenAI Chat Completions ⇄ Anthropic Messages translation (spec ``anthropic-wire.md`` §7.2).

Pure functions and one stateful stream translator: no I/O, no framework. The relay calls
:func:`chat_to_messages` on a ``POST /v1/chat/completions`` body, forwards the result to the
upstream ``/v1/messages``, and turns the answer back with :func:`messages_to_chat` (JSON) or
:class:`ChatStreamTranslator` (SSE). Upstream errors go through :func:`anthropic_error_to_openai`;
bad OpenAI input raises :class:`TranslationError`, which the relay answers with a 400 in
OpenAI's error shape (:meth:`TranslationError.to_openai`).

Request (OpenAI → Anthropic)
    * ``system``/``developer`` messages (string or text parts) are hoisted wherever they appear,
      empty ones skipped, and joined with ``"\\n"`` into the top-level ``system`` string.
    * ``user`` content: a string stays a string; parts map ``text`` → text block, ``image_url``
      → image block (``data:<type>;base64,…`` → base64 source, ``http(s)://`` → url source).
      ``input_audio`` and ``file`` parts and ``image_url.detail`` are ignored (spec §7.1).
    * ``assistant``: text (string, ``text`` or ``refusal`` parts) then one ``tool_use`` block per
      ``tool_calls[i]`` (``arguments`` parsed as a JSON object, ``""`` → ``{}``, anything else
      invalid → :class:`TranslationError`). An assistant turn with neither text nor tool calls is
      dropped. Legacy ``function_call`` becomes a ``tool_use`` whose id (``call_legacy_<i>``)
      is matched, by function name, to the next ``role:"function"`` message.
    * ``tool`` (and legacy ``function``) messages become ``tool_result`` blocks in a ``user`` turn.
    * Consecutive turns of the same role are merged into one block list so turns alternate; in a
      merged user turn ``tool_result`` blocks are moved to the front (Anthropic requires it), so
      consecutive tool messages and a following user text become ONE user message.
    * ``tools[{type:"function",function:{name,description,parameters}}]`` (or legacy
      ``functions``) → ``{name, description, input_schema}`` (default
      ``{"type":"object","properties":{}}``); ``strict`` is ignored.
    * ``tool_choice`` (or legacy ``function_call``): ``"auto"``/``"required"``/``"none"``/
      ``{type:"function",function:{name}}`` → ``auto``/``any``/``none``/``{type:"tool",name}``;
      ``parallel_tool_calls: false`` → ``disable_parallel_tool_use: true`` (on an implicit
      ``auto`` when no ``tool_choice`` was given). Both are only sent when tools are present.
    * ``max_completion_tokens`` → else ``max_tokens`` → else :data:`DEFAULT_MAX_TOKENS`.
    * ``stop`` (string or list) → ``stop_sequences``, whitespace-only entries dropped.
    * ``user`` (else ``safety_identifier``) → ``metadata.user_id``.
    * ``temperature`` clamped to 0–1, ``top_p`` passed; both (and a ``top_k``) are dropped for
      models that reject sampling parameters (:data:`SAMPLING_REJECTED_MODELS`).
    * ``stream`` passed; ``stream_options`` is for the relay (:func:`stream_include_usage`).
    * ``n`` other than 1 → :class:`TranslationError`.
    * ``reasoning_effort`` → ``output_config.effort`` (``minimal`` → ``low``; ``none`` omitted).
    * ``thinking`` and ``top_k`` (only reachable through the OpenAI SDK's ``extra_body``) pass
      through. Everything else spec §7.1 lists as ignored (``logprobs``, ``metadata``,
      ``response_format``, ``seed``, penalties, ``service_tier``, …) is ignored.

Response (Anthropic → OpenAI)
    ``chat.completion`` with id ``chatcmpl-<msg id>``, the response's ``model``, text blocks
    concatenated into ``content`` (``None`` when there are none), ``tool_use`` blocks as
    ``tool_calls``, thinking dropped (or ``reasoning_content`` with ``include_reasoning=True``),
    :func:`finish_reason` by the spec table and ``usage`` with ``prompt_tokens`` = input + cache
    creation + cache read and ``prompt_tokens_details.cached_tokens`` = cache read.

Streaming
    :class:`ChatStreamTranslator` emits ``data: <json>\\n\\n`` frames and ``data: [DONE]\\n\\n``.
    When ``include_usage`` is set every chunk carries ``"usage": null`` and a final
    ``"choices": []`` chunk carries the usage. An upstream ``error`` event becomes
    ``data: {"error": {...}}`` and ends the stream **without** ``[DONE]``: OpenAI itself closes
    after an error frame, and the OpenAI SDK raises ``APIError`` on that frame.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "SAMPLING_REJECTED_MODELS",
    "ChatStreamTranslator",
    "TranslationError",
    "anthropic_error_to_openai",
    "chat_to_messages",
    "finish_reason",
    "is_openai_client",
    "messages_to_chat",
    "models_to_openai",
    "stream_include_usage",
]

DEFAULT_MAX_TOKENS: Final[int] = 4096
"""``max_tokens`` sent upstream when the OpenAI request names no limit (Anthropic requires one)."""

SAMPLING_REJECTED_MODELS: Final[re.Pattern[str]] = re.compile(
    r"^claude-(?:opus-4-(?:[7-9]|[1-9]\d)(?!\d)|(?:opus|sonnet|fable)-(?:[5-9]|[1-9]\d)(?!\d))"
)
"""Models that answer 400 to non-default ``temperature``/``top_p``/``top_k`` (spec §1.1:
Opus 4.7+, Sonnet 5, Fable 5 and later). The translation drops those fields for them."""

_DEFAULT_INPUT_SCHEMA: Final[dict[str, Any]] = {"type": "object", "properties": {}}
_IGNORED_USER_PARTS: Final = frozenset({"input_audio", "file"})
_CREDIT_TOO_LOW: Final = "credit balance is too low"

_FINISH_REASONS: Final[dict[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error.type -> (OpenAI error.type, OpenAI error.code)
_ERROR_TYPES: Final[dict[str, tuple[str, str | None]]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("authentication_error", "invalid_api_key"),
    "permission_error": ("permission_error", None),
    "not_found_error": ("not_found_error", None),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "api_error": ("api_error", "server_error"),
    "timeout_error": ("api_error", "server_error"),
    "overloaded_error": ("api_error", "server_error"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
}

# HTTP status -> Anthropic error.type, for bodies that name no (known) type
_STATUS_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

_OPENAI_UA: Final = re.compile(r"^(?:async)?(?:azure)?openai/", re.IGNORECASE)


class TranslationError(Exception):
    """The OpenAI request cannot be translated; answer 400 ``invalid_request_error``."""

    message: str
    param: str | None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI-shaped error body for this failure (send it with status 400)."""
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": None,
            }
        }


# --------------------------------------------------------------------------------------------
# small helpers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError (e.g. an integer beyond 64 bits)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _sse(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


_DONE: Final = b"data: [DONE]\n\n"


def _text_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _require_str(value: object, param: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise TranslationError(f"'{param}' must be a non-empty string", param)
    return value


# --------------------------------------------------------------------------------------------
# request: OpenAI chat.completions -> Anthropic Messages


def _system_text(content: object, param: str) -> str:
    """A system/developer message's text: a string or a list of text parts (joined by "\\n")."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            p = f"{param}[{j}]"
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise TranslationError(f"'{p}' must be a text content part", p)
            text = _require_str(part.get("text"), f"{p}.text", allow_empty=True)
            if text:
                texts.append(text)
        return "\n".join(texts)
    raise TranslationError(f"'{param}' must be a string or a list of text parts", param)


def _image_block(part: Mapping[str, Any], param: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    p = f"{param}.image_url.url"
    url = _require_str(url, p)
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        pieces = header.split(";")
        media_type = pieces[0].strip().lower()
        if not sep or not media_type or "base64" not in (x.strip().lower() for x in pieces[1:]):
            raise TranslationError(
                "image data URLs must look like 'data:<media type>;base64,<data>'", p
            )
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.lower().startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError("image URLs must be http(s):// or data: URLs", p)


def _content_blocks(content: list[Any], param: str, *, assistant: bool) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, Mapping):
            raise TranslationError(f"'{p}' must be an object", p)
        ptype = part.get("type")
        if ptype == "text" or (assistant and ptype == "refusal"):
            key = "text" if ptype == "text" else "refusal"
            text = _require_str(part.get(key), f"{p}.{key}", allow_empty=True)
            if text:
                blocks.append({"type": "text", "text": text})
        elif ptype == "image_url" and not assistant:
            blocks.append(_image_block(part, p))
        elif ptype in _IGNORED_USER_PARTS and not assistant:
            continue
        else:
            raise TranslationError(f"unsupported content part type {ptype!r}", f"{p}.type")
    return blocks


def _user_content(content: object, param: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return _content_blocks(content, param, assistant=False)
    raise TranslationError(f"'{param}' must be a string or a list of content parts", param)


def _parse_arguments(raw: object, param: str) -> dict[str, Any]:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    if not isinstance(raw, str):
        raise TranslationError(f"'{param}' must be a JSON string", param)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise TranslationError(f"'{param}' is not valid JSON: {exc}", param) from None
    if not isinstance(parsed, dict):
        raise TranslationError(f"'{param}' must encode a JSON object", param)
    return parsed


def _tool_use(call: object, param: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise TranslationError(f"'{param}' must be an object", param)
    if call.get("type", "function") not in ("function", None):
        raise TranslationError("only tool calls of type 'function' are supported", f"{param}.type")
    call_id = _require_str(call.get("id"), f"{param}.id")
    fn = call.get("function")
    if not isinstance(fn, Mapping):
        raise TranslationError(f"'{param}.function' must be an object", f"{param}.function")
    name = _require_str(fn.get("name"), f"{param}.function.name")
    args = _parse_arguments(fn.get("arguments"), f"{param}.function.arguments")
    return {"type": "tool_use", "id": call_id, "name": name, "input": args}


def _tool_result(tool_use_id: str, content: object, param: str) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id}
    if content is None:
        return block
    if isinstance(content, str):
        block["content"] = content
    elif isinstance(content, list):
        parts = _content_blocks(content, param, assistant=False)
        if parts:
            block["content"] = parts
    else:
        raise TranslationError(f"'{param}' must be a string or a list of content parts", param)
    return block


def _append_turn(
    turns: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]
) -> None:
    """Append a turn, merging it into the previous one when the roles match."""
    if turns and turns[-1]["role"] == role:
        merged = _text_blocks(turns[-1]["content"]) + _text_blocks(content)
        if role == "user":  # tool_result blocks must lead a user turn
            merged = [b for b in merged if b.get("type") == "tool_result"] + [
                b for b in merged if b.get("type") != "tool_result"
            ]
        turns[-1]["content"] = merged
    else:
        turns.append({"role": role, "content": content})


def _convert_messages(raw: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    system_parts: list[str] = []
    turns: list[dict[str, Any]] = []
    legacy_ids: dict[str, deque[str]] = {}

    for i, msg in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise TranslationError(f"'{p}' must be an object", p)
        role = msg.get("role")
        content = msg.get("content")

        if role in ("system", "developer"):
            text = _system_text(content, f"{p}.content")
            if text:
                system_parts.append(text)

        elif role == "user":
            _append_turn(turns, "user", _user_content(content, f"{p}.content"))

        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            if isinstance(content, str):
                blocks = _text_blocks(content)
            elif isinstance(content, list):
                blocks = _content_blocks(content, f"{p}.content", assistant=True)
            elif content is not None:
                raise TranslationError(
                    f"'{p}.content' must be a string, a list of parts or null", f"{p}.content"
                )
            tool_calls = msg.get("tool_calls")
            if tool_calls is not None:
                if not isinstance(tool_calls, list):
                    raise TranslationError(f"'{p}.tool_calls' must be a list", f"{p}.tool_calls")
                blocks += [_tool_use(tc, f"{p}.tool_calls[{j}]") for j, tc in enumerate(tool_calls)]
            function_call = msg.get("function_call")
            if function_call is not None:
                call_id = f"call_legacy_{i}"
                fc = {"id": call_id, "type": "function", "function": function_call}
                block = _tool_use(fc, f"{p}.function_call")
                legacy_ids.setdefault(block["name"], deque()).append(call_id)
                blocks.append(block)
            if not blocks:
                continue  # nothing to say; Anthropic rejects empty assistant turns
            if isinstance(content, str) and len(blocks) == 1:
                _append_turn(turns, "assistant", content)  # plain text stays a string
            else:
                _append_turn(turns, "assistant", blocks)

        elif role == "tool":
            call_id = _require_str(msg.get("tool_call_id"), f"{p}.tool_call_id")
            _append_turn(turns, "user", [_tool_result(call_id, content, f"{p}.content")])

        elif role == "function":
            name = _require_str(msg.get("name"), f"{p}.name")
            pending = legacy_ids.get(name)
            if not pending:
                raise TranslationError(
                    f"no preceding assistant function_call named {name!r}", f"{p}.name"
                )
            _append_turn(turns, "user", [_tool_result(pending.popleft(), content, f"{p}.content")])

        else:
            raise TranslationError(f"unsupported message role {role!r}", f"{p}.role")

    return "\n".join(system_parts), turns


def _convert_tool(tool: object, param: str, *, legacy: bool) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise TranslationError(f"'{param}' must be an object", param)
    fn: object = tool
    fp = param
    if not legacy:
        if tool.get("type", "function") != "function":
            raise TranslationError("only tools of type 'function' are supported", f"{param}.type")
        fn = tool.get("function")
        fp = f"{param}.function"
    if not isinstance(fn, Mapping):
        raise TranslationError(f"'{fp}' must be an object", fp)
    name = _require_str(fn.get("name"), f"{fp}.name")
    out: dict[str, Any] = {"name": name}
    description = fn.get("description")
    if description is not None:
        out["description"] = _require_str(description, f"{fp}.description", allow_empty=True)
    params = fn.get("parameters")
    if params is None or (isinstance(params, Mapping) and not params):
        out["input_schema"] = dict(_DEFAULT_INPUT_SCHEMA)
    elif isinstance(params, Mapping):
        out["input_schema"] = dict(params) if "type" in params else {"type": "object", **params}
    else:
        raise TranslationError(f"'{fp}.parameters' must be an object", f"{fp}.parameters")
    return out


def _convert_tool_choice(choice: object, param: str, *, legacy: bool) -> dict[str, Any]:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required" and not legacy:
        return {"type": "any"}
    if isinstance(choice, Mapping):
        if legacy:
            return {"type": "tool", "name": _require_str(choice.get("name"), f"{param}.name")}
        fn = choice.get("function")
        if choice.get("type") == "function" and isinstance(fn, Mapping):
            return {"type": "tool", "name": _require_str(fn.get("name"), f"{param}.function.name")}
    allowed = "'auto', 'none'" + ("" if legacy else ", 'required'")
    raise TranslationError(f"'{param}' must be {allowed} or a named function", param)


def _int_field(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise TranslationError(f"'{name}' must be a positive integer", name)
    return int(value)


def _number_field(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise TranslationError(f"'{name}' must be a number", name)
    return float(value)


def _stop_sequences(stop: object) -> list[str]:
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise TranslationError("'stop' must be a string or a list of strings", "stop")
    return [s for s in stop if s.strip()]


def chat_to_messages(body: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an OpenAI ``chat.completions`` request body into an Anthropic Messages body.

    Raises :class:`TranslationError` (with ``param`` naming the offending field) on input
    OpenAI itself would reject or that has no Anthropic equivalent.
    """
    if not isinstance(body, Mapping):
        raise TranslationError("the request body must be a JSON object")
    model = _require_str(body.get("model"), "model")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise TranslationError("'messages' must be a non-empty list", "messages")

    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise TranslationError("only n=1 is supported", "n")

    system, turns = _convert_messages(raw_messages)
    if not turns:
        raise TranslationError(
            "'messages' must contain at least one user or assistant message", "messages"
        )

    max_tokens = _int_field(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")

    out: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS,
    }
    if system:
        out["system"] = system
    out["messages"] = turns

    # tools and tool_choice (modern first, legacy functions/function_call as fallback)
    tools: list[dict[str, Any]] = []
    raw_tools = body.get("tools")
    legacy_tools = raw_tools is None and body.get("functions") is not None
    tools_param = "functions" if legacy_tools else "tools"
    raw_tools = body.get(tools_param)
    if raw_tools is not None:
        if not isinstance(raw_tools, list):
            raise TranslationError(f"'{tools_param}' must be a list", tools_param)
        tools = [
            _convert_tool(t, f"{tools_param}[{j}]", legacy=legacy_tools)
            for j, t in enumerate(raw_tools)
        ]
    choice_param = "tool_choice"
    if body.get("tool_choice") is None and body.get("function_call") is not None:
        choice_param = "function_call"
    raw_choice = body.get(choice_param)
    tool_choice = (
        _convert_tool_choice(raw_choice, choice_param, legacy=choice_param == "function_call")
        if raw_choice is not None
        else None
    )
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise TranslationError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if tools:
        out["tools"] = tools
        if parallel is False and (tool_choice is None or tool_choice["type"] != "none"):
            tool_choice = {**(tool_choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        if tool_choice is not None:
            out["tool_choice"] = tool_choice

    stop = body.get("stop")
    if stop is not None:
        sequences = _stop_sequences(stop)
        if sequences:
            out["stop_sequences"] = sequences

    sampling: dict[str, Any] = {}
    temperature = _number_field(body, "temperature")
    if temperature is not None:
        sampling["temperature"] = min(max(temperature, 0.0), 1.0)
    top_p = _number_field(body, "top_p")
    if top_p is not None:
        sampling["top_p"] = top_p
    top_k = _int_field(body, "top_k")
    if top_k is not None:
        sampling["top_k"] = top_k
    if not SAMPLING_REJECTED_MODELS.match(model):
        out.update(sampling)

    user = body.get("user")
    if user is None:
        user = body.get("safety_identifier")
    if user is not None:
        user_param = "user" if body.get("user") is not None else "safety_identifier"
        out["metadata"] = {"user_id": _require_str(user, user_param)}

    stream = body.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise TranslationError("'stream' must be a boolean", "stream")
        out["stream"] = stream

    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, Mapping):
            raise TranslationError("'thinking' must be an object", "thinking")
        out["thinking"] = dict(thinking)

    effort = body.get("reasoning_effort")
    if effort is not None:
        effort = _require_str(effort, "reasoning_effort")
        if effort == "minimal":
            effort = "low"
        if effort != "none":
            out["output_config"] = {"effort": effort}

    return out


def stream_include_usage(body: Mapping[str, Any]) -> bool:
    """Whether the OpenAI request asked for ``stream_options.include_usage``."""
    options = body.get("stream_options") if isinstance(body, Mapping) else None
    return isinstance(options, Mapping) and options.get("include_usage") is True


# --------------------------------------------------------------------------------------------
# response: Anthropic Message -> OpenAI chat.completion


def finish_reason(stop_reason: str | None) -> str | None:
    """Map an Anthropic ``stop_reason`` to an OpenAI ``finish_reason`` (unknown → ``"stop"``)."""
    if stop_reason is None:
        return None
    return _FINISH_REASONS.get(stop_reason, "stop")


def _tokens(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _openai_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    cache_read = _tokens(usage, "cache_read_input_tokens")
    prompt = (
        _tokens(usage, "input_tokens") + _tokens(usage, "cache_creation_input_tokens") + cache_read
    )
    completion = _tokens(usage, "output_tokens")
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }
    details = usage.get("output_tokens_details")
    if isinstance(details, Mapping) and _is_int(details.get("thinking_tokens")):
        out["completion_tokens_details"] = {"reasoning_tokens": details["thinking_tokens"]}
    return out


def messages_to_chat(
    message: Mapping[str, Any], *, created: int, include_reasoning: bool = False
) -> dict[str, Any]:
    """Translate an Anthropic Message (a non-streaming response) into a ``chat.completion``.

    ``include_reasoning`` adds the thinking text as the non-standard
    ``message.reasoning_content``; by default thinking is dropped.
    """
    texts: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    has_text = False
    for block in message.get("content") or ():
        if not isinstance(block, Mapping):
            continue
        btype = block.get("type")
        if btype == "text":
            has_text = True
            texts.append(str(block.get("text") or ""))
        elif btype == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": _dumps(block.get("input") or {}),
                    },
                }
            )
        elif btype == "thinking" and include_reasoning:
            reasoning.append(str(block.get("thinking") or ""))

    chat_message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if has_text else None,
        "refusal": None,
    }
    if tool_calls:
        chat_message["tool_calls"] = tool_calls
    if reasoning and any(reasoning):
        chat_message["reasoning_content"] = "".join(reasoning)

    usage = message.get("usage")
    return {
        "id": f"chatcmpl-{message.get('id') or uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": chat_message,
                "logprobs": None,
                "finish_reason": finish_reason(message.get("stop_reason")) or "stop",
            }
        ],
        "usage": _openai_usage(usage if isinstance(usage, Mapping) else {}),
    }


# --------------------------------------------------------------------------------------------
# streaming: Anthropic SSE events -> OpenAI chat.completion.chunk frames


def _block_index(data: Mapping[str, Any]) -> int:
    index = data.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else -1


class ChatStreamTranslator:
    """Turn Anthropic SSE events into OpenAI ``chat.completion.chunk`` SSE frames.

    Feed every upstream event (name and parsed JSON data) in order and write what
    :meth:`feed` returns downstream; call :meth:`finish` when the upstream ends (it is
    idempotent and returns ``b""`` once ``[DONE]`` or an error frame has been sent). For a
    failure that is not an upstream ``error`` event (connection lost, timeout), call
    :meth:`fail`. After an error frame the stream is over: no ``[DONE]`` follows.
    """

    def __init__(
        self,
        *,
        created: int,
        include_usage: bool,
        fallback_model: str,
        include_reasoning: bool = False,
    ) -> None:
        self._created = created
        self._include_usage = include_usage
        self._include_reasoning = include_reasoning
        self._model = fallback_model
        self._id: str | None = None
        self._role_sent = False
        self._tool_calls: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._usage: dict[str, Any] = {}
        self._finish_reason: str | None = None
        self._usage_sent = False
        self._closed = False
        self._errored = False

    # -- state the relay may want -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """``[DONE]`` or an error frame has been emitted; nothing more will be."""
        return self._closed

    @property
    def errored(self) -> bool:
        return self._errored

    @property
    def model(self) -> str:
        return self._model

    @property
    def finish_reason(self) -> str | None:
        return self._finish_reason

    @property
    def usage(self) -> dict[str, Any]:
        """The OpenAI-shaped usage seen so far (message_start overwritten by message_delta)."""
        return _openai_usage(self._usage)

    # -- frames --------------------------------------------------------------------------------

    def _chunk_id(self) -> str:
        if self._id is None:
            self._id = f"chatcmpl-{uuid.uuid4().hex}"
        return self._id

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self._chunk_id(),
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if self._include_usage:
            obj["usage"] = None
        return self._role() + _sse(obj)

    def _role(self) -> bytes:
        """The opening ``role`` chunk, if it has not gone out yet."""
        if self._role_sent:
            return b""
        self._role_sent = True
        return self._chunk({"role": "assistant", "content": ""})

    def _usage_chunk(self) -> bytes:
        if not self._include_usage or self._usage_sent:
            return b""
        self._usage_sent = True
        return _sse(
            {
                "id": self._chunk_id(),
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [],
                "usage": self.usage,
            }
        )

    def _merge_usage(self, usage: object) -> None:
        if isinstance(usage, Mapping):
            self._usage.update({k: v for k, v in usage.items() if v is not None})

    # -- events --------------------------------------------------------------------------------

    def feed(self, event: str, data: Mapping[str, Any]) -> bytes:
        """Translate one upstream event; returns the bytes to send (possibly ``b""``)."""
        if self._closed:
            return b""
        kind = event or str(data.get("type") or "")

        if kind == "message_start":
            message = data.get("message")
            if isinstance(message, Mapping):
                if isinstance(message.get("id"), str) and self._id is None:
                    self._id = f"chatcmpl-{message['id']}"
                if isinstance(message.get("model"), str) and message["model"]:
                    self._model = message["model"]
                self._merge_usage(message.get("usage"))
            return self._role()

        if kind == "content_block_start":
            block = data.get("content_block")
            if not isinstance(block, Mapping):
                return b""
            btype = block.get("type")
            if btype == "tool_use":
                k = len(self._tool_calls)
                self._tool_calls[_block_index(data)] = k
                initial = block.get("input")
                arguments = _dumps(initial) if isinstance(initial, Mapping) and initial else ""
                call = {
                    "index": k,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
                return self._chunk({"tool_calls": [call]})
            if btype == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            if btype == "thinking" and self._include_reasoning and block.get("thinking"):
                return self._chunk({"reasoning_content": block["thinking"]})
            return b""

        if kind == "content_block_delta":
            delta = data.get("delta")
            if not isinstance(delta, Mapping):
                return b""
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = delta.get("text")
                return self._chunk({"content": text}) if text else b""
            if dtype == "input_json_delta":
                k_or_none = self._tool_calls.get(_block_index(data))
                partial = delta.get("partial_json")
                if k_or_none is None or not partial:
                    return b""
                call = {"index": k_or_none, "function": {"arguments": partial}}
                return self._chunk({"tool_calls": [call]})
            if dtype == "thinking_delta" and self._include_reasoning:
                thinking = delta.get("thinking")
                return self._chunk({"reasoning_content": thinking}) if thinking else b""
            return b""  # signature_delta, citations_delta, unknown

        if kind == "message_delta":
            self._merge_usage(data.get("usage"))
            delta = data.get("delta")
            stop_reason = delta.get("stop_reason") if isinstance(delta, Mapping) else None
            if not isinstance(stop_reason, str):
                return b""
            self._finish_reason = finish_reason(stop_reason)
            return self._chunk({}, self._finish_reason)

        if kind == "message_stop":
            self._closed = True
            return self._role() + self._usage_chunk() + _DONE

        if kind == "error":
            error = anthropic_error_to_openai(500, data)
            error["error"]["code"] = None
            self._closed = True
            self._errored = True
            return _sse(error)

        return b""  # ping, content_block_stop, unknown events

    def fail(self, message: str, error_type: str = "api_error") -> bytes:
        """End the stream with an error frame for a failure the upstream did not report."""
        return self.feed(
            "error", {"type": "error", "error": {"type": error_type, "message": message}}
        )

    def finish(self) -> bytes:
        """``[DONE]`` (preceded by the usage chunk if asked for and not sent); idempotent."""
        if self._closed:
            return b""
        self._closed = True
        return self._role() + self._usage_chunk() + _DONE


# --------------------------------------------------------------------------------------------
# errors, models, client detection


def anthropic_error_to_openai(status: int, body: Mapping[str, Any] | bytes) -> dict[str, Any]:
    """Re-shape an Anthropic error body as ``{"error": {message, type, param, code}}``.

    The HTTP status is left to the caller (it does not change). Bodies that are not
    Anthropic-shaped JSON are described by their text or, failing that, the status.
    """
    parsed: object = body
    if isinstance(body, bytes | bytearray | str):
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raw = body.decode("utf-8", "replace") if isinstance(body, bytes | bytearray) else body
            parsed = {"error": {"message": raw.strip()[:1000]}}

    error: Mapping[str, Any] = {}
    if isinstance(parsed, Mapping):
        inner = parsed.get("error")
        if isinstance(inner, Mapping):
            error = inner
        elif isinstance(inner, str):
            error = {"message": inner}

    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = f"upstream request failed with HTTP status {status}"
    anthropic_type = error.get("type")
    if not isinstance(anthropic_type, str) or anthropic_type not in _ERROR_TYPES:
        anthropic_type = _STATUS_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
    openai_type, code = _ERROR_TYPES[anthropic_type]

    if _CREDIT_TOO_LOW in message.lower():
        openai_type, code = "insufficient_quota", "insufficient_quota"
    elif anthropic_type == "not_found_error" and "model" in message.lower():
        code = "model_not_found"

    return {"error": {"message": message, "type": openai_type, "param": None, "code": code}}


def _unix(created_at: object) -> int:
    if isinstance(created_at, int) and not isinstance(created_at, bool):
        return created_at
    if isinstance(created_at, str):
        try:
            parsed = datetime.fromisoformat(created_at.strip())
        except ValueError:
            return 0
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp())
    return 0


def models_to_openai(models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Anthropic ``ModelInfo`` objects → OpenAI's ``GET /v1/models`` list."""
    return {
        "object": "list",
        "data": [
            {
                "id": m.get("id"),
                "object": "model",
                "created": _unix(m.get("created_at")),
                "owned_by": "anthropic",
            }
            for m in models
        ],
    }


def is_openai_client(headers: Mapping[str, str]) -> bool:
    """Guess whether ``GET /v1/models`` should answer in OpenAI's shape.

    Rule, first match wins (header names are case-insensitive):

    1. ``anthropic-version`` present → Anthropic client (every Anthropic SDK and Claude Code
       send it; OpenAI SDKs never do).
    2. ``user-agent`` starting ``OpenAI/``, ``AsyncOpenAI/``, ``AzureOpenAI/`` or
       ``AsyncAzureOpenAI/`` (the OpenAI Python and JS SDKs) → OpenAI client.
    3. Any ``openai-*`` request header (``openai-organization``, ``openai-project``,
       ``openai-beta``) → OpenAI client.
    4. ``authorization: Bearer …`` without ``x-api-key`` → OpenAI client (generic
       OpenAI-compatible tools authenticate that way and send no ``anthropic-version``).
    5. Otherwise → Anthropic client.

    ``x-stainless-*`` headers are not used: both vendors' SDKs send them.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    if "anthropic-version" in lowered:
        return False
    if _OPENAI_UA.match(lowered.get("user-agent", "").strip()):
        return True
    if any(k.startswith("openai-") for k in lowered):
        return True
    authorization = lowered.get("authorization", "").strip()
    return authorization[:7].lower() == "bearer " and "x-api-key" not in lowered
