"""The prompt-cache simulation, per (credential, model, prefix).

The first request with a ``cache_control`` breakpoint writes its prefix
(``cache_creation_input_tokens``, split by TTL in ``cache_creation``); later ones within the
TTL read the longest cached prefix (``cache_read_input_tokens``) and write what lies beyond
it. A read refreshes the entry's TTL. There is no minimum cacheable length.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Final

import orjson

from app.sandbox.common import tokens
from app.sandbox.prompt import Prompt

CACHE_MAX_ENTRIES: Final = 50_000
TTL_SECONDS: Final = {"5m": 300.0, "1h": 3600.0}

CacheKey = tuple[str, bytes]


@dataclass(slots=True)
class CachePlan:
    read: int
    write_5m: int
    write_1h: int
    store: list[tuple[CacheKey, float]]  # (key, ttl seconds) to (re)write on commit

    @property
    def written(self) -> int:
        return self.write_5m + self.write_1h


def _prefix_digests(model: str, units: list[tuple[int, str, Any]], upto: int) -> list[bytes]:
    h = hashlib.blake2b(model.encode(), digest_size=16)
    out: list[bytes] = []
    for _, tag, payload in units[: upto + 1]:
        if isinstance(payload, dict) and "cache_control" in payload:
            payload = {k: v for k, v in payload.items() if k != "cache_control"}
        h.update(b"\x00" + tag.encode() + b"\x00")
        h.update(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))
        out.append(h.copy().digest())
    return out


class PromptCache:
    """Cached prefixes: key -> (expires at, ttl seconds), oldest first."""

    def __init__(self) -> None:
        self.entries: dict[CacheKey, tuple[float, float]] = {}

    def clear(self) -> None:
        self.entries.clear()

    def plan(self, credential: str, model: str, prompt: Prompt, total: int) -> CachePlan:
        """What this prompt reads and writes (nothing is stored until :meth:`commit`)."""
        bps = prompt.breakpoints
        last = bps[-1][0]
        digests = _prefix_digests(model, prompt.units, last)
        now = time.monotonic()
        units = prompt.units
        entries = self.entries

        read_pos = 0
        hit: tuple[CacheKey, float] | None = None
        for i in range(last, -1, -1):
            key = (credential, digests[i])
            entry = entries.get(key)
            if entry is not None and entry[0] > now:
                read_pos = tokens(units[i][0])
                hit = (key, entry[1])
                break

        writes = {"5m": 0, "1h": 0}
        prev = 0
        for index, ttl in bps:
            pos = tokens(units[index][0])
            start = max(prev, read_pos)
            if pos > start:
                writes[ttl] += pos - start
            prev = max(prev, pos)

        read = min(read_pos, total)
        write_1h = min(writes["1h"], total - read)
        write_5m = min(writes["5m"], total - read - write_1h)
        store = [((credential, digests[i]), TTL_SECONDS[ttl]) for i, ttl in bps]
        if hit is not None:
            store.append(hit)
        return CachePlan(read, write_5m, write_1h, store)

    def commit(self, plan: CachePlan) -> None:
        now = time.monotonic()
        entries = self.entries
        for key, ttl in plan.store:
            entries.pop(key, None)
            entries[key] = (now + ttl, ttl)
        while len(entries) > CACHE_MAX_ENTRIES:
            del entries[next(iter(entries))]
