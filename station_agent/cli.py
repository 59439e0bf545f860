"""`station-agent`: the command line of the agent installed on each workstation.

Why so few commands. A workstation agent is deployed by a software-distribution tool and run
as a service; anything interactive would never be used. `run` polls forever (or once, for
scripted use and for tests, with `--once`); everything else -- what to check, when to move
local mail -- comes from the reconciler. The token is read from a file (never from the
command line, where `ps` would show it to every user of the machine).

Exit codes of `run --once`: 0 the cycle completed and every report was delivered; 2 the
reconciler could not be reached or some reports are still waiting in the outbox (they are
sent on the next run); 1 bad configuration (token file, options).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from station_agent.agent import Agent, AgentConfig

log = logging.getLogger("station_agent")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also documents the options in `--help`)."""
    parser = argparse.ArgumentParser(
        prog="station-agent",
        description="mailferry station agent: checks, local mail upload and client profile "
                    "switch for the migration of this workstation's mailbox.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="poll the reconciler and do what it asks")
    run.add_argument("--api", required=True, help="station API base URL, e.g. "
                     "https://mailferry.corp.example:8443")
    run.add_argument("--station", required=True, help="this station's enrolled name")
    run.add_argument("--token-file", required=True, type=Path,
                     help="file holding the station token")
    run.add_argument("--profile", required=True, type=Path,
                     help="the mail client profile (JSON) to switch")
    run.add_argument("--local-mail", required=True, type=Path,
                     help="directory of local mbox folders to upload")
    run.add_argument("--state-dir", required=True, type=Path,
                     help="the agent's own directory: outbox, manifest, state")
    run.add_argument("--once", action="store_true", help="one poll-and-act cycle, then exit")
    run.add_argument("--interval", type=float, default=30.0,
                     help="seconds between polls, +-20%% jitter (default 30)")
    run.add_argument("--min-free-mb", type=int, default=100,
                     help="free disk needed in the state dir (default 100)")
    run.add_argument("--retries", type=int, default=3,
                     help="retries of a failed profile switch test (default 3)")
    run.add_argument("--retry-delay", type=float, default=30.0,
                     help="first retry delay in seconds, doubled each time (default 30)")
    run.add_argument("--timeout", type=float, default=30.0,
                     help="HTTP timeout in seconds (default 30)")
    run.add_argument("--log", type=Path, default=None, help="log file (default: stderr)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _setup_logging(path: Path | None, verbose: bool) -> None:
    handler: logging.Handler = (logging.FileHandler(path, encoding="utf-8") if path
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s station-agent %(levelname)s "
                                           "%(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `station-agent` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log, args.verbose)
    try:
        token = args.token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        log.error("cannot read the token file %s: %s", args.token_file, exc.strerror or exc)
        return 1
    if not token:
        log.error("the token file %s is empty", args.token_file)
        return 1
    if args.retries < 0 or args.interval <= 0 or args.retry_delay < 0:
        log.error("--retries, --interval and --retry-delay must not be negative")
        return 1
    config = AgentConfig(
        api=args.api, station=args.station, token=token, profile=args.profile,
        local_mail=args.local_mail, state_dir=args.state_dir, interval=args.interval,
        min_free_mb=args.min_free_mb, retries=args.retries, retry_delay=args.retry_delay,
        timeout=args.timeout)
    try:
        agent = Agent(config)
    except OSError as exc:
        log.error("cannot use the state dir %s: %s", args.state_dir, exc)
        return 1
    if args.once:
        result = agent.run_once()
        return 0 if result.reached_api and result.pending == 0 else 2
    signal.signal(signal.SIGTERM, _terminate)
    log.info("station %s polling %s every %.0f s", args.station, args.api, args.interval)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C in a console: a clean stop
        agent.run_forever()
    log.info("station agent stopped")
    return 0
