"""Redis clients: a real server by URL, or an in-process fakeredis for ``memory://``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from billing.group_commit import GroupCommit

Command = tuple[Any, ...]


def make_redis(url: str) -> aioredis.Redis:
    if url.startswith("memory://"):
        import fakeredis

        client: Any = fakeredis.FakeAsyncRedis()
        return client  # type: ignore[no-any-return]
    client = aioredis.from_url(url, max_connections=500, health_check_interval=30)  # type: ignore[no-untyped-call]
    return client  # type: ignore[no-any-return]


def pipelined(client: aioredis.Redis) -> GroupCommit[Command, Any]:
    """Plain commands of concurrent requests (a stream's progress record, its removal), sent
    together: one pipeline per batch, each command's reply (or error) to its own caller."""

    async def run(commands: list[Command]) -> Sequence[Any]:
        if len(commands) == 1:
            try:
                return [await client.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
            except Exception as exc:
                return [exc]
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    return GroupCommit(run)
