"""The arq worker: ``poolrelay worker``. Jobs are listed explicitly; cron runs them on timers.

Every job is idempotent (reconciliation only finishes holds whose process is gone; probes only
lift quarantines on success), so several workers may run side by side.

The worker outlives its dependencies. arq's own worker ends when its Redis connection drops
(its ``conn_retries`` cover only the first connection), so :class:`Supervisor` runs it in a loop:
when Redis goes away the worker is stopped, and started again with backoff (1 s doubling to
30 s) until Redis answers; the outage is logged once, and its end once. A job that fails because
the database (or Redis) is unreachable logs one line and returns (:func:`tolerant`): the next
run on its timer tries again. The process's services (database pools, Redis client) are built
once and kept across those restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq import cron
from arq.connections import ArqRedis
from arq.typing import WorkerCoroutine
from arq.worker import Worker

from app.errors import unreachable_dependency
from app.redis import CLIENT_OPTIONS
from app.settings import Settings
from app.state import build_services
from workers import notify, tasks

log = logging.getLogger("poolrelay.worker")

FIRST_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 30.0
STOP_JOBS_TIMEOUT = 10.0
"""Seconds the worker waits for cancelled jobs to unwind when it stops or loses Redis."""

Job = Callable[..., Awaitable[Any]]


def tolerant(job: Job) -> WorkerCoroutine:
    """``job``, except that a failure because the database or Redis is unreachable is one
    warning line (no traceback) and the job returns ``{"skipped": ...}``; arq would log every
    such failure with its whole traceback, on every timer tick of an outage. The wrapper keeps
    the job's name, so arq's job names (and cron's unique ids) stay the same."""

    @functools.wraps(job)
    async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await job(ctx, *args, **kwargs)
        except Exception as exc:
            dependency = unreachable_dependency(exc)
            if dependency is None:
                raise
            log.warning(
                "job %s skipped: %s unreachable (%s: %s)",
                job.__name__,
                dependency,
                type(exc).__name__,
                _first_line(exc),
                extra={"event": "job_skipped", "job": job.__name__, "dependency": dependency},
            )
            return {"skipped": f"{dependency} unreachable"}

    return run


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


async def startup(ctx: dict[str, Any]) -> None:
    if "services" not in ctx:  # the supervisor builds them once, for every restart
        settings: Settings = ctx.get("settings") or Settings()
        ctx["services"] = build_services(settings)
        ctx["owns_services"] = True
    ctx["worker"] = True


async def shutdown(ctx: dict[str, Any]) -> None:
    services = ctx.get("services")
    if services is not None and ctx.pop("owns_services", False):
        del ctx["services"]
        await services.aclose()


reconcile_billing = tolerant(tasks.reconcile_billing)
probe_accounts = tolerant(tasks.probe_accounts)
rollup_usage = tolerant(tasks.rollup_usage)
drop_dead_leases = tolerant(tasks.drop_dead_leases)
settle_batches = tolerant(tasks.settle_batches)

notify_transitions = tolerant(notify.notify_transitions)
deliver_webhooks = tolerant(notify.deliver_webhooks)
FUNCTIONS = [
    reconcile_billing,
    probe_accounts,
    rollup_usage,
    drop_dead_leases,
    notify_transitions,
    deliver_webhooks,
    settle_batches,
]
BATCH_SETTLE_TIMEOUT = 3600
"""Seconds one batch poll may take (it may read the results of several large batches)."""
CRON_JOBS = [
    cron(reconcile_billing, second={0, 30}, unique=True, run_at_startup=True),
    cron(probe_accounts, second=set(range(0, 60, 10)), unique=True, run_at_startup=True),
    cron(rollup_usage, minute=17, second=0, unique=True),
    # a crashed relay's slots come back within HEARTBEAT_SECONDS + 10 s
    cron(drop_dead_leases, second=set(range(5, 60, 10)), unique=True),
    # webhooks: events looked for every 5 s, due deliveries sent every 2 s
    cron(notify_transitions, second=set(range(0, 60, 5)), unique=True),
    cron(deliver_webhooks, second=set(range(1, 60, 2)), unique=True),
]


def batch_poll_cron(seconds: float) -> Any:
    """The cron of the batch poll, every ``BATCH_POLL_SECONDS`` as nearly as a cron can say:
    at the seconds of each minute that divide it, or every so many minutes."""
    step = max(1, round(seconds))
    if step < 60:
        times: dict[str, Any] = {"second": set(range(0, 60, step))}
    else:
        minutes = max(1, min(60, round(step / 60)))
        times = {"minute": set(range(0, 60, minutes)), "second": 0}
    return cron(
        settle_batches, unique=True, run_at_startup=True, timeout=BATCH_SETTLE_TIMEOUT, **times
    )


ARQ_CRON_JOBS = [*CRON_JOBS, batch_poll_cron(60)]
"""The ``arq`` command's jobs (default settings: the batch poll every 60 s)."""


def worker_settings(settings: Settings) -> dict[str, Any]:
    """The arq ``Worker`` arguments of ``poolrelay worker`` (its Redis comes from the
    supervisor, see :meth:`Supervisor.connect`)."""
    return {
        "functions": FUNCTIONS,
        "cron_jobs": [*CRON_JOBS, batch_poll_cron(settings.batch_poll_seconds)],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "ctx": {"settings": settings},
        "max_jobs": 10,
        "job_timeout": 300,
        "keep_result": 60,
    }


class WorkerSettings:
    """For the ``arq`` command (``arq workers.main.WorkerSettings``); it connects to arq's default
    Redis (localhost:6379). ``poolrelay worker`` is the same worker on ``POOLRELAY_REDIS_URL``,
    kept running through Redis outages."""

    functions = FUNCTIONS
    cron_jobs = ARQ_CRON_JOBS
    on_startup = startup
    on_shutdown = shutdown


class Supervisor:
    """Runs the arq worker until told to stop, through Redis outages (module docstring).

    ``connect`` and ``make_worker`` are seams for tests; by default the worker's Redis is an
    :class:`ArqRedis` on ``REDIS_URL`` with the relay's timeouts (:data:`app.redis.CLIENT_OPTIONS`),
    so a Redis that stopped answering is noticed in seconds, not never.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        first_delay: float = FIRST_RETRY_DELAY,
        max_delay: float = MAX_RETRY_DELAY,
        connect: Callable[[], Awaitable[ArqRedis]] | None = None,
        make_worker: Callable[[ArqRedis, dict[str, Any]], Worker] | None = None,
        services: Any = None,
    ) -> None:
        self.settings = settings
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._connect = connect or self.connect
        self._make_worker = make_worker or self.make_worker
        self._services = services
        self._stop: asyncio.Event | None = None
        self._worker: Worker | None = None
        self._signal: signal.Signals | None = None
        self.outage_since: float | None = None
        self.outages = 0
        """How many times Redis was lost (or could not be reached at start)."""
        self.starts = 0
        """How many times a worker started (connected and ran its start-up)."""

    async def connect(self) -> ArqRedis:
        redis: ArqRedis = ArqRedis.from_url(self.settings.redis_url, **CLIENT_OPTIONS)
        try:
            await redis.ping()
        except BaseException:
            with contextlib.suppress(Exception):
                await redis.close(close_connection_pool=True)
            raise
        return redis

    def make_worker(self, redis: ArqRedis, ctx: dict[str, Any]) -> Worker:
        options = {**worker_settings(self.settings), "ctx": ctx}
        return Worker(**options, redis_pool=redis, handle_signals=False)

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> None:
        """Stop (a signal handler): the running worker cancels its jobs and ends; a wait for
        Redis ends at once."""
        self._signal = signum
        if self._stop is not None:
            self._stop.set()
        if self._worker is not None:
            self._worker.handle_sig(signum)

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def run(self) -> None:
        self._stop = asyncio.Event()
        settings = self.settings
        services = self._services if self._services is not None else build_services(settings)
        ctx: dict[str, Any] = {"settings": settings, "services": services, "worker": True}
        delay = self.first_delay
        try:
            while not self.stopping:
                try:
                    redis = await self._connect()
                except Exception as exc:
                    self._lost(exc, delay)
                else:
                    self._back()
                    delay = self.first_delay
                    await self._run_once(redis, ctx, delay)
                if self.stopping:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(self.max_delay, delay * 2)
        finally:
            if self._services is None:
                await services.aclose()

    async def _run_once(self, redis: ArqRedis, ctx: dict[str, Any], delay: float) -> None:
        """One worker on ``redis``, until it ends: stopped, or Redis lost (logged)."""
        worker = self._make_worker(redis, ctx)
        self._worker = worker
        self.starts += 1
        try:
            if self.stopping:  # told to stop while connecting
                return
            await worker.async_run()
        except asyncio.CancelledError:
            if not self.stopping:
                raise
        except Exception as exc:
            if not self.stopping:
                self._lost(exc, delay)
        finally:
            self._worker = None
            await self._dispose(worker)

    def _lost(self, exc: Exception, delay: float) -> None:
        dependency = unreachable_dependency(exc)
        if dependency is None and not isinstance(exc, OSError):
            log.error(
                "the worker stopped on an unexpected error; restarting it in %g s",
                delay,
                exc_info=exc,
                extra={"event": "worker_error"},
            )
            return
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            self.outages += 1
            log.warning(
                "redis unreachable (%s: %s), retrying in %g s (then backing off up to %g s)",
                type(exc).__name__,
                _first_line(exc),
                delay,
                self.max_delay,
                extra={"event": "redis_down"},
            )
        else:
            log.debug("redis still unreachable (%s); retrying in %g s", type(exc).__name__, delay)

    def _back(self) -> None:
        if self.outage_since is not None:
            log.warning(
                "redis reachable again after %.1f s; the worker runs again",
                time.monotonic() - self.outage_since,
                extra={"event": "redis_back"},
            )
            self.outage_since = None

    async def _dispose(self, worker: Worker) -> None:
        """What arq's ``Worker.close`` does, without raising on a Redis that is gone: cancel
        and await the running jobs, drop the health-check key, close the connections."""
        running = [t for t in worker.tasks.values() if not t.done()]
        for task in running:
            task.cancel()
        if worker.tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*worker.tasks.values(), return_exceptions=True),
                    STOP_JOBS_TIMEOUT,
                )
        for task in worker.job_tasks.values():
            task.cancel()
        pool = worker._pool
        if pool is None:
            return
        if self.outage_since is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.delete(worker.health_check_key), 2)
        with contextlib.suppress(Exception):
            await pool.close(close_connection_pool=True)
        worker._pool = None


async def supervise(settings: Settings) -> None:
    """``poolrelay worker``: the supervised worker, stopped by SIGTERM or SIGINT."""
    supervisor = Supervisor(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, supervisor.stop, signum)
    await supervisor.run()


def run_worker(settings: Settings) -> None:
    asyncio.run(supervise(settings))
