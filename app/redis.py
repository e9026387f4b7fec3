"""Redis clients: a real server by URL, or an in-process fakeredis for ``memory://``."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis


def make_redis(url: str) -> aioredis.Redis:
    if url.startswith("memory://"):
        import fakeredis

        client: Any = fakeredis.FakeAsyncRedis()
        return client  # type: ignore[no-any-return]
    client = aioredis.from_url(url, max_connections=500, health_check_interval=30)  # type: ignore[no-untyped-call]
    return client  # type: ignore[no-any-return]
