"""Test messages, built one way: From, To, Subject, Message-ID, any further headers, a blank
line and the body, with CRLF line ends (what SMTP, LMTP and IMAP APPEND carry)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from mailferry.mail.messageid import message_id_of


def message(subject: str = "hello", msgid: str | None = None, body: str = "body", *,
            sender: str | None = "a@x.example", to: str | None = "b@y.example",
            headers: Sequence[str] = (), auto_id: bool = True) -> bytes:
    """A small RFC 5322 message. `msgid` with or without its angle brackets; None makes one
    up from the subject (or, with auto_id=False, leaves the header out); sender or to None
    leaves that header out; `headers` are whole header lines added after Message-ID."""
    if msgid is None and auto_id:
        msgid = f"{subject.replace(' ', '.')}.{os.urandom(4).hex()}@test.example"
    lines = []
    if sender is not None:
        lines.append(f"From: {sender}")
    if to is not None:
        lines.append(f"To: {to}")
    lines.append(f"Subject: {subject}")
    if msgid is not None:
        lines.append(f"Message-ID: {msgid if msgid.startswith('<') else f'<{msgid}>'}")
    lines += [*headers, "", body, ""]
    return "\r\n".join(lines).encode()


def message_id(raw: bytes) -> str:
    """The Message-ID header's value ("" when there is none): how a test counts a message,
    read by the extraction fed, the mover and the drivers share."""
    return message_id_of(raw) or ""
