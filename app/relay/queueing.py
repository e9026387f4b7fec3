"""Waiting, not refusing: a request's turn at the concurrency caps (contract §7).

A request whose only obstacle is a concurrency cap — every eligible account's
(``max_concurrency``, :mod:`pool.scheduler`'s queue) or its key's own (:mod:`app.keyslots`) —
waits first come first served across every relay process, for up to ``QUEUE_SECONDS`` in all,
and goes the moment a slot frees: the process's one Pub/Sub subscription wakes it
(:class:`pool.waiters.Waiters`), nothing polls. Only then is it refused, 429
``rate_limit_error`` with ``retry-after`` and a message naming the limit.

One :class:`Turn` per request:

- ``await turn.take_key_slot()`` before forwarding (a no-op for a key without a cap);
- ``open_upstream(..., queue=turn)`` waits on the pool's queue with what is left of the budget;
- ``turn.keep()`` while a stream runs (the key slot is renewed like the pool lease);
- ``turn.release()`` when the request ends, on every path (idempotent).

A request refused for credit never waits: the hold may still be being placed (``gate``, a
group commit on PostgreSQL), so a request about to wait awaits it first and, when it raises,
leaves the queue and lets the refusal propagate. A waiting request whose task is cancelled (the
client went away: :class:`app.relay.stream.ClientWatch`) leaves the queue at once, giving back
a slot handed over meanwhile. The time waited goes to ``x-poolrelay-queue-ms`` (in the
request's notes, so every answer carries it), to the request log (``queue_ms``) and to the
metrics ``poolrelay_queue_waiting`` and ``poolrelay_queue_wait_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from app import errors
from app.keyslots import KeyQueued, KeySlot
from app.state import Services
from pool.errors import NoCapacity, Queued
from pool.scheduler import Lease
from pool.waiters import wait_for_slot

log = logging.getLogger("poolrelay.relay")

QUEUE_HEADER = "x-poolrelay-queue-ms"


class Turn:
    """One request's waits for concurrency slots, within one ``QUEUE_SECONDS`` budget, and the
    key slot it holds until :meth:`release`.

    ``key_id``/``cap``: the key and its ``max_concurrency`` (None: no key cap); ``gate``: the
    request's hold while it is still being placed; ``notes``: the request's relay headers, where
    ``x-poolrelay-queue-ms`` is kept current."""

    def __init__(
        self,
        services: Services,
        *,
        key_id: str | None = None,
        cap: int | None = None,
        gate: Awaitable[None] | None = None,
        notes: dict[str, str] | None = None,
    ) -> None:
        self._services = services
        self._key_id = key_id
        self._cap = cap
        self._gate = gate
        self._notes = notes
        self.budget = services.settings.queue_seconds
        self.waited = 0.0
        """Seconds spent waiting so far (key and pool)."""
        self.slot: KeySlot | None = None
        self._renewal: asyncio.TimerHandle | None = None
        self._renewing: set[asyncio.Task[None]] = set()
        if notes is not None:
            notes[QUEUE_HEADER] = "0"

    @property
    def queue_ms(self) -> int:
        return int(self.waited * 1000)

    @property
    def left(self) -> float:
        """Seconds this request may still wait."""
        return max(0.0, self.budget - self.waited)

    # -- the key's cap ---------------------------------------------------------------------------

    async def take_key_slot(self) -> None:
        """Take one of the key's slots, waiting for one when all are taken; raises a 429
        naming the key's limit when none frees in time."""
        if self._cap is None or self._key_id is None:
            return
        slots = self._services.key_slots
        try:
            got = await slots.take(self._key_id, self._cap, wait=self.left)
        except NoCapacity:
            raise self._key_full() from None
        if isinstance(got, KeyQueued):
            try:
                got = await self._wait("key", slots, got)
            except NoCapacity:
                raise self._key_full() from None
        self.slot = got

    def _key_full(self) -> errors.ApiError:
        return errors.rate_limited(
            f"This API key is at its concurrency limit ({self._cap} requests at once, its "
            "max_concurrency); retry shortly.",
            1.0,
        )

    # -- the pool's caps -------------------------------------------------------------------------

    async def wait_for_lease(self, queued: Queued) -> Lease:
        """Wait for the slot the pool's queue hands ``queued``; raises :class:`NoCapacity`
        (``concurrency``) when none comes in time."""
        lease: Lease = await self._wait("pool", self._services.scheduler, queued)
        return lease

    # -- waiting ---------------------------------------------------------------------------------

    async def _wait(self, kind: str, queue: Any, queued: Queued | KeyQueued) -> Any:
        services = self._services
        metrics = services.metrics
        loop = asyncio.get_running_loop()
        began = loop.time()
        allowed = self.left  # the span the queue entry was made with
        result = "granted"
        depth = metrics.queue_depth.labels(kind)
        depth.inc()
        try:
            if self._gate is not None:
                try:
                    # Credit first: a request refused for credit never waits. Shielded: a
                    # cancellation must not cancel the placement, whose outcome is still read.
                    await asyncio.shield(self._gate)
                except BaseException:
                    result = "refused"
                    await asyncio.shield(_leave(queue, queued))
                    raise
                self._gate = None
            try:  # the wake-up channel (subscribed once per process) must be there first
                await asyncio.wait_for(services.waiters.start(), max(0.1, allowed))
            except TimeoutError:  # Redis is not answering: as if no slot had freed
                await asyncio.shield(_leave(queue, queued))
                raise NoCapacity(1.0, concurrency=True) from None
            return await wait_for_slot(
                queue, services.waiters, queued, max(0.0, allowed - (loop.time() - began))
            )
        except NoCapacity:
            result = "timeout"
            raise
        except asyncio.CancelledError:
            result = "left"
            raise
        except BaseException:
            if result == "granted":
                result = "failed"
            raise
        finally:
            depth.dec()
            spent = loop.time() - began
            self.waited += spent
            metrics.queue_wait.labels(kind, result).observe(spent)
            if self._notes is not None:
                self._notes[QUEUE_HEADER] = str(self.queue_ms)

    # -- holding the key slot ----------------------------------------------------------------------

    def keep(self) -> None:
        """Renew the key slot every third of its lifetime while a stream runs (an expired
        slot would let the key run more than its cap)."""
        if self.slot is None or self._renewal is not None:
            return
        every = self._services.key_slots.ttl / 3
        loop = asyncio.get_running_loop()

        def due() -> None:
            if self.slot is None:
                return
            task = loop.create_task(self._renew(self.slot))
            self._renewing.add(task)
            task.add_done_callback(self._renewing.discard)
            self._renewal = loop.call_later(every, due)

        self._renewal = loop.call_later(every, due)

    async def _renew(self, slot: KeySlot) -> None:
        try:
            await self._services.key_slots.renew(slot)
        except Exception:
            log.warning("could not renew a key's concurrency slot", exc_info=True)

    async def release(self) -> None:
        """Give the key slot back (to the key's oldest waiter, if any); idempotent, never
        raises (a slot that could not be given back expires by itself)."""
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        slot, self.slot = self.slot, None
        if slot is None:
            return
        try:
            await asyncio.shield(self._services.key_slots.give_back(slot))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("could not give back a key's concurrency slot; it expires", exc_info=True)


async def _leave(queue: Any, queued: Any) -> None:
    """Leave a queue before waiting in it; a slot handed over meanwhile goes back."""
    try:
        got = await queue.unwait(queued)
        if got is not None:
            await queue.release(got)
    except Exception:  # the entry expires by itself at its deadline
        log.warning("could not leave the concurrency queue", exc_info=True)
