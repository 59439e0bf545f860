"""Test helpers: run a real maildir system subprocess and a fake fed, talk LMTP and SMTP.

Why real processes and sockets: the invariants live in the wire behaviour (one LMTP reply per
recipient, 250 only after fed's 250, 451 when fed is down), which an in-process fake would
not prove. Everything binds 127.0.0.1; the system is started with port 0 and its ready line
tells the ports it got, so parallel test runs never collide. Every wait is bounded.

Usage::

    with FakeFed() as fed, start_system(tmp_path, fed_port=fed.port) as (proc, driver):
        replies = lmtp_send(driver.lmtp, "a@x.example", ["box@s1.invalid"], MESSAGE)
"""

from __future__ import annotations

import contextlib
import queue
import smtplib
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from mailferry.ports import free_port as free_port  # the harnesses import it from here
from reconciler.drivers.maildir import MaildirDriver

from helpers.processes import stop_process

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0


@dataclass
class Received:
    """One message the fake fed accepted."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class FakeFedHandler:
    """Records messages; `answer` (e.g. "451 4.3.0 later") replaces the 250 after DATA."""

    received: list[Received] = field(default_factory=list)
    answer: str | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Record the message unless told to refuse it."""
        if self.answer:
            return self.answer
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content))
        return "250 2.0.0 queued"


class FakeFed:
    """A real aiosmtpd SMTP server on loopback standing in for fed."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.handler = FakeFedHandler()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     enable_SMTPUTF8=True, decode_data=False)

    @property
    def received(self) -> list[Received]:
        """Messages accepted so far."""
        return self.handler.received

    def __enter__(self) -> FakeFed:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


@contextlib.contextmanager
def start_system(
    tmp_path: Path, *, name: str = "s1", fed_port: int | None = None,
    internal_domain: str | None = None,
) -> Iterator[tuple[subprocess.Popen[str], MaildirDriver]]:
    """Run `python -m maildir_system serve` on free ports; yield (process, driver); stop it."""
    root = tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    fed = fed_port or free_port()  # nobody listening there: fed "down"
    errlog = open(tmp_path / f"{name}.stderr", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "maildir_system", "serve", "--name", name, "--root", str(root),
         "--lmtp", "127.0.0.1:0", "--submission", "127.0.0.1:0", "--fed", f"127.0.0.1:{fed}"],
        stdout=subprocess.PIPE, stderr=errlog, text=True, cwd=REPO,
    )
    try:
        line = _ready_line(proc, tmp_path / f"{name}.stderr")
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        lmtp = fields["lmtp"].rsplit(":", 1)
        sub = fields["submission"].rsplit(":", 1)
        driver = MaildirDriver(name, root, (lmtp[0], int(lmtp[1])), (sub[0], int(sub[1])),
                               internal_domain or f"{name}.internal")
        yield proc, driver
    finally:
        stop_process(proc)
        errlog.close()


def _ready_line(proc: subprocess.Popen[str], errpath: Path) -> str:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=READY_TIMEOUT)
    except queue.Empty:
        raise RuntimeError(f"no ready line in {READY_TIMEOUT}s: {errpath.read_text()}") from None
    if " ready " not in line:
        proc.wait(timeout=5)
        raise RuntimeError(f"system failed to start: {line!r} {errpath.read_text()}")
    return line


def lmtp_send(
    endpoint: tuple[str, int], mail_from: str, rcpts: list[str], data: bytes,
) -> dict[str, tuple[int, str]]:
    """One LMTP transaction; the reply (code, text) for each recipient (RCPT or post-DATA)."""
    replies: dict[str, tuple[int, str]] = {}
    with smtplib.LMTP(endpoint[0], endpoint[1], timeout=30) as lmtp:
        lmtp.ehlo()
        code, msg = lmtp.mail(mail_from)
        assert code == 250, (code, msg)
        accepted = []
        for rcpt in rcpts:
            code, msg = lmtp.rcpt(rcpt)
            if code == 250:
                accepted.append(rcpt)
            else:
                replies[rcpt] = (code, msg.decode())
        if not accepted:
            return replies
        code, msg = lmtp.data(data)  # the first recipient's reply ...
        replies[accepted[0]] = (code, msg.decode())
        for rcpt in accepted[1:]:  # ... then one more reply line per accepted recipient
            code, msg = lmtp.getreply()
            replies[rcpt] = (code, msg.decode())
    return replies


def smtp_send(
    endpoint: tuple[str, int], mail_from: str, rcpts: list[str], data: bytes,
) -> tuple[int, str]:
    """One SMTP transaction; the reply after DATA."""
    with smtplib.SMTP(endpoint[0], endpoint[1], timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail(mail_from)
        for rcpt in rcpts:
            code, msg = smtp.rcpt(rcpt)
            assert code == 250, (rcpt, code, msg)
        code, msg = smtp.data(data)
        return code, msg.decode()
