"""pool.headroom: header parsing and the scoring rule."""

from __future__ import annotations

import pytest

from pool.headroom import (
    FAMILIES,
    NEARLY_EXHAUSTED,
    FamilyState,
    headroom_score,
    is_nearly_exhausted,
    parse_ratelimit_headers,
    parse_retry_after,
    rate_limit_until,
)

NOW = 1_740_435_900.0  # 2025-02-24T22:25:00Z
RESET = "2025-02-24T22:25:47Z"
RESET_TS = 1_740_435_947.0


def fam(limit: int, remaining: int, reset: float | None = NOW + 60) -> FamilyState:
    return FamilyState(limit, remaining, reset)


# -- scoring ----------------------------------------------------------------------------------

SCORES = [
    # (id, families, inflight, expected tokens, weight, score)
    ("never seen", {}, 0, 1000, 1.0, 1.0),
    ("never seen, busy", {}, 5, 1000, 1.0, 1.0),
    ("half left", {"requests": fam(100, 50)}, 0, 1000, 1.0, 0.5),
    ("reset passed counts as full", {"requests": fam(100, 0, NOW - 1)}, 3, 1000, 1.0, 1.0),
    ("reset exactly now counts as full", {"requests": fam(100, 0, NOW)}, 0, 0, 1.0, 1.0),
    ("no reset time: numbers as they are", {"requests": fam(100, 25, None)}, 0, 0, 1.0, 0.25),
    ("in-flight requests subtract 1 each", {"requests": fam(100, 50)}, 10, 1000, 1.0, 0.4),
    (
        "in-flight requests subtract expected tokens on token families",
        {"input-tokens": fam(100_000, 50_000)},
        10,
        1000,
        1.0,
        0.4,
    ),
    (
        "minimum over families",
        {"requests": fam(100, 90), "tokens": fam(1000, 300), "output-tokens": fam(10, 8)},
        0,
        0,
        1.0,
        0.3,
    ),
    (
        "a passed family does not mask a live one",
        {"requests": fam(100, 0, NOW - 5), "tokens": fam(1000, 600)},
        0,
        0,
        1.0,
        0.6,
    ),
    ("clamped at 0", {"requests": fam(100, 5)}, 10, 0, 1.0, 0.0),
    ("clamped at 1 (rounded remaining)", {"tokens": fam(1000, 1400)}, 0, 0, 1.0, 1.0),
    ("weight scales", {"requests": fam(100, 50)}, 0, 0, 0.5, 0.25),
    ("weight above 1", {"requests": fam(100, 50)}, 0, 0, 2.0, 1.0),
    ("weight 0", {"requests": fam(100, 50)}, 0, 0, 0.0, 0.0),
    (
        "priority families are token families",
        {"priority-input-tokens": fam(10_000, 5_000), "requests": fam(100, 100)},
        2,
        1000,
        1.0,
        0.3,
    ),
    ("limit 0 is ignored", {"requests": fam(0, 0)}, 0, 0, 1.0, 1.0),
]


@pytest.mark.parametrize(
    ("families", "inflight", "expected", "weight", "score"),
    [case[1:] for case in SCORES],
    ids=[case[0] for case in SCORES],
)
def test_headroom_score(
    families: dict[str, FamilyState], inflight: int, expected: int, weight: float, score: float
) -> None:
    got = headroom_score(
        families, now=NOW, inflight=inflight, expected_tokens_per_request=expected, weight=weight
    )
    assert got == pytest.approx(score)


def test_negative_weight_is_refused() -> None:
    with pytest.raises(ValueError):
        headroom_score({}, now=NOW, inflight=0, expected_tokens_per_request=0, weight=-1.0)


def test_nearly_exhausted() -> None:
    assert is_nearly_exhausted(0.0)
    assert is_nearly_exhausted(NEARLY_EXHAUSTED / 2)
    assert not is_nearly_exhausted(NEARLY_EXHAUSTED)
    assert not is_nearly_exhausted(1.0)


# -- headers ----------------------------------------------------------------------------------


def headers_for(
    family: str, limit: str, remaining: str, reset: str | None = RESET
) -> dict[str, str]:
    headers = {
        f"anthropic-ratelimit-{family}-limit": limit,
        f"anthropic-ratelimit-{family}-remaining": remaining,
    }
    if reset is not None:
        headers[f"anthropic-ratelimit-{family}-reset"] = reset
    return headers


def test_parse_all_standard_families() -> None:
    headers: dict[str, str] = {"content-type": "application/json", "request-id": "req_1"}
    headers |= headers_for("requests", "4000", "3999")
    headers |= headers_for("tokens", "480000", "479000")
    headers |= headers_for("input-tokens", "400000", "399000")
    headers |= headers_for("output-tokens", "80000", "80000")
    assert parse_ratelimit_headers(headers) == {
        "requests": FamilyState(4000, 3999, RESET_TS),
        "tokens": FamilyState(480000, 479000, RESET_TS),
        "input-tokens": FamilyState(400000, 399000, RESET_TS),
        "output-tokens": FamilyState(80000, 80000, RESET_TS),
    }


