"""The station verifications (E20, E22) and the profile test (E31).

Why these checks. The patent lets the address migration (E4) go ahead only after the user
station verified, twice, that the move can succeed on its side, and stops the migration for
this mailbox when the second verification is negative (E24). What can go wrong on a
workstation on migration day is concrete:
- no free disk in the agent's state directory: the outbox, the manifest and the profile backup
  could not be written, so nothing could be done safely;
- the mail client is running: it holds the profile and the local mbox files open and would
  overwrite a switched profile when it exits (Thunderbird's `lock` / `.parentlock` files in the
  profile directory say it runs);
- the target's submission server cannot be reached from this workstation (firewall, VPN,
  DNS): the switched client could not send mail;
- the profile cannot be read: there would be nothing to switch.
The result also carries what E23 reports: the type ("mbox") and size of the local mail.

The E31 test speaks real SMTP to the new submission server as the user would: EHLO, MAIL FROM
and RCPT TO the user's own address, then RSET (nothing is sent) and QUIT. A 2xx answer to RCPT
means the new system knows the address and accepts mail for it from this station.
"""

from __future__ import annotations

import shutil
import smtplib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from station_agent import localdata, profile

SMTP_TIMEOUT = 15.0


def parse_hostport(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to (host, port); ValueError if malformed."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port: {value!r}")
    return host.strip("[]"), int(port)


def smtp_reachable(submission: str, timeout: float = SMTP_TIMEOUT) -> str | None:
    """None if `host:port` answers an SMTP greeting and EHLO, else the reason it does not."""
    try:
        host, port = parse_hostport(submission)
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            code, reply = smtp.ehlo()
            if code != 250:
                return f"EHLO answered {code} {reply.decode(errors='replace')}"
    except (OSError, smtplib.SMTPException, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class CheckResult:
    """The outcome of one verification run (E20/E22), as reported."""

    free_mb: int
    client_running: bool
    target_reachable: bool
    local_bytes: int
    profile_readable: bool
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def detail(self) -> dict[str, Any]:
        """The report's detail, including E23's mailbox type and size."""
        return {"free_mb": self.free_mb, "client_running": self.client_running,
                "target_reachable": self.target_reachable, "local_bytes": self.local_bytes,
                "profile_readable": self.profile_readable, "mailbox_type": "mbox",
                "mailbox_size": self.local_bytes, "problems": list(self.problems)}


def run_checks(*, state_dir: Path, profile_path: Path, local_mail: Path,
               submission: str | None, min_free_mb: int) -> CheckResult:
    """Run every verification; each failure adds a sentence a help desk can act on."""
    problems: list[str] = []
    free_mb = shutil.disk_usage(state_dir).free // (1024 * 1024)
    if free_mb < min_free_mb:
        problems.append(f"only {free_mb} MB free in {state_dir}, {min_free_mb} MB needed")
    lock = profile.client_lock(profile_path)
    if lock is not None:
        problems.append(f"the mail client is running (lock file {lock}): ask the user to "
                        f"close it")
    reachable = False
    if not submission:
        problems.append("the reconciler gave no submission server for the target system")
    else:
        reason = smtp_reachable(submission)
        reachable = reason is None
        if reason is not None:
            problems.append(f"target submission server {submission} unreachable: {reason}")
    readable = True
    try:
        profile.load_account(profile_path)
    except profile.ProfileError as exc:
        readable = False
        problems.append(f"profile unreadable: {exc}")
    try:
        size = localdata.local_bytes(local_mail)
    except OSError as exc:
        size = 0
        problems.append(f"local mail in {local_mail} unreadable: {exc}")
    return CheckResult(free_mb=int(free_mb), client_running=lock is not None,
                       target_reachable=reachable, local_bytes=size,
                       profile_readable=readable, problems=problems)


@dataclass
class SmtpTest:
    """The outcome of the E31 test of the switched profile."""

    ok: bool
    smtp: str
    stage: str
    code: int | None = None
    reply: str = ""

    def detail(self) -> dict[str, Any]:
        return {"smtp": self.smtp, "stage": self.stage, "code": self.code, "reply": self.reply}

    def describe(self) -> str:
        """One sentence for the log and the rollback report."""
        if self.ok:
            return f"{self.smtp} accepted RCPT ({self.code})"
        where = f"{self.code} {self.reply}".strip()
        return f"{self.smtp} failed at {self.stage}: {where}"


def try_submission(submission: str, address: str, timeout: float = SMTP_TIMEOUT) -> SmtpTest:
    """E31: EHLO, MAIL FROM and RCPT TO `address` on the new server, then RSET and QUIT."""
    stage = "connect"
    try:
        host, port = parse_hostport(submission)
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            stage = "EHLO"
            code, reply = smtp.ehlo()
            if code != 250:
                return SmtpTest(False, submission, stage, code, reply.decode(errors="replace"))
            stage = "MAIL FROM"
            code, reply = smtp.mail(address)
            if not 200 <= code < 300:
                return SmtpTest(False, submission, stage, code, reply.decode(errors="replace"))
            stage = "RCPT TO"
            code, reply = smtp.rcpt(address)
            text = reply.decode(errors="replace")
            smtp.rset()  # the test sends nothing
            return SmtpTest(200 <= code < 300, submission, stage, code, text)
    except (OSError, smtplib.SMTPException, ValueError) as exc:
        return SmtpTest(False, submission, stage, None, f"{type(exc).__name__}: {exc}")
