"""Command line of fed: ``fed serve``, ``fed queue``, ``fed auth-hash``.

Secrets never appear on the command line (process lists are world-readable): the control
API token comes from a file (``--token-file``) or an environment variable
(``--token-env``), SMTP AUTH passwords from a credentials file (``--auth-file``), whose
lines ``fed auth-hash`` makes from a password read on stdin; invariant 7.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import logging
import re
import ssl
import sys
from pathlib import Path

from mailferry import __version__, secretfile
from mailferry.mail.addresses import set_case_sensitive_local
from mailferry.service import exposure, private_files

from . import procs
from .admin import queuectl
from .app import FedConfig, run
from .delivery.scheduler import DeliverySettings
from .routing.node_agent import NodeNameInUse
from .routing.shared_db import default_url
from .smtp.auth import (
    Authenticator,
    AuthThrottle,
    CredentialsError,
    hash_password,
    load_credentials,
)
from .smtp.policy import DEFAULT_RELAY_NETWORKS, RelayPolicy, parse_networks
from .smtp.server import SmtpSettings
from .smtp.tls import server_context
from .telemetry import logs

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


def duration(raw: str) -> float:
    """'30', '30s', '15m', '12h', '5d' -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    number, unit = (raw[:-1], raw[-1]) if raw[-1:] in units else (raw, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 5d, got {raw!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {raw!r}")
    return value


def network_arg(raw: str) -> str:
    """A CIDR (or 'none'), checked now so that a typo fails at start."""
    if raw != "none":
        try:
            ipaddress.ip_network(raw, strict=False)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"expected a CIDR such as 10.0.0.0/24: {exc}") from exc
    return raw


def positive_int(raw: str) -> int:
    """An integer >= 1."""
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {raw!r}")
    return int(raw)


def positive_float(raw: str) -> float:
    """A number of seconds > 0."""
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {raw!r}")
    return value


def _token_args(p: argparse.ArgumentParser) -> None:
    token = p.add_mutually_exclusive_group(required=True)
    token.add_argument("--token-file", type=Path)
    token.add_argument("--token-env", metavar="VAR")


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog="fed", description="mailferry's SMTP routing hub")
    p.add_argument("--version", action="version", version=f"fed (mailferry) {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the SMTP hub and its control API")
    s.add_argument("--smtp", type=host_port, default=("127.0.0.1", 2525), metavar="HOST:PORT")
    s.add_argument("--control", type=host_port, default=("127.0.0.1", 8025),
                   metavar="HOST:PORT")
    s.add_argument("--state-dir", type=Path, required=True)
    _token_args(s)
    s.add_argument("--domain", action="append", required=True, help="a domain fed serves")
    s.add_argument("--system", action="append", type=system_arg, default=[],
                   metavar="NAME=HOST:PORT[/lmtp|/smtp]")
    s.add_argument("--hostname", default="fed.invalid", help="name in greetings and headers")
    s.add_argument("--max-size", type=int, default=50 * 1024 * 1024, help="bytes per message")
    s.add_argument("--max-rcpts", type=int, default=100, help="recipients per message")
    s.add_argument("--smtp-timeout", type=float, default=300.0,
                   help="seconds to wait for a command line or, in DATA, for more data")
    s.add_argument("--max-connections", type=int, default=500,
                   help="SMTP connections at once")
    s.add_argument("--max-connections-per-ip", type=int, default=50,
                   help="SMTP connections at once per client outside the relay networks")
    s.add_argument("--bare-newline", choices=("normalize", "reject"), default="normalize",
                   help="bare CR/LF in DATA: turn into CRLF, or refuse the message (550)")
    s.add_argument("--case-sensitive-local", action="store_true",
                   help="compare local parts case-sensitively (domains never are)")
    s.add_argument("--relay-network", action="append", type=network_arg, metavar="CIDR",
                   help="clients that may relay for the systems' own senders without "
                        "SMTP AUTH (repeatable; default: none, not even loopback)")
    s.add_argument("--auth-file", type=Path,
                   help="SMTP AUTH credentials, user:scrypt-hash lines (fed auth-hash)")
    s.add_argument("--auth-max-failures", type=int, default=10,
                   help="failed AUTH logins per client IP within 10 minutes before AUTH "
                        "from it is refused (454)")
    s.add_argument("--tls-cert", type=Path, help="certificate chain (PEM) for STARTTLS")
    s.add_argument("--tls-key", type=Path, help="private key (PEM) for STARTTLS")
    s.add_argument("--metrics-public", action="store_true",
                   help="serve GET /metrics without the token")
    s.add_argument("--log-format", choices=("text", "json"), default="text")
    s.add_argument("--retry-base", "--minimal-backoff", dest="retry_base", type=float,
                   default=1.0, help="first retry delay (s), doubling per attempt, with "
                                     "jitter (Postfix: minimal_backoff_time)")
    s.add_argument("--retry-max", "--maximal-backoff", dest="retry_max", type=float,
                   default=600.0, help="longest retry delay (s) "
                                       "(Postfix: maximal_backoff_time)")
    s.add_argument("--workers", type=int, default=8,
                   help="connections per destination (system or smarthost)")
    s.add_argument("--smarthost", type=host_port, default=None, metavar="HOST:PORT",
                   help="relay for recipients of domains fed does not serve")
    s.add_argument("--queue-lifetime", type=duration, default=5 * 86400.0, metavar="TIME",
                   help="give up and bounce after this long (e.g. 5d, 12h, 30s; default 5d)")
    s.add_argument("--delivery-timeout", type=float, default=30.0, help="SMTP/LMTP timeout (s)")
    s.add_argument("--hold-timeout", type=float, default=120.0,
                   help="how long a hold call waits for in-flight deliveries (s)")
    s.add_argument("--shared-db", metavar="URL",
                   help="SQLAlchemy URL of the directory and holds several nodes share "
                        "(default: sqlite:///STATE-DIR/shared.db)")
    s.add_argument("--node-name", help="this node's name (default: host name + state dir hash)")
    s.add_argument("--node-lease", type=float, default=10.0,
                   help="a node that could not refresh for this long stops delivering (s)")
    s.add_argument("--node-poll", type=positive_float, default=0.1, metavar="S",
                   help="how often a node reads the shared version counters when no "
                        "notices wake it: SQLite, --no-node-notify, or while its LISTEN "
                        "connection is down (s, default 0.1)")
    s.add_argument("--node-safety-poll", type=positive_float, default=5.0, metavar="S",
                   help="the same poll while PostgreSQL notices wake the node "
                        "(LISTEN/NOTIFY; s, default 5)")
    s.add_argument("--no-node-notify", dest="node_notify", action="store_false",
                   help="do not LISTEN on a PostgreSQL shared database: poll every "
                        "--node-poll seconds instead")
    s.add_argument("--processes", type=positive_int, default=1,
                   help="node processes on this machine, one SMTP port (docs/fed-multinode.md)")
    s.add_argument("--smtp-fd", type=int, help=argparse.SUPPRESS)  # from --processes
    s.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)

    q = sub.add_parser("queue", help="inspect and manage the queue (like postqueue/postsuper)")
    q.add_argument("action", choices=("list", "show", "flush", "hold", "release", "delete",
                                      "quarantine", "requeue"),
                   help="quarantine: list the messages set aside as unreadable or corrupt; "
                        "requeue ID: put one back into the queue (it must pass its checks)")
    q.add_argument("queue_id", nargs="?", help="for show, hold, release, delete, requeue")
    q.add_argument("--control", type=host_port, default=("127.0.0.1", 8025),
                   metavar="HOST:PORT")
    _token_args(q)
    q.add_argument("--yes", action="store_true", help="delete without asking")
    q.add_argument("--json", action="store_true", help="list/show as JSON")
    q.add_argument("--this-node", action="store_true",
                   help="only the node --control names (default: every live node)")

    sub.add_parser("auth-hash", help="read a password on stdin, print its --auth-file hash")
    return p


