"""Test helpers for fed: a real fed subprocess, fake mail systems, an SMTP sender.

Why real processes and sockets: fed's promises (250 only after fsync, nothing delivered for
a held address, nothing lost on kill -9) are promises about a process on the wire, so the
tests start ``python -m fed serve`` exactly as an admin would and talk to it over
127.0.0.1. fed is started with port 0 and its ready line names the ports it got; the fake
systems bind free ports found by binding port 0. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from reconciler.fedclient import FedClient

from helpers import mail
from sysutil import free_port

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789abcdef"
READY = re.compile(r"fed ready smtp=([\d.]+):(\d+) control=([\d.]+):(\d+)")


@dataclass
class Received:
    """One message a fake system accepted."""

    mail_from: str
    rcpts: list[str]
    data: bytes

    @property
    def message_id(self) -> str:
        """The Message-ID header value."""
        return mail.message_id(self.data)


@dataclass
class FakeSystem:
    """A mail system on loopback (aiosmtpd) that records what fed delivers to it.

    `reply` is what DATA answers ('250 ...', '451 ...', '550 ...'); `delay` makes DATA slow;
    `gate`, when set, holds DATA's answer until the test sets the event (at most `gate_limit`
    seconds). `refuse` gives single LMTP recipients their own DATA reply.
    """

    name: str
    protocol: str = "lmtp"
    reply: str = "250 2.0.0 Ok"
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)
    sessions: set[int] = field(default_factory=set)  # connections that carried DATA
    data_started: threading.Event = field(default_factory=threading.Event)
    smtputf8: bool = False  # advertise SMTPUTF8 (aiosmtpd's default does not)
    gate: threading.Event | None = None
    gate_limit: float = 20.0
    port: int = 0
    _controller: Controller | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the message for the recipients whose reply is 2xx.

        LMTP answers once per recipient (RFC 2033), SMTP once for all; `refuse` maps a
        recipient to its own reply.
        """
        self.data_started.set()
        self.sessions.add(id(session))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, self.gate_limit)
        raw = envelope.original_content or b""
        assert isinstance(raw, bytes)
        replies = [self.refuse.get(rcpt, self.reply) for rcpt in envelope.rcpt_tos]
        if self.protocol != "lmtp":
            replies = [self.reply] * len(replies)
        taken = [r for r, reply in zip(envelope.rcpt_tos, replies, strict=True)
                 if reply.startswith("2")]
        if taken:
            self.received.append(Received(str(envelope.mail_from), taken, raw))
        return "\r\n".join(replies) if self.protocol == "lmtp" else self.reply

    def start(self) -> FakeSystem:
        """Listen on a free loopback port."""
        self.port = free_port()
        protocol = self.protocol

        class _Controller(Controller):
            def factory(self) -> SMTP:
                cls = LMTP if protocol == "lmtp" else SMTP
                return cls(self.handler, **self.SMTP_kwargs)

        self._controller = _Controller(self, hostname="127.0.0.1", port=self.port,
                                       enable_SMTPUTF8=self.smtputf8)
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def arg(self) -> str:
        """The --system argument of fed for this system."""
        return f"{self.name}=127.0.0.1:{self.port}/{self.protocol}"

    def physical(self, local: str) -> str:
        """A physical address on this system."""
        return f"{local}@{self.name}.invalid"

    def ids(self) -> list[str]:
        """Message-IDs received, in order."""
        return [m.message_id for m in list(self.received)]


class Fed:
    """A `python -m fed serve` subprocess on a state directory."""

    def __init__(self, state_dir: Path, systems: list[FakeSystem],
                 extra: list[str] | None = None, domains: tuple[str, ...] = ("corp.example",)
                 ) -> None:
        self.state_dir = state_dir
        self.systems = systems
        self.extra = extra or []
        self.domains = domains
        self.proc: subprocess.Popen[str] | None = None
        self.smtp_port = 0
        self.control_port = 0

    def start(self) -> Fed:
        """Start fed and wait for its ready line."""
        token_file = self.state_dir.parent / f"{self.state_dir.name}.token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)  # as an admin must (fed warns otherwise)
        cmd = [sys.executable, "-m", "fed", "serve", "--smtp", "127.0.0.1:0",
               "--control", "127.0.0.1:0", "--state-dir", str(self.state_dir),
               "--token-file", str(token_file), "--retry-base", "0.1", "--retry-max", "0.5",
               "--delivery-timeout", "10"]
        for domain in self.domains:
            cmd += ["--domain", domain]
        for system in self.systems:
            cmd += ["--system", system.arg]
        log = open(self.state_dir.parent / f"{self.state_dir.name}.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd + self.extra, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=log, text=True)
        log.close()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(20)
        match = READY.search(lines[0]) if lines else None
        if match is None:
            self.kill()
            raise AssertionError(f"fed did not get ready: {lines!r}, see {log.name}")
        self.smtp_port, self.control_port = int(match.group(2)), int(match.group(4))
        return self

    @property
    def client(self) -> FedClient:
        """A control API client."""
        return FedClient(f"http://127.0.0.1:{self.control_port}", TOKEN, timeout=20)

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL (no-op if already gone)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        """fed's stderr so far."""
        return (self.state_dir.parent / f"{self.state_dir.name}.log").read_text()


def fed_queue(fed: Fed, *args: str, timeout: float = 60.0
              ) -> subprocess.CompletedProcess[str]:
    """`fed queue ARGS` as an admin runs it, pointed at `fed`'s control port (node 0's, the
    one `fed ready` prints) with its token file."""
    token_file = fed.state_dir.parent / f"{fed.state_dir.name}.token"
    return subprocess.run(
        [sys.executable, "-m", "fed", "queue", *args, "--control",
         f"127.0.0.1:{fed.control_port}", "--token-file", str(token_file)],
        capture_output=True, text=True, cwd=REPO, timeout=timeout)


def message(subject: str, msgid: str, body: str = "hello") -> bytes:
    """A small message as fed's tests send it: helpers.mail's, from and to fed's addresses."""
    return mail.message(subject, msgid, body, sender="sender@outside.example",
                        to="someone@corp.example")


def send(port: int, rcpts: list[str], data: bytes, mail_from: str = "sender@outside.example"
         ) -> tuple[int, str]:
    """One SMTP transaction to fed; (code, text) of the final reply (RCPT or DATA)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("tester.example")
        code, text = client.mail(mail_from)
        assert code == 250, text
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code != 250:
                return code, text.decode()
        code, text = client.data(data)
        return code, text.decode()


def queue_id(reply: str) -> str:
    """The queue id in fed's 250 reply."""
    match = re.search(r"queued as (\w+)", reply)
    assert match, reply
    return match.group(1)
