"""Bounces: RFC 3464 delivery status notifications for mail fed could not deliver.

Why fed bounces at all: a hub that silently shunts refused mail leaves the sender believing
it arrived. After a permanent refusal (5xx) or once a message has waited longer than the
queue lifetime, the envelope sender gets a DSN: ``multipart/report;
report-type=delivery-status`` with a human-readable part, the ``message/delivery-status``
part (Reporting-MTA, Arrival-Date, then per recipient Final-Recipient, Action: failed,
Status, Diagnostic-Code, Last-Attempt-Date) and the original message's headers
(``text/rfc822-headers``; not the body, which the admin still has in the shunt folder).

A DSN is sent from the null sender ``<>`` and mail from ``<>`` is never bounced (RFC 5321
6.1 and 4.5.5), so two hubs cannot bounce a bounce back and forth. This module only builds
bytes; queueing the DSN (durably, like any message) is delivery's job.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Failure:
    """One recipient that will not get the message, and the last answer about it."""

    rcpt: str          # the address the sender used
    physical: str | None  # where fed tried to deliver it, if it got that far
    code: int          # the SMTP reply code (0: no reply at all)
    diagnostic: str    # the reply text, or fed's reason
    expired: bool = False  # given up after the queue lifetime, not refused


def should_bounce(mail_from: str) -> bool:
    """No DSN for the null sender (a bounce is never bounced)."""
    return mail_from.strip("<>") != ""


def status_of(failure: Failure) -> str:
    """The RFC 3463 status for a failure: the server's enhanced code if it gave one."""
    match = _ENHANCED.search(failure.diagnostic)
    if match and match.group(1) in "45":
        code = match.group(0)
        if failure.expired or code.startswith("5"):
            return code
    if failure.expired:
        return "4.4.7"  # delivery time expired
    return f"{failure.code // 100}.0.0" if 500 <= failure.code < 600 else "5.0.0"


def original_headers(data: bytes) -> bytes:
    """The header block of a message (up to the first empty line), CRLF-terminated."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    return head if head.endswith(b"\r\n") else head + b"\r\n"


def _clean(text: str) -> str:
    """One header line's worth of text (no CR/LF or controls)."""
    return _SAFE.sub(" ", text).strip()[:900]


def build_dsn(*, reporting_mta: str, queue_id: str, sender: str, arrival: float,
              last_attempt: float, failures: Sequence[Failure], original: bytes) -> bytes:
    """The DSN message (CRLF line endings) telling `sender` about `failures`."""
    boundary = f"fed-dsn-{queue_id}-{secrets.token_hex(6)}"
    date = email.utils.formatdate(last_attempt)
    expired = any(f.expired for f in failures)
    human = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to the recipients below"
        + (", and fed has stopped trying." if expired else "."),
        "",
    ]
    for failure in failures:
        why = "it waited too long in the queue" if failure.expired else "it was refused"
        human.append(f"<{failure.rcpt}>: {why}: {_clean(failure.diagnostic)}")
    status = [f"Reporting-MTA: dns; {reporting_mta}",
              f"X-Fed-Queue-ID: {queue_id}",
              f"Arrival-Date: {email.utils.formatdate(arrival)}"]
    for failure in failures:
        status += ["", f"Final-Recipient: rfc822; {failure.rcpt}"]
        if failure.physical and failure.physical != failure.rcpt:
            status.append(f"X-Fed-Physical: {failure.physical}")
        status += ["Action: failed", f"Status: {status_of(failure)}"]
        if failure.code:
            reply = _clean(f"{failure.code} {failure.diagnostic}")
            status.append(f"Diagnostic-Code: smtp; {reply}")
        else:
            status.append(f"Diagnostic-Code: x-fed; {_clean(failure.diagnostic)}")
        status.append(f"Last-Attempt-Date: {date}")
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(4)}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    parts = [
        "\r\n".join(headers), "",
        "This is a MIME-encapsulated message.", "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification", "",
        "\r\n".join(human), "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report", "",
        "\r\n".join(status), "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered Message Headers", "",
    ]
    return ("\r\n".join(parts) + "\r\n").encode("utf-8", "replace") + original_headers(
        original) + f"\r\n--{boundary}--\r\n".encode()