def read_token(args: argparse.Namespace) -> str:
    """The control API token, from the file or the environment variable (one line, checked
    by `mailferry.secretfile`); SecretError names the source, never the token."""
    if args.token_file is not None:
        return secretfile.read_file(args.token_file)
    return secretfile.read_env(args.token_env)


def warn_exposed_token(args: argparse.Namespace) -> None:
    """Warn, as ssh does of a key, when others can read the token file: the token opens the
    whole control API. In fed's log for `serve` (JSON lines stay JSON), else on stderr."""
    warning = exposure(args.token_file) if args.token_file is not None else None
    if warning is None:
        return
    if args.command == "serve":
        logging.getLogger("fed").warning("token file %s", warning)
    else:
        print(f"fed: warning: token file {warning}", file=sys.stderr)


def smtp_settings(args: argparse.Namespace) -> SmtpSettings:
    """The SMTP listener's settings; raises ValueError with a message for the admin."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert is not None:
        try:
            tls = server_context(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the TLS certificate or key: {exc}") from exc
    authenticator = None
    if args.auth_file is not None:
        try:
            authenticator = Authenticator(load_credentials(args.auth_file),
                                          AuthThrottle(args.auth_max_failures))
        except CredentialsError as exc:
            raise ValueError(str(exc)) from exc
    networks = parse_networks(args.relay_network or list(DEFAULT_RELAY_NETWORKS))
    return SmtpSettings(
        hostname=args.hostname, max_size=args.max_size, max_rcpts=args.max_rcpts,
        timeout=args.smtp_timeout, bare_newline=args.bare_newline,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        relay=RelayPolicy(tuple(networks)), tls_context=tls, authenticator=authenticator,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fed` console script."""
    args = parser().parse_args(argv)
    private_files()  # the spool, databases and logs: 0600/0700 whatever the umask
    if args.command == "auth-hash":
        password = getpass.getpass("password: ") if sys.stdin.isatty() \
            else sys.stdin.readline().rstrip("\n")
        if not password:
            print("fed: empty password", file=sys.stderr)
            return 2
        print(hash_password(password))
        return 0
    if args.command == "serve":
        logs.setup(args.log_format)  # before the first warning
    try:
        token = read_token(args)
    except secretfile.SecretError as exc:
        print(f"fed: {exc}", file=sys.stderr)
        return 2
    warn_exposed_token(args)
    if args.command == "queue":
        if args.action not in ("list", "flush", "quarantine") and not args.queue_id:
            print(f"fed queue {args.action}: needs a QUEUE_ID", file=sys.stderr)
            return 2
        return queuectl.run(args, token)
    try:
        smtp = smtp_settings(args)
    except ValueError as exc:
        print(f"fed: {exc}", file=sys.stderr)
        return 2
    if args.processes > 1:
        logs.setup(args.log_format)
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            return procs.supervise(
                argv, args.processes, args.smtp, args.control, args.state_dir,
                args.shared_db or default_url(str(args.state_dir.resolve())), args.node_name)
        except OSError as exc:
            print(f"fed: cannot listen: {exc}", file=sys.stderr)
            return 2
    set_case_sensitive_local(args.case_sensitive_local)
    config = FedConfig(
        smtp_host=args.smtp[0], smtp_port=args.smtp[1],
        control_host=args.control[0], control_port=args.control[1],
        state_dir=args.state_dir, token=token,
        domains=[d.lower() for d in args.domain], systems=args.system, smtp=smtp,
        delivery=DeliverySettings(retry_base=args.retry_base, retry_max=args.retry_max,
                                  concurrency=args.workers, timeout=args.delivery_timeout,
                                  helo_name=args.hostname, smarthost=args.smarthost,
                                  domains=tuple(d.lower() for d in args.domain),
                                  queue_lifetime=args.queue_lifetime),
        hold_timeout=args.hold_timeout, metrics_public=args.metrics_public,
        log_format=args.log_format,
        shared_db=args.shared_db, node_name=args.node_name, node_lease=args.node_lease,
        node_poll=args.node_poll, node_notify=args.node_notify,
        node_safety_poll=args.node_safety_poll,
        smtp_fd=args.smtp_fd, control_fd=args.control_fd,
    )
    try:
        return run(config)
    except NodeNameInUse as exc:
        print(f"fed: {exc}", file=sys.stderr)
        return 2
