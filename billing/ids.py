"""Identifiers: time-ordered, URL-safe, prefixed by kind (``cus_``, ``key_``, ``acc_``, ``req_``).

The first 10 characters encode milliseconds since the epoch in Crockford base32 (lower case),
so ids sort by creation time and cursor pagination can order by id; 16 random characters
(80 bits) follow. Python's base32 codec does the encoding (its alphabet maps one to one, in
order, onto Crockford's), one id per request on the hot path.
"""

from __future__ import annotations

import base64
import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def new_id(prefix: str) -> str:
    millis = int(time.time() * 1000)
    # 50 bits of time: the top 10 characters of the 80-bit value millis << 30
    stamp = base64.b32encode((millis << 30).to_bytes(10, "big"))[:10]
    rand = base64.b32encode(secrets.token_bytes(10))
    return f"{prefix}_{(stamp + rand).translate(_CROCKFORD).decode()}"
