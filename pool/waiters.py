"""Waiting for a concurrency slot without polling: one Pub/Sub subscription per process.

A request that only a concurrency cap keeps out is queued in Redis by the script that refused
it (:class:`pool.errors.Queued`); when a slot frees, the script that frees it hands the slot
over and publishes ``<kind>|<lease id>|...`` on the waiter's process channel
(``poolrelay:wake:<owner>``). :class:`Waiters` holds that one subscription and a future per
waiting request, so a waiting request costs no Redis round trip until it is woken or gives up.

Should the subscription drop (Redis restarted, a network blip), it is re-established with
backoff, and every waiter is told to look for its grant (a message published meanwhile was
lost): each then asks Redis once whether it was given a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

log = logging.getLogger("poolrelay.pool")

RECONNECT_MIN = 0.2
RECONNECT_MAX = 5.0
RECHECK = "recheck"
"""What a waiter's future resolves to when its wake-up may have been lost."""


class Waiters:
    """The process's wake-up channel and the futures of its waiting requests."""

    def __init__(self, redis: aioredis.Redis, channel: str) -> None:
        self._redis = redis
        self.channel = channel
        self._futures: dict[str, asyncio.Future[str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None

    @property
    def waiting(self) -> int:
        return len(self._futures)

    async def start(self) -> None:
        """Subscribe (once); returns when the subscription is in place, so a grant published
        after this cannot be missed."""
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._listen())
        assert self._ready is not None
        await self._ready.wait()

    def expect(self, lease_id: str) -> asyncio.Future[str]:
        """The future of ``lease_id``'s wake-up message (or :data:`RECHECK`)."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._futures[lease_id] = future
        return future

    def forget(self, lease_id: str) -> None:
        self._futures.pop(lease_id, None)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for future in self._futures.values():
            if not future.done():
                future.set_result(RECHECK)

    def _deliver(self, data: Any) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        parts = text.split("|", 2)
        if len(parts) < 2:
            return
        future = self._futures.pop(parts[1], None)
        if future is not None and not future.done():
            future.set_result(text)

    def _recheck_all(self) -> None:
        for lease_id, future in list(self._futures.items()):
            if not future.done():
                future.set_result(RECHECK)
            self._futures.pop(lease_id, None)

    async def _listen(self) -> None:
        delay = RECONNECT_MIN
        down = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if down:
                    log.info("wake-up channel back after a Redis outage")
                    self._recheck_all()  # what was published meanwhile is lost
                down, delay = False, RECONNECT_MIN
                assert self._ready is not None
                self._ready.set()
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not down:
                    log.warning("wake-up channel lost (%s); reconnecting", type(exc).__name__)
                down = True
                self._recheck_all()
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX, delay * 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def wait_for_slot(
    scheduler: Any,
    waiters: Waiters,
    queued: Any,
    seconds: float,
    gone: asyncio.Future[Any] | None = None,
) -> Any:
    """Wait until ``queued`` (a :class:`pool.errors.Queued`) is handed a slot; return its
    :class:`pool.scheduler.Lease`. Raises :class:`pool.errors.NoCapacity` (``concurrency``)
    when the wait ends first, and :class:`asyncio.CancelledError` when ``gone`` (the client
    went away) resolves first or the waiting task is cancelled — leaving the queue, or giving
    back a slot handed over meanwhile, in every case (shielded from a further cancellation).
    ``seconds``: how long it may wait (the queue's own deadline in Redis is the same span).
    ``scheduler``: a :class:`pool.scheduler.Scheduler`, or anything with its ``grant_of``,
    ``granted``, ``unwait`` and ``release`` (:class:`app.keyslots.KeySlots`)."""
    from pool.errors import NoCapacity

    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    final: asyncio.Future[Any] | None = None  # the last unwait, once the time is up
    try:
        while True:
            future = waiters.expect(queued.lease_id)
            lease = await scheduler.grant_of(queued)  # handed over before we listened?
            if lease is not None:
                return lease
            left = deadline - loop.time()
            if left <= 0:
                break
            pending = {future} if gone is None else {future, gone}
            done, _ = await asyncio.wait(pending, timeout=left, return_when="FIRST_COMPLETED")
            if gone is not None and gone in done:
                raise asyncio.CancelledError("the client went away while waiting")
            if future in done:
                message = future.result()
                if message != RECHECK:
                    lease = scheduler.granted(queued, message)
                    if lease is not None:
                        return lease
                continue  # look again (a lost wake-up), and wait on
            break  # timed out
        final = asyncio.ensure_future(scheduler.unwait(queued))
        lease = await asyncio.shield(final)
    except asyncio.CancelledError:
        await asyncio.shield(_leave(scheduler, queued, final))
        raise
    finally:
        waiters.forget(queued.lease_id)
    if lease is not None:  # handed over at the last moment
        return lease
    raise NoCapacity(1.0, concurrency=True)


async def _leave(scheduler: Any, queued: Any, unwaiting: asyncio.Future[Any] | None) -> None:
    """Leave the queue (``unwaiting``: an unwait already under way); a slot handed over
    meanwhile goes back at once (to the next waiter)."""
    lease = await (unwaiting if unwaiting is not None else scheduler.unwait(queued))
    if lease is not None:
        await scheduler.release(lease)
