"""billing.money: exact parsing and formatting of USD amounts, multipliers and prices."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.errors import BillingError, InvalidAmount
from billing.money import (
    MICROS_PER_USD,
    ceil_div,
    format_multiplier,
    format_price_per_mtok,
    format_usd,
    parse_multiplier,
    parse_price_per_mtok,
    parse_usd,
)

MAX_MICROS = 10**12 * MICROS_PER_USD
micros_any = st.integers(min_value=-MAX_MICROS, max_value=MAX_MICROS)


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("10", 10_000_000),
        ("10.5", 10_500_000),
        ("0.000001", 1),
        ("0.1", 100_000),
        ("1.50000000", 1_500_000),  # trailing zeros are not extra precision
        ("  7.25 ", 7_250_000),
        ("007", 7_000_000),
        ("1000000000000", MAX_MICROS),
    ],
)
def test_parse_usd_accepts(text: str, micros: int) -> None:
    assert parse_usd(text) == micros


def test_parse_usd_other_types() -> None:
    assert parse_usd(3) == 3_000_000
    assert parse_usd(Decimal("2.5")) == 2_500_000
    assert parse_usd(Decimal("1E+3")) == 1_000_000_000
    assert parse_usd(Decimal("0.1000000000")) == 100_000


def test_parse_usd_sign_and_zero_policy() -> None:
    assert parse_usd("-3.25", allow_negative=True) == -3_250_000
    assert parse_usd(-2, allow_negative=True) == -2_000_000
    assert parse_usd("0", allow_zero=True) == 0
    assert parse_usd("-0", allow_zero=True) == 0
    with pytest.raises(InvalidAmount, match="negative"):
        parse_usd("-3.25")
    with pytest.raises(InvalidAmount, match="zero"):
        parse_usd("0.000000")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (1.5, "float"),
        (True, "boolean"),
        ("", "empty"),
        ("   ", "empty"),
        ("NaN", "finite"),
        ("-Infinity", "finite"),
        ("inf", "finite"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        ("1e3", "exponent"),
        ("1E-2", "exponent"),
        ("1.0000001", "decimal places"),
        ("0.0000001", "decimal places"),
        (Decimal("0.0000001"), "decimal places"),
        (Decimal("1E-1000000"), "decimal places"),
        ("1000000000000.000001", "magnitude"),
        ("99999999999999999999", "magnitude"),
        (10**13, "magnitude"),
        pytest.param(10**5000, "magnitude", id="huge-int"),
        (Decimal("1E+1000000"), "magnitude"),
        ("+5", "not a decimal"),
        (".5", "not a decimal"),
        ("5.", "not a decimal"),
        ("1_000", "not a decimal"),
        ("1,5", "not a decimal"),
        ("٣", "not a decimal"),  # non-ASCII digit
        ("1" * 100, "too long"),
        (None, "not NoneType"),
        ([1], "not list"),
    ],
)
def test_parse_usd_rejects(value: object, reason: str) -> None:
    with pytest.raises(InvalidAmount, match=reason) as caught:
        parse_usd(value, field="amount_usd")  # type: ignore[arg-type]
    assert caught.value.field == "amount_usd"
    assert isinstance(caught.value, BillingError)
    assert isinstance(caught.value, ValueError)  # pydantic validators turn it into a 422/400
    assert str(caught.value).startswith("amount_usd: ")


def test_error_names_the_field() -> None:
    with pytest.raises(InvalidAmount) as caught:
        parse_usd("abc", field="daily_budget_usd")
    assert caught.value.field == "daily_budget_usd"
    assert "daily_budget_usd" in str(caught.value)


def test_format_usd() -> None:
    assert format_usd(1_500_000) == "1.500000"
    assert format_usd(-1) == "-0.000001"
    assert format_usd(0) == "0.000000"
    assert format_usd(-1_000_000) == "-1.000000"
    assert format_usd(MAX_MICROS) == "1000000000000.000000"
    with pytest.raises(TypeError):
        format_usd(1.5)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(micros_any)
def test_usd_round_trip(micros: int) -> None:
    text = format_usd(micros)
    assert parse_usd(text, allow_negative=True, allow_zero=True) == micros
    assert len(text.split(".")[1]) == 6


@settings(max_examples=300, deadline=None)
@given(st.decimals(min_value=-(10**12), max_value=10**12, places=6, allow_nan=False))
def test_decimal_parse_is_exact(value: Decimal) -> None:
    micros = parse_usd(value, allow_negative=True, allow_zero=True)
    assert Decimal(micros) / MICROS_PER_USD == value
    assert parse_usd(format(value, "f"), allow_negative=True, allow_zero=True) == micros


def test_multiplier() -> None:
    assert parse_multiplier("1") == Decimal(1)
    assert parse_multiplier("1.250") == Decimal("1.25")
    assert parse_multiplier(2) == Decimal(2)
    assert parse_multiplier("1000") == Decimal(1000)
    assert parse_multiplier("0.000001") == Decimal("0.000001")
    assert format_multiplier(Decimal("1")) == "1"
    assert format_multiplier(Decimal("1.2500")) == "1.25"
    assert format_multiplier(Decimal("1E+1")) == "10"
    assert format_multiplier(Decimal("0.000")) == "0"
    for bad in ("0", "-1", "1000.000001", "1.0000001", 1.5, "x", "1e2"):
        with pytest.raises(InvalidAmount) as caught:
            parse_multiplier(bad)  # type: ignore[arg-type]
        assert caught.value.field == "price_multiplier"
    with pytest.raises(ValueError):
        format_multiplier(Decimal("NaN"))


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=1000 * MICROS_PER_USD))
def test_multiplier_round_trip(scaled: int) -> None:
    text = format_multiplier(Decimal(scaled) / MICROS_PER_USD)
    assert "E" not in text
    assert not text.endswith("0") or "." not in text
    parsed = parse_multiplier(text)
    assert parsed * MICROS_PER_USD == scaled
    assert format_multiplier(parsed) == text


def test_price_per_mtok() -> None:
    assert parse_price_per_mtok("3") == 3_000_000
    assert parse_price_per_mtok("0.30") == 300_000
    assert parse_price_per_mtok("18.75") == 18_750_000
    assert parse_price_per_mtok("0") == 0
    assert format_price_per_mtok(3_000_000) == "3"
    assert format_price_per_mtok(300_000) == "0.3"
    assert format_price_per_mtok(18_750_000) == "18.75"
    assert format_price_per_mtok(0) == "0"
    assert format_price_per_mtok(1) == "0.000001"
    for bad in ("-1", "0.0000001", 0.3, "1e3"):
        with pytest.raises(InvalidAmount):
            parse_price_per_mtok(bad)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**9 * MICROS_PER_USD))
def test_price_round_trip(micros: int) -> None:
    assert parse_price_per_mtok(format_price_per_mtok(micros)) == micros


@given(st.integers(min_value=-(10**30), max_value=10**30), st.integers(1, 10**20))
@settings(max_examples=200, deadline=None)
def test_ceil_div(numerator: int, denominator: int) -> None:
    result = ceil_div(numerator, denominator)
    assert (result - 1) * denominator < numerator <= result * denominator


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_error_messages_format_usd_as_money_does(micros: int) -> None:
    """billing.errors formats amounts itself (billing.money imports it, not the reverse)."""
    from billing.errors import _usd

    assert _usd(micros) == format_usd(micros)
