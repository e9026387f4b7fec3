"""``serve``, ``worker``, ``migrate``, ``reconcile``, ``encryption rotate``, ``fake-upstream``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from app.cli.common import CliError, run
from app.settings import Settings
from app.state import Services


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the relay, the customer API and the admin API")
    p.add_argument("--host", help="listen address (default: POOLRELAY_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: POOLRELAY_PORT or 8080)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser(
        "worker", help="run the arq worker (reconciliation, health probes); needs a real Redis"
    )
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("migrate", help="apply the database migrations")
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("reconcile", help="run billing reconciliation once and print its report")
    p.set_defaults(handler=cmd_reconcile)

    p = sub.add_parser("encryption", help="encryption key operations")
    enc = p.add_subparsers(dest="encryption_command", required=True)
    r = enc.add_parser("rotate", help="re-encrypt every credential under the newest key")
    r.set_defaults(handler=cmd_rotate)

    p = sub.add_parser("fake-upstream", help="run a sandbox Anthropic-compatible upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.set_defaults(handler=cmd_fake_upstream)


def _configure_logging(settings: Settings) -> None:
    from app.logs import configure

    configure(settings.log_level, settings.log_format)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from app.http_protocol import http_protocol
    from app.main import SettingsError, create_app

    host = args.host or settings.host
    port = args.port or settings.port
    if not 1 <= port <= 65535:
        raise CliError("--port must be between 1 and 65535")
    _configure_logging(settings)
    try:
        app = create_app(settings, freeze_gc=True)
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        # httptools, closing connections whose request headers take too long
        http=http_protocol(settings.client_header_timeout),
        log_level=settings.log_level.lower(),
        access_log=False,
        proxy_headers=False,  # the relay never uses the client address
        timeout_graceful_shutdown=30,
    )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    if settings.is_memory_redis:
        raise CliError(
            "the worker needs a real Redis: set POOLRELAY_REDIS_URL (embedded mode runs jobs inside serve)"
        )
    _configure_logging(settings)
    from workers.main import run_worker

    run_worker(settings)
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from app.migrate import upgrade

    upgrade(settings.database_url)
    print("migrations applied")
    return 0


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from workers.tasks import reconcile_billing

    async def job(services: Services) -> dict[str, Any]:
        return await reconcile_billing({"services": services, "worker": True})

    report = run(settings, job)
    print(json.dumps(report, indent=2, default=str))
    return 1 if report["discrepancies"] else 0


def cmd_rotate(args: argparse.Namespace, settings: Settings) -> int:
    from app.cli.common import cli_transaction
    from app.oversight import audit, webhooks
    from pool.accounts import rotate_encryption

    async def job(services: Services) -> int:
        async with cli_transaction(services) as session:
            count = await rotate_encryption(session, services.cipher)
            secrets = await webhooks.rotate_secrets(session, services.cipher)
            after = {"credentials": count, "webhook_secrets": secrets}
            await audit.record(session, "encryption.rotate", None, after=after)
            return count

    count = run(settings, job)
    print(f"re-encrypted {count} credential(s) under the newest key")
    return 0


def cmd_fake_upstream(args: argparse.Namespace, settings: Settings) -> int:
    from app.sandbox import run as run_fake

    print(
        f"fake upstream on http://{args.host}:{args.port} (control API under /_fake/)", flush=True
    )
    run_fake(host=args.host, port=args.port)
    return 0
