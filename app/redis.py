"""Redis clients: a real server by URL, or an in-process fakeredis for ``memory://``.

The in-process one keeps its :class:`fakeredis.FakeServer` at hand (``fake_server``), so that
``serve`` can also serve the very same data to the command line (:mod:`app.embedded_redis`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from billing.group_commit import GroupCommit

if TYPE_CHECKING:
    from fakeredis import FakeServer

Command = tuple[Any, ...]

CONNECT_TIMEOUT_SECONDS = 3.0
"""A Redis that does not accept the connection in this time counts as down."""
COMMAND_TIMEOUT_SECONDS = 5.0
"""A reply that takes longer means Redis is gone or stuck (every command here is short; the
Pub/Sub listeners wait with a timeout of their own): the caller gets ``TimeoutError`` and the
customer an honest 529, instead of a request hanging on a dead socket."""

CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
    "socket_timeout": COMMAND_TIMEOUT_SECONDS,
    "socket_keepalive": True,
    # A connection idle this long is PINGed before it is used again, so a connection that a
    # Redis restart broke is replaced before a command goes out on it.
    "health_check_interval": 30,
}
"""How every client of a real Redis connects (the relay's and the worker's). No automatic
retries: a command that failed may have run (a lease taken, a counter bumped), so the caller
decides; a restarted Redis gets fresh connections, as the pool checks each one it hands out."""


def make_redis(url: str) -> aioredis.Redis:
    if url.startswith("memory://"):
        return in_process_redis()
    client = aioredis.from_url(url, max_connections=500, **CLIENT_OPTIONS)  # type: ignore[no-untyped-call]
    return client  # type: ignore[no-any-return]


def in_process_redis() -> aioredis.Redis:
    """A fakeredis client on a server of its own (``client.fake_server``)."""
    import fakeredis

    server = fakeredis.FakeServer(version=(7,))  # fakeredis's default for its async client
    client: Any = fakeredis.FakeAsyncRedis(server=server)
    client.fake_server = server
    return client  # type: ignore[no-any-return]


def fake_server_of(client: aioredis.Redis) -> FakeServer | None:
    """The :class:`fakeredis.FakeServer` behind an in-process client, else None."""
    server: FakeServer | None = getattr(client, "fake_server", None)
    return server


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
