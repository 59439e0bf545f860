"""A small pipelined asyncio IMAP4rev1 client: just what the data mover needs, fast.

Why our own and not a library: the mover's speed comes from keeping many commands in flight
on one connection (RFC 3501 section 5.5) and from streaming FETCH responses straight into
the hash and the next APPEND with back-pressure. `imaplib` and `imapclient` (on top of it)
are synchronous: one command, one round trip, every response buffered whole. `aioimaplib`
is asyncio but buffers each command's whole response before returning it (a `UID FETCH 1:*
BODY.PEEK[]` of a 2 GB folder would sit in memory) and sends literals one continuation at
a time (no LITERAL+, no MULTIAPPEND). So this module implements the subset we use, with:

- tags matched to commands, several commands in flight, responses read by one task;
- untagged responses routed to the command that asked for them (FETCH by UID range), with
  an async handler per command: while the handler awaits (a full queue downstream), the
  reader stops reading the socket, and TCP back-pressure bounds memory;
- literals read exactly (`{n}`), sent with LITERAL+ (`{n+}`) when the server has it,
  otherwise after the server's continuation request;
- a parser for the response grammar we meet (atoms, quoted strings, literals, lists);
- TLS: implicit (IMAPS) or STARTTLS, certificates always verified. With STARTTLS required,
  a server that does not offer it, refuses it or shows an untrusted certificate gets no
  login at all (`ImapTlsError`, naming host and reason, never retried): the password is
  never sent in cleartext;
- capabilities taken from the greeting and the login's OK when the server puts them there
  (Dovecot does): two round trips fewer per connection;
- pipelining that every server accepts (RFC 3501 5.5): nothing is sent behind a command
  that changes the session's state (LOGIN, AUTHENTICATE, STARTTLS, SELECT, EXAMINE,
  UNSELECT, CLOSE) until it completes; Cyrus answers a command pipelined behind
  AUTHENTICATE with BAD and loses the one after it (issue 21);
- a protocol error stops pipelining on the connection with a logged warning, never a
  silent wait for a timeout: a BAD to a command sent while others were in flight is sent
  once more alone; a tagged reply for no command in flight (the server misread the stream)
  fails what is in flight at once (`ImapProtocolError`, retried on a new connection, which
  does not pipeline to that server either);
- bodies whose only use is their hash (a read-back) may be hashed as they stream in
  (`digest_over`): a `Digest` instead of the bytes, so a big message is not held twice.

Errors: a NO or BAD answer raises `ImapCommandError` (the connection stays usable); a broken
connection raises `ImapConnectionError` in every pending command (the caller reconnects and
resumes: the mover's manifest makes that safe).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Union, cast

from mailferry.mail.imap.quoting import quote
from mailferry.mail.imap.sasl import failure_detail, initial_response
from mailferry.mail.imap.servers import family_of
from mailferry.mail.imap.wire import ChunkSource, Wire, open_wire
from mailferry.mail.tls import client_context

Value = Union[bytes, int, None, "list[Value]"]
Untagged = list[Value]  # one untagged response, parsed: [b"12", b"FETCH", [...]]
Handler = Callable[[Untagged], Awaitable[None] | None]

_LITERAL_END = re.compile(rb"\{(\d+)\+?\}\r\n$")
_TOKEN = re.compile(
    rb'[ \t]*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|((?:[^\s()"\[\]]|\[[^\]]*\])+))'
)
_LITERAL_MARK = object()
MAX_LITERAL = 1 << 31  # a message larger than 2 GiB is refused rather than read
_CHUNK = 1 << 18  # what one read of a literal read in chunks asks for (it may get less)
# Commands that change the session's state: nothing may follow them on the wire until they
# complete (RFC 3501 5.5; servers differ in what they do otherwise).
BARRIERS = frozenset({"LOGIN", "AUTHENTICATE", "STARTTLS", "SELECT", "EXAMINE", "UNSELECT",
                      "CLOSE", "LOGOUT"})
# Servers (host, port) that made a protocol error in this process: no pipelining to them
NO_PIPELINING: set[tuple[str, int]] = set()
log = logging.getLogger("mailferry.mover.imap")


class Digest(bytes):
    """A body that was hashed as it streamed in and not kept: empty bytes carrying its
    content hash (sha256 of its wire form) and size."""

    sha256: str
    size: int
    raw: bool  # sha256 of the bytes as received, not of their wire form (`digest_raw`)

    @classmethod
    def of(cls, sha256: str, size: int, *, raw: bool = False) -> Digest:
        made = cls(b"")
        made.sha256, made.size, made.raw = sha256, size, raw
        return made


_BARE_LF = re.compile(rb"(?<!\r)\n")
# The same test, written to start with its literal: sre then skips to each LF at memchr
# speed and looks behind only there (1.2 GB/s on the benchmark's text, where the two
# `count`s it replaces ran at 0.5 GB/s together, `count(b"\r\n")` being the slow one).
_LF_WITHOUT_CR = re.compile(rb"\n(?<!\r\n)")


def has_bare_lf(data: bytes | memoryview, start: int = 0) -> bool:
    """Whether `data` has an LF that no CR precedes, from `start` on (an LF at 0 has none
    before it: the caller knows whether the previous chunk ended with a CR)."""
    return _LF_WITHOUT_CR.search(data, start) is not None


class WireHash:
    """sha256 of a message's wire form (bare LF as CRLF, as `endpoints.content_hash` does),
    fed chunk by chunk. Why a search first: IMAP serves CRLF, so a chunk almost never has a
    bare LF; `has_bare_lf` proves that at a fraction of the hash's cost, where the regex
    substitution ran at a tenth of the hash's speed and was most of the mover's CPU on
    big messages."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._after_cr = False
        self.size = 0  # bytes fed (as received, before any LF -> CRLF)
        self.wire_size = 0  # bytes hashed (the wire form's length)

    def update(self, chunk: bytes) -> bytes:
        """Feed a chunk; return it in wire form (itself when it had no bare LF)."""
        self.size += len(chunk)
        if not chunk:
            return chunk
        joined = self._after_cr and chunk[0] == 0x0A  # the CR ended the previous chunk
        if has_bare_lf(chunk, 1 if joined else 0):
            fixed = _BARE_LF.sub(b"\r\n", chunk)
            chunk = fixed[1:] if joined else fixed
        self._digest.update(chunk)
        self.wire_size += len(chunk)
        self._after_cr = chunk[-1] == 0x0D
        return chunk

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


