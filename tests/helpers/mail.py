"""Test messages, built one way: From, To, Subject, Message-ID, any further headers, a blank
line and the body, with CRLF line ends (what SMTP, LMTP and IMAP APPEND carry)."""

from __future__ import annotations

import os
import smtplib
import threading
import time
from collections.abc import Sequence

from mailferry.mail.imap.client import ImapClient
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


class Sender(threading.Thread):
    """Bounded background mail to an SMTP port (fed's, or a mail system's own): at most
    `count` messages within `seconds`, from `sender` to `rcpts` in turn, Message-IDs
    ``<TAG N@outside.example>``; `acked` maps each recipient to the Message-IDs the server
    answered 250 for (what must arrive, and where), `acked_ids` lists them all in the order
    they were acknowledged, `refused` names the others with the recipient and the error."""

    def __init__(self, port: int, rcpts: Sequence[str], *, tag: str = "live", count: int = 30,
                 pause: float = 0.05, seconds: float = 30.0, body: str = "body",
                 sender: str = "x@outside.example", timeout: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.timeout = timeout  # each connection's (smtplib's)
        self.port, self.rcpts, self.tag, self.body = port, list(rcpts), tag, body
        self.count, self.pause, self.seconds, self.sender = count, pause, seconds, sender
        self.acked: dict[str, list[str]] = {rcpt: [] for rcpt in self.rcpts}
        self.acked_at: dict[str, float] = {}  # Message-ID -> time.monotonic() of its 250
        self._in_order: list[str] = []
        self.refused: list[str] = []
        self.stop_flag = threading.Event()

    @property
    def acked_ids(self) -> list[str]:
        """Every acknowledged Message-ID, whatever its recipient, in the order of the 250s."""
        return list(self._in_order)

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        for n in range(self.count):
            if self.stop_flag.is_set() or time.monotonic() > deadline:
                break
            rcpt = self.rcpts[n % len(self.rcpts)]
            mid = f"<{self.tag}{n}@outside.example>"
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=self.timeout) as smtp:
                    smtp.sendmail(self.sender, [rcpt],
                                  message(f"{self.tag} {n}", mid, self.body,
                                          sender=self.sender, to=rcpt))
                    at = time.monotonic()
                self.acked_at[mid] = at
                self.acked[rcpt].append(mid)
                self._in_order.append(mid)
            except (OSError, smtplib.SMTPException) as exc:
                self.refused.append(f"{mid} -> {rcpt}: {exc}")
            self.stop_flag.wait(self.pause)

    def finish(self, timeout: float = 30.0) -> list[str]:
        """Stop sending, wait for the thread, and return `acked_ids` (the thread must have
        ended within `timeout`)."""
        self.stop_flag.set()
        self.join(timeout)
        assert not self.is_alive(), f"sender {self.tag!r} still running after {timeout} s"
        return self.acked_ids


async def imap_fill(port: int, user: str, password: str,
                    folders: dict[str, list[tuple[bytes, str]]]) -> None:
    """Append each folder's (message, flags) list in one MULTIAPPEND, creating the folder
    (appending one at a time, hundreds of messages take seconds on a loaded machine)."""
    client = await ImapClient.connect("127.0.0.1", port, timeout=30)
    await client.login(user, password)
    for folder, items in folders.items():
        if folder != "INBOX":
            await client.simple(f"CREATE {folder}")
        segments = [f"APPEND {folder}".encode()]
        for data, flags in items:
            segments[-1] += f" ({flags}) ".encode()
            segments += [data, b""]
        await client.finish(await client.start(segments, "APPEND"))
    await client.logout()
