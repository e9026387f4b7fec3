"""app.redis.pipelined: concurrent plain commands share one pipeline, each gets its own reply."""

from __future__ import annotations

import asyncio
import os

import fakeredis
import pytest
import redis.asyncio as aioredis

from app.redis import pipelined

REAL_URL = os.environ.get("POOLRELAY_TEST_REDIS_URL")


@pytest.mark.parametrize("backend", ["fake", "real"] if REAL_URL else ["fake"])
def test_concurrent_commands_share_a_pipeline_and_errors_stay_with_their_caller(
    backend: str,
) -> None:
    async def main() -> None:
        if backend == "fake":
            client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        else:
            assert REAL_URL is not None
            client = aioredis.Redis.from_url(REAL_URL)
        try:
            commands = pipelined(client)
            assert await commands.submit(("SET", "pr:t:text", "x", "EX", 60)) is True
            results = await asyncio.gather(
                *(commands.submit(("SET", f"pr:t:{i}", str(i), "EX", 60)) for i in range(5)),
                commands.submit(("INCR", "pr:t:text")),  # not a number: an error for it alone
                commands.submit(("DEL", "pr:t:0", "pr:t:1")),
                return_exceptions=True,
            )
            assert results[:5] == [True] * 5
            assert isinstance(results[5], Exception)
            assert results[6] == 2
            assert commands.batches < commands.items  # the concurrent ones went together
            assert await client.get("pr:t:4") == b"4"
            assert 0 < await client.ttl("pr:t:4") <= 60
        finally:
            await client.delete(*[f"pr:t:{i}" for i in range(5)], "pr:t:text")
            await client.aclose()

    asyncio.run(main())
