"""Table tests for the OpenAI Chat Completions ⇄ Anthropic Messages translation (spec §7.2)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, cast

import httpx2
import openai
import orjson
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from app.relay.openai import (
    DEFAULT_MAX_TOKENS,
    ChatStreamTranslator,
    TranslationError,
    anthropic_error_to_openai,
    chat_to_messages,
    finish_reason,
    is_openai_client,
    messages_to_chat,
    models_to_openai,
    stream_include_usage,
)

MODEL = "claude-sonnet-4-6"
CREATED = 1_760_000_000
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"


def req(messages: Any = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": messages if messages is not None else [{"role": "user", "content": "hi"}],
    }
    body.update(fields)
    return body


BASE = {
    "model": MODEL,
    "max_tokens": DEFAULT_MAX_TOKENS,
    "messages": [{"role": "user", "content": "hi"}],
}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_use(call_id: str, name: str, inp: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": inp}


def tool_result(call_id: str, content: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": call_id, "content": content}


# ============================================================================================
# Request: top-level fields


FIELD_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("default max_tokens", {}, {}),
    ("max_tokens", {"max_tokens": 100}, {"max_tokens": 100}),
    (
        "max_completion_tokens wins",
        {"max_completion_tokens": 50, "max_tokens": 100},
        {"max_tokens": 50},
    ),
    (
        "null max_completion_tokens",
        {"max_completion_tokens": None, "max_tokens": 7},
        {"max_tokens": 7},
    ),
    ("stop string", {"stop": "END"}, {"stop_sequences": ["END"]}),
    ("stop list, blanks dropped", {"stop": ["a", "  ", "\n", "b"]}, {"stop_sequences": ["a", "b"]}),
    ("stop only whitespace", {"stop": [" ", "\t"]}, {}),
    ("stop empty string", {"stop": ""}, {}),
    ("stop null", {"stop": None}, {}),
    ("user", {"user": "u_7f3a"}, {"metadata": {"user_id": "u_7f3a"}}),
    ("safety_identifier", {"safety_identifier": "h1"}, {"metadata": {"user_id": "h1"}}),
    (
        "user beats safety_identifier",
        {"user": "u", "safety_identifier": "h"},
        {"metadata": {"user_id": "u"}},
    ),
    ("temperature clamped high", {"temperature": 1.7}, {"temperature": 1.0}),
    ("temperature clamped low", {"temperature": -0.5}, {"temperature": 0.0}),
    ("temperature in range", {"temperature": 0.3}, {"temperature": 0.3}),
    ("temperature int", {"temperature": 2}, {"temperature": 1.0}),
    ("top_p", {"top_p": 0.9}, {"top_p": 0.9}),
    ("stream true", {"stream": True}, {"stream": True}),
    ("stream false", {"stream": False}, {"stream": False}),
    ("n = 1", {"n": 1}, {}),
    ("reasoning_effort", {"reasoning_effort": "high"}, {"output_config": {"effort": "high"}}),
    (
        "reasoning_effort minimal",
        {"reasoning_effort": "minimal"},
        {"output_config": {"effort": "low"}},
    ),
    ("reasoning_effort none", {"reasoning_effort": "none"}, {}),
    (
        "thinking via extra_body",
        {"thinking": {"type": "enabled", "budget_tokens": 2048}},
        {"thinking": {"type": "enabled", "budget_tokens": 2048}},
    ),
    ("top_k via extra_body", {"top_k": 5}, {"top_k": 5}),
    (
        "ignored fields (spec §7.1)",
        {
            "logprobs": True,
            "top_logprobs": 3,
            "metadata": {"k": "v"},
            "response_format": {"type": "json_object"},
            "prediction": {"type": "content", "content": "x"},
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "seed": 42,
            "service_tier": "flex",
            "audio": {"voice": "alloy", "format": "mp3"},
            "logit_bias": {"50256": -100},
            "store": True,
            "modalities": ["text"],
            "stream_options": {"include_usage": True},
        },
        {},
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected_extra"),
    [pytest.param(f, e, id=name) for name, f, e in FIELD_CASES],
)
def test_request_fields(fields: dict[str, Any], expected_extra: dict[str, Any]) -> None:
    assert chat_to_messages(req(**fields)) == {**BASE, **expected_extra}


@pytest.mark.parametrize(
    ("model", "kept"),
    [
        ("claude-sonnet-4-6", True),
        ("claude-haiku-4-5-20251001", True),
        ("claude-opus-4-20250514", True),
        ("claude-opus-4-1-20250805", True),
        ("claude-opus-4-6", True),
        ("claude-3-5-sonnet-20241022", True),
        ("claude-opus-4-7", False),
        ("claude-opus-4-8", False),
        ("claude-opus-4-10", False),
        ("claude-opus-5", False),
        ("claude-sonnet-5", False),
        ("claude-sonnet-5-20260901", False),
        ("claude-fable-5", False),
    ],
)
def test_sampling_params_dropped_for_models_that_reject_them(model: str, kept: bool) -> None:
    out = chat_to_messages(req(model=model, temperature=0.5, top_p=0.9, top_k=3))
    sampling = {k: out[k] for k in ("temperature", "top_p", "top_k") if k in out}
    assert sampling == ({"temperature": 0.5, "top_p": 0.9, "top_k": 3} if kept else {})


def test_input_is_not_mutated() -> None:
    body = req(
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "user", "content": [text("b")]},
            {"role": "assistant", "content": None, "tool_calls": [call("c1", "f", "{}")]},
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
        ],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    )
    before = copy.deepcopy(body)
    chat_to_messages(body)
    assert body == before


# ============================================================================================
# Request: messages


MESSAGE_CASES: list[tuple[str, list[Any], str | None, list[dict[str, Any]]]] = [
    (
        "user string stays a string",
        [{"role": "user", "content": "Weather in Paris?"}],
        None,
        [{"role": "user", "content": "Weather in Paris?"}],
    ),
    (
        "system and developer hoisted and joined with newline",
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hi"},
            {"role": "developer", "content": [text("Rule 1"), text("Rule 2")]},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "Late rule"},
            {"role": "user", "content": "bye"},
        ],
        "You are terse.\nRule 1\nRule 2\nLate rule",
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
        ],
    ),
    (
        "empty system messages are skipped",
        [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}],
        None,
        [{"role": "user", "content": "hi"}],
    ),
    (
        "hoisting a system message merges the user turns around it",
        [
            {"role": "user", "content": "a"},
            {"role": "system", "content": "s"},
            {"role": "user", "content": "b"},
        ],
        "s",
        [{"role": "user", "content": [text("a"), text("b")]}],
    ),
    (
        "user parts: text, data-URL image, http image, detail and audio ignored",
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "high"},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                    {"type": "file", "file": {"file_id": "file-1"}},
                ],
            }
        ],
        None,
        [
            {
                "role": "user",
                "content": [
                    text("What is in these?"),
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/cat.jpg"},
                    },
                ],
            }
        ],
    ),
    (
        "data URL with extra parameters",
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:Image/JPEG;name=x.jpg;base64,AAA="},
                    }
                ],
            }
        ],
        None,
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAA="},
                    }
                ],
            }
        ],
    ),
    (
        "consecutive user messages merge",
        [{"role": "user", "content": "a"}, {"role": "user", "content": [text("b")]}],
        None,
        [{"role": "user", "content": [text("a"), text("b")]}],
    ),
    (
        "consecutive assistant messages merge",
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a1"},
            {"role": "assistant", "content": "a2"},
        ],
        None,
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [text("a1"), text("a2")]},
        ],
    ),
    (
        "assistant text + tool_calls → text + tool_use; empty arguments → {}",
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    call("call_1", "get_weather", '{"city": "Paris"}'),
                    call("call_2", "now", ""),
                ],
            },
        ],
        None,
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": [
                    text("Let me check."),
                    tool_use("call_1", "get_weather", {"city": "Paris"}),
                    tool_use("call_2", "now", {}),
                ],
            },
        ],
    ),
    (
        "assistant with null content and tool_calls",
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [call("c", "f", '{"x":[1,2]}')]},
        ],
        None,
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [tool_use("c", "f", {"x": [1, 2]})]},
        ],
    ),
    (
        "assistant text parts and refusal parts",
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": [text("a"), {"type": "refusal", "refusal": "no"}],
            },
        ],
        None,
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [text("a"), text("no")]},
        ],
    ),
    (
        "empty assistant turn dropped, surrounding users merge",
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "b"},
        ],
        None,
        [{"role": "user", "content": [text("a"), text("b")]}],
    ),
    (
        "consecutive tool messages → one user message; following user text merges in",
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("c1", "f", "{}"), call("c2", "g", '{"a":1}')],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "r1"},
            {"role": "tool", "tool_call_id": "c2", "content": [text("r2")]},
            {"role": "user", "content": "thanks, go on"},
        ],
        None,
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": [tool_use("c1", "f", {}), tool_use("c2", "g", {"a": 1})],
            },
            {
                "role": "user",
                "content": [
                    tool_result("c1", "r1"),
                    tool_result("c2", [text("r2")]),
                    text("thanks, go on"),
                ],
            },
        ],
    ),
    (
        "tool_result blocks lead a merged user turn",
        [
            {"role": "assistant", "content": None, "tool_calls": [call("c1", "f", "{}")]},
            {"role": "user", "content": "note"},
            {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        ],
        None,
        [
            {"role": "assistant", "content": [tool_use("c1", "f", {})]},
            {"role": "user", "content": [tool_result("c1", "r1"), text("note")]},
        ],
    ),
    (
        "legacy function_call and role function",
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
            },
            {"role": "function", "name": "get_weather", "content": "cold"},
        ],
        None,
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": [tool_use("call_legacy_1", "get_weather", {"city": "Oslo"})],
            },
            {"role": "user", "content": [tool_result("call_legacy_1", "cold")]},
        ],
    ),
    (
        "assistant prefill as last message is kept",
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "{"}],
        None,
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "{"}],
    ),
]


@pytest.mark.parametrize(
    ("messages", "system", "expected"),
    [pytest.param(m, s, e, id=name) for name, m, s, e in MESSAGE_CASES],
)
def test_messages(messages: list[Any], system: str | None, expected: list[dict[str, Any]]) -> None:
    out = chat_to_messages(req(messages))
    assert out.get("system") == system
    assert out["messages"] == expected


# ============================================================================================
# Request: tools and tool_choice

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather by city",
        "parameters": WEATHER_PARAMS,
        "strict": True,
    },
}
WEATHER_ANTHROPIC = {
    "name": "get_weather",
    "description": "Weather by city",
    "input_schema": WEATHER_PARAMS,
}
EMPTY_SCHEMA = {"type": "object", "properties": {}}

TOOL_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("tools only", {"tools": [WEATHER_TOOL]}, {"tools": [WEATHER_ANTHROPIC]}),
    (
        "parameters missing → empty object schema",
        {"tools": [{"type": "function", "function": {"name": "now"}}]},
        {"tools": [{"name": "now", "input_schema": EMPTY_SCHEMA}]},
    ),
    (
        "parameters without type get type object",
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"properties": {}}}}
            ]
        },
        {"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]},
    ),
    (
        "tool_choice auto",
        {"tools": [WEATHER_TOOL], "tool_choice": "auto"},
        {"tools": [WEATHER_ANTHROPIC], "tool_choice": {"type": "auto"}},
    ),
    (
        "tool_choice required → any",
        {"tools": [WEATHER_TOOL], "tool_choice": "required"},
        {"tools": [WEATHER_ANTHROPIC], "tool_choice": {"type": "any"}},
    ),
    (
        "tool_choice none",
        {"tools": [WEATHER_TOOL], "tool_choice": "none"},
        {"tools": [WEATHER_ANTHROPIC], "tool_choice": {"type": "none"}},
    ),
    (
        "tool_choice named function → tool",
        {
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
        {"tools": [WEATHER_ANTHROPIC], "tool_choice": {"type": "tool", "name": "get_weather"}},
    ),
    (
        "parallel_tool_calls false without tool_choice → auto + disable",
        {"tools": [WEATHER_TOOL], "parallel_tool_calls": False},
        {
            "tools": [WEATHER_ANTHROPIC],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        },
    ),
    (
        "parallel_tool_calls false with required",
        {"tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False},
        {
            "tools": [WEATHER_ANTHROPIC],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        },
    ),
    (
        "parallel_tool_calls false with none → none alone",
        {"tools": [WEATHER_TOOL], "tool_choice": "none", "parallel_tool_calls": False},
        {"tools": [WEATHER_ANTHROPIC], "tool_choice": {"type": "none"}},
    ),
    (
        "parallel_tool_calls true changes nothing",
        {"tools": [WEATHER_TOOL], "parallel_tool_calls": True},
        {"tools": [WEATHER_ANTHROPIC]},
    ),
    (
        "tool_choice without tools is dropped",
        {"tool_choice": "auto", "parallel_tool_calls": False},
        {},
    ),
    ("empty tools list", {"tools": [], "tool_choice": "none"}, {}),
    (
        "legacy functions + function_call name",
        {
            "functions": [
                {
                    "name": "get_weather",
                    "description": "Weather by city",
                    "parameters": WEATHER_PARAMS,
                }
            ],
            "function_call": {"name": "get_weather"},
        },
        {"tools": [WEATHER_ANTHROPIC], "tool_choice": {"type": "tool", "name": "get_weather"}},
    ),
    (
        "legacy function_call auto",
        {"functions": [{"name": "now"}], "function_call": "auto"},
        {"tools": [{"name": "now", "input_schema": EMPTY_SCHEMA}], "tool_choice": {"type": "auto"}},
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected_extra"),
    [pytest.param(f, e, id=name) for name, f, e in TOOL_CASES],
)
def test_tools_and_tool_choice(fields: dict[str, Any], expected_extra: dict[str, Any]) -> None:
    assert chat_to_messages(req(**fields)) == {**BASE, **expected_extra}


# ============================================================================================
# Request: errors

ASSISTANT_CALL = {"role": "assistant", "content": None, "tool_calls": [call("c1", "f", "{}")]}

ERROR_CASES: list[tuple[str, Any, str | None]] = [
    ("body not an object", ["x"], None),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("model not a string", req(model=5), "model"),
    ("empty model", req(model=""), "model"),
    ("missing messages", {"model": MODEL}, "messages"),
    ("messages not a list", req(messages="hi"), "messages"),
    ("messages empty", req([]), "messages"),
    ("only system messages", req([{"role": "system", "content": "s"}]), "messages"),
    ("message not an object", req(["hi"]), "messages[0]"),
    ("unknown role", req([{"role": "wizard", "content": "x"}]), "messages[0].role"),
    ("user content wrong type", req([{"role": "user", "content": 5}]), "messages[0].content"),
    ("user content null", req([{"role": "user", "content": None}]), "messages[0].content"),
    (
        "unknown content part",
        req([{"role": "user", "content": [{"type": "video", "video": {}}]}]),
        "messages[0].content[0].type",
    ),
    (
        "text part without text",
        req([{"role": "user", "content": [{"type": "text"}]}]),
        "messages[0].content[0].text",
    ),
    (
        "system parts must be text",
        req([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        "messages[0].content[0]",
    ),
    (
        "image URL with unsupported scheme",
        req(
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y"}}],
                }
            ]
        ),
        "messages[0].content[0].image_url.url",
    ),
    (
        "data URL that is not base64",
        req(
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}],
                }
            ]
        ),
        "messages[0].content[0].image_url.url",
    ),
    (
        "invalid JSON arguments",
        req(
            [
                {"role": "user", "content": "q"},
                {**ASSISTANT_CALL, "tool_calls": [call("c1", "f", "{oops")]},
            ]
        ),
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "arguments not an object",
        req(
            [
                {"role": "user", "content": "q"},
                {**ASSISTANT_CALL, "tool_calls": [call("c1", "f", "[1]")]},
            ]
        ),
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "tool call without id",
        req(
            [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                }
            ]
        ),
        "messages[0].tool_calls[0].id",
    ),
    (
        "tool call without name",
        req([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}]),
        "messages[0].tool_calls[0].function.name",
    ),
    (
        "tool_calls not a list",
        req([{"role": "assistant", "tool_calls": {}}]),
        "messages[0].tool_calls",
    ),
    (
        "tool message without tool_call_id",
        req([ASSISTANT_CALL, {"role": "tool", "content": "r"}]),
        "messages[1].tool_call_id",
    ),
    (
        "function message without matching function_call",
        req([{"role": "user", "content": "q"}, {"role": "function", "name": "f", "content": "r"}]),
        "messages[1].name",
    ),
    ("n = 2", req(n=2), "n"),
    ("n = 0", req(n=0), "n"),
    ("max_tokens zero", req(max_tokens=0), "max_tokens"),
    ("max_tokens string", req(max_tokens="100"), "max_tokens"),
    ("max_completion_tokens bool", req(max_completion_tokens=True), "max_completion_tokens"),
    ("temperature string", req(temperature="hot"), "temperature"),
    ("top_p bool", req(top_p=True), "top_p"),
    ("stop wrong type", req(stop=5), "stop"),
    ("stop list with non-strings", req(stop=["a", 1]), "stop"),
    ("stream not a bool", req(stream="yes"), "stream"),
    ("user not a string", req(user=123), "user"),
    ("tools not a list", req(tools={}), "tools"),
    (
        "non-function tool",
        req(tools=[{"type": "custom", "custom": {"name": "x"}}]),
        "tools[0].type",
    ),
    (
        "tool without name",
        req(tools=[{"type": "function", "function": {}}]),
        "tools[0].function.name",
    ),
    (
        "tool parameters not an object",
        req(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
        "tools[0].function.parameters",
    ),
    ("bad tool_choice", req(tool_choice="sometimes"), "tool_choice"),
    (
        "tool_choice function without name",
        req(tool_choice={"type": "function", "function": {}}),
        "tool_choice.function.name",
    ),
    ("parallel_tool_calls not a bool", req(parallel_tool_calls="no"), "parallel_tool_calls"),
    ("reasoning_effort not a string", req(reasoning_effort=3), "reasoning_effort"),
    ("thinking not an object", req(thinking="on"), "thinking"),
]


@pytest.mark.parametrize(("body", "param"), [pytest.param(b, p, id=n) for n, b, p in ERROR_CASES])
def test_translation_errors(body: Any, param: str | None) -> None:
    with pytest.raises(TranslationError) as info:
        chat_to_messages(body)
    assert info.value.param == param
    assert info.value.message
    assert info.value.to_openai() == {
        "error": {
            "message": info.value.message,
            "type": "invalid_request_error",
            "param": param,
            "code": None,
        }
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, False),
        ({"stream_options": None}, False),
        ({"stream_options": {"include_usage": False}}, False),
        ({"stream_options": {"include_usage": True}}, True),
    ],
)
def test_stream_include_usage(body: dict[str, Any], expected: bool) -> None:
    assert stream_include_usage(body) is expected


# ============================================================================================
# Response: finish reasons and chat.completion


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("some_future_reason", "stop"),
        (None, None),
    ],
)
def test_finish_reason(stop_reason: str | None, expected: str | None) -> None:
    assert finish_reason(stop_reason) == expected


def anthropic_message(
    content: list[dict[str, Any]],
    stop_reason: str | None = "end_turn",
    usage: dict[str, Any] | None = None,
    model: str = "claude-sonnet-4-6-20260101",
) -> dict[str, Any]:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage
        if usage is not None
        else {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0},
    }


RESPONSE_CASES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    (
        "plain text",
        anthropic_message([text("Hello!")]),
        {"role": "assistant", "content": "Hello!", "refusal": None},
        "stop",
    ),
    (
        "text blocks are concatenated",
        anthropic_message([text("Hel"), text("lo")]),
        {"role": "assistant", "content": "Hello", "refusal": None},
        "stop",
    ),
    (
        "text and tool_use",
        anthropic_message(
            [
                text("Let me check."),
                tool_use("toolu_01A", "get_weather", {"city": "Paris"}),
                tool_use("toolu_01B", "now", {}),
            ],
            stop_reason="tool_use",
        ),
        {
            "role": "assistant",
            "content": "Let me check.",
            "refusal": None,
            "tool_calls": [
                call("toolu_01A", "get_weather", '{"city":"Paris"}'),
                call("toolu_01B", "now", "{}"),
            ],
        },
        "tool_calls",
    ),
    (
        "only tool_use → content null",
        anthropic_message([tool_use("toolu_1", "f", {"a": [1, "é"]})], stop_reason="tool_use"),
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [call("toolu_1", "f", '{"a":[1,"é"]}')],
        },
        "tool_calls",
    ),
    (
        "thinking dropped",
        anthropic_message(
            [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, text("42")],
            stop_reason="max_tokens",
        ),
        {"role": "assistant", "content": "42", "refusal": None},
        "length",
    ),
    (
        "redacted thinking and server tools dropped",
        anthropic_message(
            [
                {"type": "redacted_thinking", "data": "xx"},
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                text("done"),
            ]
        ),
        {"role": "assistant", "content": "done", "refusal": None},
        "stop",
    ),
    (
        "refusal",
        anthropic_message([], stop_reason="refusal"),
        {"role": "assistant", "content": None, "refusal": None},
        "content_filter",
    ),
    (
        "stop_sequence",
        anthropic_message([text("a")], stop_reason="stop_sequence"),
        {"role": "assistant", "content": "a", "refusal": None},
        "stop",
    ),
]


@pytest.mark.parametrize(
    ("message", "expected_message", "expected_finish"),
    [pytest.param(m, e, f, id=n) for n, m, e, f in RESPONSE_CASES],
)
def test_messages_to_chat(
    message: dict[str, Any], expected_message: dict[str, Any], expected_finish: str
) -> None:
    out = messages_to_chat(message, created=CREATED)
    assert out["id"] == "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL"
    assert out["object"] == "chat.completion"
    assert out["created"] == CREATED
    assert out["model"] == "claude-sonnet-4-6-20260101"
    assert len(out["choices"]) == 1
    choice = out["choices"][0]
    assert choice["index"] == 0
    assert choice["message"] == expected_message
    assert choice["finish_reason"] == expected_finish
    parsed = ChatCompletion.model_validate(out)
    assert parsed.choices[0].finish_reason == expected_finish
    for tc, block in zip(
        parsed.choices[0].message.tool_calls or [],
        [b for b in message["content"] if b["type"] == "tool_use"],
        strict=True,
    ):
        assert orjson.loads(tc.function.arguments) == block["input"]  # type: ignore[union-attr]


def test_messages_to_chat_reasoning_content() -> None:
    message = anthropic_message(
        [
            {"type": "thinking", "thinking": "step 1. ", "signature": "s"},
            {"type": "thinking", "thinking": "step 2.", "signature": "s"},
            text("42"),
        ]
    )
    out = messages_to_chat(message, created=CREATED, include_reasoning=True)
    assert out["choices"][0]["message"]["reasoning_content"] == "step 1. step 2."
    assert out["choices"][0]["message"]["content"] == "42"
    ChatCompletion.model_validate(out)


USAGE_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "spec §1.2 example",
        {
            "input_tokens": 42,
            "cache_creation_input_tokens": 1800,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1800},
            "output_tokens": 61,
            "service_tier": "standard",
        },
        {
            "prompt_tokens": 1842,
            "completion_tokens": 61,
            "total_tokens": 1903,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    ),
    (
        "cache read counts as prompt and cached",
        {
            "input_tokens": 10,
            "cache_creation_input_tokens": 20,
            "cache_read_input_tokens": 300,
            "output_tokens": 7,
        },
        {
            "prompt_tokens": 330,
            "completion_tokens": 7,
            "total_tokens": 337,
            "prompt_tokens_details": {"cached_tokens": 300},
        },
    ),
    (
        "missing and null fields count as zero",
        {"input_tokens": 5, "cache_creation_input_tokens": None, "output_tokens": 2},
        {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    ),
    (
        "thinking tokens → reasoning_tokens",
        {"input_tokens": 1, "output_tokens": 9, "output_tokens_details": {"thinking_tokens": 6}},
        {
            "prompt_tokens": 1,
            "completion_tokens": 9,
            "total_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 6},
        },
    ),
]


@pytest.mark.parametrize(
    ("usage", "expected"), [pytest.param(u, e, id=n) for n, u, e in USAGE_CASES]
)
def test_usage(usage: dict[str, Any], expected: dict[str, Any]) -> None:
    out = messages_to_chat(anthropic_message([text("x")], usage=usage), created=CREATED)
    assert out["usage"] == expected
    ChatCompletion.model_validate(out)


# ============================================================================================
# Streaming


def ev(kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **data}


START_USAGE = {
    "input_tokens": 706,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 100,
    "output_tokens": 1,
    "service_tier": "standard",
}


def message_start(model: str | None = "claude-haiku-4-5-20251001") -> tuple[str, dict[str, Any]]:
    message: dict[str, Any] = {
        "id": "msg_018C",
        "type": "message",
        "role": "assistant",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": START_USAGE,
    }
    if model is not None:
        message["model"] = model
    return ev("message_start", message=message)


def message_delta(stop_reason: str, output_tokens: int) -> tuple[str, dict[str, Any]]:
    return ev(
        "message_delta",
        delta={"stop_reason": stop_reason, "stop_sequence": None},
        usage={"input_tokens": 706, "cache_read_input_tokens": 100, "output_tokens": output_tokens},
    )


TEXT_STREAM = [
    message_start(),
    ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    ev("ping"),
    ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Building"}),
    ev("content_block_delta", index=0, delta={"type": "text_delta", "text": " things"}),
    ev("content_block_stop", index=0),
    message_delta("end_turn", 13),
    ev("message_stop"),
]

TOOL_STREAM = [
    message_start(),
    ev(
        "content_block_start",
        index=0,
        content_block={"type": "thinking", "thinking": "", "signature": ""},
    ),
    ev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Hmm."}),
    ev("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "EqQB"}),
    ev("content_block_stop", index=0),
    ev("content_block_start", index=1, content_block={"type": "text", "text": ""}),
    ev("content_block_delta", index=1, delta={"type": "text_delta", "text": "Checking."}),
    ev("content_block_stop", index=1),
    ev(
        "content_block_start",
        index=2,
        content_block={"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}},
    ),
    ev("content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": ""}),
    ev(
        "content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": '{"city'}
    ),
    ev(
        "content_block_delta",
        index=2,
        delta={"type": "input_json_delta", "partial_json": '": "Paris"}'},
    ),
    ev("content_block_stop", index=2),
    ev(
        "content_block_start",
        index=3,
        content_block={"type": "tool_use", "id": "toolu_B", "name": "now", "input": {}},
    ),
    ev("content_block_stop", index=3),
    message_delta("tool_use", 40),
    ev("message_stop"),
]


def run(
    events: Iterable[tuple[str, Mapping[str, Any]]], **options: Any
) -> tuple[bytes, ChatStreamTranslator]:
    kwargs: dict[str, Any] = {"created": CREATED, "include_usage": False, "fallback_model": MODEL}
    kwargs.update(options)
    translator = ChatStreamTranslator(**kwargs)
    out = b"".join(translator.feed(kind, data) for kind, data in events)
    return out + translator.finish(), translator


def frames(raw: bytes) -> list[Any]:
    """Split SSE output into parsed JSON payloads ("[DONE]" kept as the string)."""
    assert raw.endswith(b"\n\n")
    result: list[Any] = []
    for frame in raw.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: "), frame
        assert b"\n" not in frame
        payload = frame[len(b"data: ") :]
        result.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return result


def chunks(raw: bytes) -> list[dict[str, Any]]:
    parsed = frames(raw)
    assert parsed[-1] == "[DONE]"
    assert "[DONE]" not in parsed[:-1]
    body = parsed[:-1]
    for chunk in body:
        ChatCompletionChunk.model_validate(chunk)
    return body


def test_stream_text() -> None:
    raw, translator = run(TEXT_STREAM)
    out = chunks(raw)
    assert [c["choices"][0]["delta"] for c in out] == [
        {"role": "assistant", "content": ""},
        {"content": "Building"},
        {"content": " things"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in out] == [None, None, None, "stop"]
    for c in out:
        assert c["id"] == "chatcmpl-msg_018C"
        assert c["object"] == "chat.completion.chunk"
        assert c["created"] == CREATED
        assert c["model"] == "claude-haiku-4-5-20251001"
        assert "usage" not in c
        assert c["choices"][0]["index"] == 0
    assert b'data: {"id":' in raw  # compact JSON
    assert translator.closed
    assert translator.finish_reason == "stop"
    assert translator.finish() == b""  # idempotent after message_stop


def test_stream_include_usage_final_chunk() -> None:
    raw, translator = run(TEXT_STREAM, include_usage=True)
    out = chunks(raw)
    *content, last = out
    for c in content:
        assert "usage" in c
        assert c["usage"] is None
        assert len(c["choices"]) == 1
    assert last["choices"] == []
    assert last["id"] == "chatcmpl-msg_018C"
    # message_start usage overwritten (not summed) by the last message_delta usage
    assert last["usage"] == {
        "prompt_tokens": 806,
        "completion_tokens": 13,
        "total_tokens": 819,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    assert ChatCompletionChunk.model_validate(last).usage.total_tokens == 819  # type: ignore[union-attr]
    assert translator.usage == last["usage"]


def test_stream_tool_calls() -> None:
    raw, _ = run(TOOL_STREAM, include_usage=True)
    out = chunks(raw)
    deltas = [c["choices"][0]["delta"] for c in out if c["choices"]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Checking."},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "toolu_A",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '": "Paris"}'}}]},
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "toolu_B",
                    "type": "function",
                    "function": {"name": "now", "arguments": ""},
                }
            ]
        },
        {},
    ]
    assert out[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert out[-1]["usage"]["completion_tokens"] == 40

    # what an OpenAI client accumulates
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.get("id") or ""
            slot["name"] += tc["function"].get("name") or ""
            slot["arguments"] += tc["function"].get("arguments") or ""
    assert calls == {
        0: {"id": "toolu_A", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "toolu_B", "name": "now", "arguments": ""},
    }


def test_stream_reasoning_content() -> None:
    raw, _ = run(TOOL_STREAM, include_reasoning=True)
    deltas = [c["choices"][0]["delta"] for c in chunks(raw)]
    assert deltas[1] == {"reasoning_content": "Hmm."}
    assert not any("signature" in orjson.dumps(d).decode() for d in deltas)


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_error_event(include_usage: bool) -> None:
    events = [
        *TEXT_STREAM[:4],
        ev("error", error={"type": "overloaded_error", "message": "Overloaded"}),
    ]
    translator = ChatStreamTranslator(
        created=CREATED, include_usage=include_usage, fallback_model=MODEL
    )
    raw = b"".join(translator.feed(k, d) for k, d in events)
    parsed = frames(raw)
    assert "[DONE]" not in parsed
    assert parsed[-1] == {
        "error": {"message": "Overloaded", "type": "api_error", "param": None, "code": None}
    }
    for c in parsed[:-1]:
        ChatCompletionChunk.model_validate(c)
    assert translator.closed and translator.errored
    # nothing after the error, not even [DONE] or a usage chunk
    assert translator.feed(*TEXT_STREAM[3]) == b""
    assert translator.feed("message_stop", {"type": "message_stop"}) == b""
    assert translator.finish() == b""


def test_stream_fail_helper() -> None:
    translator = ChatStreamTranslator(created=CREATED, include_usage=False, fallback_model=MODEL)
    translator.feed(*message_start())
    raw = translator.fail("upstream connection lost")
    assert frames(raw) == [
        {
            "error": {
                "message": "upstream connection lost",
                "type": "api_error",
                "param": None,
                "code": None,
            }
        }
    ]
    assert translator.finish() == b""


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_finish_without_message_stop(include_usage: bool) -> None:
    translator = ChatStreamTranslator(
        created=CREATED, include_usage=include_usage, fallback_model=MODEL
    )
    body = b"".join(translator.feed(k, d) for k, d in TEXT_STREAM[:-1])
    tail = translator.finish()
    assert tail.endswith(b"data: [DONE]\n\n")
    assert (b'"choices":[]' in tail) is include_usage
    out = chunks(body + tail)
    if include_usage:
        assert out[-1]["choices"] == []
        assert out[-1]["usage"]["completion_tokens"] == 13
    else:
        assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert translator.finish() == b""


def test_stream_empty_finish_still_valid() -> None:
    raw = ChatStreamTranslator(created=CREATED, include_usage=True, fallback_model=MODEL).finish()
    out = chunks(raw)
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert out[0]["model"] == MODEL
    assert out[-1]["usage"]["total_tokens"] == 0


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ev("ping"),
        ev("content_block_stop", index=0),
        ev("some_future_event", foo=1),
        ev("content_block_delta", index=0, delta={"type": "citations_delta", "citation": {}}),
        ev("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "x"}),
        ev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "x"}),
        ev("content_block_delta", index=0, delta={"type": "text_delta", "text": ""}),
        ev("content_block_delta", index=9, delta={"type": "input_json_delta", "partial_json": "{"}),
        ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
        ev("content_block_start", index=0, content_block={"type": "server_tool_use", "id": "s"}),
        ev("message_delta", delta={"stop_reason": None}, usage={"output_tokens": 3}),
    ],
)
def test_stream_events_without_output(kind: str, data: dict[str, Any]) -> None:
    translator = ChatStreamTranslator(created=CREATED, include_usage=True, fallback_model=MODEL)
    translator.feed(*message_start())
    assert translator.feed(kind, data) == b""


def test_stream_fallback_model_and_event_name_from_data() -> None:
    translator = ChatStreamTranslator(created=CREATED, include_usage=False, fallback_model=MODEL)
    events = [message_start(model=None), *TEXT_STREAM[1:]]
    raw = b"".join(translator.feed("", data) for _, data in events)
    out = chunks(raw)
    assert {c["model"] for c in out} == {MODEL}
    assert [c["choices"][0]["delta"].get("content") for c in out] == [
        "",
        "Building",
        " things",
        None,
    ]


# ============================================================================================
# Errors


ERROR_MAP_CASES: list[tuple[str, int, Any, dict[str, Any]]] = [
    (
        "invalid_request_error",
        400,
        {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "bad"},
            "request_id": "req_1",
        },
        {"message": "bad", "type": "invalid_request_error", "param": None, "code": None},
    ),
    (
        "credit balance too low",
        400,
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": (
                    "Your credit balance is too low to access the Anthropic API. "
                    "Please go to Plans & Billing to upgrade or purchase credits."
                ),
            },
        },
        {"type": "insufficient_quota", "code": "insufficient_quota"},
    ),
    (
        "authentication_error",
        401,
        {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        },
        {"type": "authentication_error", "code": "invalid_api_key"},
    ),
    (
        "billing_error",
        402,
        {"type": "error", "error": {"type": "billing_error", "message": "pay"}},
        {"type": "insufficient_quota", "code": "insufficient_quota"},
    ),
    (
        "permission_error",
        403,
        {"type": "error", "error": {"type": "permission_error", "message": "no"}},
        {"type": "permission_error", "code": None},
    ),
    (
        "not_found_error about a model",
        404,
        {"type": "error", "error": {"type": "not_found_error", "message": "model: claude-nope"}},
        {"type": "not_found_error", "code": "model_not_found"},
    ),
    (
        "not_found_error about a path",
        404,
        {"type": "error", "error": {"type": "not_found_error", "message": "Not found"}},
        {"type": "not_found_error", "code": None},
    ),
    (
        "request_too_large",
        413,
        {"type": "error", "error": {"type": "request_too_large", "message": "too big"}},
        {"type": "invalid_request_error", "code": "request_too_large"},
    ),
    (
        "rate_limit_error",
        429,
        {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
        {"type": "rate_limit_error", "code": "rate_limit_exceeded"},
    ),
    (
        "api_error",
        500,
        {"type": "error", "error": {"type": "api_error", "message": "Internal"}},
        {"type": "api_error", "code": "server_error"},
    ),
    (
        "overloaded_error",
        529,
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        {"type": "api_error", "code": "server_error", "message": "Overloaded"},
    ),
    (
        "bytes body",
        429,
        b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}',
        {"type": "rate_limit_error", "message": "slow"},
    ),
    (
        "unparseable bytes body",
        502,
        b"<html>Bad Gateway</html>",
        {"type": "api_error", "code": "server_error", "message": "<html>Bad Gateway</html>"},
    ),
    (
        "empty body",
        503,
        b"",
        {"type": "api_error", "message": "upstream request failed with HTTP status 503"},
    ),
    (
        "invalid utf-8",
        500,
        b"\xff\xfe",
        {"type": "api_error"},
    ),
    (
        "JSON that is not an error",
        429,
        b"[1, 2]",
        {"type": "rate_limit_error", "code": "rate_limit_exceeded"},
    ),
    (
        "unknown error type falls back to the status",
        403,
        {"type": "error", "error": {"type": "brand_new_error", "message": "x"}},
        {"type": "permission_error", "message": "x"},
    ),
    (
        "unknown 4xx",
        422,
        {"error": {"message": "x"}},
        {"type": "invalid_request_error", "code": None},
    ),
]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [pytest.param(s, b, e, id=n) for n, s, b, e in ERROR_MAP_CASES],
)
def test_anthropic_error_to_openai(status: int, body: Any, expected: dict[str, Any]) -> None:
    out = anthropic_error_to_openai(status, body)
    assert set(out) == {"error"}
    assert set(out["error"]) == {"message", "type", "param", "code"}
    assert isinstance(out["error"]["message"], str) and out["error"]["message"]
    assert out["error"]["param"] is None
    assert {k: out["error"][k] for k in expected} == expected
    orjson.dumps(out)


# ============================================================================================
# Models and client detection


def test_models_to_openai() -> None:
    out = models_to_openai(
        [
            {
                "type": "model",
                "id": "claude-sonnet-4-6",
                "display_name": "Claude Sonnet 4.6",
                "created_at": "2025-10-01T00:00:00Z",
            },
            {"type": "model", "id": "claude-x", "created_at": "2025-10-01T02:00:00.123456+02:00"},
            {"type": "model", "id": "claude-naive", "created_at": "2025-10-01T00:00:00"},
            {"type": "model", "id": "claude-bad", "created_at": "yesterday"},
            {"type": "model", "id": "claude-none"},
        ]
    )
    assert out["object"] == "list"
    assert [(m["id"], m["created"]) for m in out["data"]] == [
        ("claude-sonnet-4-6", 1759276800),
        ("claude-x", 1759276800),
        ("claude-naive", 1759276800),
        ("claude-bad", 0),
        ("claude-none", 0),
    ]
    for m in out["data"]:
        assert m["object"] == "model" and m["owned_by"] == "anthropic"
        Model.model_validate(m)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"user-agent": "OpenAI/Python 1.99.0", "authorization": "Bearer sk-pr-x"}, True),
        ({"User-Agent": "AsyncOpenAI/Python 3.54.0"}, True),
        ({"user-agent": "OpenAI/JS 4.104.0", "x-stainless-lang": "js"}, True),
        ({"user-agent": "AzureOpenAI/Python 1.0"}, True),
        ({"openai-organization": "org-1", "x-api-key": "k"}, True),
        ({"authorization": "Bearer sk-pr-x"}, True),
        ({"authorization": "bearer sk-pr-x", "user-agent": "curl/8.5"}, True),
        ({"authorization": "Bearer t", "x-api-key": "k"}, False),
        ({"x-api-key": "sk-pr-x"}, False),
        ({}, False),
        (
            {
                "user-agent": "Anthropic/Python 0.121.0",
                "anthropic-version": "2023-06-01",
                "x-api-key": "k",
                "x-stainless-package-version": "0.121.0",
            },
            False,
        ),
        (
            {
                "user-agent": "claude-cli/2.1.0 (external, cli)",
                "anthropic-version": "2023-06-01",
                "authorization": "Bearer t",
            },
            False,
        ),
        ({"User-Agent": "OpenAI/Python 1.0", "Anthropic-Version": "2023-06-01"}, False),
    ],
)
def test_is_openai_client(headers: dict[str, str], expected: bool) -> None:
    assert is_openai_client(headers) is expected


def test_is_openai_client_headers_from_the_real_sdk() -> None:
    client = openai.OpenAI(api_key="sk-pr-test", base_url="http://relay.test/v1")
    headers = {k: v for k, v in client.default_headers.items() if isinstance(v, str)}
    headers.update(client.auth_headers)
    assert is_openai_client(headers)


# ============================================================================================
# End to end through the real OpenAI SDK (no network: a mock transport plays the relay)


def _sse_events(events: Iterable[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, Any]]:
    return [(k, d) for k, d in events]


def _relay(
    events: list[tuple[str, Any]], message: dict[str, Any]
) -> tuple[httpx2.MockTransport, list[dict[str, Any]]]:
    """A mock transport that plays the relay; also returns the Anthropic bodies it built."""
    seen: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        translated = chat_to_messages(body)
        seen.append(translated)
        if translated.get("stream"):
            translator = ChatStreamTranslator(
                created=CREATED,
                include_usage=stream_include_usage(body),
                fallback_model=translated["model"],
            )
            payload = b"".join(translator.feed(k, d) for k, d in events) + translator.finish()
            return httpx2.Response(
                200, headers={"content-type": "text/event-stream"}, content=payload
            )
        return httpx2.Response(200, json=messages_to_chat(message, created=CREATED))

    return httpx2.MockTransport(handler), seen


def _client(transport: httpx2.MockTransport) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-pr-test",
        base_url="http://relay.test/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=transport),
    )


def test_openai_sdk_non_streaming_round_trip() -> None:
    message = anthropic_message(
        [text("Let me check."), tool_use("toolu_01A", "get_weather", {"city": "Paris"})],
        stop_reason="tool_use",
    )
    transport, seen = _relay([], message)
    with _client(transport) as client:
        completion = client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
            ],
            tools=cast(Any, [WEATHER_TOOL]),
            tool_choice="required",
            max_completion_tokens=256,
        )
    assert completion.choices[0].finish_reason == "tool_calls"
    tool_call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert tool_call.function.arguments == '{"city":"Paris"}'  # type: ignore[union-attr]
    sent = seen[0]
    assert sent["system"] == "Be brief."
    assert sent["max_tokens"] == 256
    assert sent["tool_choice"] == {"type": "any"}


def test_openai_sdk_streaming_round_trip() -> None:
    transport, _ = _relay(_sse_events(TOOL_STREAM), anthropic_message([]))
    with _client(transport) as client:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        received = list(stream)
    assert received[-1].usage is not None and received[-1].usage.completion_tokens == 40
    assert received[-2].choices[0].finish_reason == "tool_calls"
    arguments = "".join(
        tc.function.arguments or ""
        for chunk in received
        for choice in chunk.choices
        for tc in choice.delta.tool_calls or []
        if tc.index == 0 and tc.function is not None
    )
    assert orjson.loads(arguments) == {"city": "Paris"}


def test_openai_sdk_raises_on_stream_error() -> None:
    events = [
        *TEXT_STREAM[:4],
        ev("error", error={"type": "overloaded_error", "message": "Overloaded"}),
    ]
    transport, _ = _relay(events, anthropic_message([]))
    with _client(transport) as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="Overloaded"):
            list(stream)
