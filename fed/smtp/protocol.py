"""A lean SMTP server session: one ``asyncio.Protocol`` state machine per connection.

Why not aiosmtpd: it runs a task per connection that reads each command with a
``StreamReader``, awaits a coroutine per command and a ``drain`` per reply line. At one
message per connection (the relay benchmark's load, and what most mail systems do) that
machinery was most of fed's CPU per message. Here ``data_received`` parses the commands
already in the buffer, answers them at once and writes the replies of a pipelined group
with one ``write``; a task exists only while a handler hook really waits (the spool's
group commit after DATA, an AUTH exchange, the TLS handshake).

What it keeps from aiosmtpd: the handler hooks and their arguments
(``handle_EHLO(server, session, envelope, hostname, responses)``, ``handle_HELO``,
``handle_MAIL(..., address, mail_options)``, ``handle_RCPT``, ``handle_DATA``,
``handle_RSET``, ``handle_NOOP``, ``handle_QUIT``; a hook may return its reply or an
awaitable of it), aiosmtpd's ``Session``/``Envelope``/``AuthResult`` objects, its replies
and its limits: a command line over 512 octets (MAIL: 548 after EHLO, for SIZE and
SMTPUTF8) or over 1001 before its end gets ``500 Command line too long``; a DATA line
over 1001 octets (CRLF included) ``500 Line too long``; more data than
``data_size_limit`` ``552``, both after the data; ``SIZE=`` over the limit ``552`` at
MAIL; per-command call limits (``421 4.7.0 X sent too many times``, then close) and five
unknown commands at most. DATA ends only at ``<CR><LF>.<CR><LF>`` (or a first line
``.<CR><LF>``), lines are CRLF-terminated (a bare CR or LF is data), a line's leading dot
is removed (RFC 5321 4.5.2). Extensions: PIPELINING, SIZE, 8BITMIME, SMTPUTF8, STARTTLS
(with a TLS context), AUTH PLAIN and LOGIN (with an authenticator; off loopback only after
STARTTLS).

Memory: the DATA phase appends what arrives to one ``bytearray`` (no list of lines), which
becomes the message's one ``bytes`` once complete; data over the size limit is not kept.
Input waiting while a hook runs is bounded (reading pauses above ``_PAUSE_AT``), and so is
output a client does not read (reading pauses while the transport's buffer is full).
"""

from __future__ import annotations

import asyncio
import binascii
import inspect
import logging
import ssl
from base64 import b64decode, b64encode
from collections.abc import Awaitable, Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

log = logging.getLogger("fed.smtp.protocol")

COMMAND_SIZE_LIMIT = 512  # RFC 5321 4.5.3.1.4, as aiosmtpd
LINE_LENGTH_LIMIT = 1001  # RFC 5321 4.5.3.1.6 (1000 octets and the LF), as aiosmtpd
MAIL_EXTRA = 26 + 10  # room for SIZE= and SMTPUTF8 on MAIL after EHLO (aiosmtpd's)
BOGUS_LIMIT = 5  # unknown commands before the session is closed
_PAUSE_AT = 256 * 1024  # unprocessed input held while a hook runs, at most (about)
_END = b"\r\n.\r\n"
_HELP = "250 Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"
AuthMechanism = Callable[["SMTPProtocol", list[str]], Awaitable[AuthResult]]
Authenticator = Callable[[Any, Session, Envelope, str, Any], AuthResult]


def parse_address(arg: str, local_part_limit: int = 0) -> tuple[str | None, str]:
    """(address, rest) of a MAIL/RCPT argument as aiosmtpd parses it; address None when it
    does not parse, ``""`` when `arg` is empty. The plain ``<user@domain>`` form is cut out
    directly (the same answer as the header parser, tests/test_fed_smtp_protocol.py)."""
    text = arg.lstrip()
    if not text:
        return "", ""
    if text[0] == "<":
        end = text.find(">")
        if end > 0:
            inner = text[1:end]
            local, at, domain = inner.rpartition("@")
            if at and _plain_local(local) and _plain_domain(domain):
                if local_part_limit and len(local) > local_part_limit:
                    return None, ""
                return inner, text[end + 1:].lstrip()
    address: Any
    try:
        if text.startswith("<"):
            address, rest = get_angle_addr(text)
        else:
            address, rest = get_addr_spec(text)
    except HeaderParseError:
        return None, ""
    addr: str = address.addr_spec
    if local_part_limit and len(addr.rpartition("@")[0]) > local_part_limit:
        return None, ""
    return addr, rest


