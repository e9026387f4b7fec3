"""Prices, usage, and the exact cost of a request.

Money rules (contract §6, spec §6):

- A :class:`Price` holds integer micro-USD **per million tokens** for each token kind: un-cached
  input, output, 5-minute cache writes, 1-hour cache writes and cache reads. Each kind is priced
  separately from the upstream's ``usage`` (never from the relay's own token estimate).
- ::

      tokens  = input·P_in + w5m·P_5m + w1h·P_1h + read·P_read     (× long_context_input_pct/100)
              + output·P_out                                       (× long_context_output_pct/100)
      cost    = ( tokens / 1e6
                  × (100 − batch_discount_pct)/100   if usage.service_tier == "batch"
                  × inference_geo_us_pct/100         if usage.inference_geo == "us"
                  × fast_mode_pct/100                if usage.speed == "fast"
                  + web_search_requests × 10_000 )   # $10 per 1,000 searches, no discounts
              × customer multiplier

  The long-context tier applies when the price has a ``long_context_threshold`` and the total
  input (un-cached + cache writes + cache reads) is **above** it; then *every* token of the
  request is at the premium rate. The whole computation is exact integer arithmetic (the
  multiplier enters as the exact ratio of its ``Decimal``), and the result is rounded **up,
  once**, to a whole micro-USD. Zero usage costs 0; any non-zero cost is at least 1 micro-USD.
- A price row for ``claude-haiku-4-5`` also prices ``claude-haiku-4-5-20251001``: an exact id
  wins, else the **longest** key that is a prefix of the model id (:func:`match_price`,
  :class:`PriceBook`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Final

from billing.errors import InvalidAmount
from billing.money import ceil_div

__all__ = [
    "SEED_PRICES",
    "WEB_SEARCH_MICROS_PER_REQUEST",
    "Price",
    "PriceBook",
    "Usage",
    "cost_micros",
    "match_price",
    "total_cost_micros",
]

#: Web search: $10 per 1,000 requests = 10_000 micro-USD per request (spec §6).
WEB_SEARCH_MICROS_PER_REQUEST: Final = 10_000
_TOKENS_PER_RATE: Final = 1_000_000  # rates are per million tokens
_PCT: Final = 100


@dataclass(frozen=True, slots=True)
class Price:
    """One model's rates, all integer micro-USD per million tokens.

    ``batch_discount_pct``: batch usage (``service_tier == "batch"``) pays ``(100 − pct)%`` of
    every rate. ``long_context_threshold``: when set and the total input is above it, input-side
    rates (input and all cache rates) are multiplied by ``long_context_input_pct/100`` and the
    output rate by ``long_context_output_pct/100``. ``inference_geo_us_pct`` applies to every
    token when ``usage.inference_geo == "us"`` (110 on Opus 4.6 and later); ``fast_mode_pct``
    when ``usage.speed == "fast"``. The default 100 means "no modifier".
    """

    model: str
    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int
    batch_discount_pct: int = 50
    long_context_threshold: int | None = None
    long_context_input_pct: int = 200
    long_context_output_pct: int = 150
    inference_geo_us_pct: int = 100
    fast_mode_pct: int = 100

    def __post_init__(self) -> None:
        for name in ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read"):
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
                raise InvalidAmount(name, f"must be a non-negative int of micros, got {rate!r}")
        if not 0 <= self.batch_discount_pct <= 100:
            raise InvalidAmount("batch_discount_pct", "must be between 0 and 100")
        for name in (
            "long_context_input_pct",
            "long_context_output_pct",
            "inference_geo_us_pct",
            "fast_mode_pct",
        ):
            pct = getattr(self, name)
            if isinstance(pct, bool) or not isinstance(pct, int) or pct < 0:
                raise InvalidAmount(name, "must be a non-negative int percentage")
        threshold = self.long_context_threshold
        if threshold is not None and (isinstance(threshold, bool) or threshold < 0):
            raise InvalidAmount("long_context_threshold", "must be a non-negative int or None")


def _count(value: object) -> int | None:
    """A token count from the wire: a non-negative int, else None (missing, null, garbage)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _breakdown(value: object) -> tuple[int, int] | None:
    """``usage.cache_creation`` as ``(5m, 1h)``, or None when absent or not an object."""
    if not isinstance(value, Mapping):
        return None
    return (
        _count(value.get("ephemeral_5m_input_tokens")) or 0,
        _count(value.get("ephemeral_1h_input_tokens")) or 0,
    )


