"""Helpers shared by the CLI commands: one Services per command, credential input."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

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
    services = build_services(settings)
    try:
        yield services
    finally:
        await services.aclose()


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
