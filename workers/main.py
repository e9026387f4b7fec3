"""The arq worker: ``poolrelay worker``. Jobs are listed explicitly; cron runs them on timers.

Every job is idempotent (reconciliation only finishes holds whose process is gone; probes only
lift quarantines on success), so several workers may run side by side.
"""

from __future__ import annotations

from typing import Any

from arq import cron
from arq.connections import RedisSettings
from arq.worker import run_worker as arq_run_worker

from app.settings import Settings
from app.state import build_services
from workers import tasks


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx.get("settings") or Settings()
    ctx["services"] = build_services(settings)
    ctx["worker"] = True


async def shutdown(ctx: dict[str, Any]) -> None:
    services = ctx.get("services")
    if services is not None:
        await services.aclose()


FUNCTIONS = [tasks.reconcile_billing, tasks.probe_accounts, tasks.rollup_usage]
CRON_JOBS = [
    cron(tasks.reconcile_billing, second={0, 30}, unique=True, run_at_startup=True),
    cron(tasks.probe_accounts, second=set(range(0, 60, 10)), unique=True, run_at_startup=True),
    cron(tasks.rollup_usage, minute=17, second=0, unique=True),
]


def worker_settings(settings: Settings) -> dict[str, Any]:
    return {
        "functions": FUNCTIONS,
        "cron_jobs": CRON_JOBS,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "ctx": {"settings": settings},
        "max_jobs": 10,
        "job_timeout": 300,
        "keep_result": 60,
    }


class WorkerSettings:
    """For the ``arq`` command (``arq workers.main.WorkerSettings``); it connects to arq's default
    Redis (localhost:6379). ``poolrelay worker`` is the same worker on ``POOLRELAY_REDIS_URL``."""

    functions = FUNCTIONS
    cron_jobs = CRON_JOBS
    on_startup = startup
    on_shutdown = shutdown


def run_worker(settings: Settings) -> None:
    arq_run_worker(worker_settings(settings))
