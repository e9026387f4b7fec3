"""Group commit: concurrent callers share one database round trip, and each still waits for it.

``GroupCommit(run)`` queues what callers :meth:`~GroupCommit.submit` and hands it to ``run`` in
batches. Nothing waits for a batch to fill: when no batch is in flight, the first item leaves
at once (a lone request pays no extra latency); while one is in flight, new items queue, and
when it returns, everything queued leaves together (natural batching, as a database's own group
commit does with WAL flushes). A caller of :meth:`~GroupCommit.submit` that finds nothing in
flight runs its batch of one itself, without a task. Each caller's ``submit`` returns only once ``run`` has returned
for its batch, so with an autocommit statement per batch every hold and every charge is durable
before the caller goes on: batching saves round trips and row updates, never durability.

``run`` gets the items in submission order and returns one result per item: a value, or an
exception instance that is raised to that item's caller alone. An exception raised by ``run``
itself reaches every caller of the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Runner = Callable[[list[T]], Awaitable[Sequence["R | BaseException"]]]


class GroupCommit(Generic[T, R]):
    """One queue of items and at most one batch of them in flight (module docstring)."""

    def __init__(self, run: Runner[T, R], *, max_batch: int = 256) -> None:
        self._run = run
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._leading = False  # a caller is running a batch of one itself (see _lead)
        self.batches = 0
        self.items = 0

    @property
    def queued(self) -> int:
        """Items waiting for the next batch."""
        return len(self._queue)

    async def submit(self, item: T) -> R:
        if self._drainer is None and not self._leading:
            return await self._lead(item)
        return await self.submit_nowait(item)

    async def _lead(self, item: T) -> R:
        """Nothing in flight: run this item's batch of one in the caller's own task (no task,
        no future). Items that arrive meanwhile queue, and a drainer takes them after."""
        self._leading = True
        self.batches += 1
        self.items += 1
        try:
            result = (await self._run([item]))[0]
        finally:
            self._leading = False
            if self._queue and self._drainer is None:
                self._drainer = asyncio.get_running_loop().create_task(self._drain())
        if isinstance(result, BaseException):
            raise result
        return result

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` and return the future of its result at once, so the caller can do
        other work (another round trip) while the batch runs."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        if self._drainer is None and not self._leading:
            self._drainer = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = [entry for entry in self._queue[: self._max_batch] if not entry[1].done()]
                del self._queue[: self._max_batch]
                if batch:
                    await self._run_batch(batch)
        finally:
            self._drainer = None
            for _, future in self._queue:  # only when cancelled (shutdown)
                future.cancel()
            self._queue.clear()

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = await self._run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
