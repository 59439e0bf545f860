"""The SMTP face of fed: who may send to whom, hostile input, and the acknowledgement rule.

fed is the hub every system and the outside world send through, so it must be strict at
MAIL/RCPT time and careful at DATA time:

- MAIL/RCPT: an address holding NUL, another control character or invalid UTF-8 is
  refused (``553``) whatever the client declared (aiosmtpd alone lets NUL through);
  a non-ASCII address needs ``SMTPUTF8`` on MAIL (``553 5.6.7`` otherwise, RFC 6531).
- RCPT: a physical address of a registered system, or an address the directory knows, is
  accepted (as its ``address_key``); any other address of one of fed's domains gets
  ``550 5.1.1``; any other domain is relaying, decided by ``policy.py`` (``550 5.7.1
  relaying denied`` unless the client may relay; a relayed recipient keeps its local part
  as written). At most ``max_rcpts`` recipients (``452 4.5.3``); the size limit is the
  session's ``data_size_limit`` (``552``).
- DATA: the message gets a ``Received:`` header naming fed and the queue id and is written
  durably to the spool (``spool.py``) *before* the 250 reply, so an acknowledged message
  survives any crash (invariant 1). If the spool cannot take it, the client gets a 451.
- Smuggling: the session (``protocol.py``) ends DATA only at a line that is exactly
  ``.<CR><LF>`` after a ``<CR><LF>``, so ``\\n.\\n``, ``\\r.\\r``,
  ``\\r\\n.\\n``, ``\\n.\\r\\n`` never end a message here. What to do with the bare CR/LF
  inside is ``bare_newline``: ``normalize`` (default, like Postfix 3.9's
  ``smtpd_forbid_bare_newline = normalize``) turns each into CRLF, so the would-be second
  message stays inside the first and reaches the next server dot-stuffed; ``reject``
  refuses such a message with ``550 5.5.2`` (Postfix's ``reject``).
- Timeouts: ``timeout`` (``--smtp-timeout``) bounds the wait for each command line; while
  DATA streams in, each received chunk restarts it (a per-read timeout, as Postfix's
  ``smtpd_timeout``), so big messages on slow links pass. A timed-out client gets a 421.
- Connections: at most ``max_connections`` at once, and ``max_connections_per_ip`` per
  client outside the relay networks; more get ``421 4.7.0`` and are closed. Together with
  the timeout this bounds what slow-loris clients can hold.
- Shutdown (``drain``): a DATA command after SIGTERM gets ``421 4.3.2``; a message already
  streaming may finish within the grace time and is spooled and answered 250 as usual;
  then every remaining client gets 421 and is disconnected.
- AUTH (PLAIN, LOGIN) is offered only with an ``--auth-file``, and only after STARTTLS,
  except to loopback clients.

The session itself is ``protocol.py``'s ``SMTPProtocol`` (a state machine on
``data_received``, with aiosmtpd's handler hooks); ``FedSMTP`` adds the connection limits,
the 421s and shutdown, ``FedHandler`` the decisions.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

from aiosmtpd.smtp import Envelope, Session

from mailferry.mail.addresses import (
    address_key,
    domain_key,
    domain_of,
    has_forbidden,
    is_valid,
    preserve,
    split_physical,
)
from mailferry.mail.messageid import message_id_of

from ..queue.spool import Spool
from ..routing.directory import Directory
from ..telemetry import metrics
from .auth import Authenticator
from .policy import RelayPolicy, client_ip, is_loopback
from .protocol import SMTPProtocol

log = logging.getLogger("fed.smtp")

_BARE_EOL = re.compile(rb"\r\n|\r|\n")
_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
# Commands a normal session sends a handful of times; a client looping on them is hostile.
_CALL_LIMITS = {"EHLO": 10, "HELO": 10, "NOOP": 50, "RSET": 100, "VRFY": 10, "AUTH": 3,
                "STARTTLS": 2, "HELP": 10, "EXPN": 10}
_CALL_LIMIT_DEFAULT = 10_000
SHUTDOWN_REPLY = "421 4.3.2 fed is shutting down, try again later"
# Up to this many open sessions, a message that fits its blank is synced by the loop itself
# (one pwritev and one fdatasync, ~0.3 ms while the others wait) rather than handed to the
# writing thread, whose round trip under a busy loop took 2.4-3.0 ms for a batch of one (it
# waits for the GIL). Measured with bench/fed_ab.sh, two processes, six pairs: 8 against 1,
# at 10 clients (~5 sessions a process) the rate x1.118 and the CPU a message x0.843, at
# 50 clients (~25 a process: batches share their fsyncs) x1.007; with no limit, 50 clients
# lost (0.78-1.12x in four pairs: every message its own fsync).
INLINE_SESSIONS = 8


def normalize_eols(data: bytes) -> bytes:
    """Every line ending as CRLF (bare CR and bare LF included)."""
    return _BARE_EOL.sub(b"\r\n", data)


def has_bare_newline(data: bytes) -> bool:
    """True if the data holds a CR not followed by LF or an LF not preceded by CR.

    Three counts in C instead of a regular expression with a look-behind (4.5 % of fed's
    GIL time per 2 KB message under the relay benchmark, the counts a tenth of that): every
    CR and every LF is part of a CRLF exactly when the three counts agree."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def rfc2822_now() -> str:
    """The local time as in a Received: header (formatted once a second)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, localtime=True))
    return _date_cache[1]


_date_cache = (0, "")


@dataclass
class SmtpSettings:
    """Limits and options of the SMTP listener."""

    hostname: str = "fed.invalid"
    max_size: int = 50 * 1024 * 1024
    max_rcpts: int = 100
    timeout: float = 300.0
    bare_newline: Literal["normalize", "reject"] = "normalize"
    max_connections: int = 500
    max_connections_per_ip: int = 50
    relay: RelayPolicy = field(default_factory=lambda: RelayPolicy(()))
    tls_context: ssl.SSLContext | None = None
    authenticator: Authenticator | None = None


def address_refusal(address: str, envelope: Envelope, what: str) -> str | None:
    """The 5xx for an address no mail system would take, or None."""
    if has_forbidden(address):
        return f"553 5.1.{3 if what == 'recipient' else 7} bad {what} address: " \
               "control character or invalid UTF-8"
    if not address.isascii() and not envelope.smtp_utf8:
        return f"553 5.6.7 non-ASCII {what} address needs SMTPUTF8"
    return None


class FedHandler:
    """The SMTP handler (aiosmtpd's hooks): address hygiene, recipient and relay policy,
    durable acceptance."""

    def __init__(self, directory: Directory, spool: Spool, domains: list[str],
                 settings: SmtpSettings, on_queued: Callable[[], None]) -> None:
        self.directory = directory
        self.spool = spool
        self.domains = {domain_key(d) for d in domains}
        self.settings = settings
        self.hostname = settings.hostname
        self.max_rcpts = settings.max_rcpts
        self.on_queued = on_queued
        self.writing = 0  # DATA writes in progress; shutdown waits for them
        self.stopping = False

    def is_local(self, key: str) -> bool:
        """True if fed itself routes this address (physical of a system, or directory)."""
        physical = split_physical(key)
        if physical is not None:
            return self.directory.system(physical[0]) is not None
        return self.directory.lookup(key) is not None

    def check_recipient(self, key: str) -> str | None:
        """None if fed takes `key` as a local recipient, else the refusal (for a foreign
        domain: the relaying refusal, which the caller may lift)."""
        if not is_valid(key):
            return f"553 5.1.3 <{key}>: bad recipient address syntax"
        physical = split_physical(key)
        if physical is not None:
            if self.directory.system(physical[0]) is None:
                return f"550 5.1.1 <{key}>: unknown system {physical[0]}"
            return None
        if self.directory.lookup(key) is not None:
            return None
        if domain_of(key) in self.domains:
            return f"550 5.1.1 <{key}>: user unknown in directory"
        return f"550 5.7.1 <{preserve(key)}>: relaying denied"

    def handle_EHLO(self, server: SMTPProtocol, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        """Refuse control characters in the name; offer AUTH only when it can succeed."""
        if has_forbidden(hostname):
            return ["501 5.5.2 bad EHLO hostname"]
        session.host_name = hostname
        if self.settings.authenticator is None:
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        return responses

    def handle_HELO(self, server: SMTPProtocol, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        """Refuse control characters in the name."""
        if has_forbidden(hostname):
            return "501 5.5.2 bad HELO hostname"
        session.host_name = hostname
        return f"250 {server.hostname}"

    def handle_MAIL(self, server: SMTPProtocol, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        """Refuse senders no mail system would write."""
        refusal = address_refusal(address, envelope, "sender")
        if refusal is None and address != "<>" and not is_valid(preserve(address)):
            refusal = "553 5.1.7 bad sender address syntax"
        if refusal is not None:
            log.info("refused MAIL from %s: %s", session.peer, refusal)
            return refusal
        envelope.mail_from = address  # as written: bounces go back to exactly this
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    def sender_is_local(self, envelope: Envelope) -> bool:
        """The envelope sender is a mail system's own address (or the null sender)."""
        sender = str(envelope.mail_from or "")
        return sender in ("", "<>") or self.is_local(address_key(sender))

    def handle_RCPT(self, server: SMTPProtocol, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        """Accept or refuse one recipient."""
        if len(envelope.rcpt_tos) >= self.max_rcpts:
            return "452 4.5.3 too many recipients"
        refusal = address_refusal(address, envelope, "recipient")
        if refusal is not None:
            log.info("refused RCPT from %s: %s", session.peer, refusal)
            return refusal
        key = address_key(address)
        refusal = self.check_recipient(key)
        rcpt = key
        if refusal is not None and refusal.startswith("550 5.7.1") \
                and self.settings.relay.may_relay(session.peer, bool(session.authenticated),
                                                  self.sender_is_local(envelope)):
            refusal, rcpt = None, preserve(address)
        if refusal is not None:
            log.info("refused RCPT <%s> from %s: %s", key, session.peer, refusal)
            metrics.count_refused(refusal[:3])
            return refusal
        envelope.rcpt_tos.append(rcpt)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        """Spool the message durably, then (only then) acknowledge it."""
        raw = envelope.original_content or b""
        assert isinstance(raw, bytes)
        if has_bare_newline(raw):
            if self.settings.bare_newline == "reject":
                log.info("refused DATA from %s: bare CR or LF", session.peer)
                metrics.count_refused("550")
                return "550 5.5.2 bare <CR> or <LF> in message data (RFC 5321 2.3.8)"
            raw = normalize_eols(raw)
        queue_id = self.spool.take_queue_id()  # a blank's, when one is ready
        # Header and body stay two pieces (the spool writes both): no copy of a big message.
        data = [self.received_header(session, envelope, queue_id), raw]
        size = sum(map(len, data))
        mail_from = envelope.mail_from or ""
        # Few connections: the loop may sync this message itself (Spool.accept's `quiet`).
        quiet = isinstance(server, FedSMTP) and server.connections.total <= INLINE_SESSIONS
        self.writing += 1
        try:
            await self.spool.accept(queue_id, mail_from, list(envelope.rcpt_tos), data,
                                    message_id_of(raw), quiet=quiet)
        except Exception:
            log.exception("could not spool a message from %s", session.peer,
                          extra={"queue_id": queue_id})
            return "451 4.3.0 could not queue the message, try again later"
        finally:
            self.writing -= 1
        log.info("%s queued: from=<%s> rcpts=%s size=%d client=%s", queue_id, mail_from,
                 ",".join(envelope.rcpt_tos), size, _ip(session),
                 extra={"queue_id": queue_id})
        metrics.count_accepted(size)
        self.on_queued()
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def received_header(self, session: Session, envelope: Envelope, queue_id: str) -> bytes:
        """The trace header fed adds (client-supplied names sanitised)."""
        helo = _UNSAFE.sub("", str(session.host_name or "unknown"))[:64] or "unknown"
        ip = _UNSAFE.sub("", _ip(session)) or "unknown"
        proto = ("ESMTP" if session.extended_smtp else "SMTP") \
            + ("S" if session.ssl is not None else "") \
            + ("A" if session.authenticated else "")
        single = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
        rcpt = f"\r\n\tfor <{single}>" if single else ""
        date = rfc2822_now()
        return (f"Received: from {helo} ([{ip}])\r\n\tby {self.hostname} (mailferry fed) "
                f"with {proto} id {queue_id}{rcpt}; {date}\r\n").encode("utf-8", "replace")


def _ip(session: Session) -> str:
    ip = client_ip(session.peer)
    return str(ip) if ip is not None else "unknown"


class Connections:
    """Open SMTP connections, in total and per client IP (in memory, event loop only)."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def admit(self, peer: object) -> str | None:
        """Count a new connection; None if admitted, else the 421 to send."""
        ip = str(client_ip(peer))
        if self.total >= self.settings.max_connections:
            return "421 4.7.0 too many connections, try again later"
        if self.per_ip[ip] >= self.settings.max_connections_per_ip \
                and not self.settings.relay.in_networks(peer):
            return "421 4.7.0 too many connections from your address, try again later"
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def leave(self, peer: object) -> None:
        """Forget an admitted connection."""
        ip = str(client_ip(peer))
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class FedSMTP(SMTPProtocol):
    """fed's SMTP session: connection limits, the timeout's 421, refusals while stopping."""

    def __init__(self, handler: FedHandler, settings: SmtpSettings,
                 connections: Connections) -> None:
        super().__init__(
            handler, hostname=settings.hostname, ident="mailferry fed",
            data_size_limit=settings.max_size, timeout=settings.timeout,
            tls_context=settings.tls_context, authenticator=settings.authenticator,
            call_limits=_CALL_LIMITS, call_limit_default=_CALL_LIMIT_DEFAULT)
        self.handler = handler
        self.connections = connections
        self.refusal: str | None = None
        self.admitted = False

    @property
    def in_data(self) -> bool:
        """A message is streaming in (shutdown lets it finish)."""
        return self._data is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection and place AUTH (on loopback nobody can sniff a password:
        AUTH needs no TLS there)."""
        peer = transport.get_extra_info("peername")
        self.refusal = self.connections.admit(peer)
        self.admitted = self.refusal is None
        self.auth_require_tls = not is_loopback(peer)
        super().connection_made(transport)

    def greeting(self) -> str:
        """220, or the 421 of a connection over the limits."""
        if self.refusal is not None:
            log.warning("refused connection from %s: %s",
                        self.session.peer if self.session else None, self.refusal)
            return self.refusal
        return super().greeting()

    def connection_lost(self, exc: Exception | None) -> None:
        """Release the connection's slot."""
        if self.admitted:
            self.admitted = False
            assert self.session is not None
            self.connections.leave(self.session.peer)
        super().connection_lost(exc)

    def may_start_data(self) -> bool:
        """DATA is refused once fed is stopping (a message already streaming may still
        finish, see drain)."""
        if self.handler.stopping:
            self.push(SHUTDOWN_REPLY)
            self.close()
            return False
        return True


def _writable(transport: object) -> TypeGuard[asyncio.WriteTransport]:
    """An open transport we can still write to (asyncio's, or uvloop's, which does not
    inherit from asyncio.WriteTransport)."""
    return callable(getattr(transport, "write", None)) and not getattr(
        transport, "is_closing", lambda: True)()


async def drain(handler: FedHandler, sessions: Iterable[SMTPProtocol], deadline: float
                ) -> None:
    """Shutdown: let messages already streaming finish (and be spooled and answered) until
    `deadline` (monotonic), then tell every remaining client 421 and close."""
    handler.stopping = True
    for _ in range(100_000):  # bounded: 0.01 s steps, and the deadline below
        busy = handler.writing or any(isinstance(s, FedSMTP) and s.in_data
                                      for s in list(sessions))
        if not busy or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.01)
    for session in list(sessions):
        transport = session.transport
        if _writable(transport):
            transport.write(SHUTDOWN_REPLY.encode() + b"\r\n")
            transport.close()


def make_factory(handler: FedHandler, settings: SmtpSettings,
                 track: Callable[[SMTPProtocol], Any]) -> Callable[[], SMTPProtocol]:
    """The protocol factory of the SMTP listener (one FedSMTP per connection)."""
    connections = Connections(settings)

    def factory() -> SMTPProtocol:
        session = FedSMTP(handler, settings, connections)
        track(session)
        return session

    return factory
