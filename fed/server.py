"""The SMTP face of fed: who may send to whom, and the acknowledgement rule.

fed is the hub every system and the outside world send through, so it must be strict at
RCPT time and careful at DATA time:

- RCPT: a physical address of a registered system is accepted (systems re-submit
  redirected mail to physical addresses); an address the directory knows is accepted; any
  other address of one of fed's domains gets ``550 5.1.1 user unknown in directory``; any
  other domain gets ``550 5.7.1 relaying denied`` (invariant 8: no open relay). At most
  ``max_rcpts`` recipients per message (``452 4.5.3``); the size limit is aiosmtpd's
  ``data_size_limit`` (552).
- DATA: the message gets a ``Received:`` header naming fed and the queue id and is written
  durably to the spool (``spool.py``) *before* the 250 reply, so an acknowledged message
  survives any crash (invariant 1). If the spool cannot take it, the client gets a 451 and
  keeps the message.
- Smuggling: aiosmtpd 1.4.6 ends DATA only at ``<CR><LF>.<CR><LF>``. Bare LF and bare CR
  inside the data are normalised to CRLF before spooling, so a ``\\n.\\n`` that a sloppier
  server downstream might read as end-of-data reaches it as a dot-stuffed line instead.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import logging
import re
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from .addresses import domain_of, is_valid, normalize, split_physical
from .directory import Directory
from .spool import Spool, new_queue_id

log = logging.getLogger("fed.smtp")

_BARE_EOL = re.compile(rb"\r\n|\r|\n")
_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def normalize_eols(data: bytes) -> bytes:
    """Every line ending as CRLF (bare CR and bare LF included); `data` itself if it is."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data  # the usual case: no copy of a possibly big message
    return _BARE_EOL.sub(b"\r\n", data)


def message_id_of(data: bytes) -> str | None:
    """The Message-ID header of a message, if any (headers only are parsed)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    value = parser.parsebytes(head).get("Message-ID")
    return None if value is None else str(value).strip()[:998]


class FedHandler:
    """aiosmtpd handler: recipient policy and durable acceptance."""

    def __init__(self, directory: Directory, spool: Spool, domains: list[str], hostname: str,
                 max_rcpts: int, on_queued: Callable[[], None]) -> None:
        self.directory = directory
        self.spool = spool
        self.domains = {d.lower() for d in domains}
        self.hostname = hostname
        self.max_rcpts = max_rcpts
        self.on_queued = on_queued
        self.writing = 0  # DATA writes in progress; shutdown waits for them
        self.stopping = False

    def check_recipient(self, address: str) -> str | None:
        """None if fed takes mail for `address`, else the SMTP refusal."""
        if not is_valid(address):
            return f"553 5.1.3 <{address}>: bad recipient address syntax"
        physical = split_physical(address)
        if physical is not None:
            if self.directory.system(physical[0]) is None:
                return f"550 5.1.1 <{address}>: unknown system {physical[0]}"
            return None
        if self.directory.lookup(address) is not None:
            return None
        if domain_of(address) in self.domains:
            return f"550 5.1.1 <{address}>: user unknown in directory"
        return f"550 5.7.1 <{address}>: relaying denied"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        """Accept or refuse one recipient."""
        if len(envelope.rcpt_tos) >= self.max_rcpts:
            return "452 4.5.3 too many recipients"
        rcpt = normalize(address)
        refusal = self.check_recipient(rcpt)
        if refusal is not None:
            log.info("refused RCPT <%s> from %s: %s", rcpt, _peer(session), refusal)
            return refusal
        envelope.rcpt_tos.append(rcpt)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Spool the message durably, then (only then) acknowledge it."""
        if self.stopping:
            return "421 4.3.2 fed is shutting down, try again later"
        raw = envelope.original_content or b""
        assert isinstance(raw, bytes)
        queue_id = new_queue_id()
        # Header and body stay two pieces (the spool writes both): no copy of a big message.
        body = normalize_eols(raw)
        data = [self.received_header(session, envelope, queue_id), body]
        mail_from = envelope.mail_from or ""
        self.writing += 1
        try:
            await self.spool.accept(queue_id, mail_from, list(envelope.rcpt_tos), data,
                                    message_id_of(body))
        except Exception:
            log.exception("could not spool a message from %s", _peer(session))
            return "451 4.3.0 could not queue the message, try again later"
        finally:
            self.writing -= 1
        log.info("%s queued: from=<%s> rcpts=%s size=%d", queue_id, mail_from,
                 ",".join(envelope.rcpt_tos), sum(map(len, data)))
        self.on_queued()
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def received_header(self, session: Session, envelope: Envelope, queue_id: str) -> bytes:
        """The trace header fed adds (client-supplied names sanitised)."""
        helo = _UNSAFE.sub("", str(session.host_name or "unknown"))[:64] or "unknown"
        peer = session.peer
        ip = _UNSAFE.sub("", str(peer[0])) if isinstance(peer, tuple) and peer else "unknown"
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        single = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
        rcpt = f"\r\n\tfor <{single}>" if single else ""
        date = email.utils.formatdate(localtime=True)
        return (f"Received: from {helo} ([{ip}])\r\n\tby {self.hostname} (mailferry fed) "
                f"with {proto} id {queue_id}{rcpt}; {date}\r\n").encode("utf-8", "replace")


def _peer(session: Session) -> Any:
    return session.peer
