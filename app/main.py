"""The server's composition root: ``create_app(settings)``.

The customer API is a set of plain Starlette routes (the hot path); the admin API is FastAPI
(validation and OpenAPI docs at ``/docs``). The lifespan builds the process's services, migrates
SQLite, makes sure an admin token exists, heart-beats the process's instance id (so that
reconciliation can tell a crashed process's holds from live ones) and, in embedded mode, runs
the background jobs on timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from app import embedded_redis, errors, http_limits, owned, portal
from app.admin import accounts as admin_accounts
from app.admin import admin_tokens as admin_admin_tokens
from app.admin import aliases as admin_aliases
from app.admin import audit as admin_audit
from app.admin import customers as admin_customers
from app.admin import prices as admin_prices
from app.admin import ui as admin_ui
from app.admin import usage as admin_usage
from app.admin import webhooks as admin_webhooks
from app.admin.deps import require_admin
from app.auth import ensure_admin_token
from app.errors import ApiError, to_api_error
from app.metrics import Snapshot
from app.relay import cors
from app.relay.routes import CustomerApi, customer_routes, json_response
from app.relay.service import Relay
from app.settings import Settings
from app.state import Services, build_services
from billing.errors import BillingError
from billing.holds import holds_summary
from pool.errors import PoolError
from workers import notify, tasks

log = logging.getLogger("poolrelay")


class SettingsError(RuntimeError):
    """The configuration cannot run: the message says what to set."""


def check_settings(settings: Settings) -> None:
    problems = settings.production_problems()
    if problems:
        raise SettingsError(
            "poolrelay refuses to start on PostgreSQL without explicit secrets; set "
            + " and ".join(problems)
        )


async def _every(seconds: float, name: str, job: Callable[[], Awaitable[Any]]) -> None:
    """Run ``job`` every ``seconds`` for as long as the server runs; a failure never ends the
    loop. While the database or Redis is unreachable the job fails on every turn: that outage
    is logged once (one line, no traceback) and its end once; any other failure is logged with
    its traceback each time."""
    outage_since: float | None = None
    while True:
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            dependency = errors.unreachable_dependency(exc)
            if dependency is None:
                log.exception("background job %s failed", name)
            elif outage_since is None:
                outage_since = time.monotonic()
                log.warning(
                    "background job %s failed: %s unreachable (%s); retrying every %g s",
                    name,
                    dependency,
                    type(exc).__name__,
                    seconds,
                    extra={"event": "job_dependency_down", "job": name, "dependency": dependency},
                )
        else:
            if outage_since is not None:
                log.info(
                    "background job %s runs again (it had failed for %.1f s)",
                    name,
                    time.monotonic() - outage_since,
                    extra={"event": "job_dependency_back", "job": name},
                )
                outage_since = None
        await asyncio.sleep(seconds)


async def refuse(
    scope: Scope, receive: Receive, limit: int, body_seconds: float
) -> Response | None:
    """Refuse a declared body over the limit before it reaches a route (413, once the rest of
    the body is read and dropped when that is bounded, so that the client reads the answer:
    :func:`app.http_limits.too_large`), and a path or query string with a NUL byte (400: no id
    or filter can contain one, and PostgreSQL refuses NUL in text)."""
    query: bytes = scope.get("query_string", b"")
    if "\x00" in scope.get("path", "") or b"%00" in query or b"\x00" in query:
        return errors.anthropic_response(
            errors.invalid_request("NUL bytes are not allowed in URLs")
        )
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                return None
            if declared <= limit:
                return None
            deadline = asyncio.get_running_loop().time() + body_seconds
            headers = Headers(scope=scope)
            err = await http_limits.too_large(
                receive, limit, headers, declared=declared, received=0, deadline=deadline
            )
            return errors.anthropic_response(err)
    return None


def is_customer_path(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/", "/api/hello")


HOT_ROUTES: dict[str, Callable[[CustomerApi, Request], Awaitable[Any]]] = {
    "/v1/messages": CustomerApi.messages,
    "/v1/chat/completions": CustomerApi.chat_completions,
}


class PoolrelayApp(FastAPI):
    """FastAPI for the admin API, docs and health; the customer API (the hot path) is a plain
    Starlette router reached without FastAPI's middleware and dependency machinery."""

    body_limit: int = 0
    body_timeout: float = 60.0
    """Seconds a request body may take to arrive (``CLIENT_BODY_TIMEOUT``)."""
    customer_router: Router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            limit = owned.body_limit(scope["path"], self.body_limit)
            refusal = await refuse(scope, receive, limit, self.body_timeout)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            path = scope["path"]
            if is_customer_path(path):
                scope["app"] = self
                if path.startswith("/v1/"):
                    answer = cors.preflight(scope) or cors.refusal(scope)
                    if answer is not None:
                        await answer(scope, receive, send)
                        return
                    send = cors.allowing(scope, send)
                if scope["method"] == "POST" and path in HOT_ROUTES:
                    # The relay endpoints, without routing or Starlette's per-request wrappers.
                    api: CustomerApi = self.state.customer_api
                    try:
                        response = await HOT_ROUTES[path](api, Request(scope, receive))
                    except Exception:
                        log.exception("unexpected error on POST %s", path)
                        response = errors.anthropic_response(
                            ApiError(500, "api_error", "Internal server error")
                        )
                    await response(scope, receive, send)
                    return
                try:
                    await self.customer_router(scope, receive, send)
                except StarletteHTTPException as exc:  # 405 and friends, before any byte went out
                    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
                    response = errors.anthropic_response(
                        ApiError(exc.status_code, kind, str(exc.detail))
                    )
                    await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    print_token: Callable[[str], None] | None = None,
    freeze_gc: bool = False,
) -> PoolrelayApp:
    """The relay's ASGI app. ``freeze_gc`` (``poolrelay serve``): once started, move everything
    alive (modules, the app, its services) out of the garbage collector's view with
    ``gc.freeze()``; it lives as long as the process anyway, and a full collection that scanned
    it stalled every request for ~70 ms on the benchmark machine (~1 ms after)."""
    settings = settings or Settings()
    check_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.is_sqlite:
            from app.migrate import upgrade  # Alembic is only needed here on SQLite

            await asyncio.to_thread(upgrade, settings.database_url)
        services: Services = build_services(settings)
        app.state.services = services
        app.state.customer_api = CustomerApi(services, Relay(services))
        configured = settings.admin_token.get_secret_value() if settings.admin_token else None
        new_token = await ensure_admin_token(services.db, configured)
        if new_token:
            (print_token or _print_token)(new_token)
        await tasks.heartbeat(services)
        background = [
            asyncio.create_task(
                _every(
                    max(0.5, settings.heartbeat_seconds / 3),
                    "heartbeat",
                    lambda: tasks.heartbeat(services),
                )
            )
        ]
        if settings.run_jobs_in_process:
            ctx: dict[str, Any] = {"services": services}
            background += [
                asyncio.create_task(
                    _every(
                        settings.reconcile_interval_seconds,
                        "reconcile",
                        lambda: tasks.reconcile_billing(ctx),
                    )
                ),
                asyncio.create_task(
                    _every(
                        settings.health_interval_seconds,
                        "health",
                        lambda: tasks.probe_accounts(ctx),
                    )
                ),
                asyncio.create_task(_every(3600, "rollup", lambda: tasks.rollup_usage(ctx))),
                # webhooks (workers/notify.py): events looked for, due deliveries sent
                asyncio.create_task(
                    _every(
                        settings.webhook_scan_seconds,
                        "notify",
                        lambda: notify.notify_transitions(ctx),
                    )
                ),
                asyncio.create_task(_every(1.0, "webhooks", lambda: notify.deliver_webhooks(ctx))),
                asyncio.create_task(
                    _every(
                        settings.batch_poll_seconds,
                        "batches",
                        lambda: tasks.settle_batches(ctx),
                    )
                ),
            ]
        # memory://: serve this process's Redis to the command line (app/embedded_redis.py)
        shared_redis = await embedded_redis.share(settings, services.redis)
        if freeze_gc:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            await shared_redis.close()
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await services.redis.delete(tasks.instance_key(services.instance_id))
            await services.aclose()

    app = PoolrelayApp(
        title="poolrelay",
        version="0.1.0",
        summary="A relay for the Anthropic Messages API with a prepaid ledger and an account pool",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    @app.exception_handler(BillingError)
    @app.exception_handler(PoolError)
    async def domain_error(request: Request, exc: Exception) -> Response:
        return errors.anthropic_response(to_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        return errors.anthropic_response(
            errors.invalid_request("; ".join(parts) or "invalid request")
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kinds = {
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            405: "invalid_request_error",
        }
        return errors.anthropic_response(
            ApiError(
                exc.status_code,
                kinds.get(exc.status_code, "invalid_request_error"),
                str(exc.detail),
            )
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return errors.anthropic_response(ApiError(500, "api_error", "Internal server error"))

    admin = [Depends(require_admin)]
    for module in (admin_customers, admin_accounts, admin_prices, admin_aliases, admin_usage):
        app.include_router(module.router, dependencies=admin)
    # issue 15B: admin tokens, the audit log, webhooks
    for module in (admin_admin_tokens, admin_audit, admin_webhooks):
        app.include_router(module.router, dependencies=admin)
    # The dashboard page is public (it holds no data); everything it shows comes from the admin API.
    app.include_router(admin_ui.router)
    # The customer portal, public in the same way: its data comes from /v1/me/* with the key.
    app.include_router(portal.router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    snapshot = Snapshot()

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(request: Request) -> Response:
        services: Services = request.app.state.services
        if not snapshot.taken_at:
            services.metrics.registry.register(snapshot)
        await refresh_snapshot(services, snapshot)
        return Response(
            services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> Response:
        services: Services = request.app.state.services
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(services.db.ping(), 5)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            await asyncio.wait_for(services.redis.ping(), 5)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return json_response(
            {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503
        )

    app.customer_router = Router(routes=customer_routes())
    app.body_limit = settings.max_body_bytes
    app.body_timeout = settings.client_body_timeout
    return app


async def refresh_snapshot(services: Services, snapshot: Snapshot) -> None:
    """Pool and billing gauges, read from Redis and the database at scrape time."""
    live = await services.directory.accounts()
    states = await services.scheduler.states(list(live), time.time())
    accounts = []
    for account_id, account in live.items():
        state = states.get(account_id)
        families: dict[str, float] = {}
        if state is not None:
            for family, fam in state.headroom.items():
                if fam.limit:
                    families[family] = fam.remaining / fam.limit
        accounts.append((account.name, state.in_flight if state is not None else 0, families))
    async with services.db.transaction() as session:
        count, held = await holds_summary(session)
    snapshot.accounts = accounts
    snapshot.holds_outstanding = count
    snapshot.held_micros = held
    snapshot.taken_at = time.time()


def _print_token(token: str) -> None:
    message = (
        "\n  poolrelay: a new admin token was generated. It is shown this once; store it now.\n"
        f"  Admin token: {token}\n"
        "  (set POOLRELAY_ADMIN_TOKEN to choose your own)\n"
    )
    print(message, flush=True)
