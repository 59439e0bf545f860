"""Command line of the embedded maildir system: ``maildir-system serve ...``.

Why a CLI at all: the system is a separate server process (like Dovecot), started by demos,
tests and admins; fed and the reconciler reach it only over its sockets and, for the
reconciler's driver, through the on-disk account table. Port 0 is accepted for the listeners;
the ready line on stdout tells the real ports.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from maildir_system.server import parse_endpoint, serve
from mailferry import __version__
from mailferry.service import private_files


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maildir-system", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version",
                        version=f"maildir-system (mailferry) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the LMTP and submission listeners")
    run.add_argument("--name", required=True, help="system name (physical domain NAME.invalid)")
    run.add_argument("--root", required=True, help="directory holding accounts.db and mailboxes/")
    run.add_argument("--lmtp", required=True, type=parse_endpoint, help="HOST:PORT for fed")
    run.add_argument("--submission", required=True, type=parse_endpoint,
                     help="HOST:PORT for local users")
    run.add_argument("--fed", required=True, type=parse_endpoint,
                     help="HOST:PORT of fed's SMTP listener (relay and redirects)")
    run.add_argument("--log-level", default="WARNING", help="Python logging level")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `maildir-system` console script."""
    args = _parser().parse_args(argv)
    private_files()  # the Maildirs, accounts.db and journal are the users' mail
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "serve":
        asyncio.run(serve(args.name, args.root, args.lmtp, args.submission, args.fed))
    return 0
