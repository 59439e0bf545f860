"""Command line of fed: ``fed serve`` and nothing else yet.

Secrets never appear on the command line (process lists are world-readable): the control
API token comes from a file (``--token-file``) or an environment variable
(``--token-env``), as invariant 7 asks of everything mailferry configures.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .app import FedConfig, run
from .delivery import DeliverySettings
from .node_agent import NodeNameInUse

_SYSTEM = re.compile(r"^([A-Za-z0-9_.\-]+)=([^:/]+|\[[^\]]+\]):(\d+)(?:/(lmtp|smtp))?$")


def host_port(raw: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port); port 0 asks the kernel for a free one."""
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {raw!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def system_arg(raw: str) -> tuple[str, str, int, str]:
    """NAME=HOST:PORT[/lmtp|/smtp] -> (name, host, port, protocol)."""
    match = _SYSTEM.match(raw)
    if not match:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT[/lmtp|/smtp], got {raw!r}")
    name, host, port, protocol = match.groups()
    return name.lower(), host.strip("[]"), int(port), protocol or "lmtp"


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog="fed", description="mailferry's SMTP routing hub")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the SMTP hub and its control API")
    s.add_argument("--smtp", type=host_port, default=("127.0.0.1", 2525), metavar="HOST:PORT")
    s.add_argument("--control", type=host_port, default=("127.0.0.1", 8025),
                   metavar="HOST:PORT")
    s.add_argument("--state-dir", type=Path, required=True)
    token = s.add_mutually_exclusive_group(required=True)
    token.add_argument("--token-file", type=Path)
    token.add_argument("--token-env", metavar="VAR")
    s.add_argument("--domain", action="append", required=True, help="a domain fed serves")
    s.add_argument("--system", action="append", type=system_arg, default=[],
                   metavar="NAME=HOST:PORT[/lmtp|/smtp]")
    s.add_argument("--hostname", default="fed.invalid", help="name in greetings and headers")
    s.add_argument("--max-size", type=int, default=50 * 1024 * 1024, help="bytes per message")
    s.add_argument("--max-rcpts", type=int, default=100, help="recipients per message")
    s.add_argument("--retry-base", type=float, default=1.0, help="first retry delay (s)")
    s.add_argument("--retry-max", type=float, default=60.0, help="longest retry delay (s)")
    s.add_argument("--workers", type=int, default=8, help="concurrent deliveries")
    s.add_argument("--delivery-timeout", type=float, default=30.0, help="SMTP/LMTP timeout (s)")
    s.add_argument("--hold-timeout", type=float, default=120.0,
                   help="how long a hold call waits for in-flight deliveries (s)")
    s.add_argument("--shared-db", metavar="URL",
                   help="SQLAlchemy URL of the directory and holds several nodes share "
                        "(default: sqlite:///STATE-DIR/shared.db)")
    s.add_argument("--node-name", help="this node's name (default: host name + state dir hash)")
    s.add_argument("--node-lease", type=float, default=10.0,
                   help="a node that could not refresh for this long stops delivering (s)")
    return p


def read_token(args: argparse.Namespace) -> str:
    """The control API token, from the file or the environment variable."""
    if args.token_file is not None:
        token = Path(args.token_file).read_text().strip()
        where = str(args.token_file)
    else:
        token = os.environ.get(args.token_env, "").strip()
        where = f"${args.token_env}"
    if not token:
        raise SystemExit(f"fed: no token in {where}")
    return token


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fed` console script."""
    args = parser().parse_args(argv)
    try:
        token = read_token(args)
    except OSError as exc:
        print(f"fed: cannot read the token: {exc}", file=sys.stderr)
        return 2
    config = FedConfig(
        smtp_host=args.smtp[0], smtp_port=args.smtp[1],
        control_host=args.control[0], control_port=args.control[1],
        state_dir=args.state_dir, token=token,
        domains=[d.lower() for d in args.domain], systems=args.system,
        hostname=args.hostname, max_size=args.max_size, max_rcpts=args.max_rcpts,
        delivery=DeliverySettings(retry_base=args.retry_base, retry_max=args.retry_max,
                                  concurrency=args.workers, timeout=args.delivery_timeout,
                                  helo_name=args.hostname),
        hold_timeout=args.hold_timeout,
        shared_db=args.shared_db, node_name=args.node_name, node_lease=args.node_lease,
    )
    try:
        return run(config)
    except NodeNameInUse as exc:
        print(f"fed: {exc}", file=sys.stderr)
        return 2
