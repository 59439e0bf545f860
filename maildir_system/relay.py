"""Hand a message to fed over SMTP, all recipients or none.

Why all-or-none: the system answers its own client (fed over LMTP, or a local user over
submission) only after fed's answer, and a single SMTP reply cannot say "some recipients
yes, others later". So the relay issues MAIL and every RCPT first; if fed refuses any
recipient it resets the transaction before DATA, nothing was sent, and the caller can answer
4xx or 5xx knowing a retry will not duplicate anything. Only when fed accepted every
recipient is DATA sent, and fed's 250 after DATA means fed owns the message (its own
invariant: on disk and fsynced before 250).

The message bytes pass through unchanged (smtplib only dot-stuffs on the wire and adds a
final CRLF when the message lacks one). Code 0 in the result means "fed unreachable".
"""

from __future__ import annotations

import smtplib
from dataclasses import dataclass


@dataclass(frozen=True)
class RelayResult:
    """fed's answer: SMTP code (0 = unreachable) and text."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        """True when fed accepted the message."""
        return self.code == 250

    @property
    def permanent(self) -> bool:
        """True when fed refused for good (5xx)."""
        return 500 <= self.code < 600


def _text(msg: bytes | str) -> str:
    return msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg


def relay(
    fed: tuple[str, int], mail_from: str, rcpts: list[str], data: bytes, *, timeout: float = 60.0,
) -> RelayResult:
    """Send `data` to fed for `rcpts`; fed's final answer (DATA sent only if every RCPT passed)."""
    host, port = fed
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            smtp.ehlo_or_helo_if_needed()
            needs_utf8 = not all(a.isascii() for a in [mail_from, *rcpts])
            options: list[str] = []
            if smtp.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if needs_utf8 and smtp.has_extn("smtputf8"):
                options.append("SMTPUTF8")
            code, msg = smtp.mail(mail_from, options)
            if code != 250:
                smtp.rset()
                return RelayResult(code, f"MAIL FROM refused: {_text(msg)}")
            for rcpt in rcpts:
                code, msg = smtp.rcpt(rcpt)
                if code not in (250, 251):
                    smtp.rset()  # nothing sent: a retry cannot duplicate
                    return RelayResult(code, f"<{rcpt}>: {_text(msg)}")
            code, msg = smtp.data(data)
            return RelayResult(code, _text(msg))
    except smtplib.SMTPResponseException as exc:
        return RelayResult(exc.smtp_code, _text(exc.smtp_error))
    except (OSError, smtplib.SMTPException) as exc:
        return RelayResult(0, f"fed {host}:{port} unreachable: {exc}")