def _web_searches(value: object) -> int | None:
    if not isinstance(value, Mapping):
        return None
    return _count(value.get("web_search_requests"))


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as the upstream reports it (spec §1.2).

    ``cache_write_5m_tokens + cache_write_1h_tokens == cache_creation_input_tokens`` always
    holds: when the breakdown is absent or inconsistent, every cache write counts as a 5-minute
    write (the spec's rule); when only a breakdown is given, the total is its sum.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_input_tokens: int = 0
    service_tier: str | None = None
    web_search_requests: int = 0
    inference_geo: str | None = None
    speed: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_write_5m_tokens",
            "cache_write_1h_tokens",
            "cache_read_input_tokens",
            "web_search_requests",
        ):
            if _count(getattr(self, name)) is None:
                raise ValueError(f"Usage.{name} must be a non-negative int")
        split = self.cache_write_5m_tokens + self.cache_write_1h_tokens
        if split != self.cache_creation_input_tokens:
            if self.cache_creation_input_tokens == 0:
                object.__setattr__(self, "cache_creation_input_tokens", split)
            else:
                object.__setattr__(self, "cache_write_5m_tokens", self.cache_creation_input_tokens)
                object.__setattr__(self, "cache_write_1h_tokens", 0)

    @classmethod
    def from_api(cls, usage: Mapping[str, Any] | None) -> Usage:
        """Read an Anthropic ``usage`` object; missing, null or non-int counts are 0."""
        if not isinstance(usage, Mapping):
            return cls()
        created = _count(usage.get("cache_creation_input_tokens"))
        split = _breakdown(usage.get("cache_creation"))
        if created is None:
            created = sum(split) if split is not None else 0
        w5m, w1h = split if split is not None and sum(split) == created else (created, 0)
        return cls(
            input_tokens=_count(usage.get("input_tokens")) or 0,
            output_tokens=_count(usage.get("output_tokens")) or 0,
            cache_creation_input_tokens=created,
            cache_write_5m_tokens=w5m,
            cache_write_1h_tokens=w1h,
            cache_read_input_tokens=_count(usage.get("cache_read_input_tokens")) or 0,
            service_tier=_text(usage.get("service_tier")),
            web_search_requests=_web_searches(usage.get("server_tool_use")) or 0,
            inference_geo=_text(usage.get("inference_geo")),
            speed=_text(usage.get("speed")),
        )

    def merged(self, delta_usage: Mapping[str, Any] | None) -> Usage:
        """This usage with a ``message_delta`` usage written over it (spec §2 final-usage rule).

        Each non-null field of the delta replaces the stored one; nothing is added up (delta
        usage is cumulative). The cache-write breakdown is taken from the delta if it has one
        that sums to the new total, else kept if it still sums, else all writes are 5-minute.
        """
        if not isinstance(delta_usage, Mapping):
            return self

        def pick(key: str, current: int) -> int:
            value = _count(delta_usage.get(key))
            return current if value is None else value

        split = _breakdown(delta_usage.get("cache_creation"))
        created = _count(delta_usage.get("cache_creation_input_tokens"))
        if created is None:
            created = sum(split) if split is not None else self.cache_creation_input_tokens
        if split is not None and sum(split) == created:
            w5m, w1h = split
        elif self.cache_write_5m_tokens + self.cache_write_1h_tokens == created:
            w5m, w1h = self.cache_write_5m_tokens, self.cache_write_1h_tokens
        else:
            w5m, w1h = created, 0
        searches = _web_searches(delta_usage.get("server_tool_use"))
        return Usage(
            input_tokens=pick("input_tokens", self.input_tokens),
            output_tokens=pick("output_tokens", self.output_tokens),
            cache_creation_input_tokens=created,
            cache_write_5m_tokens=w5m,
            cache_write_1h_tokens=w1h,
            cache_read_input_tokens=pick("cache_read_input_tokens", self.cache_read_input_tokens),
            service_tier=_text(delta_usage.get("service_tier")) or self.service_tier,
            web_search_requests=self.web_search_requests if searches is None else searches,
            inference_geo=_text(delta_usage.get("inference_geo")) or self.inference_geo,
            speed=_text(delta_usage.get("speed")) or self.speed,
        )

    def to_api(self) -> dict[str, Any]:
        """This usage in the wire shape; ``Usage.from_api(u.to_api()) == u`` for every ``u``."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_write_5m_tokens,
                "ephemeral_1h_input_tokens": self.cache_write_1h_tokens,
            },
            "server_tool_use": {"web_search_requests": self.web_search_requests},
            "service_tier": self.service_tier,
            "inference_geo": self.inference_geo,
            "speed": self.speed,
        }

    def total_input(self) -> int:
        """Un-cached input + cache writes + cache reads (the SDK's definition of total input)."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    def is_zero(self) -> bool:
        """True when nothing billable was used."""
        return self.total_input() == 0 and self.output_tokens == 0 and self.web_search_requests == 0


def _multiplier_ratio(multiplier: Decimal | int | Fraction) -> tuple[int, int]:
    if isinstance(multiplier, bool) or not isinstance(multiplier, Decimal | int | Fraction):
        raise TypeError(f"multiplier must be a Decimal, got {type(multiplier).__name__}")
    if isinstance(multiplier, Decimal) and not multiplier.is_finite():
        raise InvalidAmount("price_multiplier", "must be finite")
    numerator, denominator = multiplier.as_integer_ratio()
    if numerator < 0:
        raise InvalidAmount("price_multiplier", "must not be negative")
    return numerator, denominator


_SCALE: Final = _TOKENS_PER_RATE * _PCT**4
"""The common denominator of :func:`_scaled_cost`: micro-USD × this."""


def _scaled_cost(usage: Usage, price: Price) -> int:
    """The cost of ``usage`` at ``price`` (no multiplier) in micro-USD × :data:`_SCALE`, exact."""
    long_context = (
        price.long_context_threshold is not None
        and usage.total_input() > price.long_context_threshold
    )
    input_pct = price.long_context_input_pct if long_context else _PCT
    output_pct = price.long_context_output_pct if long_context else _PCT
    tokens = (
        usage.input_tokens * price.input
        + usage.cache_write_5m_tokens * price.cache_write_5m
        + usage.cache_write_1h_tokens * price.cache_write_1h
        + usage.cache_read_input_tokens * price.cache_read
    ) * input_pct + usage.output_tokens * price.output * output_pct
    tokens *= _PCT - price.batch_discount_pct if usage.service_tier == "batch" else _PCT
    tokens *= price.inference_geo_us_pct if usage.inference_geo == "us" else _PCT
    tokens *= price.fast_mode_pct if usage.speed == "fast" else _PCT
    return tokens + usage.web_search_requests * WEB_SEARCH_MICROS_PER_REQUEST * _SCALE


def cost_micros(
    usage: Usage, price: Price, multiplier: Decimal | int | Fraction = Decimal(1)
) -> int:
    """The exact cost of ``usage`` at ``price`` × ``multiplier``, rounded up once to a micro-USD.

    See the module docstring for the formula. Every step is integer arithmetic over a common
    denominator (``1e6 × 100^4``), so no intermediate rounding happens anywhere.
    """
    numerator, denominator = _multiplier_ratio(multiplier)
    return ceil_div(_scaled_cost(usage, price) * numerator, _SCALE * denominator)


def total_cost_micros(
    items: Iterable[tuple[Usage, Price]], multiplier: Decimal | int | Fraction = Decimal(1)
) -> int:
    """The exact sum of the costs of several usages, each at its own price, × ``multiplier``,
    rounded up once (a batch's hold: one rounding for the whole batch, not one per request)."""
    numerator, denominator = _multiplier_ratio(multiplier)
    total = sum(_scaled_cost(usage, price) for usage, price in items)
    return ceil_div(total * numerator, _SCALE * denominator)


def match_price(model: str, prices: Mapping[str, Price]) -> Price | None:
    """The price for ``model``: the exact key, else the longest key that prefixes ``model``."""
    exact = prices.get(model)
    if exact is not None:
        return exact
    best: str | None = None
    for key in prices:
        if key and model.startswith(key) and (best is None or len(key) > len(best)):
            best = key
    return None if best is None else prices[best]


class PriceBook:
    """An immutable set of prices with a per-model match cache (cheap on every request).

    Build a new ``PriceBook`` when prices change; the cache is bounded so that arbitrary model
    strings sent by customers cannot grow it without limit.
    """

    __slots__ = ("_cache", "_prices")
    _CACHE_LIMIT: Final = 4096

    def __init__(self, prices: Mapping[str, Price] | Iterable[Price]) -> None:
        if isinstance(prices, Mapping):
            self._prices: dict[str, Price] = dict(prices)
        else:
            self._prices = {price.model: price for price in prices}
        self._cache: dict[str, Price | None] = {}

    @property
    def prices(self) -> Mapping[str, Price]:
        return self._prices

    def match(self, model: str) -> Price | None:
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = match_price(model, self._prices)
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[model] = found
        return found

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, model: object) -> bool:
        return model in self._prices