_ATEXT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                   "!#$%&'*+/=?^_`{|}~-")
_LDH = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")


def _plain_local(local: str) -> bool:
    """A dot-atom local part: atext runs separated by single dots."""
    return all(part and _ATEXT.issuperset(part) for part in local.split("."))


def _plain_domain(domain: str) -> bool:
    """Labels of letters, digits and hyphens separated by single dots."""
    return all(part and _LDH.issuperset(part) for part in domain.split("."))


def _params(options: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters as aiosmtpd reads them (None if one is malformed)."""
    result: dict[str, str | bool] = {}
    for option in options:
        name, eq, value = option.partition("=")
        if not name.isalnum() or (eq and not value):
            return None
        result[name] = value if eq else True
    return result


class SMTPProtocol(asyncio.Protocol):
    """One SMTP server session (see the module docstring)."""

    line_length_limit = LINE_LENGTH_LIMIT
    command_size_limit = COMMAND_SIZE_LIMIT
    local_part_limit = 0
    AuthLoginUsernameChallenge = "User Name\x00"
    AuthLoginPasswordChallenge = "Password\x00"

    def __init__(self, handler: Any, *, hostname: str, ident: str = "ESMTP",
                 data_size_limit: int = 32 * 1024 * 1024, timeout: float = 300.0,
                 tls_context: ssl.SSLContext | None = None,
                 authenticator: Authenticator | None = None, auth_require_tls: bool = True,
                 call_limits: dict[str, int] | None = None, call_limit_default: int = 10_000,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.event_handler = handler
        self.hostname = hostname
        self.ident = ident
        self.data_size_limit = data_size_limit
        self.timeout = timeout
        self.tls_context = tls_context
        self.authenticator = authenticator
        self.auth_require_tls = auth_require_tls
        self.loop = loop or asyncio.get_running_loop()
        self._calls_left = dict(call_limits or {})
        self._call_default = call_limit_default
        self._bogus_left = BOGUS_LIMIT
        self._hooks: dict[str, Callable[..., Any]] = {
            name[7:]: getattr(handler, name) for name in
            ("handle_EHLO", "handle_HELO", "handle_MAIL", "handle_RCPT", "handle_DATA",
             "handle_RSET", "handle_NOOP", "handle_QUIT") if hasattr(handler, name)}
        self._auth_methods: dict[str, AuthMechanism] = (
            {"LOGIN": SMTPProtocol.auth_LOGIN, "PLAIN": SMTPProtocol.auth_PLAIN}
            if authenticator is not None else {})
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.envelope = Envelope()
        self.tls_active = False
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._busy = False  # a hook (or AUTH, or the TLS handshake) is running
        self._closing = False
        self._write_paused = False
        self._reading_paused = False
        self._discarding = False  # skipping the rest of an over-long command line
        self._line_waiter: asyncio.Future[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        # The DATA phase (None outside it): the message so far, behind a CRLF sentinel.
        self._data: bytearray | None = None
        self._data_size = 0
        self._data_problem = ""
        self._data_scanned = 0
        self._activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._commands: dict[str, Callable[[str | None], None]] = {
            "EHLO": self.smtp_EHLO, "HELO": self.smtp_HELO, "MAIL": self.smtp_MAIL,
            "RCPT": self.smtp_RCPT, "DATA": self.smtp_DATA, "RSET": self.smtp_RSET,
            "NOOP": self.smtp_NOOP, "QUIT": self.smtp_QUIT, "VRFY": self.smtp_VRFY,
            "HELP": self.smtp_HELP, "EXPN": self.smtp_EXPN, "AUTH": self.smtp_AUTH,
            "STARTTLS": self.smtp_STARTTLS}

    # -- connection -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Greet (subclasses may refuse instead: ``greeting``)."""
        self.transport = transport  # type: ignore[assignment]  # uvloop's: no subclass
        self.session = Session(self.loop)
        self.session.peer = transport.get_extra_info("peername")
        self._touch()
        self._timer = self.loop.call_later(self.timeout, self._check_timeout)
        greeting = self.greeting()
        self.push(greeting)
        self._flush()
        if not greeting.startswith("220"):
            self.close()

    def greeting(self) -> str:
        """The first reply; anything but a 220 closes the connection after it."""
        return f"220 {self.hostname} {self.ident}"

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; a DATA phase in progress is dropped (no hook runs)."""
        self.transport = None
        self._closing = True
        self._data = None
        self._buffer = bytearray()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._line_waiter is not None and not self._line_waiter.done():
            self._line_waiter.set_exception(ConnectionResetError("connection lost"))

    def eof_received(self) -> bool:
        """The client closed its side: close ours (an accept in progress still finishes)."""
        return False

    def pause_writing(self) -> None:
        """The client does not read its replies: stop reading its commands."""
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        """Replies drain again."""
        self._write_paused = False
        if not self._busy:
            self._resume_reading()
            self._process()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._write_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Write what is pending and close the connection."""
        self._flush()
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    # -- timeout: one timer per session, re-armed lazily ---------------------------------
    def _touch(self) -> None:
        self._activity = self.loop.time()

    def _check_timeout(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        left = self._activity + self.timeout - self.loop.time()
        if left > 0:
            self._timer = self.loop.call_later(left, self._check_timeout)
            return
        self.on_timeout()

    def on_timeout(self) -> None:
        """The client sent nothing for `timeout` seconds: 421 and close."""
        log.info("%r connection timeout", self.session.peer if self.session else None)
        self.push("421 4.4.2 timeout exceeded, closing connection")
        self.close()

    # -- output -------------------------------------------------------------------------
    def push(self, status: str | bytes) -> None:
        """Queue one reply line (written at the end of the current input, or before a
        hook waits)."""
        self._out.append((status.encode("utf-8", "surrogateescape")
                          if isinstance(status, str) else status) + b"\r\n")

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))

    # -- input --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Parse and answer whatever complete commands (or DATA) arrived."""
        if self._closing:
            return
        if self._data is not None and not self._busy:
            self._touch()  # per-read timeout while a message streams in
            self._data_chunk(data)
        else:
            self._buffer += data
        if self._busy:
            if len(self._buffer) > _PAUSE_AT:
                self._pause_reading()
            return
        self._process()

    def _process(self) -> None:
        """Run commands from the buffer until it holds no complete line or a hook waits."""
        buffer = self._buffer
        while not self._busy and not self._closing and not self._write_paused:
            if self._data is not None:
                if buffer:
                    chunk = bytes(buffer)
                    buffer.clear()
                    self._data_chunk(chunk)
                    continue
                break
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > self.line_length_limit:  # no end in sight: skip it
                    buffer.clear()
                    self._discarding = True
                break
            line = bytes(buffer[:end + 1])
            del buffer[:end + 1]
            if self._discarding or len(line) > self.line_length_limit:
                self._discarding = False
                self.push("500 Command line too long")
                continue
            if self._line_waiter is not None:  # an AUTH exchange reads this line
                waiter, self._line_waiter = self._line_waiter, None
                if not waiter.done():
                    waiter.set_result(line)
                self._busy = True  # the AUTH task goes on; it resumes processing
                break
            self._command(line.rstrip(b"\r\n"))
        self._flush()
        if not self._busy and len(buffer) <= _PAUSE_AT:
            self._resume_reading()

    def _command(self, line: bytes) -> None:
        if not line:
            self.push("500 Error: bad syntax")
            return
        name_bytes, _, arg_bytes = line.partition(b" ")
        try:
            name = name_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            self.push("500 Error: bad syntax")
            return
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape") if arg_bytes else None
        assert self.session is not None
        limit = self.command_size_limit
        if name == "MAIL" and self.session.extended_smtp:
            limit += MAIL_EXTRA
        if len(line) > limit:
            self.push("500 Command line too long")
            return
        left = self._calls_left.get(name, self._call_default)
        if left < 1:
            log.warning("%r over limit for %s", self.session.peer, name)
            self.push(f"421 4.7.0 {name} sent too many times")
            self.close()
            return
        self._calls_left[name] = left - 1
        method = self._commands.get(name)
        if method is None:
            self._bogus_left -= 1
            if self._bogus_left < 1:
                log.warning("%r too many bogus commands", self.session.peer)
                self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                self.close()
                return
            self.push(f'500 Error: command "{name}" not recognized')
            return
        self._touch()
        method(arg)

    # -- hooks --------------------------------------------------------------------------
    def _hook(self, name: str, *args: Any) -> Any:
        """The handler hook's result (an awaitable for async hooks), or None if absent."""
        hook = self._hooks.get(name)
        if hook is None:
            return None
        return hook(self, self.session, self.envelope, *args)

    def _then(self, result: Any, reply: Callable[[Any], None]) -> None:
        """Call `reply` with the hook's result: now, or once an async hook finished (the
        session waits meanwhile; replies so far are written first)."""
        if not inspect.isawaitable(result):
            reply(result)
            return
        self._run(self._await_then(result, reply))

    async def _await_then(self, result: Awaitable[Any], reply: Callable[[Any], None]
                          ) -> None:
        reply(await result)

    def _run(self, coroutine: Awaitable[None]) -> None:
        """Run `coroutine` with the session paused; processing resumes after it."""
        self._busy = True
        self._flush()
        self._task = self.loop.create_task(self._guarded(coroutine))

    async def _guarded(self, coroutine: Awaitable[None]) -> None:
        try:
            await coroutine
        except (ConnectionError, asyncio.CancelledError):
            self.close()
        except Exception as exc:
            log.exception("%r SMTP session error",
                          self.session.peer if self.session else None)
            self.push(f"451 4.3.0 Error: ({type(exc).__name__}) try again later")
        finally:
            self._task = None
            self._busy = False
        if self.transport is not None and not self._closing:
            self._process()
        else:
            self._flush()

    # -- commands -----------------------------------------------------------------------
    def _reset(self) -> None:
        self.envelope = Envelope()

    def _helo_needed(self, helo: str = "HELO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            self.push(f"503 Error: send {helo} first")
            return True
        return False

    def smtp_HELO(self, arg: str | None) -> None:
        """HELO: plain SMTP."""
        if not arg:
            self.push("501 Syntax: HELO hostname")
            return
        self._reset()
        assert self.session is not None
        self.session.extended_smtp = False

        def reply(status: Any) -> None:
            if status is None:
                assert self.session is not None
                self.session.host_name = arg
                status = f"250 {self.hostname}"
            self.push(status)
        self._then(self._hook("HELO", arg), reply)

    def ehlo_lines(self) -> list[str]:
        """The EHLO reply before the hook sees it."""
        lines = [f"250-{self.hostname}", "250-PIPELINING"]
        if self.data_size_limit:
            lines.append(f"250-SIZE {self.data_size_limit}")
        lines += ["250-8BITMIME", "250-SMTPUTF8"]
        if self.tls_context is not None and not self.tls_active:
            lines.append("250-STARTTLS")
        if self._auth_methods and (not self.auth_require_tls or self.tls_active):
            lines.append("250-AUTH " + " ".join(sorted(self._auth_methods)))
        lines.append("250 HELP")
        return lines

    def smtp_EHLO(self, arg: str | None) -> None:
        """EHLO: the extensions (the hook may change the list)."""
        if not arg:
            self.push("501 Syntax: EHLO hostname")
            return
        self._reset()
        assert self.session is not None
        self.session.extended_smtp = True
        lines = self.ehlo_lines()

        def reply(status: Any) -> None:
            assert self.session is not None
            if status is None:
                self.session.host_name = arg
                status = lines
            for line in [status] if isinstance(status, str) else status:
                self.push(line)
        self._then(self._hook("EHLO", arg, lines), reply)

    def smtp_NOOP(self, arg: str | None) -> None:
        """NOOP."""
        self._then(self._hook("NOOP", arg), lambda s: self.push(s or "250 OK"))

    def smtp_QUIT(self, arg: str | None) -> None:
        """QUIT: 221 and close."""
        if arg:
            self.push("501 Syntax: QUIT")
            return

        def reply(status: Any) -> None:
            self.push(status or "221 Bye")
            self.close()
        self._then(self._hook("QUIT"), reply)

    def smtp_RSET(self, arg: str | None) -> None:
        """RSET: forget the transaction."""
        if arg:
            self.push("501 Syntax: RSET")
            return
        self._reset()
        self._then(self._hook("RSET"), lambda s: self.push(s or "250 OK"))

    def smtp_HELP(self, arg: str | None) -> None:
        """HELP: the commands."""
        self.push(_HELP if not arg else "501 " + _HELP[4:])

    def smtp_VRFY(self, arg: str | None) -> None:
        """VRFY: never says (as aiosmtpd)."""
        if not arg:
            self.push("501 Syntax: VRFY <address>")
        elif parse_address(arg, self.local_part_limit)[0] is None:
            self.push("502 Could not VRFY " + arg)
        else:
            self.push("252 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: str | None) -> None:
        """EXPN: not offered."""
        self.push("502 EXPN not implemented")

    def _address_arg(self, keyword: str, arg: str | None, syntax: str
                     ) -> tuple[str, list[str]] | None:
        """(address, upper-cased options) of MAIL/RCPT, or None once refused."""
        assert self.session is not None
        if self.session.extended_smtp:
            syntax += " [SP <mail-parameters>]"
        if arg is None or arg[:len(keyword)].upper() != keyword:
            self.push(syntax)
            return None
        address, rest = parse_address(arg[len(keyword):].strip(), self.local_part_limit)
        if address is None:
            self.push("553 5.1.3 Error: malformed address")
            return None
        if not address or (rest and not self.session.extended_smtp):
            self.push(syntax)
            return None
        return address, rest.upper().split()

    def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL FROM: with SIZE, BODY and SMTPUTF8."""
        if self._helo_needed():
            return
        syntax = "501 Syntax: MAIL FROM: <address>"
        parsed = self._address_arg("FROM:", arg, syntax)
        if parsed is None:
            return
        address, options = parsed
        if self.envelope.mail_from:
            self.push("503 Error: nested MAIL command")
            return
        params = _params(options)
        if params is None:
            self.push(syntax + (" [SP <mail-parameters>]" if self.session
                                and self.session.extended_smtp else ""))
            return
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            self.push("501 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if not isinstance(smtputf8, bool):
            self.push("501 Error: SMTPUTF8 takes no arguments")
            return
        self.envelope.smtp_utf8 = smtputf8
        size = params.pop("SIZE", None)
        if size:
            if isinstance(size, bool) or not size.isdigit():
                self.push(syntax)
                return
            if self.data_size_limit and int(size) > self.data_size_limit:
                self.push("552 Error: message size exceeds fixed maximum message size")
                return
        if params:
            self.push("555 MAIL FROM parameters not recognized or not implemented")
            return

        def reply(status: Any) -> None:
            if status is None:
                self.envelope.mail_from = address
                self.envelope.mail_options.extend(options)
                status = "250 OK"
            self.push(status)
        self._then(self._hook("MAIL", address, options), reply)

    def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT TO: (no parameters)."""
        if self._helo_needed():
            return
        if not self.envelope.mail_from:
            self.push("503 Error: need MAIL command")
            return
        syntax = "501 Syntax: RCPT TO: <address>"
        parsed = self._address_arg("TO:", arg, syntax)
        if parsed is None:
            return
        address, options = parsed
        params = _params(options)
        if params is None:
            self.push(syntax)
            return
        if params:
            self.push("555 RCPT TO parameters not recognized or not implemented")
            return

        def reply(status: Any) -> None:
            if status is None:
                self.envelope.rcpt_tos.append(address)
                self.envelope.rcpt_options.extend(options)
                status = "250 OK"
            self.push(status)
        self._then(self._hook("RCPT", address, options), reply)

    # -- DATA ---------------------------------------------------------------------------
    def smtp_DATA(self, arg: str | None) -> None:
        """DATA: 354, then the message (``_data_chunk``) until the end marker."""
        if self._helo_needed():
            return
        if not self.envelope.rcpt_tos:
            self.push("503 Error: need RCPT command")
            return
        if arg:
            self.push("501 Syntax: DATA")
            return
        if not self.may_start_data():
            return
        self.push("354 End data with <CR><LF>.<CR><LF>")
        self._data = bytearray(b"\r\n")  # the sentinel: a first line "." ends it too
        self._data_size = 0
        self._data_problem = ""
        self._data_scanned = 0

    def may_start_data(self) -> bool:
        """A subclass may refuse DATA here (it pushes the reply); True to go on."""
        return True

    def _data_chunk(self, chunk: bytes) -> None:
        """Add what arrived to the message; at the end marker, hand it to the hook."""
        data = self._data
        assert data is not None
        start = max(0, len(data) - 4)
        data += chunk
        end = data.find(_END, start)
        if end < 0:
            self._data_size += len(chunk)
            self._check_data(data, len(data))
            return
        rest = bytes(data[end + 5:])
        self._data_size += len(chunk) - len(rest) - 3  # the "." line is no data
        del data[end + 2:]  # the message and its last CRLF, behind the sentinel
        self._check_data(data, len(data))
        self._data = None
        if rest:
            self._buffer[:0] = rest  # pipelined commands after the message
        if self._data_problem:
            self.push(self._data_problem)
            self._reset()
            return
        if data.find(b"\r\n.") >= 0:  # RFC 5321 4.5.2: a line's leading dot goes
            data = data.replace(b"\r\n.", b"\r\n")
        del data[:2]
        content = bytes(data)
        del data
        self.envelope.content = content
        self.envelope.original_content = content
        if "DATA" not in self._hooks:
            self._reset()
            self.push("250 OK")
            return

        def reply(status: Any) -> None:
            self._reset()
            self.push(status or "250 OK")
        self._then(self._hook("DATA"), reply)

    def _check_data(self, data: bytearray, upto: int) -> None:
        """Size and line-length checks of the data so far; once one fails, only the last
        bytes are kept (to find the end marker) and the reply waits for the end."""
        if not self._data_problem:
            if self.data_size_limit and self._data_size > self.data_size_limit:
                self._data_problem = "552 Error: Too much mail data"
            else:
                # From the start of the line open at the last check (the sentinel's
                # CRLF is always found) to what is here now.
                first = data.rfind(b"\r\n", 0, max(2, self._data_scanned)) + 2
                if upto - first > self.line_length_limit and _longest_line(
                        data, first, upto) > self.line_length_limit - 2:
                    self._data_problem = "500 Line too long (see RFC5321 4.5.3.1.6)"
                self._data_scanned = upto
        if self._data_problem and len(data) > 4:
            del data[:-4]
            self._data_scanned = 0

    # -- AUTH ---------------------------------------------------------------------------
    def smtp_AUTH(self, arg: str | None) -> None:
        """AUTH PLAIN / LOGIN (aiosmtpd's replies)."""
        if self._helo_needed("EHLO"):
            return
        assert self.session is not None
        if not self.session.extended_smtp:
            self.push("500 Error: command 'AUTH' not recognized")
        elif self.auth_require_tls and not self.tls_active:
            self.push("538 5.7.11 Encryption required for requested authentication "
                      "mechanism")
        elif self.session.authenticated:
            self.push("503 Already authenticated")
        elif not arg:
            self.push("501 Not enough value")
        elif len(arg.split()) > 2:
            self.push("501 Too many values")
        elif arg.split()[0] not in self._auth_methods:
            self.push("504 5.5.4 Unrecognized authentication type")
        else:
            self._run(self._auth(arg.split()))

    async def _auth(self, args: list[str]) -> None:
        result = await self._auth_methods[args[0]](self, args)
        assert self.session is not None
        if result.success:
            self.session.authenticated = True
            self.session.auth_data = result.auth_data
            self.push(result.message or "235 2.7.0 Authentication successful")
        elif not result.handled:
            self.push(result.message or "535 5.7.8 Authentication credentials invalid")

    async def readline(self) -> bytes:
        """The client's next line (during AUTH)."""
        self._flush()
        self._line_waiter = self.loop.create_future()
        self._busy = False
        self._process()  # a line may be waiting already
        return await self._line_waiter

    async def challenge_auth(self, challenge: str) -> bytes | None:
        """334 + base64 challenge; the decoded answer, or None (already answered)."""
        self.push(b"334 " + b64encode(challenge.encode()))
        line = (await self.readline()).strip()
        if line == b"*":
            self.push("501 5.7.0 Auth aborted")
            return None
        try:
            return b64decode(line, validate=True)
        except binascii.Error:
            self.push("501 5.5.2 Can't decode base64")
            return None

    def _check_login(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        assert self.authenticator is not None and self.session is not None
        return self.authenticator(self, self.session, self.envelope, mechanism,
                                  LoginPassword(login, password))

    async def auth_PLAIN(self, args: list[str]) -> AuthResult:
        """RFC 4616: authzid NUL login NUL password."""
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is None:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return self._check_login("PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, args: list[str]) -> AuthResult:
        """The LOGIN exchange: user name, then password."""
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is None:
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is None:
            return AuthResult(success=False, handled=True)
        return self._check_login("LOGIN", login, password)

    # -- STARTTLS -----------------------------------------------------------------------
    def smtp_STARTTLS(self, arg: str | None) -> None:
        """STARTTLS: 220, the handshake, then a new session (RFC 3207 4.2)."""
        if arg:
            self.push("501 Syntax: STARTTLS")
        elif self.tls_context is None:
            self.push("454 TLS not available")
        elif self.tls_active:
            self.push("503 5.5.1 TLS already active")
        else:
            self.push("220 Ready to start TLS")
            self._buffer.clear()  # RFC 3207 4.2: nothing sent in clear counts
            self._run(self._start_tls(self.tls_context))

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        transport = self.transport
        assert transport is not None
        try:
            new = await self.loop.start_tls(transport, self, context, server_side=True,
                                            ssl_handshake_timeout=self.timeout)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("%r TLS handshake failed: %s",
                     self.session.peer if self.session else None, exc)
            transport.close()
            self.connection_lost(None)  # the TLS layer may not tell us: forget it here
            return
        if new is None:
            return
        self.transport = new
        peer = self.session.peer if self.session else None
        self.session = Session(self.loop)
        self.session.peer = peer
        self.session.ssl = {"ssl_object": new.get_extra_info("ssl_object")}
        self.tls_active = True
        self._reset()


def _longest_line(data: bytearray, start: int, end: int) -> int:
    """Length (without CRLF) of the longest CRLF-terminated line touching data[start:end];
    the open last line counts as it stands (a CR at its end may be half of its CRLF)."""
    lines = data[start:end].split(b"\r\n")
    last = lines.pop()
    open_length = len(last) - (1 if last.endswith(b"\r") else 0)
    return max(max(map(len, lines), default=0), open_length)
