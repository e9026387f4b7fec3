"""billing.ids: the fast encoding equals the plain Crockford base32 one, and ids sort by time."""

from __future__ import annotations

import re
from types import SimpleNamespace
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from billing import ids


def crockford(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(ids._ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def clock(seconds: float) -> SimpleNamespace:
    """A stand-in for the ``time`` module as billing.ids sees it. Only ids' own reference is
    replaced: patching ``time.time`` itself would reach every thread of the test process (the
    in-thread relay and fake upstream included)."""
    return SimpleNamespace(time=lambda: seconds)


@given(st.integers(0, 2**50 - 1), st.binary(min_size=10, max_size=10))
def test_matches_the_plain_encoding(millis: int, rand: bytes) -> None:
    with (
        # half a millisecond in: far from both millisecond edges even where a float of
        # seconds is coarsest in this range (2**50 ms: 1/4096 s between floats)
        mock.patch.object(ids, "time", clock(millis / 1000 + 0.0005)),
        mock.patch.object(ids, "secrets", SimpleNamespace(token_bytes=lambda n: rand)),
    ):
        made = ids.new_id("req")
    assert made == "req_" + crockford(millis, 10) + crockford(int.from_bytes(rand, "big"), 16)


def test_shape_and_order() -> None:
    made = [ids.new_id("cus") for _ in range(50)]
    assert all(re.fullmatch(r"cus_[0-9a-hjkmnp-tv-z]{26}", m) for m in made)
    with mock.patch.object(ids, "time", clock(1_800_000_000.0)):
        early = ids.new_id("req")
    with mock.patch.object(ids, "time", clock(1_800_000_000.001)):
        later = ids.new_id("req")
    assert early[:14] < later[:14]
