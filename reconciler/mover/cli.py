"""The data mover's command line: `mover copy` between IMAP servers and maildir systems.

Why a command of its own beside `reconcile`: admins test a source server's limits, run a
prestage of thousands of mailboxes days before a window, and compare the mover with
imapsync and mbsync on their own data, all without specs or a state machine. The reconciler
calls the same code (`runner.run_jobs`) from its steps; this command only builds the jobs
from flags and a users file.

    python -m reconciler.mover copy --src imap://127.0.0.1:11143 --dst 127.0.0.1:12143 \\
        --users users.txt [--src-admin admin --src-admin-password-env SRC_ADMIN_PW] \\
        [--parallel 8] [--processes 2] [--state mover-state.db] \\
        [--progress auto|tty|plain|json|none] \\
        [--verify fast|deep] [--max-msgs-per-s 50] [--max-bytes-per-s 2000000] \\
        [--dst-max-connections 20] [--dst-max-connections-per-user 3] \\
        [--dst-bytes-per-day 450000000] \\
        [--folder-map 'INBOX.Sent=Sent'] [--rerun] [--stats FILE] [--read-target] \\
        [--src-tls none|implicit|starttls] [--src-cafile CA.pem] [--dst-tls ...]

`mover prestage --specs DIR --state URL [--all]` copies, before their cutover, the mailboxes
of migrations in states 1-6 whose policy has ``prestageCopy: true`` (see `prestage.py`).

`--src`/`--dst` take ``HOST:PORT`` (``imap://`` optional) or ``maildir:ROOT`` (an embedded
maildir system's data folder, mailbox id = user). The users file has lines ``user password``
(same login on both sides) or ``src_user src_password dst_user dst_password``; with
``--src-admin`` / ``--dst-admin`` the password columns may be ``-`` and the admin logs in on
behalf of each user. Passwords are read from that file or from the environment variable
named by ``--*-password-env``, never from the command line. Exit status 0 when every
mailbox is verified, 1 otherwise; the per-mailbox report goes to stdout as JSON Lines with
``--report json``, as a table otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mailferry import secretfile
from mailferry.service import private_files
from reconciler.drivers.base import ImapAccount
from reconciler.mover.endpoints import DriverEndpoint, Endpoint, ImapEndpoint
from reconciler.mover.folders import FolderRule
from reconciler.mover.manifest import Manifest
from reconciler.mover.pace import Limits, LocalPace
from reconciler.mover.pipeline import MailboxReport, Options
from reconciler.mover.pool import ConnectionPool
from reconciler.mover.progress import make_progress
from reconciler.mover.rewrites import REWRITES
from reconciler.mover.runner import Job, run_jobs_async
from reconciler.mover.throttle import Throttle
from reconciler.state.lite import default_url


class _Version(argparse.Action):
    """`--version`, the installed version read only when asked (see `mailferry.__getattr__`:
    the metadata's import is 20 ms of every new process's start otherwise)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        import mailferry
        print(f"mover (mailferry) {mailferry.__version__}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mover", description="mailferry data mover")
    p.add_argument("--version", action=_Version, help="show the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("copy", help="copy mailboxes, verify, report")
    c.add_argument("--src", required=True, help="HOST:PORT or maildir:ROOT")
    c.add_argument("--dst", required=True, help="HOST:PORT or maildir:ROOT")
    c.add_argument("--users", required=True, type=Path, help="users file")
    for side in ("src", "dst"):
        c.add_argument(f"--{side}-admin", help="admin/master user logging in for each user")
        c.add_argument(f"--{side}-admin-password-env", help="env variable with its password")
        c.add_argument(f"--{side}-tls", default="none", choices=["none", "implicit", "starttls"],
                       help="TLS to the IMAP server (starttls: required, no cleartext login)")
        c.add_argument(f"--{side}-cafile", help="CA bundle for the server's certificate")
    c.add_argument("--parallel", type=int, default=8,
                   help="mailboxes at once (8; in each process with --processes)")
    c.add_argument("--processes", type=int, default=1,
                   help="split the mailboxes over N forked processes (1); rates, "
                        "connection limits and daily budgets are divided among them")
    c.add_argument("--state", help="state store URL or SQLite file (default mover-state.db)")
    c.add_argument("--no-state", action="store_true", help="no manifest (compare only)")
    c.add_argument("--progress", default="auto", choices=["auto", "tty", "plain", "json", "none"])
    c.add_argument("--report", default="table", choices=["table", "json"])
    c.add_argument("--verify", default="fast", choices=["fast", "deep"])
    c.add_argument("--accept-rewrite", action="append", default=[], metavar="NAME",
                   choices=sorted(REWRITES),
                   help="a change the target makes on store accepted as equivalent "
                        "(8bit-headers-as-x: Cyrus munge8bit); the proof checks it")
    c.add_argument("--dst-dovecot-config", type=Path, metavar="DOVECOT_CONF",
                   help="the target is the Dovecot of this machine run with this "
                        "configuration: big messages written into its Maildirs, as dsync "
                        "writes them (IMAP for the rest)")
    c.add_argument("--dst-name", default="",
                   help="the target's name in the report (default its host:port)")
    c.add_argument("--phase", default="copy", choices=["prestage", "copy", "final"])
    c.add_argument("--read-target", action="store_true",
                   help="read the target even when the source is unchanged since the last "
                        "verified pass (a final pass always does)")
    c.add_argument("--max-msgs-per-s", type=float, default=0.0)
    c.add_argument("--max-bytes-per-s", type=float, default=0.0)
    for side in ("src", "dst"):  # a system's limits (`pace.py`); the back-off is always on
        c.add_argument(f"--{side}-max-connections", type=int, default=0,
                       help="most connections to this side's server at once (0: no limit)")
        c.add_argument(f"--{side}-max-connections-per-user", type=int, default=0)
        c.add_argument(f"--{side}-bytes-per-day", type=int, default=0,
                       help="message bytes per UTC day to or from this side (0: no limit)")
    c.add_argument("--folder-map", action="append", default=[], metavar="FROM=TO")
    c.add_argument("--rerun", action="store_true",
                   help="after the copy, run a second full pass (idempotence proof) and time it")
    c.add_argument("--stats", type=Path, help="write timings and peak memory here (JSON)")
    c.add_argument("--timeout", type=float, default=60.0)
    c.add_argument("--batch-messages", type=int, default=Options.batch_messages,
                   help="messages per MULTIAPPEND")
    c.add_argument("--batch-bytes", type=int, default=Options.batch_bytes,
                   help="bytes per MULTIAPPEND (memory: x appends in flight)")
    c.add_argument("--appends-in-flight", type=int, default=Options.appends_in_flight)
    pre = sub.add_parser("prestage", help="bulk copy of migrations before their cutover")
    pre.add_argument("--specs", default="specs", help="folder of YAML specs (./specs)")
    pre.add_argument("--state", help="state store URL or SQLite file (default var/state.db)")
    pre.add_argument("--all", action="store_true", help="also policies without prestageCopy")
    pre.add_argument("--parallel", type=int, default=4)
    pre.add_argument("--progress", default="auto", choices=["auto", "tty", "plain", "json", "none"])
    return p


def _password(env: str | None) -> str:
    if not env:
        raise SystemExit("mover: --*-admin needs --*-admin-password-env")
    try:  # one line, no control characters (mailferry.secretfile); never echoed
        return secretfile.read_env(env, "password")
    except secretfile.SecretError as exc:
        raise SystemExit(f"mover: {exc}") from None


def _pace(args: argparse.Namespace, side: str) -> LocalPace:
    """One side's pace: its limits from the command line, the adaptive back-off."""
    return LocalPace(getattr(args, side), Limits(
        getattr(args, f"{side}_max_connections") or None,
        getattr(args, f"{side}_max_connections_per_user") or None,
        getattr(args, f"{side}_bytes_per_day") or None))


def _side(args: argparse.Namespace, side: str, user: str, password: str, readonly: bool,
          pool: ConnectionPool, pace: LocalPace | None = None) -> Callable[[], Endpoint]:
    spec, admin = getattr(args, side), getattr(args, f"{side}_admin")
    tls, cafile = getattr(args, f"{side}_tls"), getattr(args, f"{side}_cafile")
    if spec.startswith("maildir:"):
        if getattr(args, f"{side}_dovecot_config", None) is not None:
            raise SystemExit(f"mover: --{side}-dovecot-config needs an IMAP --{side} "
                             "(HOST:PORT of that Dovecot), not maildir:")
        root = spec.split(":", 1)[1]

        def maildir() -> Endpoint:
            from reconciler.drivers.maildir import MaildirDriver

            driver = MaildirDriver("maildir", root, ("127.0.0.1", 0), ("127.0.0.1", 0), "local")
            if driver.get_account(user) is None:
                driver.create_mailbox(user)
            return DriverEndpoint(driver, user)
        return maildir
    hostport = spec.removeprefix("imap://")
    host, _, port = hostport.rpartition(":")
    if admin:
        account = ImapAccount(host, int(port), admin,
                              _password(getattr(args, f"{side}_admin_password_env")),
                              authorize_as=user, timeout=args.timeout, tls=tls, cafile=cafile)
    else:
        account = ImapAccount(host, int(port), user, password, timeout=args.timeout, tls=tls,
                              cafile=cafile)
    config = getattr(args, f"{side}_dovecot_config", None)
    if config is not None:
        from reconciler.mover.dovecot_direct import DovecotDirectEndpoint, DovecotLayout

        layout = DovecotLayout(config)
        return lambda: DovecotDirectEndpoint(account, layout, pool=pool, pace=pace)
    return lambda: ImapEndpoint(account, readonly=readonly, pool=pool, pace=pace)


def _user_lines(path: Path) -> list[str]:
    """The users file's mailbox lines (no blank lines, no comments)."""
    return [line for line in path.read_text().splitlines()
            if line.split() and not line.split()[0].startswith("#")]


def _columns(line: str) -> tuple[str, str, str, str]:
    """(source user, password, target user, password) of a users file line."""
    cols = line.split()
    su, sp = cols[0], (cols[1] if len(cols) > 1 else "-")
    du, dp = (cols[2], cols[3]) if len(cols) >= 4 else (su, sp)
    return su, sp, du, dp


def _key(line: str) -> str:
    """The mailbox's name in reports: the user, or source->target when they differ."""
    su, _, du, _ = _columns(line)
    return su if su == du else f"{su}->{du}"


def _jobs(args: argparse.Namespace, pool: ConnectionPool, lines: list[str]) -> list[Job]:
    rules = tuple(FolderRule(*item.split("=", 1)) for item in args.folder_map)
    throttle = Throttle(args.max_msgs_per_s, args.max_bytes_per_s)
    options = Options(rules=rules, verify=args.verify, phase=args.phase,
                      batch_messages=args.batch_messages, batch_bytes=args.batch_bytes,
                      appends_in_flight=args.appends_in_flight,
                      accepted=frozenset(args.accept_rewrite),
                      target_name=args.dst_name or args.dst.removeprefix("imap://"),
                      leave_target=not args.read_target)
    jobs: list[Job] = []
    src_pace, dst_pace = _pace(args, "src"), _pace(args, "dst")
    for line in lines:
        su, sp, du, dp = _columns(line)
        jobs.append(Job(
            key=_key(line),
            source=_side(args, "src", su, sp, True, pool, src_pace),
            target=_side(args, "dst", du, dp, False, pool, dst_pace),
            throttle=throttle, options=options))
    return jobs


def _per_process(args: argparse.Namespace, processes: int) -> argparse.Namespace:
    """The limits each of `processes` processes gets: a system's rate, connections and
    daily bytes divided among them (rounded down: together they never exceed the limit;
    a user's own connections are one process's, each mailbox being in one share)."""
    share = argparse.Namespace(**vars(args))
    share.max_msgs_per_s = args.max_msgs_per_s / processes
    share.max_bytes_per_s = args.max_bytes_per_s / processes
    for side in ("src", "dst"):
        for name in (f"{side}_max_connections", f"{side}_bytes_per_day"):
            limit = getattr(args, name)
            if limit and limit < processes:
                raise SystemExit(f"mover: --{name.replace('_', '-')} {limit} cannot be "
                                 f"divided among --processes {processes}")
            setattr(share, name, limit // processes)
    if share.progress in ("auto", "tty"):
        share.progress = "plain"  # one terminal, several processes: lines, not bars
    return share


def _table(reports: list[MailboxReport]) -> None:
    print(f"{'mailbox':32} {'copied':>8} {'present':>8} {'failed':>7} {'missing':>8} "
          f"{'seconds':>8}  verified")
    for r in reports:
        print(f"{r.key[:32]:32} {r.copied:>8} {r.present:>8} {r.failed:>7} {r.missing:>8} "
              f"{r.seconds:>8.2f}  {'yes' if r.verified else 'NO: ' + (r.error or 'see report')}")
        if not r.target_read:
            print("    source unchanged since the last verified pass: target not read "
                  "(--read-target or --phase final read it)")
        if r.altered:
            print(f"    {r.alteration()}")
        if r.equivalent:
            print(f"    {r.equivalent} proven equivalent under {', '.join(r.accepted)} "
                  f"(not byte-identical)")
        for f in r.folders:
            for uid, reason in f.failed[:5]:
                print(f"    {f.folder} uid {uid}: {reason}")


async def _passes(args: argparse.Namespace, manifest: Manifest | None, lines: list[str]
                  ) -> tuple[dict[str, object], list[MailboxReport]]:
    """The copy and, with `--rerun`, a second full pass in the same event loop: the second
    pass reuses the first one's logged-in connections (see `pool.py`)."""
    pool = ConnectionPool()
    try:
        t0 = time.monotonic()
        reports = await run_jobs_async(_jobs(args, pool, lines), manifest=manifest,
                                       progress=make_progress(args.progress),
                                       parallel=args.parallel)
        first = time.monotonic() - t0
        stats: dict[str, object] = {"first_s": round(first, 3), "mailboxes": len(reports),
                                    "copied": sum(r.copied for r in reports),
                                    "targets_read": sum(r.target_read for r in reports)}
        if args.rerun:
            t1 = time.monotonic()
            again = await run_jobs_async(_jobs(args, pool, lines), manifest=manifest,
                                         progress=make_progress("none"),
                                         parallel=args.parallel)
            stats.update(rerun_s=round(time.monotonic() - t1, 3),
                         rerun_copied=sum(r.copied for r in again),
                         rerun_verified=all(r.verified for r in again),
                         rerun_logins_saved=pool.reused)
            reports = [a if not a.verified else r for r, a in zip(reports, again, strict=True)]
        return stats, reports
    finally:
        await pool.close()


def _store_url(args: argparse.Namespace) -> str:
    return args.state if args.state and "://" in args.state \
        else default_url(args.state or "mover-state.db")


def _scope(args: argparse.Namespace) -> int:
    """The manifest's scope for a stand-alone copy: one per (source, target) pair of servers,
    as the engine has one per migration. A job is named by its user, and the same user
    copied back (B -> A with one state file) must not read the A -> B rows: under an equal
    UIDVALIDITY (a creation time in seconds, or a server that numbers its folders from 1)
    their source hashes would stand for B's UIDs (tests/test_mover_cold.py). Negative: the
    engine's migration ids are positive."""
    digest = hashlib.sha256(f"{args.src}\0{args.dst}".encode()).digest()
    return -1 - int.from_bytes(digest[:4], "big") % (2**31 - 1)


def _copy(args: argparse.Namespace, lines: list[str]
          ) -> tuple[dict[str, object], list[MailboxReport]]:
    """The copy (and the optional re-run) of these mailboxes in this process."""
    # A SQLite store at head is read and written through sqlite3, without SQLAlchemy
    # (`Manifest.at_url`): most of a no-op re-run's start in a new process was its import.
    manifest = None if args.no_state else Manifest.at_url(_store_url(args), _scope(args))
    try:
        stats, reports = asyncio.run(_passes(args, manifest, lines))
    finally:
        if manifest is not None:
            manifest.close()
    stats["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return stats, reports


def copy_command(args: argparse.Namespace) -> int:
    """Run the copy (and the optional re-run); print the report; 0 when all verified."""
    lines = _user_lines(args.users)
    if args.processes > 1 and len(lines) > 1:
        # here, not at the top: pickle, tempfile and traceback are 4 ms of the start of
        # every one-process `mover copy` (issue 22)
        from reconciler.mover.processes import in_child, merged, run_split

        share = _per_process(args, min(args.processes, len(lines)))
        started = time.monotonic()
        if not args.no_state:  # created or upgraded once, not by every child at once
            failed = in_child(lambda: Manifest.at_url(_store_url(args)).close())
            if failed is not None:
                raise SystemExit(f"mover: the state store could not be opened (the "
                                 f"process opening it {failed}); nothing was copied")
        each, reports = run_split(lines, args.processes, lambda part: _copy(share, part), _key)
        stats: dict[str, object] = merged(
            each, time.monotonic() - started,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    else:
        stats, reports = _copy(args, lines)
    stats["verified"] = all(r.verified for r in reports)
    if args.report == "json":
        for r in reports:
            print(json.dumps(r.as_dict()))
    else:
        _table(reports)
    if args.stats:
        args.stats.write_text(json.dumps(stats) + "\n")
    print("mover: " + json.dumps(stats), file=sys.stderr)
    return 0 if stats["verified"] else 1


def prestage_command(args: argparse.Namespace) -> int:
    """Prestage copy of every due migration; 0 when all verified."""
    # The specs (jsonschema) and every driver: +0.15 s to `copy`, which needs neither.
    from reconciler.drivers.registry import make_drivers
    from reconciler.mover.prestage import prestage  # the state model (SQLAlchemy): the same
    from reconciler.spec.loader import load_specs
    from reconciler.state.store import open_store

    state = args.state or "var/state.db"
    store = open_store(state if "://" in state else default_url(state))
    reports = prestage(store, make_drivers(load_specs(args.specs)), everything=args.all,
                       parallel=args.parallel, progress=make_progress(args.progress))
    _table(reports)
    store.close()
    return 0 if all(r.verified for r in reports) else 1


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = _parser().parse_args(argv)
    private_files()  # the manifest store names every user's messages
    sys.exit(prestage_command(args) if args.command == "prestage" else copy_command(args))
