"""The relay's in-process caches serve the current value while they refresh (no request waits
for a reload under traffic) and never serve anything older than their bound."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.fernet import Fernet

import app.auth
from app.auth import KeyAuthenticator
from app.state import Reloading
from pool.accounts import AccountDirectory
from pool.crypto import CredentialCipher, Secret
from pool.models import UpstreamAccount


class Gate:
    """A loader whose loads can be held open, counting how many ran."""

    def __init__(self) -> None:
        self.loads = 0
        self.open = asyncio.Event()
        self.open.set()

    async def wait(self) -> int:
        self.loads += 1
        await self.open.wait()
        return self.loads


async def _quick(awaitable: Any) -> Any:
    """The awaitable's result, which must come without waiting on a load."""
    return await asyncio.wait_for(awaitable, 0.2)


def test_reloading_refreshes_in_the_background_past_half_its_age() -> None:
    async def main() -> None:
        gate = Gate()
        value: Reloading[int] = Reloading(gate.wait, 0, refresh_seconds=1.0)
        assert await value.get() == 1  # the first load is waited for
        assert await _quick(value.get()) == 1  # fresh
        await asyncio.sleep(0.6)  # past half its age
        gate.open.clear()
        assert await _quick(value.get()) == 1  # served at once while the reload is held
        assert await _quick(value.get()) == 1  # and only one reload runs
        await asyncio.sleep(0.05)
        assert gate.loads == 2
        gate.open.set()
        await asyncio.sleep(0.05)
        assert await _quick(value.get()) == 2  # the background reload landed
        value.invalidate()  # this process changed it: the next get waits for a load
        gate.open.clear()
        with pytest.raises(TimeoutError):
            await _quick(value.get())
        gate.open.set()
        assert await value.get() == 4
        await asyncio.sleep(1.1)  # idle past its bound: waited for, never served stale
        gate.open.clear()
        with pytest.raises(TimeoutError):
            await _quick(value.get())
        gate.open.set()

    asyncio.run(main())


class FakeDb:
    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield None


def test_key_lookups_refresh_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        gate = Gate()

        async def lookup_key(session: Any, plaintext: str) -> Any:
            return await gate.wait()

        monkeypatch.setattr(app.auth.customers, "lookup_key", lookup_key)
        auth = KeyAuthenticator(FakeDb(), cache_seconds=1.0)  # type: ignore[arg-type]
        assert await auth._lookup("k") == 1
        await asyncio.sleep(0.6)
        gate.open.clear()
        assert await _quick(auth._lookup("k")) == 1  # cached answer while the lookup runs
        assert await _quick(auth._lookup("k")) == 1
        await asyncio.sleep(0.05)
        assert gate.loads == 2
        gate.open.set()
        await asyncio.sleep(0.05)
        assert await _quick(auth._lookup("k")) == 2
        await asyncio.sleep(1.1)  # past the TTL: a revoked key is never served from cache
        gate.open.clear()
        with pytest.raises(TimeoutError):
            await _quick(auth._lookup("k"))
        gate.open.set()

    asyncio.run(main())


def test_account_snapshots_reload_in_the_background() -> None:
    async def main() -> None:
        cipher = CredentialCipher([Fernet.generate_key()])
        gate = Gate()
        names: list[str] = ["first"]

        async def load() -> list[UpstreamAccount]:
            await gate.wait()
            return [
                UpstreamAccount(
                    id="acc_1",
                    name=names[-1],
                    credential_ciphertext=cipher.encrypt(Secret("sk-ant-api03-x")),
                    fingerprint="sk-ant-…x",
                )
            ]

        directory = AccountDirectory(load, cipher, refresh_seconds=1.0)
        assert (await directory.accounts())["acc_1"].name == "first"
        await asyncio.sleep(0.6)
        names.append("second")
        gate.open.clear()
        assert (await _quick(directory.accounts()))["acc_1"].name == "first"
        gate.open.set()
        await asyncio.sleep(0.05)
        assert (await _quick(directory.accounts()))["acc_1"].name == "second"
        assert gate.loads == 2

    asyncio.run(main())
