"""Helpers shared by the CLI commands: one Services per command, credential input.

On the embedded ``memory://`` Redis a command's Services use the running server's Redis when a
server shares it (:mod:`app.embedded_redis`), so that it sees and changes the live pool state;
with no server running, a throwaway in-process one (the database's durable copy is all there is).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession

from app import embedded_redis
from app.oversight import audit
from app.redis import fake_server_of
from app.settings import Settings
from app.state import Services, build_services
from pool.crypto import Secret, validate_credential

T = TypeVar("T")


class CliError(Exception):
    """A one-line reason for a non-zero exit."""


@contextlib.asynccontextmanager
async def services_for(settings: Settings) -> AsyncIterator[Services]:
    if settings.is_sqlite:
        from app.migrate import upgrade

        await asyncio.to_thread(upgrade, settings.database_url)
    redis = await server_redis(settings)
    try:
        services = build_services(settings, redis=redis)
    except BaseException:
        if redis is not None:
            await redis.aclose()
        raise
    try:
        yield services
    finally:
        await services.aclose()


async def server_redis(settings: Settings) -> aioredis.Redis | None:
    """On ``memory://``: the running embedded server's Redis, if a server shares one."""
    if not settings.is_memory_redis:
        return None
    try:
        return await embedded_redis.connect(settings)
    except embedded_redis.Unreachable as exc:
        print(
            f"poolrelay: warning: cannot reach the running server's live pool state ({exc}); "
            "using the database's copy",
            file=sys.stderr,
        )
        return None


def sees_live_state(services: Services) -> bool:
    """False when the command runs on a throwaway in-process Redis (no server running)."""
    return fake_server_of(services.redis) is None


@contextlib.asynccontextmanager
async def cli_transaction(services: Services) -> AsyncIterator[AsyncSession]:
    """A write's transaction: its audit-log rows name the actor ``cli``."""
    async with services.db.transaction() as session:
        audit.act_as(session, audit.CLI)
        yield session


def run(settings: Settings, job: Callable[[Services], Awaitable[T]]) -> T:
    async def main() -> T:
        async with services_for(settings) as services:
            return await job(services)

    return asyncio.run(main())


def read_credential(prompt: str = "Upstream API key: ") -> Secret:
    """One line from standard input, or a hidden prompt on a terminal; never an argument."""
    if sys.stdin is None:
        raise CliError("no standard input to read the credential from")
    value = getpass.getpass(prompt) if sys.stdin.isatty() else sys.stdin.readline()
    if not value.strip():
        raise CliError("no credential given on standard input")
    try:
        return validate_credential(value)
    except Exception as exc:
        raise CliError(str(exc)) from None
