"""``poolrelay admin-tokens create|list|revoke``: the same service as ``/admin/admin-tokens``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from app.cli.common import cli_transaction, run
from app.oversight import audit
from app.oversight import tokens as admin_tokens
from app.settings import Settings
from app.state import Services


def register(sub: Any) -> None:
    p = sub.add_parser("admin-tokens", help="manage admin tokens (roles admin and readonly)")
    tok = p.add_subparsers(dest="admin_tokens_command", required=True)
    c = tok.add_parser(
        "create",
        help="a new admin token, printed once; readonly may read every /admin endpoint, "
        "and write none",
    )
    c.add_argument("--role", required=True, choices=admin_tokens.ROLES)
    c.add_argument("--name", help="shown as the actor in the audit log (default: role-xxxxxx)")
    c.set_defaults(handler=cmd_create)
    ls = tok.add_parser("list", help="every admin token: id, name, role, prefix, status")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=cmd_list)
    r = tok.add_parser("revoke", help="revoke an admin token (by id or name), at once")
    r.add_argument("id")
    r.set_defaults(handler=cmd_revoke)


def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    async def job(services: Services) -> tuple[dict[str, Any], str]:
        async with cli_transaction(services) as session:
            row, plaintext = await admin_tokens.create_token(session, args.role, args.name)
            view = admin_tokens.token_view(row)
            await audit.record(session, "admin_token.create", f"admin_token:{row.id}", after=view)
            return view, plaintext

    view, plaintext = run(settings, job)
    print(f"admin token: {view['id']} ({view['name']}, {view['role']})")
    print(f"token: {plaintext}")
    print("(the token is shown this once)")
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    async def job(services: Services) -> list[dict[str, Any]]:
        async with services.db.transaction() as session:
            rows = await admin_tokens.list_tokens(session, limit=10_000)
            return [admin_tokens.token_view(r) for r in rows]

    views = run(settings, job)
    if args.json:
        print(json.dumps(views, indent=2))
        return 0
    print(f"{'ID':<32} {'NAME':<24} {'ROLE':<9} {'PREFIX':<9} {'STATUS':<8} CREATED")
    for v in views:
        print(
            f"{v['id']:<32} {v['name']:<24} {v['role']:<9} {v['prefix']:<9} {v['status']:<8} "
            f"{v['created_at']}"
        )
    return 0


def cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async def job(services: Services) -> dict[str, Any]:
        async with cli_transaction(services) as session:
            before = admin_tokens.token_view(await admin_tokens.find_token(session, args.id))
            row = await admin_tokens.revoke_token(session, args.id)
            view = admin_tokens.token_view(row)
            await audit.record(
                session, "admin_token.revoke", f"admin_token:{row.id}", before=before, after=view
            )
            return view

    view = run(settings, job)
    print(f"admin token {view['id']} ({view['name']}) revoked")
    return 0
