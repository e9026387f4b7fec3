"""The ``poolrelay`` command line.

Every command works on the configured database whether or not a server runs. Bad input ends
with a one-line reason on standard error and a non-zero exit. Credentials are read from standard
input (one line) or a hidden prompt, never from arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from app.cli import accounts as accounts_cmd
from app.cli import admin_tokens as admin_tokens_cmd
from app.cli import customers as customers_cmd
from app.cli import serve as serve_cmd
from app.cli.common import CliError
from app.errors import ApiError, to_api_error
from app.settings import Settings
from billing.errors import BillingError
from pool.errors import PoolError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="poolrelay", description="A relay for the Anthropic Messages API.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    serve_cmd.register(sub)
    accounts_cmd.register(sub)
    customers_cmd.register(sub)
    admin_tokens_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's ValidationError: a setting has a bad value
        first = str(exc).splitlines()
        print(f"poolrelay: error: invalid settings: {' '.join(first[:3])}", file=sys.stderr)
        return 2
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except (ApiError, BillingError, PoolError) as exc:
        print(f"poolrelay: error: {to_api_error(exc).message}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"poolrelay: error: {exc}", file=sys.stderr)
        return 1
