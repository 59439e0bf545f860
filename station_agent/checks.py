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
- the profile cannot be read: there would be nothing to switch;

- where the target speaks IMAP: its IMAP server cannot be reached (or its TLS certificate
  does not verify), or the user's IMAP password file is missing: upload and switch would fail;
- the Thunderbird profile has no account for the address, or stores mail as maildir.
The result also carries what E23 reports: the type ("mbox") and size of the local mail.

The E31 test speaks real SMTP to the new submission server as the user would: EHLO
(STARTTLS or TLS where configured, AUTH with the user's password where the server offers it),
MAIL FROM and RCPT TO the user's own address, then RSET (nothing is sent) and QUIT. A 2xx
answer to RCPT means the new system knows the address and accepts mail for it from this
station. The IMAP side of the test (login, SELECT INBOX) is in `imapupload.login_test`.
"""

from __future__ import annotations

import shutil
import smtplib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from station_agent import imapupload, localdata
from station_agent.clients import ClientError, MailClient, Target
from station_agent.thunderbird.switch import Endpoint

SMTP_TIMEOUT = 15.0


def parse_hostport(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to (host, port); ValueError if malformed."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port: {value!r}")
    return host.strip("[]"), int(port)


def _smtp_open(endpoint: Endpoint, ca_file: str | None, timeout: float) -> smtplib.SMTP:
    """Connected, EHLO done, TLS as configured (raises on failure)."""
    context = ssl.create_default_context(cafile=ca_file)
    if endpoint.tls == "tls":
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(endpoint.host, endpoint.port, timeout=timeout,
                                              context=context)
    else:
        smtp = smtplib.SMTP(endpoint.host, endpoint.port, timeout=timeout)
    code, reply = smtp.ehlo()
    if code != 250:
        smtp.close()
        raise smtplib.SMTPResponseException(code, reply)
    if endpoint.tls == "starttls":
        smtp.starttls(context=context)
        smtp.ehlo()
    return smtp


def smtp_reachable(endpoint: Endpoint, ca_file: str | None = None,
                   timeout: float = SMTP_TIMEOUT) -> str | None:
    """None if the server answers an SMTP greeting and EHLO (and TLS), else why not."""
    try:
        smtp = _smtp_open(endpoint, ca_file, timeout)
        smtp.quit()
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
    client: str = "json"
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def detail(self) -> dict[str, Any]:
        """The report's detail, including E23's mailbox type and size."""
        return {"free_mb": self.free_mb, "client_running": self.client_running,
                "target_reachable": self.target_reachable, "local_bytes": self.local_bytes,
                "profile_readable": self.profile_readable, "mailbox_type": "mbox",
                "mailbox_size": self.local_bytes, "client": self.client,
                "problems": list(self.problems)}


def local_size(client: MailClient, address: str) -> int:
    """Bytes of local mail the client has for `address` (every root)."""
    return sum(localdata.local_bytes(root, prefix)
               for root, prefix in client.local_roots(address))


def run_checks(*, state_dir: Path, client: MailClient, address: str, target: Target,
               imap_password: str | None, min_free_mb: int,
               ca_file: str | None = None) -> CheckResult:
    """Run every verification; each failure adds a sentence a help desk can act on."""
    problems: list[str] = []
    free_mb = shutil.disk_usage(state_dir).free // (1024 * 1024)
    if free_mb < min_free_mb:
        problems.append(f"only {free_mb} MB free in {state_dir}, {min_free_mb} MB needed")
    running = client.running()
    if running is not None:
        problems.append(f"{running}: ask the user to close it")
    reachable = True
    if target.smtp is None:
        reachable = False
        problems.append("the reconciler gave no submission server for the target system")
    else:
        reason = smtp_reachable(target.smtp, ca_file)
        if reason is not None:
            reachable = False
            problems.append(f"target submission server {target.smtp.describe()} "
                            f"unreachable: {reason}")
    if target.imap is not None:
        reason = imapupload.reachable(target.imap.host, target.imap.port, target.imap.tls,
                                      ca_file)
        if reason is not None:
            reachable = False
            problems.append(f"target IMAP server {target.imap.describe()} unreachable: "
                            f"{reason}")
        if client.uses_imap and not imap_password:
            problems.append("no IMAP password for the user on the new system (the file named "
                            "by imap.password_file in the agent configuration)")
    elif client.uses_imap:
        reachable = False
        problems.append(f"the target system {target.system} offers no IMAP server for "
                        f"{client.kind}")
    problem = client.problem(address)
    if problem is not None:
        problems.append(problem)
    try:
        size = local_size(client, address)
    except (OSError, ClientError) as exc:
        size = 0
        problems.append(f"local mail unreadable: {exc}")
    return CheckResult(free_mb=int(free_mb), client_running=running is not None,
                       target_reachable=reachable, local_bytes=size,
                       profile_readable=problem is None, client=client.kind,
                       problems=problems)


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
        # No SMTP code when the connection itself failed: the reason alone, not "None ...".
        where = self.reply if self.code is None else f"{self.code} {self.reply}".strip()
        return f"{self.smtp} failed at {self.stage}: {where}"


def try_submission(endpoint: Endpoint, address: str, *, user: str | None = None,
                   password: str | None = None, ca_file: str | None = None,
                   timeout: float = SMTP_TIMEOUT) -> SmtpTest:
    """E31: EHLO (+TLS, +AUTH), MAIL FROM and RCPT TO `address`, then RSET and QUIT."""
    name = endpoint.describe()
    stage = "connect"
    try:
        smtp = _smtp_open(endpoint, ca_file, timeout)
        with smtp:
            if password and user and smtp.has_extn("auth"):
                stage = "AUTH"
                smtp.login(user, password)
            stage = "MAIL FROM"
            code, reply = smtp.mail(address)
            if not 200 <= code < 300:
                return SmtpTest(False, name, stage, code, reply.decode(errors="replace"))
            stage = "RCPT TO"
            code, reply = smtp.rcpt(address)
            text = reply.decode(errors="replace")
            smtp.rset()  # the test sends nothing
            return SmtpTest(200 <= code < 300, name, stage, code, text)
    except smtplib.SMTPResponseException as exc:
        return SmtpTest(False, name, stage, exc.smtp_code,
                        exc.smtp_error.decode(errors="replace")
                        if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error))
    except (OSError, smtplib.SMTPException, ValueError) as exc:
        return SmtpTest(False, name, stage, None, f"{type(exc).__name__}: {exc}")
