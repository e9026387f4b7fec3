"""billing.group_commit: natural batching, per-item results, and what errors reach whom."""

from __future__ import annotations

import asyncio

import pytest

from billing.group_commit import GroupCommit


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def run(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        await self.gate.wait()
        return [ValueError(i) if i < 0 else i * 10 for i in items]


def test_a_lone_call_runs_at_once_and_later_calls_share_a_batch() -> None:
    async def main() -> None:
        rec = Recorder()
        group: GroupCommit[int, int] = GroupCommit(rec.run, max_batch=3)
        assert await group.submit(1) == 10
        rec.gate.clear()
        first = asyncio.ensure_future(group.submit(2))  # leads, then waits on the gate
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(group.submit(i)) for i in (3, 4, 5, 6)]
        await asyncio.sleep(0)
        nowait = group.submit_nowait(7)
        await asyncio.sleep(0)
        assert group.queued == 5  # 3..7 wait while 2's batch is in flight
        rec.gate.set()
        assert await first == 20
        assert [await r for r in rest] == [30, 40, 50, 60]
        assert await nowait == 70
        # 1 alone; 2 alone (it led); then everything that queued meanwhile, max 3 per batch
        assert rec.batches == [[1], [2], [3, 4, 5], [6, 7]]
        assert (group.batches, group.items) == (4, 7)

    asyncio.run(main())


def test_each_caller_gets_its_own_result_or_error() -> None:
    async def main() -> None:
        rec = Recorder()
        group: GroupCommit[int, int] = GroupCommit(rec.run)
        rec.gate.clear()
        calls = [asyncio.ensure_future(group.submit(i)) for i in (1, -2, 3)]
        await asyncio.sleep(0)
        rec.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[0] == 10 and results[2] == 30
        assert isinstance(results[1], ValueError)
        with pytest.raises(ValueError):
            await group.submit(-1)  # a leader's own refusal is raised too

    asyncio.run(main())


def test_a_failed_run_fails_its_whole_batch_and_the_next_batch_runs() -> None:
    async def main() -> None:
        calls: list[list[str]] = []

        async def run(items: list[str]) -> list[str | BaseException]:
            calls.append(items)
            await asyncio.sleep(0)
            if "boom" in items:
                raise ConnectionError("database went away")
            return [x.upper() for x in items]

        group: GroupCommit[str, str] = GroupCommit(run)
        futures = [group.submit_nowait(x) for x in ("a", "boom", "c")]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results)
        assert await group.submit("d") == "D"

    asyncio.run(main())


def test_a_caller_that_gave_up_before_its_batch_left_is_skipped() -> None:
    async def main() -> None:
        rec = Recorder()
        group: GroupCommit[int, int] = GroupCommit(rec.run)
        rec.gate.clear()
        leader = asyncio.ensure_future(group.submit(1))
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(group.submit(2))
        kept = asyncio.ensure_future(group.submit(3))
        await asyncio.sleep(0)
        waiting.cancel()
        rec.gate.set()
        assert await leader == 10 and await kept == 30
        assert rec.batches == [[1], [3]]

    asyncio.run(main())
