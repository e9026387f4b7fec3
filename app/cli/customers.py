"""``poolrelay customers create``, ``keys create``, ``topup``: the same services as the admin API."""

from __future__ import annotations

import argparse
from typing import Any

from app.admin.deps import customer_view, entry_view, key_view
from app.cli.common import cli_transaction, run
from app.oversight import audit
from app.settings import Settings
from app.state import Services
from billing import customers as customer_svc
from billing import ledger
from billing.money import format_usd, parse_usd


def register(sub: Any) -> None:
    p = sub.add_parser("customers", help="manage customers")
    cust = p.add_subparsers(dest="customers_command", required=True)
    c = cust.add_parser("create", help="create a customer and its first key (printed once)")
    c.add_argument("name")
    c.add_argument("--topup", metavar="USD", help="credit this amount right away")
    c.add_argument("--price-multiplier", default="1")
    c.set_defaults(handler=cmd_create_customer)

    p = sub.add_parser("keys", help="manage customer keys")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", help="another key for a customer (printed once)")
    k.add_argument("customer", help="customer id or name")
    k.add_argument("--name", default="default")
    k.set_defaults(handler=cmd_create_key)

    t = sub.add_parser("topup", help="credit a customer's balance")
    t.add_argument("customer", help="customer id or name")
    t.add_argument("usd", help="amount in USD, e.g. 25 or 12.50")
    t.add_argument("--memo")
    t.add_argument("--idempotency-key", help="credit at most once for this key")
    t.set_defaults(handler=cmd_topup)


def cmd_create_customer(args: argparse.Namespace, settings: Settings) -> int:
    amount = parse_usd(args.topup, field="--topup") if args.topup is not None else None

    async def job(services: Services) -> tuple[str, str, str, str]:
        async with cli_transaction(services) as session:
            customer = await customer_svc.create_customer(session, args.name, args.price_multiplier)
            target = f"customer:{customer.id}"
            await audit.record(session, "customer.create", target, after=customer_view(customer))
            key, plaintext = await customer_svc.create_key(session, customer.id, "default")
            await audit.record(session, "key.create", f"key:{key.id}", after=key_view(key))
            balance = 0
            if amount is not None:
                entry, _ = await ledger.credit(
                    session,
                    customer.id,
                    "topup",
                    amount,
                    memo="initial top-up",
                    idempotency_key=None,
                )
                balance = entry.balance_after_micros
                await audit.record(
                    session,
                    "topup.create",
                    target,
                    before={"balance_usd": format_usd(0)},
                    after=entry_view(entry),
                )
            return customer.id, key.id, plaintext, format_usd(balance)

    customer_id, key_id, plaintext, balance = run(settings, job)
    print(f"customer: {customer_id} ({args.name})")
    print(f"balance_usd: {balance}")
    print(f"key_id: {key_id}")
    print(f"key: {plaintext}")
    print("(the key is shown this once)")
    return 0


def cmd_create_key(args: argparse.Namespace, settings: Settings) -> int:
    async def job(services: Services) -> tuple[str, str, str]:
        async with cli_transaction(services) as session:
            customer = await customer_svc.find_customer(session, args.customer)
            key, plaintext = await customer_svc.create_key(session, customer.id, args.name)
            await audit.record(session, "key.create", f"key:{key.id}", after=key_view(key))
            return customer.id, key.id, plaintext

    customer_id, key_id, plaintext = run(settings, job)
    print(f"customer: {customer_id}")
    print(f"key_id: {key_id}")
    print(f"key: {plaintext}")
    print("(the key is shown this once)")
    return 0


def cmd_topup(args: argparse.Namespace, settings: Settings) -> int:
    amount = parse_usd(args.usd, field="USD")

    async def job(services: Services) -> tuple[str, str, bool]:
        async with cli_transaction(services) as session:
            customer = await customer_svc.find_customer(session, args.customer)
            balance_before = format_usd(customer.balance_micros)
            entry, created = await ledger.credit(
                session,
                customer.id,
                "topup",
                amount,
                memo=args.memo,
                idempotency_key=args.idempotency_key,
            )
            if created:  # a replay writes nothing, and so records nothing
                await audit.record(
                    session,
                    "topup.create",
                    f"customer:{customer.id}",
                    before={"balance_usd": balance_before},
                    after=entry_view(entry),
                )
            return customer.id, format_usd(entry.balance_after_micros), created

    customer_id, balance, created = run(settings, job)
    note = "" if created else " (replay: already credited)"
    print(f"credited {format_usd(amount)} USD to {customer_id}; balance_usd: {balance}{note}")
    return 0