def test_parse_is_case_insensitive_and_ignores_unified() -> None:
    headers = {
        "Anthropic-RateLimit-Requests-Limit": "50",
        "ANTHROPIC-RATELIMIT-REQUESTS-REMAINING": "49",
        "anthropic-ratelimit-requests-reset": "2025-02-24T22:25:47.500+00:00",
        "anthropic-ratelimit-unified-status": "allowed",
        "anthropic-ratelimit-unified-5h-utilization": "0.2",
        "anthropic-ratelimit-unified-5h-reset": "1740450000",
    }
    assert parse_ratelimit_headers(headers) == {"requests": FamilyState(50, 49, RESET_TS + 0.5)}


@pytest.mark.parametrize(
    "prefix", ["anthropic-priority-", "anthropic-ratelimit-priority-"], ids=["doc", "alt"]
)
def test_parse_priority_families_either_spelling(prefix: str) -> None:
    headers = {
        f"{prefix}input-tokens-limit": "10000",
        f"{prefix}input-tokens-remaining": "9000",
        f"{prefix}input-tokens-reset": RESET,
        f"{prefix}output-tokens-limit": "2000",
        f"{prefix}output-tokens-remaining": "1000",
    }
    assert parse_ratelimit_headers(headers) == {
        "priority-input-tokens": FamilyState(10000, 9000, RESET_TS),
        "priority-output-tokens": FamilyState(2000, 1000, None),
    }
    assert set(parse_ratelimit_headers(headers)) <= set(FAMILIES)


JUNK = [
    ("limit not a number", headers_for("requests", "lots", "1")),
    ("remaining not a number", headers_for("requests", "10", "")),
    ("negative remaining", headers_for("requests", "10", "-1")),
    ("limit zero", headers_for("requests", "0", "0")),
    ("float limit", headers_for("requests", "10.5", "1")),
    ("bad reset", headers_for("requests", "10", "1", "tomorrow")),
    ("missing limit", {"anthropic-ratelimit-requests-remaining": "5"}),
    ("unknown family", headers_for("widgets", "10", "1")),
    ("unicode digits", headers_for("requests", "１０", "1")),
]


@pytest.mark.parametrize("headers", [j[1] for j in JUNK], ids=[j[0] for j in JUNK])
def test_parse_skips_junk_families(headers: dict[str, str]) -> None:
    good = headers_for("tokens", "1000", "500")
    assert parse_ratelimit_headers(headers) == {}
    assert parse_ratelimit_headers({**headers, **good}) == {
        "tokens": FamilyState(1000, 500, RESET_TS)
    }


def test_parse_naive_reset_is_utc() -> None:
    parsed = parse_ratelimit_headers(headers_for("requests", "10", "5", "2025-02-24T22:25:47"))
    assert parsed["requests"].reset == RESET_TS


RETRY = [
    ("seconds", {"retry-after": "17"}, 17.0),
    ("fractional seconds", {"Retry-After": "1.5"}, 1.5),
    ("milliseconds win", {"retry-after-ms": "2500", "retry-after": "30"}, 2.5),
    ("http date", {"retry-after": "Mon, 24 Feb 2025 22:25:47 GMT"}, 47.0),
    ("date in the past", {"retry-after": "Mon, 24 Feb 2025 22:00:00 GMT"}, 0.0),
    ("negative", {"retry-after": "-5"}, 0.0),
    ("junk", {"retry-after": "soon"}, None),
    ("junk ms falls back to seconds", {"retry-after-ms": "x", "retry-after": "3"}, 3.0),
    ("absent", {}, None),
    ("nan", {"retry-after": "nan"}, None),
]


@pytest.mark.parametrize(("headers", "expected"), [r[1:] for r in RETRY], ids=[r[0] for r in RETRY])
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, NOW) == expected


def test_rate_limit_until() -> None:
    assert rate_limit_until({"retry-after": "20"}, NOW) == NOW + 20
    exhausted = {
        **headers_for("requests", "10", "0", "2025-02-24T22:26:00Z"),
        **headers_for("tokens", "1000", "0", "2025-02-24T22:25:30Z"),
        **headers_for("output-tokens", "1000", "900", "2025-02-24T22:27:00Z"),
    }
    assert rate_limit_until(exhausted, NOW) == NOW + 60  # latest reset of the exhausted ones
    none_exhausted = headers_for("requests", "10", "3", "2025-02-24T22:25:10Z")
    assert rate_limit_until(none_exhausted, NOW) == NOW + 10
    assert rate_limit_until(headers_for("requests", "10", "0", "2025-02-24T22:00:00Z"), NOW) is None
    assert rate_limit_until({}, NOW) is None
