"""The maildir system's network face: an LMTP listener for fed and a submission listener.

Why two listeners: the patent's systems receive outside mail only from the routing center
(fed delivers to physical addresses over LMTP, which answers once per recipient, so one bad
recipient never makes fed resend to the good ones), and their own users submit mail to
them (SMTP submission), which the system either keeps (local recipient) or hands to fed.
Both are real aiosmtpd servers on real sockets, so fed, the driver and the tests exercise
exactly what a production Postfix + Dovecot pair would expose.

Recipients are checked at RCPT time (unknown -> 550 5.1.1 over LMTP) and resolved again at
DATA time, because the account table may change in between (a redirect set by the
reconciler must take effect for the very next message). Shutdown on SIGTERM stops
accepting, waits for deliveries in progress (so a 250 is not lost half-way), then exits.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from maildir_system.delivery import Deliverer
from maildir_system.store import Store

DATA_LIMIT = 100 * 1024 * 1024  # bytes; fed's messages can be large archives


class LmtpHandler:
    """aiosmtpd handler of the LMTP listener: known recipients only, one status each."""

    def __init__(self, deliverer: Deliverer) -> None:
        self.deliverer = deliverer

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept only addresses that resolve to a local account."""
        if await self.deliverer.resolve(address) is None:
            return f"550 5.1.1 <{address}>: no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """LMTP: one reply line per accepted recipient, in RCPT order."""
        data = envelope.original_content or b""
        statuses = await self.deliverer.deliver_local(
            envelope.mail_from or "", list(envelope.rcpt_tos), data
        )
        # aiosmtpd pushes this string as-is: CRLF-joined lines are the per-recipient replies.
        return "\r\n".join(statuses)


class SubmissionHandler:
    """aiosmtpd handler of the submission listener: local users' outgoing and local mail."""

    def __init__(self, deliverer: Deliverer) -> None:
        self.deliverer = deliverer

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Relay what leaves the system, then store what stays; one answer for all."""
        data = envelope.original_content or b""
        return await self.deliverer.submit(envelope.mail_from or "", list(envelope.rcpt_tos), data)


def parse_endpoint(text: str) -> tuple[str, int]:
    """(host, port) of a HOST:PORT text."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(
    name: str, root: str, lmtp: tuple[str, int], submission: tuple[str, int],
    fed: tuple[str, int],
) -> None:
    """Run both listeners until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    deliverer = Deliverer(Store(root), name, fed)

    def factory(cls: type[SMTP], handler: Any) -> Any:
        return lambda: cls(
            handler, hostname=f"{name}.invalid", ident=f"maildir-system {name}",
            decode_data=False, enable_SMTPUTF8=True, data_size_limit=DATA_LIMIT,
        )

    lmtp_srv = await loop.create_server(factory(LMTP, LmtpHandler(deliverer)), *lmtp)
    sub_srv = await loop.create_server(factory(SMTP, SubmissionHandler(deliverer)), *submission)
    lport = lmtp_srv.sockets[0].getsockname()[1]
    sport = sub_srv.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The actual ports are printed so a caller may pass port 0 and learn what was bound.
    print(f"maildir-system {name} ready lmtp={lmtp[0]}:{lport} submission={submission[0]}:{sport}",
          flush=True)
    await stop.wait()
    for srv in (lmtp_srv, sub_srv):
        srv.close()
    # Let deliveries in progress finish so their client gets its 250 (bounded wait).
    for _ in range(300):
        if deliverer.in_flight == 0:
            break
        await asyncio.sleep(0.1)
    print(f"maildir-system {name} stopped", file=sys.stderr, flush=True)


