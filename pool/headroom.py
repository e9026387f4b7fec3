"""Rate-limit headroom: parsing Anthropic's rate-limit headers and scoring an account.

Pure functions, no I/O. The scheduler's Lua script implements :func:`headroom_score` a second
time, on the server; ``tests/test_scheduler.py`` checks on random inputs that both agree.

The score of an account is the smallest fraction of a rate-limit bucket it has left, counting
what its in-flight requests are expected to use:

* for each family ``f`` whose reset time has not passed:
  ``ratio_f = (remaining_f - expected in-flight use_f) / limit_f``, where the expected in-flight
  use is ``inflight`` for the ``requests`` family and ``inflight * expected_tokens_per_request``
  for every token family (``tokens``, ``input-tokens``, ``output-tokens``, priority families);
* a family whose reset time has passed is full again: it counts as 1.0, whatever its numbers;
* ``score = min(1.0, min_f ratio_f)`` clamped at 0.0; an account never seen (no families yet)
  scores 1.0;
* the scheduler tracks each lease's own expected tokens, so it passes, per account, the mean
  over its in-flight leases as ``expected_tokens_per_request`` (the sum is what it subtracts);
* the final score is ``score * weight``. ``weight`` (≥ 0, default 1.0) is the operator's
  preference: at 0.5 an account looks half as free as it is, so the others are drawn on first;
  at 0 it is a last resort. "Nearly exhausted" (:func:`is_nearly_exhausted`) is judged on the
  unweighted score, because it is about the upstream's limits, not the operator's preference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = [
    "FAMILIES",
    "NEARLY_EXHAUSTED",
    "REQUEST_FAMILIES",
    "FamilyState",
    "headroom_score",
    "is_nearly_exhausted",
    "parse_ratelimit_headers",
    "parse_retry_after",
    "rate_limit_until",
]

#: The rate-limit families tracked, as named after their header prefix.
#: ``anthropic-priority-input-tokens-*`` and ``anthropic-ratelimit-priority-input-tokens-*``
#: (the two spellings seen for Priority Tier) both become ``priority-input-tokens``.
FAMILIES: tuple[str, ...] = (
    "requests",
    "tokens",
    "input-tokens",
    "output-tokens",
    "priority-input-tokens",
    "priority-output-tokens",
)

#: Families counted in requests (an in-flight request uses 1); all others count tokens.
REQUEST_FAMILIES: frozenset[str] = frozenset({"requests"})

#: Below this (unweighted) score an account is "nearly exhausted": affinity lets go of it.
NEARLY_EXHAUSTED = 0.05

_RATELIMIT = "anthropic-ratelimit-"
_PRIORITY = "anthropic-priority-"
_FIELDS = ("limit", "remaining", "reset")
_KNOWN = frozenset(FAMILIES)


@dataclass(frozen=True, slots=True)
class FamilyState:
    """One rate-limit bucket as last reported: ``reset`` is epoch seconds (None if absent)."""

    limit: int
    remaining: int
    reset: float | None


@functools.lru_cache(maxsize=512)
def _family_and_field(name: str) -> tuple[str, str] | None:
    """(family, field) of a lower-case header name; cached, as every response repeats them."""
    if name.startswith(_RATELIMIT):
        rest = name[len(_RATELIMIT) :]
        if rest.startswith("unified"):
            return None
    elif name.startswith(_PRIORITY):
        rest = "priority-" + name[len(_PRIORITY) :]
    else:
        return None
    family, _, field = rest.rpartition("-")
    if field not in _FIELDS or family not in _KNOWN:
        return None
    return family, field


def _parse_int(value: str) -> int | None:
    value = value.strip()
    if not value.isascii() or not value.isdigit():
        return None
    return int(value)


@functools.lru_cache(maxsize=256)
def _parse_rfc3339(value: str) -> float | None:
    """Epoch seconds of an RFC 3339 time; cached, as a reset time repeats across responses."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    stamp = parsed.timestamp()
    return stamp if math.isfinite(stamp) else None


def parse_ratelimit_headers(headers: Mapping[str, str]) -> dict[str, FamilyState]:
    """The rate-limit families in a response's headers, by family name (see :data:`FAMILIES`).

    Header names are matched case-insensitively by prefix (``anthropic-ratelimit-``,
    ``anthropic-priority-``); ``anthropic-ratelimit-unified-*`` is ignored. A family needs a
    ``-limit`` > 0 and a ``-remaining`` ≥ 0 (integers); ``-reset`` is optional but, when
    present, must be an RFC 3339 time. A family with a bad value is skipped, never an error.
    """
    raw: dict[str, dict[str, str]] = {}
    for name, value in _items(headers):
        if name[:1] not in "aA":  # anthropic-…: skip the rest without lower-casing them
            continue
        found = _family_and_field(name.lower())
        if found is not None:
            raw.setdefault(found[0], {})[found[1]] = value
    families: dict[str, FamilyState] = {}
    for family, fields in raw.items():
        limit = _parse_int(fields.get("limit", ""))
        remaining = _parse_int(fields.get("remaining", ""))
        if limit is None or remaining is None or limit <= 0:
            continue
        reset: float | None = None
        if "reset" in fields:
            reset = _parse_rfc3339(fields["reset"])
            if reset is None:
                continue
        families[family] = FamilyState(limit, remaining, reset)
    return families


def _items(headers: Mapping[str, str]) -> Iterable[tuple[str, str]]:
    multi = getattr(headers, "multi_items", None)  # httpx.Headers: every value of a repeated name
    if callable(multi):
        items: Iterable[tuple[str, str]] = multi()
        return items
    return headers.items()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    for key, val in _items(headers):
        if key.lower() == name:
            return val
    return None


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait, from ``retry-after-ms``, else ``retry-after`` (seconds or an
    HTTP-date, relative to ``now``); None when absent or unreadable. Never negative."""
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value)
    text = _header(headers, "retry-after")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        value = when.timestamp() - now
    return max(0.0, value) if math.isfinite(value) else None


def rate_limit_until(headers: Mapping[str, str], now: float) -> float | None:
    """When a rate-limited (429) account should be usable again, in epoch seconds.

    ``retry-after`` when given; else the latest reset of the families that are exhausted
    (``remaining`` 0); else the earliest reset still ahead; else None (the caller applies its
    cap). The caller caps the result (``Scheduler.quarantine`` does).
    """
    delay = parse_retry_after(headers, now)
    if delay is not None:
        return now + delay
    families = parse_ratelimit_headers(headers)
    ahead = [f for f in families.values() if f.reset is not None and f.reset > now]
    exhausted = [f.reset for f in ahead if f.reset is not None and f.remaining <= 0]
    if exhausted:
        return max(exhausted)
    resets = [f.reset for f in ahead if f.reset is not None]
    return min(resets) if resets else None


def headroom_score(
    families: Mapping[str, FamilyState],
    *,
    now: float,
    inflight: int,
    expected_tokens_per_request: float,
    weight: float = 1.0,
) -> float:
    """The account's headroom in [0, weight]: see the module docstring for the rule."""
    if weight < 0:
        raise ValueError("weight must be >= 0")
    score = 1.0
    for name, family in families.items():
        if family.limit <= 0 or (family.reset is not None and family.reset <= now):
            continue
        use = inflight if name in REQUEST_FAMILIES else inflight * expected_tokens_per_request
        ratio = (family.remaining - use) / family.limit
        if ratio < score:
            score = ratio
    return max(score, 0.0) * weight


def is_nearly_exhausted(score: float) -> bool:
    """True when an (unweighted) score says the account is about to hit a limit."""
    return score < NEARLY_EXHAUSTED