async def _digest_literal(reader: ChunkSource, size: int, *,
                         raw: bool = False) -> Digest:
    """Read a literal in chunks into sha256 of its wire form (`raw`: of its bytes as they
    are, a third of the CPU: no line-end counting), keeping none of it."""
    wire = WireHash()
    digest = hashlib.sha256()
    left = size
    while left:
        chunk = await reader.read(min(left, _CHUNK))  # what is there: no copy to fill it
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(chunk)
        if raw:
            digest.update(chunk)
        else:
            wire.update(chunk)
    return Digest.of(digest.hexdigest() if raw else wire.hexdigest(), size, raw=raw)


class Literal:
    """A literal being received, read in chunks by whoever streams it on (`stream_over`):
    never held whole. `read()` gives the next chunk, b"" at the end; the client reads
    whatever the consumer left unread before it parses on."""

    def __init__(self, reader: ChunkSource, size: int, touch: Callable[[], None]) -> None:
        self._reader = reader
        self.size = size
        self.left = size
        self._touch = touch  # the connection is alive: the watchdog counts from now

    async def read(self) -> bytes:
        if not self.left:
            return b""
        self._touch()
        chunk = await self._reader.read(min(self.left, _CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", self.left)
        self.left -= len(chunk)
        self._touch()
        return chunk

    async def skip(self) -> None:
        """Read and drop what is left."""
        while await self.read():
            pass


class LiteralOut:
    """A literal to send whose bytes come from an async iterator of chunks (a FETCH
    literal being received): `size` bytes exactly, written as they come, with the
    connection's back-pressure."""

    def __init__(self, size: int, chunks: AsyncIterator[bytes]) -> None:
        self.size = size
        self.chunks = chunks


# Decides, from the line announcing a literal (`* 5 FETCH (UID 9 ... BODY[] {n}`) and its
# size, whether someone streams it on: a coroutine function that consumes the `Literal`
# and returns what stands for it in the parsed response (a `Digest`), or None (read whole).
Streamer = Callable[[bytes, int], "Callable[[Literal], Awaitable[bytes]] | None"]
Segment = bytes | LiteralOut


class ImapError(Exception):
    """Any IMAP failure."""


class ImapConnectionError(ImapError):
    """The connection broke or timed out: reconnect and resume."""


class ImapProtocolError(ImapConnectionError):
    """The server's answers no longer match our commands (a tag answered twice or never
    sent): what was in flight fails now, the mailbox is retried on a new connection."""


class ImapTlsError(ImapError):
    """TLS was required and could not be had: never retried, never sent in cleartext."""


class ImapLoginError(ImapError):
    """The server refused the credentials: retrying with the same ones will not help."""


class ImapThrottled(ImapConnectionError):
    """The server said it is busy or that we use too much of it: `NO [LIMIT]`,
    `[THROTTLED]` or `[UNAVAILABLE]` (RFC 5530) to any command, "too many connections" at
    the greeting or the login, a `BYE` nobody asked for. Not a refusal of what we asked:
    slow down (`reconciler.mover.pace`), reconnect and resume. `server` is (host, port)."""

    def __init__(self, message: str, server: tuple[str, int] | None = None) -> None:
        super().__init__(message)
        self.server = server


# What providers answer when a client uses too much of them (RFC 5530's codes; Gmail's
# "Too many simultaneous connections", Exchange Online's "Server Unavailable. 15",
# "try again later"): read in NO answers, the greeting and BYE.
_THROTTLE = re.compile(rb"\[(?:LIMIT|THROTTLED|UNAVAILABLE|INUSE)\b|too many (?:simultaneous )?"
                       rb"(?:connections|sessions|logins)|maximum number of connections"
                       rb"|server unavailable|try again later",
                       re.IGNORECASE)


def throttle_answer(text: str | bytes) -> bool:
    """Whether a server's text says "slow down" rather than "no" (see `ImapThrottled`)."""
    return _THROTTLE.search(text.encode(errors="replace") if isinstance(text, str)
                            else text) is not None


class ImapCommandError(ImapError):
    """The server answered NO or BAD."""

    def __init__(self, command: str, status: str, text: str) -> None:
        super().__init__(f"{command}: {status} {text}")
        self.status = status
        self.text = text


# The FETCH response of a body fetch, as Dovecot and most servers send it: parsed without
# the general tokenizer (it is the one response per message of a copy).
_FAST_BODY = re.compile(rb"(\d+) FETCH \(UID (\d+) BODY\[\] \{\d+\+?\}\r\n$")
_FAST_META = re.compile(rb'(\d+) FETCH \(UID (\d+) FLAGS \(([^()]*)\) INTERNALDATE "([^"]*)" '
                        rb"BODY\[\] \{\d+\+?\}\r\n$")
_FAST_SIZE = re.compile(rb"(\d+) FETCH \(UID (\d+) RFC822\.SIZE (\d+)\)$")


def parse_response(parts: Sequence[bytes]) -> Untagged:
    """Parse a response split at its literals ([line, literal, line, ...]) into values."""
    if len(parts) == 3 and parts[2] == b")":
        fast = _FAST_BODY.match(parts[0])
        if fast:
            return [fast.group(1), b"FETCH", [b"UID", fast.group(2), b"BODY[]", parts[1]]]
        fast = _FAST_META.match(parts[0])
        if fast:
            flags: list[Value] = list(fast.group(3).split())
            return [fast.group(1), b"FETCH", [b"UID", fast.group(2), b"FLAGS", flags,
                                              b"INTERNALDATE", fast.group(4), b"BODY[]",
                                              parts[1]]]
    elif len(parts) == 1:
        fast = _FAST_SIZE.match(parts[0])
        if fast:
            return [fast.group(1), b"FETCH", [b"UID", fast.group(2), b"RFC822.SIZE",
                                              fast.group(3)]]
    stack: list[list[Value]] = [[]]
    for index in range(0, len(parts), 2):
        text = parts[index]
        pos = 0
        end = len(text)
        if index + 1 < len(parts):
            match = _LITERAL_END.search(text)
            end = match.start() if match else end
        while pos < end:
            m = _TOKEN.match(text, pos, end)
            if m is None or m.end() == pos:
                break
            pos = m.end()
            if m.group(1):
                stack.append([])
            elif m.group(2):
                if len(stack) > 1:
                    done = stack.pop()
                    stack[-1].append(done)
            elif m.group(3) is not None:
                stack[-1].append(re.sub(rb"\\(.)", rb"\1", m.group(3)))
            elif m.group(4):
                atom = m.group(4)
                stack[-1].append(None if atom == b"NIL" else atom)
        if index + 1 < len(parts):
            stack[-1].append(parts[index + 1])
    while len(stack) > 1:
        done = stack.pop()
        stack[-1].append(done)
    return stack[0]


_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)


def _capabilities_in(text: bytes) -> set[str] | None:
    """The capabilities of a `[CAPABILITY ...]` response code (greeting, login OK)."""
    match = _CAPABILITY_CODE.search(text)
    return {c.decode().upper() for c in match.group(1).split()} if match else None


def pending_text(pending: object) -> str:
    """The tagged OK text of a finished command (holds [APPENDUID ...], [CAPABILITY ...])."""
    done = getattr(pending, "done", None)
    if done is None or not done.done() or done.exception() is not None:
        return ""
    return str(done.result()[1])


def _verb(line: bytes) -> str:
    """The command's name: 'UID FETCH ...' -> 'UID', 'SELECT x' -> 'SELECT'."""
    return line.split(b" ", 1)[0].decode("ascii", "replace").upper()


def fetch_items(response: Untagged) -> dict[bytes, Value] | None:
    """The attribute dict of an untagged FETCH response (keys upper-cased), else None."""
    if len(response) < 3 or not isinstance(response[1], bytes) \
            or response[1].upper() != b"FETCH" or not isinstance(response[2], list):
        return None
    items = response[2]
    result: dict[bytes, Value] = {}
    for i in range(0, len(items) - 1, 2):
        key = items[i]
        if isinstance(key, bytes):
            result[key.upper()] = items[i + 1]
    return result


def as_int(value: Value) -> int:
    """An atom as an int (0 when absent)."""
    return int(value) if isinstance(value, bytes) and value.isdigit() else 0


@dataclass
class _Pending:
    tag: bytes
    name: str
    done: asyncio.Future[tuple[str, str]]
    handler: Handler | None = None
    accepts: Callable[[Untagged], bool] | None = None
    untagged: list[Untagged] = field(default_factory=list)
    segments: Sequence[bytes] = ()  # what was sent, to send it once more alone after a BAD
    pipelined: bool = False  # other commands were in flight when this one was sent
    digest_over: int | None = None  # bodies larger than this arrive as a `Digest`
    digest_raw: bool = False  # ... of their bytes as received (see `Digest.raw`)
    streamer: Streamer | None = None  # literals it claims are streamed on, not read whole


Pending = _Pending  # a command sent and not yet answered (`start`, `start_login`)


class ImapClient:
    """One IMAP connection; several commands may be in flight at once."""

    def __init__(self, wire: Wire, timeout: float) -> None:
        self._reader = wire  # reading and writing go through the one protocol object
        self._writer = wire
        self.timeout = timeout
        self.capabilities: set[str] = set()
        self._tag = 0
        self._pending: list[_Pending] = []
        self._continuation: asyncio.Future[bytes] | None = None
        self._broken: Exception | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._last_rx = 0.0
        self._in_handler = False
        self._write_lock = asyncio.Lock()
        self._quiet_event = asyncio.Event()
        self._quiet_event.set()
        self.greeting: bytes = b""
        self.where = "IMAP"  # "IMAP host:port", for warnings
        self.server: tuple[str, int] | None = None
        self.pipelining = True  # off after a protocol error on this connection

    # -- connection ---------------------------------------------------------------------
    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float = 60.0,
                      tls: bool | str = False, cafile: str | None = None) -> ImapClient:
        """Open a connection, read the greeting, learn the capabilities. `tls`: False or
        "none" (cleartext), True or "implicit" (IMAPS), "starttls" (upgraded before anything
        else is said; refused when the server does not offer it). Certificates are verified
        against the system's roots, or `cafile`."""
        mode = {True: "implicit", False: "none"}.get(tls, tls) if isinstance(tls, bool) else tls
        if mode not in ("none", "implicit", "starttls"):
            raise ValueError(f"tls: {tls!r} is not none, implicit or starttls")
        context = client_context(cafile) if mode != "none" else None
        where = f"IMAP {host}:{port}"
        try:
            wire = await asyncio.wait_for(open_wire(
                host, port, limit=1 << 20, ssl_context=context if mode == "implicit" else None),
                timeout)
            reader = writer = wire
            client = cls(wire, timeout)
            client.where, client.server = where, (host, port)
            client.pipelining = (host, port) not in NO_PIPELINING
            client.greeting = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
        except ssl.SSLError as exc:
            raise ImapTlsError(f"{where}: TLS handshake failed: {exc}") from exc
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            raise ImapConnectionError(f"{where}: {exc!r}") from exc
        if not client.greeting.startswith(b"* OK"):
            writer.close()
            if client.greeting.startswith(b"* BYE") or throttle_answer(client.greeting):
                # A server at its connection limit says so in the greeting and hangs up.
                raise ImapThrottled(f"{where}: greeting {client.greeting[:200]!r}",
                                    (host, port))
            raise ImapConnectionError(f"{where}: greeting {client.greeting!r}")
        # Most servers list their capabilities in the greeting: one round trip fewer.
        client.capabilities = _capabilities_in(client.greeting) or set()
        if mode == "starttls":
            assert context is not None
            try:
                await client._starttls(where, host, context)
            except BaseException:
                writer.close()
                raise
        client._last_rx = asyncio.get_running_loop().time()
        client._read_task = asyncio.create_task(client._read_loop())
        client._watch_task = asyncio.create_task(client._watchdog())
        if not client.capabilities:
            await client.refresh_capabilities()
        return client

    async def _starttls(self, where: str, host: str, context: ssl.SSLContext) -> None:
        """STARTTLS (RFC 3501 6.2.1) before the reader task exists; capabilities learnt in
        cleartext are forgotten afterwards (RFC 2595 3.1: they may have been tampered with)."""
        reader = self._reader
        try:
            if not self.capabilities:
                self._writer.write(b"M0 CAPABILITY\r\n")
                while True:
                    line = await asyncio.wait_for(reader.readuntil(b"\r\n"), self.timeout)
                    if line.upper().startswith(b"* CAPABILITY "):
                        self.capabilities = {c.decode().upper() for c in line[13:].split()}
                    elif line.startswith(b"M0 "):
                        break
            if "STARTTLS" not in self.capabilities:
                raise ImapTlsError(f"{where}: the server does not offer STARTTLS; refusing to "
                                   f"send a login in cleartext")
            self._writer.write(b"M0 STARTTLS\r\n")
            while True:
                line = await asyncio.wait_for(reader.readuntil(b"\r\n"), self.timeout)
                if line.startswith(b"M0 "):
                    break
            if not line.upper().startswith(b"M0 OK"):
                answer = line.strip().decode(errors="replace")
                raise ImapTlsError(f"{where}: STARTTLS refused ({answer}); refusing to send "
                                   f"a login in cleartext")
            await self._writer.start_tls(context, server_hostname=host)
        except ssl.SSLError as exc:
            raise ImapTlsError(f"{where}: STARTTLS handshake failed: {exc}") from exc
        except (TimeoutError, OSError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            raise ImapConnectionError(f"{where}: STARTTLS: {exc!r}") from exc
        self.capabilities = set()

    async def refresh_capabilities(self) -> None:
        """Ask CAPABILITY (again: they change after login)."""
        caps: set[str] = set()
        for resp in await self.simple("CAPABILITY"):
            if resp and resp[0] == b"CAPABILITY":
                caps.update(v.decode().upper() for v in resp[1:] if isinstance(v, bytes))
        self.capabilities = caps

    async def login(self, user: str, password: str, *, authorize_as: str | None = None) -> None:
        """Log in: AUTHENTICATE PLAIN (with an authorization id for a master/admin user) when
        offered, else LOGIN."""
        started = await self.start_login(user, password, authorize_as=authorize_as)
        if started is None:
            token = base64.b64encode(
                f"{authorize_as or ''}\0{user}\0{password}".encode()).decode()
            await self.finish_login(await self._authenticate_continued(token))
        else:
            await self.finish_login(started[0])

    async def start_login(self, user: str, password: str, *, authorize_as: str | None = None,
                          then: Sequence[tuple[bytes, str]] = ()) -> list[_Pending] | None:
        """Send the login in one line without waiting, and the commands `then` (line, name)
        behind it in the same write (the server runs them once logged in, or refuses them);
        their pendings, login first. None when the login needs a continuation
        (AUTHENTICATE PLAIN without SASL-IR): nothing sent."""
        if "AUTH=PLAIN" in self.capabilities or authorize_as:
            if "SASL-IR" not in self.capabilities:
                return None
            token = base64.b64encode(
                f"{authorize_as or ''}\0{user}\0{password}".encode()).decode()
            login = (f"AUTHENTICATE PLAIN {token}".encode(), "AUTHENTICATE")
        else:
            login = (f"LOGIN {quote(user)} {quote(password)}".encode(), "LOGIN")
        return await self._send_lines([login, *then])

    async def _send_lines(self, commands: Sequence[tuple[bytes, str]]) -> list[_Pending]:
        """Write several commands without literals, as few writes as RFC 3501 5.5 allows:
        a state-changing command (a login) goes out alone and the rest only once it
        completed; after a refused one the rest are not sent (answered NO here)."""
        if self._broken is not None:
            raise self._lost(commands[0][1], self._broken)
        async with self._write_lock:
            loop = asyncio.get_running_loop()
            pendings: list[_Pending] = []
            lines: list[bytes] = []
            refused = ""
            for line, name in commands:
                self._tag += 1
                pending = _Pending(b"M%d" % self._tag, name, loop.create_future(),
                                   segments=(line,))
                pendings.append(pending)
                if refused:
                    pending.done.set_result(("NO", f"not sent: {refused}"))
                    continue
                barrier = _verb(line) in BARRIERS
                if lines and (barrier or not self.pipelining):
                    await self._write(lines, name)
                    lines = []
                if barrier or not self.pipelining:
                    await self._wait_quiet()
                pending.pipelined = bool(self._pending)
                self._register(pending)
                lines.append(pending.tag + b" " + line + b"\r\n")
                if barrier:
                    await self._write(lines, name)
                    lines = []
                    await asyncio.wait([pending.done])
                    if pending.done.exception() is None and pending.done.result()[0] != "OK":
                        refused = f"{name} answered {pending.done.result()[0]}"
            if lines:
                await self._write(lines, commands[-1][1])
        return pendings

    async def _write(self, chunks: Sequence[bytes], name: str) -> None:
        self._writer.writelines(chunks)
        try:
            await asyncio.wait_for(self._writer.drain(), self.timeout)
        except (TimeoutError, OSError) as exc:
            self._fail(exc)
            raise ImapConnectionError(f"{name}: {exc!r}") from exc

    def _register(self, pending: _Pending) -> None:
        if not self._pending:
            # The watchdog counts silence from the first question on a quiet connection: an
            # answer is not overdue because the connection sat idle before (a pooled one,
            # or the blocking wrapper's between two calls).
            self._last_rx = asyncio.get_running_loop().time()
        self._pending.append(pending)
        self._quiet_event.clear()

    async def _wait_quiet(self) -> None:
        """Until no command is in flight (the watchdog ends a silent connection)."""
        while self._pending and self._broken is None:
            await self._quiet_event.wait()

    def stop_pipelining(self, why: str) -> None:
        """No more pipelining on this connection, nor on later ones to this server in this
        process; logged: a person sees why a server became slower."""
        if self.server is not None:
            NO_PIPELINING.add(self.server)
        if self.pipelining:
            self.pipelining = False
            family = family_of(self.greeting)
            log.warning("%s%s: %s: pipelining off for this server", self.where,
                        f" ({family.name})" if family else "", why)

    async def finish_login(self, pending: _Pending) -> None:
        """Wait for the login's answer (raise on NO/BAD) and take the new capabilities."""
        await self._finish(pending)
        # The tagged OK usually carries the new capabilities: no CAPABILITY round trip.
        caps = _capabilities_in(pending_text(pending).encode())
        if caps:
            self.capabilities = caps
        else:
            await self.refresh_capabilities()

    async def _authenticate_continued(self, token: str) -> _Pending:
        loop = asyncio.get_running_loop()
        self._continuation = loop.create_future()
        pending = await self._send([b"AUTHENTICATE PLAIN"], "AUTHENTICATE", hold=False)
        await asyncio.wait_for(asyncio.shield(self._continuation), self.timeout)
        self._writer.write(token.encode() + b"\r\n")
        await self._finish(pending)
        return pending

    async def login_oauth(self, user: str, token: str, *, mechanism: str = "xoauth2") -> None:
        """AUTHENTICATE XOAUTH2 or OAUTHBEARER with a bearer token (`mailferry.mail.oauth2`
        gets it and retries a refused one; `mailferry.mail.imap.sasl` encodes it). A refused
        token is answered with a challenge (RFC 7628 3.2.2) that the client acknowledges
        before the server says NO; the NO's text gets the challenge's status. The token is
        never part of a message."""

        mech = mechanism.upper()
        if f"AUTH={mech}" not in self.capabilities:
            raise ImapCommandError("AUTHENTICATE", "NO",
                                   f"the server does not offer AUTH={mech}")
        host, port = self.server or ("", 0)
        response = initial_response(mech, user, token, host, port).encode()
        loop = asyncio.get_running_loop()
        self._continuation = loop.create_future()
        if "SASL-IR" in self.capabilities:
            pending = await self._send([b"AUTHENTICATE " + mech.encode() + b" " + response],
                                       "AUTHENTICATE", hold=False)
        else:
            pending = await self._send([b"AUTHENTICATE " + mech.encode()], "AUTHENTICATE",
                                       hold=False)
            await self._await(self._continuation, "AUTHENTICATE")
            self._continuation = loop.create_future()
            self._writer.write(response + b"\r\n")
        challenge = self._continuation
        waits: list[asyncio.Future[object]] = [
            cast("asyncio.Future[object]", pending.done),
            cast("asyncio.Future[object]", challenge)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        detail = ""
        if challenge.done() and not challenge.exception() and not pending.done.done():
            detail = failure_detail(challenge.result()[1:])
            # XOAUTH2 wants an empty response, OAUTHBEARER a single %x01 (RFC 7628 3.2.3)
            self._writer.write((b"AQ==" if mech == "OAUTHBEARER" else b"") + b"\r\n")
        elif not challenge.done():
            challenge.cancel()
        try:
            await self.finish_login(pending)
        except ImapCommandError as exc:
            if detail:
                raise ImapCommandError("AUTHENTICATE", exc.status,
                                       f"{exc.text} ({mech}: {detail})") from None
            raise
        finally:
            self._continuation = None

    @property
    def usable(self) -> bool:
        """Neither broken nor closed (a pooled connection is checked with this)."""
        return self._broken is None and not self._writer.is_closing()

    @property
    def quiet(self) -> bool:
        """Usable with no command in flight: safe to hand to someone else."""
        return self.usable and not self._pending and (
            self._continuation is None or self._continuation.done())

    async def logout(self) -> None:
        """Say goodbye and close without waiting for the answer (nothing in it matters, and
        a re-run of many mailboxes would pay a round trip per connection)."""
        if self.usable:
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(b"M%d LOGOUT\r\n" % (self._tag + 1))
        self.close()

    def close(self) -> None:
        """Close the socket now."""
        for task in (self._read_task, self._watch_task):
            if task is not None:
                task.cancel()
        self._writer.close()

    # -- commands ------------------------------------------------------------------------
    async def simple(self, command: str, *, secret: bool = False,
                     handler: Handler | None = None) -> list[Untagged]:
        """Run one command without literals; return its untagged responses."""
        pending = await self._send([command.encode()],
                                   command.split(" ", 1)[0] if secret else command[:60],
                                   handler=handler)
        await self._finish(pending)
        return pending.untagged

    async def start(self, segments: Sequence[Segment], name: str, *,
                    handler: Handler | None = None,
                    accepts: Callable[[Untagged], bool] | None = None,
                    digest_over: int | None = None, digest_raw: bool = False,
                    streamer: Streamer | None = None) -> _Pending:
        """Send a command (segments joined by literals, see `_send`) without waiting for its
        answer (a state-changing command is waited for: see `_send`). A literal may be a
        `LiteralOut` (streamed from elsewhere); `streamer` may claim the literals of the
        responses to stream them on (see `Streamer`)."""
        return await self._send(segments, name, handler=handler, accepts=accepts,
                                digest_over=digest_over, digest_raw=digest_raw,
                                streamer=streamer)

    async def finish(self, pending: _Pending) -> list[Untagged]:
        """Wait for a started command's tagged answer; raise on NO/BAD."""
        await self._finish(pending)
        return pending.untagged

    @staticmethod
    def abandon(pending: _Pending) -> None:
        """Leave a started command's answer unread (a refused login's followers)."""
        pending.done.add_done_callback(
            lambda done: None if done.cancelled() else done.exception())

    async def _send(self, segments: Sequence[Segment], name: str, *,
                    handler: Handler | None = None,
                    accepts: Callable[[Untagged], bool] | None = None,
                    digest_over: int | None = None, hold: bool = True,
                    streamer: Streamer | None = None, digest_raw: bool = False) -> _Pending:
        """Write a command. Odd-indexed segments are literals; the even ones around them.
        A state-changing command waits until nothing is in flight and holds the line until
        it completes (`hold=False`: the caller must answer a continuation first); with
        pipelining off every command waits for the one before."""
        if self._broken is not None:
            raise self._lost(name, self._broken)
        plus = "LITERAL+" in self.capabilities or "LITERAL-" in self.capabilities
        barrier = _verb(cast(bytes, segments[0])) in BARRIERS
        async with self._write_lock:
            if barrier or not self.pipelining:
                await self._wait_quiet()
                if self._broken is not None:
                    raise self._lost(name, self._broken)
            self._tag += 1
            tag = b"M%d" % self._tag
            streamed = any(isinstance(s, LiteralOut) for s in segments)
            pending = _Pending(tag, name, asyncio.get_running_loop().create_future(),
                               handler, accepts,
                               # a streamed literal cannot be sent again after a BAD
                               segments=() if streamed else cast(Sequence[bytes], segments),
                               pipelined=bool(self._pending), digest_over=digest_over,
                               digest_raw=digest_raw, streamer=streamer)
            self._register(pending)
            head = tag + b" " + cast(bytes, segments[0])
            if len(segments) == 1:
                self._writer.write(head + b"\r\n")
            elif streamed:
                await self._write_streamed(head, segments, plus, name)
            elif plus:
                chunks = [head]
                for i in range(1, len(segments), 2):
                    literal = cast(bytes, segments[i])
                    chunks.append(b"{%d+}\r\n" % len(literal))
                    chunks.append(literal)
                    chunks.append(cast(bytes, segments[i + 1]) if i + 1 < len(segments)
                                  else b"")
                chunks.append(b"\r\n")
                self._writer.writelines(chunks)
            else:
                text = head
                for i in range(1, len(segments), 2):
                    literal = cast(bytes, segments[i])
                    self._continuation = asyncio.get_running_loop().create_future()
                    self._writer.write(text + b"{%d}\r\n" % len(literal))
                    await self._await(self._continuation, name)
                    self._writer.write(literal)
                    text = cast(bytes, segments[i + 1]) if i + 1 < len(segments) else b""
                self._writer.write(text + b"\r\n")
            try:
                await asyncio.wait_for(self._writer.drain(), self.timeout)
            except (TimeoutError, OSError) as exc:
                self._fail(exc)
                raise ImapConnectionError(f"{name}: {exc!r}") from exc
            if barrier and hold:
                await asyncio.wait([pending.done])  # nothing behind it until it completes
        return pending

    async def _write_streamed(self, head: bytes, segments: Sequence[Segment], plus: bool,
                              name: str) -> None:
        """Write a command with streamed literals: each chunk as it comes, waiting for the
        socket to take it (memory: a chunk, not the message). A literal that cannot be
        finished (its source broke, the task was cancelled) leaves the server in the middle
        of it: the connection is aborted, so the server drops the half command (an APPEND
        is stored only once complete) and nothing is half-done."""
        text = head
        try:
            for i in range(1, len(segments), 2):
                literal = segments[i]
                size = literal.size if isinstance(literal, LiteralOut) else len(literal)
                if plus:
                    self._writer.write(text + b"{%d+}\r\n" % size)
                else:
                    self._continuation = asyncio.get_running_loop().create_future()
                    self._writer.write(text + b"{%d}\r\n" % size)
                    await self._await(self._continuation, name)
                if isinstance(literal, LiteralOut):
                    sent = 0
                    async for chunk in literal.chunks:
                        sent += len(chunk)
                        if sent > size:
                            raise ValueError(f"{name}: literal longer than its {size} bytes")
                        self._writer.write(chunk)
                        if self._writer.writing_paused:  # no task per chunk otherwise
                            await asyncio.wait_for(self._writer.drain(), self.timeout)
                    if sent != size:
                        raise ValueError(f"{name}: literal of {sent} bytes, {size} announced")
                else:
                    self._writer.write(literal)
                text = cast(bytes, segments[i + 1]) if i + 1 < len(segments) else b""
            self._writer.write(text + b"\r\n")
        except BaseException as exc:
            self._fail(exc)
            self._writer.transport.abort()
            if isinstance(exc, Exception) and not isinstance(exc, ImapError):
                raise ImapConnectionError(f"{self.where}: {name}: streamed literal broke off: "
                                          f"{exc!r}") from exc
            raise

    async def _await(self, future: asyncio.Future[bytes], name: str) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError as exc:
            self._fail(exc)
            raise ImapConnectionError(f"{name}: no continuation") from exc

    async def _finish(self, pending: _Pending) -> None:
        # No overall timeout here: a big FETCH may legitimately take long; the watchdog
        # detects a dead server.
        status, text = await pending.done
        if status == "BAD" and pending.pipelined and pending.segments:
            # BAD: not executed. Sent behind other commands, it may be the pipelining the
            # server did not take: once more alone, and no more pipelining here.
            self.stop_pipelining(f"BAD to a pipelined {pending.name} ({text[:80]})")
            again = await self._send(pending.segments, pending.name, handler=pending.handler,
                                     accepts=pending.accepts,
                                     digest_over=pending.digest_over,
                                     digest_raw=pending.digest_raw)
            status, text = await again.done
            pending.done, pending.untagged = again.done, again.untagged
        if status != "OK":
            if status == "NO" and throttle_answer(text):
                raise ImapThrottled(f"{self.where}: {pending.name}: {status} {text}",
                                    self.server)
            raise ImapCommandError(pending.name, status, text)

    # -- reading -------------------------------------------------------------------------
    async def _read_parts(self) -> list[bytes]:
        """One response, split at its literals. No per-read timeout here (a `wait_for` per
        line costs a task each); the watchdog aborts a connection that went silent."""
        parts: list[bytes] = []
        reader = self._reader
        while True:
            line = await reader.readuntil(b"\r\n")
            if not line.endswith(b"}\r\n"):
                parts.append(line[:-2])
                return parts
            match = _LITERAL_END.search(line)
            if match is None:
                parts.append(line[:-2])
                return parts
            size = int(match.group(1))
            if size > MAX_LITERAL:
                raise ImapConnectionError(f"literal of {size} bytes refused")
            streamed = self._streamer(line, size) if not parts else None
            parts.append(line)
            over, raw = self._digest_over()
            if streamed is not None:
                literal = Literal(reader, size, self._touch)
                parts.append(await streamed(literal))
                await literal.skip()
            elif over is not None and size > over:
                parts.append(await _digest_literal(reader, size, raw=raw))
            else:
                parts.append(await reader.readexactly(size))

    def _touch(self) -> None:
        self._last_rx = asyncio.get_running_loop().time()

    def _streamer(self, line: bytes, size: int) -> Callable[[Literal], Awaitable[bytes]] | None:
        """Who streams this literal on, if a FETCH in flight wants to (the first that does:
        a connection runs one mailbox's fetches)."""
        for pending in self._pending:
            if pending.streamer is not None:
                return pending.streamer(line, size)
        return None

    def _digest_over(self) -> tuple[int | None, bool]:
        """The size above which a literal is only hashed: when every body fetch in flight
        wants nothing but hashes (a read-back), else None; and whether raw hashes do."""
        fetches = [p for p in self._pending if p.name.startswith("UID FETCH")]
        if not fetches or any(p.digest_over is None for p in fetches):
            return None, False
        return (min(p.digest_over for p in fetches if p.digest_over is not None),
                all(p.digest_raw for p in fetches))

    async def _watchdog(self) -> None:
        """Abort the connection when commands are pending and the server sent nothing for
        `timeout` seconds (time spent in our own handlers, back-pressure, does not count)."""
        loop = asyncio.get_running_loop()
        while self._broken is None:
            await asyncio.sleep(max(self.timeout / 4, 0.05))
            idle = loop.time() - self._last_rx
            if self._pending and not self._in_handler and idle > self.timeout:
                if any(p.pipelined for p in self._pending):
                    # Perhaps a server that threw away what we pipelined: the retry, and
                    # later connections to it, send one command at a time.
                    self.stop_pipelining(f"no answer for {idle:.0f} s to commands sent "
                                         f"pipelined")
                self._fail(TimeoutError(f"no answer for {idle:.0f} s"))
                self._writer.transport.abort()
                return

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                parts = await self._read_parts()
                self._last_rx = loop.time()
                first = parts[0]
                if first.startswith(b"* "):
                    await self._dispatch(parts)
                elif first.startswith(b"+"):
                    if self._continuation is not None and not self._continuation.done():
                        self._continuation.set_result(first)
                else:
                    self._tagged(first)
        except asyncio.CancelledError:
            self._fail(ConnectionAbortedError("closed"))
            raise
        except (TimeoutError, OSError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError, ImapError) as exc:
            self._fail(exc)
        except Exception as exc:
            # A handler's own error (a bug downstream): every pending command learns it
            # now, rather than the reader dying and the watchdog's timeout saying nothing.
            self._fail(exc)
            self._writer.transport.abort()

    async def _dispatch(self, parts: list[bytes]) -> None:
        response = parse_response([parts[0][2:], *parts[1:]])
        if response and response[0] == b"BYE" and not any(
                p.name.startswith("LOGOUT") for p in self._pending):
            # An early BYE: the server ends the session before we did (a provider
            # shedding load, a restart): reconnect, slowly.
            raise ImapThrottled(f"{self.where}: server said {parts[0][:200]!r}", self.server)
        target = None
        # A FETCH response belongs to a FETCH in flight, not to an APPEND or NOOP sent
        # before it (a target connection reads back while its appends are in flight).
        fetch = len(response) > 1 and isinstance(response[1], bytes) \
            and response[1].upper() == b"FETCH"
        candidates = [p for p in self._pending if "FETCH" in p.name] if fetch else []
        for pending in candidates or self._pending:
            if pending.accepts is None or pending.accepts(response):
                target = pending
                break
        if target is None:
            return  # unsolicited (EXISTS of new mail, etc.)
        if target.handler is not None:
            result = target.handler(response)
            if result is not None:
                self._in_handler = True
                try:
                    await result
                finally:
                    self._in_handler = False
                    self._last_rx = asyncio.get_running_loop().time()
        else:
            target.untagged.append(response)

    def _tagged(self, line: bytes) -> None:
        tag, _, rest = line.partition(b" ")
        status, _, text = rest.partition(b" ")
        for i, pending in enumerate(self._pending):
            if pending.tag == tag:
                del self._pending[i]
                if not self._pending:
                    self._quiet_event.set()
                    self._reader.shrink()  # an idle connection keeps no body's buffer
                if not pending.done.done():
                    pending.done.set_result((status.decode(errors="replace").upper(),
                                             text.decode(errors="replace")))
                return
        # A tag we have no command for (answered twice, or never sent): the server read
        # our stream differently from how we wrote it, and what is in flight may never be
        # answered. Fail it now instead of waiting for the timeout.
        shown = line[:80].decode("ascii", "replace")
        self.stop_pipelining(f"tagged reply for no command in flight ({shown!r})")
        self._fail(ImapProtocolError(f"{self.where}: protocol error: tagged reply for no "
                                     f"command in flight ({shown!r})"))
        self._writer.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
        for pending in self._pending:
            if not pending.done.done():
                pending.done.set_exception(self._lost(pending.name, exc))
        self._pending.clear()
        self._quiet_event.set()
        if self._continuation is not None and not self._continuation.done():
            self._continuation.set_exception(self._lost("continuation", exc))

    def _lost(self, name: str, exc: BaseException) -> ImapError:
        """What a command in flight learns when the connection broke under it (a throttling
        BYE stays one: the retry must slow down, not just reconnect)."""
        if isinstance(exc, ImapThrottled):
            return type(exc)(f"{name}: {exc}", exc.server)
        if isinstance(exc, ImapProtocolError):
            return ImapProtocolError(f"{name}: {exc}")
        return ImapConnectionError(f"{name}: connection lost: {exc!r}")
