"""``poolrelay accounts …``: the operator's pool of upstream accounts."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from app.admin.accounts import account_views
from app.cli.common import CliError, cli_transaction, read_credential, run, sees_live_state
from app.oversight import audit
from app.settings import Settings
from app.state import Services
from pool import accounts as account_repo
from pool.health import probe
from pool.models import UpstreamAccount


def register(sub: Any) -> None:
    p = sub.add_parser("accounts", help="manage the pool of upstream accounts")
    acc = p.add_subparsers(dest="accounts_command", required=True)

    a = acc.add_parser("add", help="add an account; the credential is read from standard input")
    a.add_argument("--name", required=True)
    a.add_argument("--base-url", default=account_repo.DEFAULT_BASE_URL, help="API root without /v1")
    a.add_argument("--group", help="the upstream workspace (prompt caches are shared within one)")
    a.add_argument(
        "--models", help="comma-separated model patterns this account may serve (default: all)"
    )
    a.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="in-flight requests at once (default: no cap; headroom and the upstream's 429s govern)",
    )
    a.add_argument("--weight", type=float, default=1.0)
    a.set_defaults(handler=cmd_add)

    ls = acc.add_parser("list", help="accounts with status, headroom and fingerprint")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=cmd_list)

    for name, help_text in (
        ("disable", "stop sending traffic to an account"),
        ("enable", "return an account to service (clears its quarantine)"),
        ("remove", "remove an account (its history is kept)"),
        ("check", "probe an account now with a free call"),
        ("set-credential", "replace an account's credential (standard input)"),
    ):
        c = acc.add_parser(name, help=help_text)
        c.add_argument("name")
        c.set_defaults(handler=COMMANDS[name])


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    credential = read_credential()

    async def job(services: Services) -> dict[str, Any]:
        async with cli_transaction(services) as session:
            account = await account_repo.add_account(
                session,
                services.cipher,
                name=args.name,
                credential=credential,
                base_url=args.base_url,
                group=args.group,
                models=account_repo.parse_models(args.models),
                max_concurrency=args.max_concurrency,
                weight=args.weight,
            )
            await audit.record(
                session,
                "account.create",
                f"account:{account.id}",
                after=audit.account_view(account),
            )
            return {"id": account.id, "name": account.name, "fingerprint": account.fingerprint}

    added = run(settings, job)
    print(f"added account {added['name']} ({added['id']}) {added['fingerprint']}")
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    async def job(services: Services) -> list[dict[str, Any]]:
        async with services.db.transaction() as session:
            rows = await account_repo.list_accounts(session)
        views = await account_views(services, rows)
        live = sees_live_state(services)
        for view, row in zip(views, rows, strict=True):
            view["live"] = live
            if not live:
                _durable_quarantine(view, row)
        return views

    views = run(settings, job)
    if args.json:
        print(json.dumps(views, indent=2, default=str))
        return 0
    if not views:
        print("no accounts; add one with: poolrelay accounts add --name NAME < key-file")
        return 0
    if not views[0]["live"]:
        print(
            "(no server is running: in-flight and headroom are unknown; "
            "quarantines as last recorded in the database)"
        )
    header = f"{'NAME':<20} {'ID':<28} {'STATUS':<12} {'REASON':<18} {'UNTIL':<25} {'IN-FLIGHT':>9}  {'HEADROOM':<24} FINGERPRINT"
    print(header)
    for v in views:
        headroom = ", ".join(
            f"{fam}={h['remaining']}/{h['limit']}"
            for fam, h in sorted(v["headroom"].items())
            if h["limit"]
        )
        print(
            f"{v['name']:<20} {v['id']:<28} {v['status']:<12} {v['quarantine_reason'] or '-':<18} "
            f"{v['quarantined_until'] or '-':<25} {v['in_flight']:>9}  {headroom or '-':<24} {v['fingerprint']}"
        )
        if v["last_error"]:
            print(f"{'':<20} last error: {v['last_error']}")
    return 0


def _durable_quarantine(view: dict[str, Any], row: UpstreamAccount) -> None:
    """No server runs, so there is no live state: show the quarantine the database last
    recorded, unless its time is up (a server starting now begins with none)."""
    if view["status"] != "active" or not row.quarantine_reason:
        return
    until = row.quarantined_until
    if until is not None and until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    if until is not None and until <= datetime.now(UTC):
        return
    view["status"] = "quarantined"
    view["quarantine_reason"] = row.quarantine_reason
    view["quarantined_until"] = until.isoformat() if until is not None else None


def _status(status: str) -> Any:
    def cmd(args: argparse.Namespace, settings: Settings) -> int:
        async def job(services: Services) -> str:
            async with cli_transaction(services) as session:
                before = audit.account_view(await account_repo.find_account(session, args.name))
                account = await account_repo.set_status(session, args.name, status)
                await audit.record(
                    session,
                    "account.enable" if status == "active" else "account.disable",
                    f"account:{account.id}",
                    before=before,
                    after=audit.account_view(account),
                )
            if status == "active":
                await services.scheduler.clear_quarantine(account.id)
            return account.name

        name = run(settings, job)
        print(f"account {name} {'enabled' if status == 'active' else 'disabled'}")
        return 0

    return cmd


def cmd_remove(args: argparse.Namespace, settings: Settings) -> int:
    async def job(services: Services) -> str:
        async with cli_transaction(services) as session:
            before = audit.account_view(await account_repo.find_account(session, args.name))
            account = await account_repo.remove_account(session, args.name)
            await audit.record(
                session,
                "account.remove",
                f"account:{account.id}",
                before=before,
                after=audit.account_view(account),
            )
        return account.name

    print(f"account {run(settings, job)} removed (history kept)")
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    async def job(services: Services) -> tuple[str, bool, str]:
        async with services.db.transaction() as session:
            account = await account_repo.find_account(session, args.name)
        credential = services.cipher.decrypt(account.credential_ciphertext)
        result = await probe(services.http, account.base_url, credential)
        if result.ok:
            await services.scheduler.clear_quarantine(account.id)
            if account.quarantine_reason:
                async with services.db.transaction() as session:
                    await account_repo.record_quarantine(session, account.id, None, None, None)
        return account.name, result.ok, result.detail

    name, ok, detail = run(settings, job)
    print(f"account {name}: {'ok' if ok else 'FAILED'} ({detail})")
    if not ok:
        raise CliError(f"probe of {name} failed: {detail}")
    return 0


def cmd_set_credential(args: argparse.Namespace, settings: Settings) -> int:
    credential = read_credential("New upstream API key: ")

    async def job(services: Services) -> tuple[str, str]:
        async with cli_transaction(services) as session:
            before = audit.account_view(await account_repo.find_account(session, args.name))
            account = await account_repo.set_credential(
                session, services.cipher, args.name, credential
            )
            await audit.record(
                session,
                "account.set_credential",
                f"account:{account.id}",
                before=before,
                after=audit.account_view(account),
            )
        await services.scheduler.clear_quarantine(account.id)
        return account.name, account.fingerprint

    name, fp = run(settings, job)
    print(f"credential of {name} replaced ({fp})")
    return 0


COMMANDS = {
    "disable": _status("disabled"),
    "enable": _status("active"),
    "remove": cmd_remove,
    "check": cmd_check,
    "set-credential": cmd_set_credential,
}
