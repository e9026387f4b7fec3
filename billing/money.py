"""Money at the edges: exact decimal strings in, integer micro-USD inside.

Rules (house rules in ARCHITECTURE.md, contract §6):

- Inside poolrelay every amount is an ``int`` of micro-USD (1 USD = 1_000_000 micros); names
  end in ``_micros``. Prices are integer micro-USD *per million tokens*, so one token at a
  price of ``p`` costs ``p / 1e6`` micro-USD, an exact rational that is rounded up once, at the
  end of a cost computation (see ``billing.pricing``).
- At the edges (admin API, CLI, ``/v1/me``) amounts are decimal strings. Parsing is exact:
  ``"0.1"`` is 100_000 micros, never ``0.1`` as a binary float. Floats are refused outright,
  because a float has already lost the amount the user typed.
- Accepted text: an optional ``-`` (only where negatives are allowed), ASCII digits, and
  optionally ``.`` followed by digits, e.g. ``"10"``, ``"10.5"``, ``"0.000001"``. Leading and
  trailing whitespace is ignored. Refused: exponents (``"1e3"``), ``NaN``/``Infinity``, a sign
  ``+``, ``".5"``/``"5."``, underscores, non-ASCII digits, more than 6 *significant* decimal
  places (``"1.0000001"``; trailing zeros such as ``"1.5000000"`` are fine), and magnitudes
  above 10^12 USD (which keeps every amount within a signed 64-bit integer of micros).
- ``Decimal`` inputs are converted exactly from their digits and exponent, never through
  the decimal context, so the result does not depend on the context's precision.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Final

from billing.errors import InvalidAmount

__all__ = [
    "MAX_USD",
    "MICROS_PER_USD",
    "ceil_div",
    "format_multiplier",
    "format_price_per_mtok",
    "format_usd",
    "parse_multiplier",
    "parse_price_per_mtok",
    "parse_usd",
]

MICROS_PER_USD: Final = 1_000_000
#: Largest accepted magnitude, in USD; 10^12 USD = 10^18 micros < 2^63.
MAX_USD: Final = 10**12
MAX_MULTIPLIER: Final = 1000
_SCALE: Final = 6
_MAX_MICROS: Final = MAX_USD * MICROS_PER_USD
_MAX_TEXT: Final = 64  # characters; any sane amount is far shorter
_POW10: Final[tuple[int, ...]] = tuple(10**i for i in range(20))
_NUMBER = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?", re.ASCII)


def ceil_div(numerator: int, denominator: int) -> int:
    """Exact ``ceil(numerator / denominator)`` on integers (``denominator > 0``)."""
    return -(-numerator // denominator)


def _to_micros(negative: bool, coefficient: int, exponent: int, field: str) -> int:
    """``(-1)^negative × coefficient × 10^exponent`` USD as exact micros, or InvalidAmount."""
    if coefficient == 0:
        return 0
    while exponent < 0 and coefficient % 10 == 0:  # trailing zeros are not precision
        coefficient //= 10
        exponent += 1
    if exponent < -_SCALE:
        raise InvalidAmount(field, f"has more than {_SCALE} decimal places")
    if exponent > 13:  # at least 10^14 USD; checked before building a huge integer
        raise InvalidAmount(field, f"exceeds {MAX_USD} USD in magnitude")
    micros = coefficient * _POW10[exponent + _SCALE]
    if micros > _MAX_MICROS:
        raise InvalidAmount(field, f"exceeds {MAX_USD} USD in magnitude")
    return -micros if negative else micros


def _parse_scaled(value: object, field: str) -> int:
    """Any accepted input as an exact integer scaled by 10^6, before sign/zero policy."""
    if isinstance(value, bool):
        raise InvalidAmount(field, "must be a decimal number, not a boolean")
    if isinstance(value, int):
        return _to_micros(value < 0, abs(value), 0, field)
    if isinstance(value, float):
        raise InvalidAmount(field, 'must be a decimal string such as "10.50", not a float')
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidAmount(field, "must be a finite number")
        sign, digits, exponent = value.as_tuple()
        if not isinstance(exponent, int):  # unreachable for finite values
            raise InvalidAmount(field, "must be a finite number")
        if len(digits) > 40:
            raise InvalidAmount(field, "has too many digits")
        coefficient = int("".join(map(str, digits))) if digits else 0
        return _to_micros(bool(sign), coefficient, exponent, field)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise InvalidAmount(field, "must not be empty")
        if len(text) > _MAX_TEXT:
            raise InvalidAmount(field, "is too long to be an amount")
        match = _NUMBER.fullmatch(text)
        if match is None:
            lowered = text.lower()
            if "nan" in lowered or "inf" in lowered:
                raise InvalidAmount(field, "must be a finite number")
            if "e" in lowered:
                raise InvalidAmount(field, "exponent notation is not accepted; write the digits")
            raise InvalidAmount(field, f"is not a decimal number: {text[:32]!r}")
        minus, whole, fraction = match.groups()
        fraction = fraction or ""
        return _to_micros(minus == "-", int(whole + fraction), -len(fraction), field)
    raise InvalidAmount(field, f"must be a decimal string, not {type(value).__name__}")


def parse_usd(
    value: str | int | Decimal,
    *,
    field: str = "amount_usd",
    allow_negative: bool = False,
    allow_zero: bool = False,
) -> int:
    """A decimal USD amount as exact integer micro-USD.

    ``parse_usd("10.5") == 10_500_000``; ``parse_usd("0.000001") == 1``; ``parse_usd(3) ==
    3_000_000``. Raises :class:`InvalidAmount` naming ``field`` for anything that is not an exact
    amount of at most 6 decimal places and at most 10^12 USD, for negatives unless
    ``allow_negative``, and for zero unless ``allow_zero``.
    """
    micros = _parse_scaled(value, field)
    if micros < 0 and not allow_negative:
        raise InvalidAmount(field, "must not be negative")
    if micros == 0 and not allow_zero:
        raise InvalidAmount(field, "must not be zero")
    return micros


def _format_fixed(scaled: int) -> str:
    if isinstance(scaled, bool) or not isinstance(scaled, int):
        raise TypeError(f"expected an int of micros, got {type(scaled).__name__}")
    sign = "-" if scaled < 0 else ""
    whole, fraction = divmod(abs(scaled), MICROS_PER_USD)
    return f"{sign}{whole}.{fraction:06d}"


def _format_minimal(scaled: int) -> str:
    text = _format_fixed(scaled).rstrip("0")
    return text.rstrip(".")


def format_usd(micros: int) -> str:
    """Micro-USD as a USD string with exactly 6 decimal places: ``1_500_000 → "1.500000"``."""
    return _format_fixed(micros)


def parse_multiplier(value: str | int | Decimal, *, field: str = "price_multiplier") -> Decimal:
    """A customer's price multiplier: positive, at most 6 decimal places, at most 1000.

    Returned as an exact ``Decimal`` in minimal form (``"1.250" → Decimal("1.25")``).
    """
    scaled = _parse_scaled(value, field)
    if scaled <= 0:
        raise InvalidAmount(field, "must be positive")
    if scaled > MAX_MULTIPLIER * MICROS_PER_USD:
        raise InvalidAmount(field, f"must be at most {MAX_MULTIPLIER}")
    return Decimal(_format_minimal(scaled))


def format_multiplier(d: Decimal) -> str:
    """A multiplier in minimal decimal form: ``Decimal("1.2500") → "1.25"``, ``1E+1 → "10"``."""
    if not isinstance(d, Decimal) or not d.is_finite():
        raise ValueError(f"not a finite Decimal: {d!r}")
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def parse_price_per_mtok(value: str | int | Decimal, *, field: str = "price_usd_per_mtok") -> int:
    """USD per million tokens as integer micro-USD per million tokens (``"0.30" → 300_000``).

    Zero is allowed (a free model); negatives and more than 6 decimal places are not.
    """
    scaled = _parse_scaled(value, field)
    if scaled < 0:
        raise InvalidAmount(field, "must not be negative")
    return scaled


def format_price_per_mtok(micros_per_mtok: int) -> str:
    """Integer micro-USD per Mtok as minimal USD: ``3_000_000 → "3"``, ``18_750_000 → "18.75"``."""
    return _format_minimal(micros_per_mtok)
