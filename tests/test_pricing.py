"""billing.pricing: usage reading, price matching and the exact cost of a request.

The cost is checked against an independent reference written here with ``decimal.Decimal`` at
100 digits of precision (exact for these magnitudes), ceiled once.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import ROUND_CEILING, Decimal, localcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.errors import InvalidAmount
from billing.pricing import (
    SEED_PRICES,
    Price,
    PriceBook,
    Usage,
    cost_micros,
    match_price,
)

SEEDS = {price.model: price for price in SEED_PRICES}

# Spec §6 list prices, USD per Mtok: input, 5m write, 1h write, cache read, output.
SPEC_TABLE: dict[str, tuple[str, str, str, str, str]] = {
    "claude-fable-5": ("10", "12.50", "20", "1.00", "50"),
    "claude-mythos-5": ("10", "12.50", "20", "1.00", "50"),
    "claude-opus-5": ("5", "6.25", "10", "0.50", "25"),
    "claude-opus-4-8": ("5", "6.25", "10", "0.50", "25"),
    "claude-opus-4-7": ("5", "6.25", "10", "0.50", "25"),
    "claude-opus-4-6": ("5", "6.25", "10", "0.50", "25"),
    "claude-opus-4-5": ("5", "6.25", "10", "0.50", "25"),
    "claude-opus-4-1": ("15", "18.75", "30", "1.50", "75"),
    "claude-opus-4-0": ("15", "18.75", "30", "1.50", "75"),
    "claude-opus-4": ("15", "18.75", "30", "1.50", "75"),
    "claude-sonnet-5": ("3", "3.75", "6", "0.30", "15"),
    "claude-sonnet-4-6": ("3", "3.75", "6", "0.30", "15"),
    "claude-sonnet-4-5": ("3", "3.75", "6", "0.30", "15"),
    "claude-sonnet-4-0": ("3", "3.75", "6", "0.30", "15"),
    "claude-sonnet-4": ("3", "3.75", "6", "0.30", "15"),
    "claude-3-7-sonnet": ("3", "3.75", "6", "0.30", "15"),
    "claude-haiku-4-5": ("1", "1.25", "2", "0.10", "5"),
    "claude-3-5-haiku": ("0.80", "1", "1.6", "0.08", "4"),
    "claude-3-haiku": ("0.25", "0.30", "0.50", "0.03", "1.25"),
}
KINDS = ("input", "5m", "1h", "read", "output")


def usage_of(kind: str, tokens: int) -> Usage:
    return {
        "input": Usage(input_tokens=tokens),
        "5m": Usage(cache_creation_input_tokens=tokens, cache_write_5m_tokens=tokens),
        "1h": Usage(cache_creation_input_tokens=tokens, cache_write_1h_tokens=tokens),
        "read": Usage(cache_read_input_tokens=tokens),
        "output": Usage(output_tokens=tokens),
    }[kind]


def reference_cost(usage: Usage, price: Price, multiplier: Decimal = Decimal(1)) -> int:
    """The cost in micro-USD, computed the long way with decimals."""
    with localcontext() as ctx:
        ctx.prec = 100
        per_token = Decimal(1) / Decimal(1_000_000)  # rates are per Mtok
        lc = price.long_context_threshold is not None and (
            usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
            > price.long_context_threshold
        )
        in_factor = Decimal(price.long_context_input_pct) / 100 if lc else Decimal(1)
        out_factor = Decimal(price.long_context_output_pct) / 100 if lc else Decimal(1)
        usd = Decimal(0)
        usd += Decimal(usage.input_tokens) * price.input * per_token * in_factor
        usd += Decimal(usage.cache_write_5m_tokens) * price.cache_write_5m * per_token * in_factor
        usd += Decimal(usage.cache_write_1h_tokens) * price.cache_write_1h * per_token * in_factor
        usd += Decimal(usage.cache_read_input_tokens) * price.cache_read * per_token * in_factor
        usd += Decimal(usage.output_tokens) * price.output * per_token * out_factor
        if usage.service_tier == "batch":
            usd = usd * (100 - price.batch_discount_pct) / 100
        if usage.inference_geo == "us":
            usd = usd * price.inference_geo_us_pct / 100
        if usage.speed == "fast":
            usd = usd * price.fast_mode_pct / 100
        usd += Decimal(usage.web_search_requests) * Decimal("10000")
        exact = usd * multiplier
        return int(exact.to_integral_value(rounding=ROUND_CEILING))


# --- strategies ----------------------------------------------------------------------------------

counts = st.one_of(st.integers(0, 20), st.integers(0, 2_000_000), st.integers(0, 10**10))
rates = st.integers(0, 200_000_000)
pcts = st.integers(0, 1000)
multipliers = st.decimals(min_value="0.000001", max_value=1000, places=6)


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    w5m, w1h = draw(counts), draw(counts)
    return Usage(
        input_tokens=draw(counts),
        output_tokens=draw(counts),
        cache_creation_input_tokens=w5m + w1h,
        cache_write_5m_tokens=w5m,
        cache_write_1h_tokens=w1h,
        cache_read_input_tokens=draw(counts),
        service_tier=draw(st.sampled_from([None, "standard", "priority", "batch"])),
        web_search_requests=draw(st.integers(0, 50)),
        inference_geo=draw(st.sampled_from([None, "global", "us"])),
        speed=draw(st.sampled_from([None, "standard", "fast"])),
    )


@st.composite
def prices(draw: st.DrawFn) -> Price:
    if draw(st.booleans()):
        return draw(st.sampled_from(SEED_PRICES))
    return Price(
        model="m",
        input=draw(rates),
        output=draw(rates),
        cache_write_5m=draw(rates),
        cache_write_1h=draw(rates),
        cache_read=draw(rates),
        batch_discount_pct=draw(st.integers(0, 100)),
        long_context_threshold=draw(st.one_of(st.none(), st.integers(0, 10**6))),
        long_context_input_pct=draw(pcts),
        long_context_output_pct=draw(pcts),
        inference_geo_us_pct=draw(pcts),
        fast_mode_pct=draw(pcts),
    )


@settings(max_examples=250, deadline=None)
@given(usages(), prices(), multipliers)
def test_cost_matches_reference(usage: Usage, price: Price, multiplier: Decimal) -> None:
    assert cost_micros(usage, price, multiplier) == reference_cost(usage, price, multiplier)


@settings(max_examples=120, deadline=None)
@given(usages(), prices())
def test_cost_default_multiplier_is_one(usage: Usage, price: Price) -> None:
    assert cost_micros(usage, price) == reference_cost(usage, price)


@settings(max_examples=120, deadline=None)
@given(usages(), prices(), multipliers)
def test_cost_is_monotone_in_usage(usage: Usage, price: Price, multiplier: Decimal) -> None:
    more = replace(usage, output_tokens=usage.output_tokens + 1)
    assert cost_micros(more, price, multiplier) >= cost_micros(usage, price, multiplier)


# --- table tests: each token kind of each model, priced separately --------------------------------


@pytest.mark.parametrize("model", sorted(SPEC_TABLE))
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_priced_per_spec(model: str, kind: str) -> None:
    price = SEEDS[model]
    usd_per_mtok = Decimal(SPEC_TABLE[model][KINDS.index(kind)])
    # 100k tokens (below any long-context threshold) cost a tenth of the listed rate.
    assert cost_micros(usage_of(kind, 100_000), price) == int(usd_per_mtok * 100_000)
    # 1,234 tokens: the exact value, ceiled.
    assert cost_micros(usage_of(kind, 1_234), price) == int(
        (usd_per_mtok * 1_234).to_integral_value(rounding=ROUND_CEILING)
    )


def test_seed_table_covers_spec_and_multiplier_rules() -> None:
    assert set(SEEDS) == set(SPEC_TABLE)
    assert len(SEEDS) == len(SEED_PRICES)  # no duplicates
    for price in SEED_PRICES:
        # spec §6: 5m write = 1.25 × input, 1h write = 2 × input, read = 0.1 × input; Haiku 3's
        # listed 5m write ($0.30) and read ($0.03) are the exception the spec table records.
        assert price.cache_write_1h == price.input * 2, price.model
        assert price.batch_discount_pct == 50
        if price.model != "claude-3-haiku":
            assert price.cache_write_5m * 4 == price.input * 5, price.model
            assert price.cache_read * 10 == price.input, price.model


def test_spec_response_example() -> None:
    usage = Usage.from_api(
        {
            "input_tokens": 42,
            "cache_creation_input_tokens": 1800,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1800},
            "output_tokens": 61,
            "service_tier": "standard",
        }
    )
    # 42 × $3 + 1800 × $6 + 61 × $15 per Mtok = 126 + 10_800 + 915 micro-USD
    assert cost_micros(usage, SEEDS["claude-sonnet-4-6"]) == 11_841


# --- rounding, multiplier, modifiers -------------------------------------------------------------


def test_rounds_up_once_at_the_end() -> None:
    haiku = SEEDS["claude-haiku-4-5"]
    assert cost_micros(Usage(cache_read_input_tokens=1), haiku) == 1  # 0.1 µUSD → 1
    assert cost_micros(Usage(cache_read_input_tokens=10), haiku) == 1  # exactly 1
    assert cost_micros(Usage(cache_read_input_tokens=11), haiku) == 2  # 1.1 → 2
    # Kinds add up before the one rounding: 5 reads (0.5) + 5 writes (6.25) = 6.75 → 7, where
    # rounding per kind would give 1 + 7 = 8.
    assert cost_micros(Usage(cache_read_input_tokens=5, cache_write_5m_tokens=5), haiku) == 7
    assert cost_micros(Usage(), haiku) == 0
    assert cost_micros(Usage(), haiku, Decimal("3.5")) == 0


def test_multiplier() -> None:
    sonnet = SEEDS["claude-sonnet-4-6"]
    usage = Usage(input_tokens=1_000_000)  # $3
    assert cost_micros(usage, sonnet, Decimal("1.25")) == 3_750_000
    assert cost_micros(usage, sonnet, Decimal("0.000001")) == 3
    assert cost_micros(Usage(input_tokens=1), sonnet, Decimal("1.5")) == 5  # 4.5 → 5
    assert cost_micros(Usage(input_tokens=1), sonnet, 2) == 6
    with pytest.raises(TypeError):
        cost_micros(usage, sonnet, 1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidAmount):
        cost_micros(usage, sonnet, Decimal(-1))
    with pytest.raises(InvalidAmount):
        cost_micros(usage, sonnet, Decimal("NaN"))


def test_batch_halves_every_kind() -> None:
    opus = SEEDS["claude-opus-4-1"]
    for kind in KINDS:
        standard = cost_micros(usage_of(kind, 1_000_000), opus)
        batch = cost_micros(replace(usage_of(kind, 1_000_000), service_tier="batch"), opus)
        assert batch * 2 == standard
    # web search is not discounted
    searches = Usage(web_search_requests=3, service_tier="batch")
    assert cost_micros(searches, opus) == 30_000


def test_web_search_ten_dollars_per_thousand() -> None:
    haiku = SEEDS["claude-haiku-4-5"]
    assert cost_micros(Usage(web_search_requests=1000), haiku) == 10_000_000
    assert cost_micros(Usage(web_search_requests=1), haiku, Decimal(2)) == 20_000


def test_long_context_tier() -> None:
    sonnet45 = SEEDS["claude-sonnet-4-5"]
    at = Usage(input_tokens=200_000, output_tokens=1_000)
    above = Usage(input_tokens=200_001, output_tokens=1_000)
    assert cost_micros(at, sonnet45) == 200_000 * 3 + 1_000 * 15
    assert cost_micros(above, sonnet45) == 200_001 * 6 + 1_000 * 45 // 2  # $6 and $22.50
    # the threshold counts total input: cache writes and reads included, all repriced
    mixed = Usage(
        input_tokens=100_000,
        cache_creation_input_tokens=60_000,
        cache_write_5m_tokens=60_000,
        cache_read_input_tokens=40_001,
    )
    # $6 input, $7.50 5m writes, $0.60 reads: 600_000 + 450_000 + 24_000.6 → 1_074_001
    assert cost_micros(mixed, sonnet45) == 1_074_001
    assert cost_micros(mixed, SEEDS["claude-sonnet-4-6"]) == (
        100_000 * 3 + (60_000 * 375 + 40_001 * 30) // 100 + 1
    )  # flat, 0.3 µUSD of reads rounded up
    # batch halves the premium too
    assert cost_micros(replace(above, service_tier="batch"), sonnet45) == (
        200_001 * 3 + 1_000 * 45 // 4
    )
    assert SEEDS["claude-sonnet-4"].long_context_threshold == 200_000
    assert SEEDS["claude-sonnet-4-0"].long_context_threshold == 200_000
    assert SEEDS["claude-opus-4-6"].long_context_threshold is None


def test_inference_geo_and_fast_mode() -> None:
    opus46 = SEEDS["claude-opus-4-6"]
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)  # $5 + $25
    assert cost_micros(usage, opus46) == 30_000_000
    assert cost_micros(replace(usage, inference_geo="us"), opus46) == 33_000_000
    assert cost_micros(replace(usage, inference_geo="global"), opus46) == 30_000_000
    assert cost_micros(replace(usage, speed="fast"), opus46) == 180_000_000  # $30/$150
    assert cost_micros(replace(usage, inference_geo="us"), SEEDS["claude-opus-4-5"]) == 30_000_000


# --- price matching ------------------------------------------------------------------------------


def test_match_price() -> None:
    book = PriceBook(SEED_PRICES)
    assert book.match("claude-haiku-4-5-20251001") is SEEDS["claude-haiku-4-5"]
    assert book.match("claude-haiku-4-5") is SEEDS["claude-haiku-4-5"]
    assert book.match("claude-opus-4-1-20250805") is SEEDS["claude-opus-4-1"]
    assert book.match("claude-opus-4-20250514") is SEEDS["claude-opus-4"]
    assert book.match("claude-opus-4-5-20251101") is SEEDS["claude-opus-4-5"]
    assert book.match("claude-sonnet-4-20250514") is SEEDS["claude-sonnet-4"]
    assert book.match("claude-3-5-haiku-20241022") is SEEDS["claude-3-5-haiku"]
    assert book.match("claude-3-haiku-20240307") is SEEDS["claude-3-haiku"]
    assert book.match("claude-3-7-sonnet-latest") is SEEDS["claude-3-7-sonnet"]
    assert book.match("gpt-4o") is None
    assert book.match("") is None
    assert book.match("claude") is None
    assert book.match("claude-haiku-4-5-20251001") is SEEDS["claude-haiku-4-5"]  # cached
    assert len(book) == len(SEED_PRICES)
    assert "claude-haiku-4-5" in book


def _p(model: str, rate: int) -> Price:
    return Price(model, rate, rate, rate, rate, rate)


def test_longest_prefix_and_exact_win() -> None:
    prices = {
        "claude": _p("claude", 1),
        "claude-x": _p("claude-x", 2),
        "claude-x-1": _p("claude-x-1", 3),
        "claude-x-1-2024": _p("claude-x-1-2024", 4),
    }
    assert match_price("claude-x-1-20240101", prices) is prices["claude-x-1-2024"]
    assert match_price("claude-x-1", prices) is prices["claude-x-1"]  # exact
    assert match_price("claude-x-2", prices) is prices["claude-x"]
    assert match_price("claude-y", prices) is prices["claude"]
    assert match_price("other", prices) is None
    assert match_price("claude-x-1", {}) is None
    book = PriceBook(prices)
    assert book.match("claude-x-1-20240101") is prices["claude-x-1-2024"]
    assert book.prices == prices


def test_price_book_cache_is_bounded() -> None:
    book = PriceBook(SEED_PRICES)
    for i in range(10_000):
        book.match(f"unknown-{i}")
    assert len(book._cache) <= 4096
    assert book.match("claude-haiku-4-5-x") is SEEDS["claude-haiku-4-5"]


def test_price_validation() -> None:
    with pytest.raises(InvalidAmount):
        _p("m", -1)
    with pytest.raises(InvalidAmount):
        Price("m", 1, 1, 1, 1, 1, batch_discount_pct=101)
    with pytest.raises(InvalidAmount):
        Price("m", 1, 1, 1, 1, 1, long_context_threshold=-5)


# --- Usage ---------------------------------------------------------------------------------------


def test_usage_from_api_missing_and_null() -> None:
    assert Usage.from_api(None) == Usage()
    assert Usage.from_api({}) == Usage()
    assert Usage.from_api("garbage") == Usage()  # type: ignore[arg-type]
    usage = Usage.from_api(
        {
            "input_tokens": 5,
            "output_tokens": None,
            "cache_creation_input_tokens": None,
            "cache_read_input_tokens": "12",
            "cache_creation": None,
            "server_tool_use": None,
            "service_tier": None,
        }
    )
    assert usage == Usage(input_tokens=5)
    weird = Usage.from_api(
        {"input_tokens": True, "output_tokens": -3, "cache_read_input_tokens": 2.0}
    )
    assert weird == Usage()


def test_usage_from_api_breakdown() -> None:
    # absent breakdown: every cache write is a 5m write
    usage = Usage.from_api({"cache_creation_input_tokens": 100})
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (100, 0)
    # a breakdown that does not sum up: the same
    usage = Usage.from_api(
        {
            "cache_creation_input_tokens": 100,
            "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 10},
        }
    )
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (100, 0)
    # a consistent breakdown is kept
    usage = Usage.from_api(
        {
            "cache_creation_input_tokens": 100,
            "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 70},
        }
    )
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (30, 70)
    # only a breakdown: the total is its sum
    usage = Usage.from_api({"cache_creation": {"ephemeral_1h_input_tokens": 70}})
    assert usage.cache_creation_input_tokens == 70
    assert usage.cache_write_1h_tokens == 70


def test_usage_from_api_full() -> None:
    usage = Usage.from_api(
        {
            "input_tokens": 10,
            "output_tokens": 20,
            "cache_read_input_tokens": 30,
            "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1},
            "service_tier": "batch",
            "inference_geo": "us",
            "speed": "fast",
            "output_tokens_details": {"thinking_tokens": 5},
        }
    )
    assert usage == Usage(
        input_tokens=10,
        output_tokens=20,
        cache_read_input_tokens=30,
        web_search_requests=2,
        service_tier="batch",
        inference_geo="us",
        speed="fast",
    )
    assert usage.total_input() == 40


def test_usage_constructor_keeps_breakdown_consistent() -> None:
    assert Usage(cache_creation_input_tokens=50).cache_write_5m_tokens == 50
    only_split = Usage(cache_write_1h_tokens=7)
    assert only_split.cache_creation_input_tokens == 7
    assert only_split.total_input() == 7
    with pytest.raises(ValueError):
        Usage(input_tokens=-1)


def test_merged_overwrites_never_adds() -> None:
    start = Usage.from_api(
        {
            "input_tokens": 706,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 50,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 100},
            "output_tokens": 1,
            "service_tier": "standard",
        }
    )
    final = start.merged({"output_tokens": 13})
    assert final.output_tokens == 13
    assert final.input_tokens == 706
    assert final.cache_write_1h_tokens == 100  # breakdown kept: it still sums up
    # cumulative: a second delta replaces, never adds
    assert final.merged({"output_tokens": 20}).output_tokens == 20
    # non-null fields overwrite, null and missing fields keep
    over = start.merged(
        {
            "input_tokens": 800,
            "cache_read_input_tokens": None,
            "output_tokens": 40,
            "server_tool_use": {"web_search_requests": 3},
        }
    )
    assert (over.input_tokens, over.cache_read_input_tokens, over.output_tokens) == (800, 50, 40)
    assert over.web_search_requests == 3
    assert over.service_tier == "standard"
    # a new cache-creation total without breakdown: all 5m
    grown = start.merged({"cache_creation_input_tokens": 150})
    assert (grown.cache_write_5m_tokens, grown.cache_write_1h_tokens) == (150, 0)
    # with its own breakdown: taken
    split = start.merged(
        {
            "cache_creation_input_tokens": 150,
            "cache_creation": {"ephemeral_5m_input_tokens": 50, "ephemeral_1h_input_tokens": 100},
        }
    )
    assert (split.cache_write_5m_tokens, split.cache_write_1h_tokens) == (50, 100)
    assert start.merged(None) is start
    assert start.merged({}) == start


@settings(max_examples=120, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
            ]
        ),
        st.one_of(st.none(), st.integers(0, 10**6)),
    ),
    usages(),
)
def test_merged_property(delta: dict[str, int | None], start: Usage) -> None:
    merged = start.merged(delta)
    for key, value in delta.items():
        expected = getattr(start, key) if value is None else value
        assert getattr(merged, key) == expected
    assert merged.cache_write_5m_tokens + merged.cache_write_1h_tokens == (
        merged.cache_creation_input_tokens
    )


@settings(max_examples=100, deadline=None)
@given(usages())
def test_to_api_round_trips(usage: Usage) -> None:
    assert Usage.from_api(usage.to_api()) == usage
    assert Usage().merged(usage.to_api()) == usage
