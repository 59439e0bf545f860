"""`station-agent`: the command line of the agent installed on each workstation.

Why so few commands. A workstation agent is deployed by a software-distribution tool and run
as a service; anything interactive would never be used. `run` polls forever (or once, for
scripted use and for tests, with `--once`); everything else -- what to check, when to move
local mail -- comes from the reconciler. The usual start is `station-agent run --config
station-agent.toml` with the file `reconcile station enrol` wrote (see `config.py`); options
given on the command line override the file. The token is read from a file (never from the
command line, where `ps` would show it to every user of the machine).

Logs go to the configured file (rotated at 1 MB, 5 kept) in plain sentences with a time
stamp, so a help desk can read what happened on a workstation without knowing mailferry.

Exit codes of `run --once`: 0 the cycle completed and every report was delivered; 2 the
reconciler could not be reached or some reports are still waiting in the outbox (they are
sent on the next run); 1 bad configuration (token file, options).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import logging.handlers
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from mailferry import __version__, secretfile
from mailferry.service import notify_ready, private_files
from station_agent import config
from station_agent.agent import Agent, AgentConfig

log = logging.getLogger("station_agent")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also documents the options in `--help`)."""
    parser = argparse.ArgumentParser(
        prog="station-agent",
        description="mailferry station agent: checks, local mail upload and client profile "
                    "switch for the migration of this workstation's mailbox.")
    parser.add_argument("--version", action="version",
                        version=f"station-agent (mailferry) {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="poll the reconciler and do what it asks")
    run.add_argument("--config", type=Path, default=None,
                     help="agent configuration file (TOML, written by `reconcile station "
                          "enrol`); the options below override it")
    run.add_argument("--api", help="station API base URL, e.g. "
                     "https://mailferry.corp.example:8443")
    run.add_argument("--station", help="this station's enrolled name")
    run.add_argument("--token-file", type=Path, help="file holding the station token")
    run.add_argument("--client", choices=("thunderbird", "json"),
                     help="the mail client to switch (default: json if --profile is a "
                          ".json file, else thunderbird)")
    run.add_argument("--profile", type=Path,
                     help="the Thunderbird profile folder, or the JSON profile file "
                          "(default for Thunderbird: found through profiles.ini)")
    run.add_argument("--profiles-ini", type=Path, help="Thunderbird's profiles.ini (or "
                     "the folder holding it), instead of the platform's default location")
    run.add_argument("--local-mail", type=Path,
                     help="JSON client: directory of local mbox folders to upload")
    run.add_argument("--archive", type=Path, action="append", dest="archives",
                     help="another folder of mbox files to upload (repeatable)")
    run.add_argument("--pop3-folders", choices=("account", "merge"),
                     help="where a POP3 account's local folders go in the new mailbox: "
                          "under a folder named for the account (default) or merged "
                          "into it (Inbox into INBOX, Sent into Sent, ...)")
    run.add_argument("--imap-password-file", type=Path,
                     help="the user's password on the new system, for IMAP upload and test")
    run.add_argument("--state-dir", type=Path,
                     help="the agent's own directory: outbox, manifest, state")
    run.add_argument("--once", action="store_true", help="one poll-and-act cycle, then exit")
    run.add_argument("--interval", type=float, help="seconds between polls, +-20%% jitter "
                     "(default 30)")
    run.add_argument("--min-free-mb", type=int, help="free disk needed in the state dir "
                     "(default 100)")
    run.add_argument("--retries", type=int,
                     help="retries of a failed profile switch test (default 3)")
    run.add_argument("--retry-delay", type=float,
                     help="first retry delay in seconds, doubled each time (default 30)")
    run.add_argument("--cleanup-delay", type=float,
                     help="seconds to keep the old settings after a passed test (default 0)")
    run.add_argument("--timeout", type=float, help="HTTP timeout in seconds (default 30)")
    run.add_argument("--log", type=Path, default=None, help="log file (default: the "
                     "configuration's log_file, else stderr)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _setup_logging(path: Path | None, verbose: bool) -> None:
    handler: logging.Handler
    if path is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rotated: an agent polling for months must not fill the user's disk.
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=1_000_000,
                                                       backupCount=5, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s station-agent %(levelname)s "
                                           "%(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


_OPTION_KEYS = ("api", "station", "token_file", "client", "profile", "profiles_ini",
                "local_mail", "archives", "imap_password_file", "state_dir", "interval",
                "min_free_mb", "retries", "retry_delay", "cleanup_delay", "timeout",
                "pop3_folders")
_DEFAULTS: dict[str, Any] = {"interval": 30.0, "min_free_mb": 100, "retries": 3,
                             "retry_delay": 30.0, "timeout": 30.0, "cleanup_delay": 0.0}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration file's values, overridden by the options given."""
    settings: dict[str, Any] = dict(_DEFAULTS)
    if args.config is not None:
        settings.update(config.load(args.config))
    for key in _OPTION_KEYS:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if "client" not in settings:
        profile = settings.get("profile")
        settings["client"] = ("json" if isinstance(profile, Path) and profile.suffix == ".json"
                              else "thunderbird")
    return settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `station-agent` console script."""
    args = build_parser().parse_args(argv)
    private_files()  # its outbox holds the user's local mail
    try:
        settings = _settings(args)
    except config.ConfigError as exc:
        _setup_logging(args.log, args.verbose)
        log.error("%s", exc)
        return 1
    _setup_logging(args.log or settings.get("log_file"), args.verbose)
    missing = [name for name in ("api", "station", "token_file", "state_dir")
               if not settings.get(name)]
    if settings["client"] == "json" and not settings.get("profile"):
        missing.append("profile")
    if missing:
        log.error("missing setting(s): %s (options or the configuration file)",
                  ", ".join(missing))
        return 1
    try:
        token = secretfile.read_file(settings["token_file"])
    except secretfile.SecretError as exc:  # names the file and the problem, never the token
        log.error("%s", exc)
        return 1
    if settings["retries"] < 0 or settings["interval"] <= 0 or settings["retry_delay"] < 0:
        log.error("--retries, --interval and --retry-delay must not be negative")
        return 1
    fields = {f.name for f in dataclasses.fields(AgentConfig)}
    kwargs = {k: v for k, v in settings.items() if k in fields and k != "token"}
    kwargs.setdefault("profile", None)
    kwargs.setdefault("local_mail", None)
    try:
        agent = Agent(AgentConfig(token=token, **kwargs))
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    if args.once:
        result = agent.run_once()
        return 0 if result.reached_api and result.pending == 0 else 2
    signal.signal(signal.SIGTERM, _terminate)
    log.info("station %s polling %s every %.0f s (client: %s)", settings["station"],
             settings["api"], settings["interval"], settings["client"])
    notify_ready(f"polling {settings['api']}")  # Type=notify in the systemd unit
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C in a console: a clean stop
        agent.run_forever()
    log.info("station agent stopped")
    return 0
