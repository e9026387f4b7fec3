"""billing.estimate: the hold is an upper bound of the cost.

For text, the truth used here is "a token covers at least one UTF-8 byte": the input bound must
be at least the UTF-8 byte length of every text the request carries.
"""

from __future__ import annotations

import base64
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.estimate import (
    DOCUMENT_TOKENS,
    FALLBACK_MAX_TOKENS,
    IMAGE_TOKENS,
    MAX_INPUT_TOKENS,
    estimate_input_tokens_upper,
    hold_micros,
    input_rate_for,
    web_search_max_uses,
    worst_case_usage,
)
from billing.pricing import SEED_PRICES, Price, Usage, cost_micros

SEEDS = {price.model: price for price in SEED_PRICES}
SONNET = SEEDS["claude-sonnet-4-6"]
SONNET45 = SEEDS["claude-sonnet-4-5"]


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


# --- random bodies with known text ---------------------------------------------------------------

texts = st.text(
    alphabet=st.characters(codec="utf-8"),  # multibyte UTF-8 included, no lone surrogates
    max_size=200,
)


@st.composite
def text_bodies(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A valid text-only body, and the UTF-8 byte count of every text in it."""
    truth = 0

    def text() -> str:
        nonlocal truth
        value = draw(texts)
        truth += nbytes(value)
        return value

    def blocks() -> str | list[dict[str, Any]]:
        if draw(st.booleans()):
            return text()
        out: list[dict[str, Any]] = []
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["text", "tool_use", "tool_result", "thinking"]))
            if kind == "text":
                out.append({"type": "text", "text": text()})
            elif kind == "tool_use":
                out.append(
                    {"type": "tool_use", "id": "toolu_1", "name": text(), "input": {"q": text()}}
                )
            elif kind == "tool_result":
                content: Any = (
                    text()
                    if draw(st.booleans())
                    else [{"type": "text", "text": text()} for _ in range(draw(st.integers(0, 2)))]
                )
                out.append({"type": "tool_result", "tool_use_id": "toolu_1", "content": content})
            else:
                out.append({"type": "thinking", "thinking": text(), "signature": "sig"})
        return out

    body: dict[str, Any] = {"model": "claude-sonnet-4-6", "max_tokens": draw(st.integers(1, 10**5))}
    if draw(st.booleans()):
        body["system"] = blocks()
    body["messages"] = [
        {"role": draw(st.sampled_from(["user", "assistant"])), "content": blocks()}
        for _ in range(draw(st.integers(0, 4)))
    ]
    if draw(st.booleans()):
        body["tools"] = [
            {
                "name": text(),
                "description": text(),
                "input_schema": {
                    "type": "object",
                    "properties": {text(): {"type": "string", "description": text()}},
                },
            }
            for _ in range(draw(st.integers(0, 2)))
        ]
    return body, truth


@settings(max_examples=80, deadline=None)
@given(text_bodies())
def test_input_bound_covers_text_bytes(case: tuple[dict[str, Any], int]) -> None:
    body, truth = case
    assert estimate_input_tokens_upper(body) >= truth


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=2000))
def test_single_text_bound(text: str) -> None:
    body = {"max_tokens": 1, "messages": [{"role": "user", "content": text}]}
    bound = estimate_input_tokens_upper(body)
    assert nbytes(text) <= bound <= nbytes(text) + 200  # tight: bytes plus small framing


@st.composite
def usages_within(draw: st.DrawFn, body: dict[str, Any], price: Price) -> Usage:
    """Any usage the request could report: input ≤ the bound, output ≤ max_tokens, cache
    writes only of the TTLs the body has breakpoints for."""
    bound = estimate_input_tokens_upper(body)
    rate = input_rate_for(body, price)
    total = draw(st.integers(0, bound))
    parts = sorted(draw(st.lists(st.integers(0, total), min_size=3, max_size=3)))
    uncached, w5m, w1h, read = (
        parts[0],
        parts[1] - parts[0],
        parts[2] - parts[1],
        total - parts[2],
    )
    if rate < price.cache_write_1h:
        uncached, w1h = uncached + w1h, 0
    if rate < price.cache_write_5m:
        uncached, w5m = uncached + w5m, 0
    return Usage(
        input_tokens=uncached,
        cache_write_5m_tokens=w5m,
        cache_write_1h_tokens=w1h,
        cache_read_input_tokens=read,
        output_tokens=draw(st.integers(0, body["max_tokens"])),
    )


@settings(max_examples=100, deadline=None)
@given(
    text_bodies(),
    st.sampled_from(SEED_PRICES),
    st.sampled_from(["none", "5m", "1h"]),
    st.decimals(min_value="0.000001", max_value=1000, places=6),
    st.data(),
)
def test_hold_covers_any_possible_cost(
    case: tuple[dict[str, Any], int],
    price: Price,
    ttl: str,
    multiplier: Decimal,
    data: st.DataObject,
) -> None:
    body, _ = case
    if ttl != "none":
        body["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    usage = data.draw(usages_within(body, price))
    assert cost_micros(usage, price, multiplier) <= hold_micros(body, price, multiplier)


# --- rates and breakpoints -----------------------------------------------------------------------


def base_body(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "Hello"}],
    }
    body.update(extra)
    return body


EPHEMERAL = {"type": "ephemeral"}
ONE_HOUR = {"type": "ephemeral", "ttl": "1h"}
FIVE_MIN = {"type": "ephemeral", "ttl": "5m"}


def test_no_breakpoint_uses_input_rate() -> None:
    assert input_rate_for(base_body(), SONNET) == SONNET.input


@pytest.mark.parametrize(
    "body",
    [
        base_body(cache_control=EPHEMERAL),
        base_body(system=[{"type": "text", "text": "s", "cache_control": FIVE_MIN}]),
        base_body(tools=[{"name": "t", "input_schema": {}, "cache_control": EPHEMERAL}]),
        base_body(
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}
            ]
        ),
        base_body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "text", "text": "r", "cache_control": FIVE_MIN}],
                        }
                    ],
                }
            ]
        ),
    ],
    ids=["top-level", "system", "tool", "message", "nested-tool-result"],
)
def test_any_breakpoint_uses_5m_rate(body: dict[str, Any]) -> None:
    assert input_rate_for(body, SONNET) == SONNET.cache_write_5m


@pytest.mark.parametrize(
    "body",
    [
        base_body(cache_control=ONE_HOUR),
        base_body(system=[{"type": "text", "text": "s", "cache_control": ONE_HOUR}]),
        base_body(tools=[{"name": "t", "input_schema": {}, "cache_control": ONE_HOUR}]),
        base_body(
            system=[{"type": "text", "text": "s", "cache_control": ONE_HOUR}],
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}
            ],
        ),
        base_body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {}, "cache_control": ONE_HOUR},
                    ],
                }
            ]
        ),
    ],
    ids=["top-level", "system", "tool", "1h-and-5m", "image"],
)
def test_one_hour_breakpoint_wins(body: dict[str, Any]) -> None:
    assert input_rate_for(body, SONNET) == SONNET.cache_write_1h


def test_hold_formula() -> None:
    body = base_body(system=[{"type": "text", "text": "x" * 1000, "cache_control": ONE_HOUR}])
    tokens = estimate_input_tokens_upper(body)
    expected = tokens * 6 + 1000 * 15  # $6 (1h write) and $15 per Mtok = µUSD per token
    assert hold_micros(body, SONNET, Decimal(1)) == expected
    assert hold_micros(body, SONNET, Decimal("1.5")) == -(-expected * 3 // 2)
    haiku = SEEDS["claude-haiku-4-5"]
    plain = base_body()
    assert hold_micros(plain, haiku, Decimal(1)) == -(
        -(estimate_input_tokens_upper(plain) * 1_000_000 + 1000 * 5_000_000) // 1_000_000
    )


def test_hold_applies_long_context_tier() -> None:
    small = base_body(messages=[{"role": "user", "content": "x" * 150_000}])
    big = base_body(messages=[{"role": "user", "content": "x" * 250_000}])
    for body, premium in ((small, False), (big, True)):
        tokens = estimate_input_tokens_upper(body)
        expected = tokens * 6 + 1000 * 45 // 2 if premium else tokens * 3 + 1000 * 15
        assert hold_micros(body, SONNET45, Decimal(1)) == expected
    # flat-priced models: no premium
    tokens = estimate_input_tokens_upper(big)
    assert hold_micros(big, SONNET, Decimal(1)) == tokens * 3 + 1000 * 15


def test_hold_geo_and_fast() -> None:
    opus = SEEDS["claude-opus-4-6"]
    plain = hold_micros(base_body(), opus, Decimal(1))
    assert hold_micros(base_body(inference_geo="us"), opus, Decimal(1)) >= plain * 11 // 10
    assert hold_micros(base_body(speed="fast"), opus, Decimal(1)) >= plain * 6 - 1


def test_web_search_in_hold() -> None:
    tool = {"type": "web_search_20250305", "name": "web_search"}
    assert web_search_max_uses(base_body(tools=[tool])) == 10
    assert web_search_max_uses(base_body(tools=[{**tool, "max_uses": 3}])) == 3
    assert web_search_max_uses(base_body(tools=[{**tool, "max_uses": "x"}])) == 10
    assert web_search_max_uses(base_body()) == 0
    usage = worst_case_usage(base_body(tools=[{**tool, "max_uses": 3}]), SONNET)
    assert usage.web_search_requests == 3
    with_search = hold_micros(base_body(tools=[{**tool, "max_uses": 3}]), SONNET, Decimal(1))
    assert with_search >= hold_micros(base_body(), SONNET, Decimal(1)) + 3 * 10_000


# --- images, documents ---------------------------------------------------------------------------

BIG_DATA = base64.b64encode(b"\x00" * 3_000_000).decode()


def test_image_is_a_constant_not_its_base64() -> None:
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": BIG_DATA},
    }
    body = base_body(messages=[{"role": "user", "content": [image, {"type": "text", "text": "?"}]}])
    bound = estimate_input_tokens_upper(body)
    assert IMAGE_TOKENS <= bound < IMAGE_TOKENS + 200
    url_image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    in_result = {"type": "tool_result", "tool_use_id": "t", "content": [url_image, url_image]}
    body = base_body(messages=[{"role": "user", "content": [in_result]}])
    assert 2 * IMAGE_TOKENS <= estimate_input_tokens_upper(body) < 2 * IMAGE_TOKENS + 200


def test_documents() -> None:
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": BIG_DATA},
        "title": "report",
    }
    body = base_body(messages=[{"role": "user", "content": [pdf]}])
    assert DOCUMENT_TOKENS <= estimate_input_tokens_upper(body) < DOCUMENT_TOKENS + 200
    file_doc = {"type": "document", "source": {"type": "file", "file_id": "file_1"}}
    body = base_body(messages=[{"role": "user", "content": [file_doc]}])
    assert estimate_input_tokens_upper(body) >= DOCUMENT_TOKENS
    text = "é" * 10_000
    text_doc = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": text},
    }
    body = base_body(messages=[{"role": "user", "content": [text_doc]}])
    assert nbytes(text) <= estimate_input_tokens_upper(body) < nbytes(text) + 200
    content_doc = {
        "type": "document",
        "source": {"type": "content", "content": [{"type": "text", "text": text}]},
    }
    body = base_body(messages=[{"role": "user", "content": [content_doc]}])
    assert nbytes(text) <= estimate_input_tokens_upper(body) < nbytes(text) + 200


def test_thinking_blocks_count_by_bytes() -> None:
    thought = "думаю " * 1000
    blocks = [
        {"type": "thinking", "thinking": thought, "signature": "s"},
        {"type": "redacted_thinking", "data": "Z" * 5000},
    ]
    body = base_body(
        messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": blocks},
        ]
    )
    assert estimate_input_tokens_upper(body) >= nbytes(thought) + 5000


# --- malformed bodies never crash and stay conservative ------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": "hello " * 100},
        {"messages": None, "system": "s" * 500},
        {"messages": [1, "two", None, ["x" * 300]]},
        {"messages": [{"role": "user", "content": 42}], "system": {"weird": "x" * 300}},
        {"messages": [{"role": "user", "content": [None, 1, "str", {"type": 5}]}]},
        {"messages": [], "tools": "nope"},
        {"messages": [], "tools": [1, None, {"type": 7}]},
        {"messages": [], "max_tokens": "100"},
        {"messages": [], "max_tokens": True},
        {"messages": [], "max_tokens": -5},
        [],
        "a string body",
        None,
        42,
    ],
)
def test_malformed_bodies(body: Any) -> None:
    tokens = estimate_input_tokens_upper(body)
    assert tokens > 0
    hold = hold_micros(body, SONNET, Decimal(1))
    assert hold > 0
    input_rate_for(body, SONNET)


def test_malformed_body_counts_its_bytes() -> None:
    body: dict[str, Any] = {"messages": {"role": "user", "content": "x" * 10_000}}
    assert estimate_input_tokens_upper(body) >= 10_000
    # breakpoints are still honoured anywhere in a malformed body
    body = {"messages": {"x": [{"cache_control": ONE_HOUR}]}}
    assert input_rate_for(body, SONNET) == SONNET.cache_write_1h


def test_deeply_nested_body_does_not_crash() -> None:
    nested: Any = "x"
    for _ in range(100_000):
        nested = [nested]
    body = {"messages": [{"role": "user", "content": [{"type": "tool_use", "input": nested}]}]}
    assert estimate_input_tokens_upper(body) > 100_000
    assert estimate_input_tokens_upper({"messages": nested}) > 100_000


def test_max_tokens_fallback_and_caps() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert worst_case_usage(body, SONNET).output_tokens == FALLBACK_MAX_TOKENS
    body = base_body(max_tokens=10**15)
    assert worst_case_usage(body, SONNET).output_tokens == 1_000_000
    huge = base_body(messages=[{"role": "user", "content": "x" * (MAX_INPUT_TOKENS + 10)}])
    assert estimate_input_tokens_upper(huge) == MAX_INPUT_TOKENS


def test_tools_and_server_tool_allowances() -> None:
    plain = estimate_input_tokens_upper(base_body())
    tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
    with_tool = estimate_input_tokens_upper(base_body(tools=[tool]))
    assert with_tool >= plain + 1_000  # the tool-use system prompt allowance
    bash = {"type": "bash_20250124", "name": "bash"}
    assert estimate_input_tokens_upper(base_body(tools=[bash])) >= plain + 3_000
    fetch = {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 2}
    assert estimate_input_tokens_upper(base_body(tools=[fetch])) >= plain + 2 * 25_000
    mcp = base_body(mcp_servers=[{"type": "url", "url": "https://m", "name": "m"}])
    assert estimate_input_tokens_upper(mcp) >= plain + 10_000