# --- seed prices (spec §6, list prices in late 2026) -------------------------------------------
# Rates in micro-USD per Mtok ($3 = 3_000_000). lc = long-context threshold (input-side ×2 and
# output ×1.5 above it: Sonnet 4.5 and Sonnet 4), geo = inference_geo "us" % (Opus 4.6 and
# later: 110), fast = fast-mode % (Opus 4.6: ×6 = $30/$150; Opus 4.8: ×2 = $10/$50, reported).
# Prefix keys: "claude-opus-4" prices "claude-opus-4-20250514" and "claude-sonnet-4" prices
# "claude-sonnet-4-20250514"; longer keys ("claude-opus-4-1", …) win for their own ids.
# Opus 5 and Sonnet 5 prices are unconfirmed (spec §10).
_SEED_TABLE: Final[tuple[tuple[str, int, int, int, int, int, int | None, int, int], ...]] = (
    # (model, input, 5m write, 1h write, cache read, output, lc, geo, fast)
    ("claude-fable-5", 10_000_000, 12_500_000, 20_000_000, 1_000_000, 50_000_000, None, 100, 100),
    ("claude-mythos-5", 10_000_000, 12_500_000, 20_000_000, 1_000_000, 50_000_000, None, 100, 100),
    ("claude-opus-5", 5_000_000, 6_250_000, 10_000_000, 500_000, 25_000_000, None, 110, 100),
    ("claude-opus-4-8", 5_000_000, 6_250_000, 10_000_000, 500_000, 25_000_000, None, 110, 200),
    ("claude-opus-4-7", 5_000_000, 6_250_000, 10_000_000, 500_000, 25_000_000, None, 110, 100),
    ("claude-opus-4-6", 5_000_000, 6_250_000, 10_000_000, 500_000, 25_000_000, None, 110, 600),
    ("claude-opus-4-5", 5_000_000, 6_250_000, 10_000_000, 500_000, 25_000_000, None, 100, 100),
    ("claude-opus-4-1", 15_000_000, 18_750_000, 30_000_000, 1_500_000, 75_000_000, None, 100, 100),
    ("claude-opus-4-0", 15_000_000, 18_750_000, 30_000_000, 1_500_000, 75_000_000, None, 100, 100),
    ("claude-opus-4", 15_000_000, 18_750_000, 30_000_000, 1_500_000, 75_000_000, None, 100, 100),
    ("claude-sonnet-5", 3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000, None, 100, 100),
    ("claude-sonnet-4-6", 3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000, None, 100, 100),
    ("claude-sonnet-4-5", 3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000, 200_000, 100, 100),
    ("claude-sonnet-4-0", 3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000, 200_000, 100, 100),
    ("claude-sonnet-4", 3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000, 200_000, 100, 100),
    ("claude-3-7-sonnet", 3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000, None, 100, 100),
    ("claude-haiku-4-5", 1_000_000, 1_250_000, 2_000_000, 100_000, 5_000_000, None, 100, 100),
    ("claude-3-5-haiku", 800_000, 1_000_000, 1_600_000, 80_000, 4_000_000, None, 100, 100),
    ("claude-3-haiku", 250_000, 300_000, 500_000, 30_000, 1_250_000, None, 100, 100),
)

SEED_PRICES: tuple[Price, ...] = tuple(
    Price(
        model=model,
        input=input_rate,
        output=output,
        cache_write_5m=write_5m,
        cache_write_1h=write_1h,
        cache_read=read,
        long_context_threshold=threshold,
        inference_geo_us_pct=geo,
        fast_mode_pct=fast,
    )
    for model, input_rate, write_5m, write_1h, read, output, threshold, geo, fast in _SEED_TABLE
)
