"""Identifiers: time-ordered, URL-safe, prefixed by kind (``cus_``, ``key_``, ``acc_``, ``req_``).

The first 10 characters encode milliseconds since the epoch in Crockford base32, so ids sort by
creation time and cursor pagination can order by id.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _b32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    millis = int(time.time() * 1000)
    return f"{prefix}_{_b32(millis, 10)}{_b32(secrets.randbits(80), 16)}"
