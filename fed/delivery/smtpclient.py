"""A small SMTP/LMTP client on an asyncio Protocol, made for fed's delivery queues.

Why not smtplib: it blocks, so every delivery needed a worker thread and a new connection.
Why not aiosmtplib: it speaks no LMTP, and LMTP's defining feature, one reply *per
recipient* after DATA, is exactly what fed needs to send one copy of a message to several
mailboxes of a system and still know which of them took it. What fed needs is small:
EHLO/LHLO, MAIL, RCPT, DATA, RSET, QUIT, PIPELINING when offered, and a connection that
stays open for the next message, and TLS when a system's endpoint requires it (a system on
another host: STARTTLS, or implicit TLS from the first byte as on port 465; the certificate
verified against a CA file or the system's roots, `mailferry.mail.tls`; a server that does
not offer STARTTLS is refused, nothing is sent in cleartext). SMTP AUTH (PLAIN, else LOGIN)
only over TLS and only for a system that asks for it: the systems mailferry administers
relay by network, as the patent's FED does, but a hosted target (Microsoft 365, Google, a
provider's submission port) takes mail only from an authenticated client. The password is
read from its file at each login (`mailferry.secretfile`) and never logged or put in a
reply text.

One ``Connection`` carries any number of transactions, one after the other. A transaction
that ends without a 250 for DATA is followed by RSET, so the next one starts clean; a
failed RSET, a timeout or any I/O error marks the connection broken (the queue opens a new
one). Replies are never guessed: a recipient's final answer is either the server's reply
for it, or ``code 0`` with the reason when the connection broke before it came.

Why a Protocol and not asyncio's streams: a relayed message is four replies (MAIL, RCPT
and DATA pipelined, then the data's), and through a ``StreamReader`` each one cost a
``drain``, a ``readuntil`` and an ``asyncio.timeout`` (a timer made and cancelled). Here
``_Replies.data_received`` cuts whole replies out of what arrived, so the replies of a
pipelined group that came in one segment are read with no wait and no timer; a timer
exists only while the client really waits. The bound is the same: one ``timeout`` per
reply waited for (the data of a big message included, as ``drain`` was), a reply line of
64 KiB and a reply of 1,000 lines at most.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections import deque
from dataclasses import dataclass

from mailferry.mail.addresses import ascii_form
from mailferry.mail.tls import client_context, describe
from mailferry.secretfile import SecretError, read_file

from ..routing.directory import System

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; code 0 means no reply (connection failure), text says why."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code else self.text

    @property
    def ok(self) -> bool:
        """2xx."""
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        """5xx."""
        return 500 <= self.code < 600

    @property
    def status(self) -> str | None:
        """The RFC 3463 enhanced status code in the text, if any."""
        match = _ENHANCED.match(self.text)
        return match.group(0) if match else None


class ClientError(Exception):
    """The connection failed or the server refused the session (the reply says how)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def dot_stuff(data: bytes) -> bytes:
    """DATA transparency (RFC 5321 4.5.2) plus the final CRLF; no copy when not needed."""
    if data.startswith(b"."):
        data = b"." + data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


MAX_LINE = 1 << 16  # a longer reply line is no SMTP reply (asyncio's stream limit before)
MAX_LINES = 1000  # lines of one reply, at most
MAX_READY = 1000  # replies not asked for yet (a pipelined group is max_rcpts + 2 at most)


class _Replies(asyncio.Protocol):
    """The receiving side of a connection: whole replies, in order, as they arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.ready: deque[tuple[Reply, list[str]]] = deque()  # (reply, its lines' texts)
        self.failure: str | None = None  # why no more replies will come
        self._buffer = bytearray()
        self._lines: list[str] = []  # of the reply being received
        self._waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.failure is not None:
            return
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end].decode("utf-8", "replace").rstrip("\r")
            start = end + 1
            if len(line) < 3 or not line[:3].isdigit():
                self._fail(f"not an SMTP reply: {line[:80]!r}")
                return
            self._lines.append(line[4:])
            if len(line) == 3 or line[3] != "-":
                lines, self._lines = self._lines, []
                self.ready.append((Reply(int(line[:3]), "\n".join(lines).strip()), lines))
                if len(self.ready) > MAX_READY:  # a flood: nothing it said counts
                    self.ready.clear()
                    self._fail(f"more than {MAX_READY} replies nobody asked for")
                    return
            elif len(self._lines) >= MAX_LINES:
                self._fail(f"reply longer than {MAX_LINES} lines")
                return
        del buffer[:start]
        if len(buffer) > MAX_LINE:
            self._fail(f"reply line longer than {MAX_LINE} bytes")
            return
        if self.ready:
            self._wake()

    def eof_received(self) -> bool:
        return False  # the transport closes itself: connection_lost says so

    def connection_lost(self, exc: Exception | None) -> None:
        if self.failure is None:
            self.failure = (str(exc) or type(exc).__name__) if exc is not None else (
                "the server closed the connection")
        self._wake()

    def _fail(self, why: str) -> None:
        self.failure = why
        self._buffer.clear()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until a reply or the end of the connection is there (TimeoutError after
        `timeout` s)."""
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Connection:
    """An open SMTP or LMTP session after the greeting and EHLO/LHLO."""

    def __init__(self, transport: asyncio.Transport, replies: _Replies, lmtp: bool,
                 timeout: float, extensions: set[str], endpoint: str) -> None:
        self._transport = transport
        self._replies = replies
        self.lmtp = lmtp
        self.timeout = timeout
        self.extensions = extensions
        self.endpoint = endpoint
        self.broken = False
        self.transactions = 0
        self.data_sent = False  # the current transaction's message went out
        self.generation = 0  # the system's generation when this connection was opened
        self.tls = False  # TLS (STARTTLS or implicit)
        self.mechanisms: set[str] = set()  # what EHLO's AUTH line offers
        self.auth_user: str | None = None  # authenticated as

    @classmethod
    async def for_system(cls, system: System, helo: str, timeout: float) -> Connection:
        """A session to a registered system, with its TLS and, if it has one, its AUTH."""
        return await cls.open(system.host, system.port, system.protocol == "lmtp", helo,
                              timeout, tls=system.tls, cafile=system.cafile,
                              auth_user=system.auth_user, auth_file=system.auth_file)

    @classmethod
    async def open(cls, host: str, port: int, lmtp: bool, helo: str, timeout: float, *,
                   tls: str = "none", cafile: str | None = None,
                   auth_user: str | None = None, auth_file: str | None = None) -> Connection:
        """Connect, read the greeting, say EHLO/LHLO; with `tls` "starttls", upgrade
        (RFC 3207) and say it again; with "implicit", TLS from the first byte; with
        `auth_user`, AUTH with the password in `auth_file` (only over TLS). Raise
        ClientError on any refusal, a missing STARTTLS or AUTH, or a certificate that does
        not verify (code 0: the message stays queued)."""
        endpoint = f"{host}:{port}"
        if tls not in ("none", "starttls", "implicit"):
            raise ClientError(Reply(0, f"{endpoint}: tls {tls!r} is not none, starttls or "
                                       "implicit"))
        if auth_user is not None and (tls == "none" or auth_file is None):
            raise ClientError(Reply(0, f"{endpoint}: AUTH needs TLS and a password file"))
        loop = asyncio.get_running_loop()
        try:
            context = client_context(cafile) if tls == "implicit" else None
            async with asyncio.timeout(timeout):
                transport, replies = await loop.create_connection(
                    lambda: _Replies(loop), host, port, ssl=context,
                    server_hostname=host if context is not None else None)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise ClientError(Reply(0, f"{endpoint}: TLS handshake failed: "
                                       f"{describe(exc)}")) from exc
        except (OSError, TimeoutError) as exc:
            raise ClientError(Reply(0, f"cannot connect to {endpoint}: "
                                       f"{exc or type(exc).__name__}")) from exc
        conn = cls(transport, replies, lmtp, timeout, set(), endpoint)
        conn.tls = context is not None
        try:
            greeting = await conn._reply()
            if not greeting.ok:
                raise ClientError(greeting)
            await conn._hello(helo)
            if tls == "starttls":
                await conn._starttls(host, helo, cafile)
            if auth_user is not None and auth_file is not None:
                await conn._auth(auth_user, auth_file)
        except ClientError:
            conn.close()
            raise
        return conn

    async def _hello(self, helo: str) -> None:
        """EHLO/LHLO; the extensions and the AUTH mechanisms it offers."""
        self._send(f"{'LHLO' if self.lmtp else 'EHLO'} {helo}\r\n".encode())
        hello, lines = await self._reply_lines()
        if not hello.ok:
            raise ClientError(hello)
        self.extensions = {line.split(" ", 1)[0].upper() for line in lines[1:]}
        self.mechanisms = {word.upper() for line in lines[1:]
                           if line.upper().startswith("AUTH ") for word in line.split()[1:]}

    async def _auth(self, user: str, password_file: str) -> None:
        """AUTH PLAIN (RFC 4616), else AUTH LOGIN; a refusal is the server's reply (a 535
        of a managed system is deferred and alerted like any 5xx, never bounced)."""
        try:
            password = read_file(password_file, "SMTP AUTH password")
        except SecretError as exc:  # names the file and the problem, never the secret
            raise ClientError(Reply(0, f"{self.endpoint}: {exc}")) from None
        if "PLAIN" in self.mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            self._send(f"AUTH PLAIN {token}\r\n".encode())
            reply = await self._reply()
        elif "LOGIN" in self.mechanisms:
            self._send(b"AUTH LOGIN\r\n")
            reply = await self._reply()
            for value in (user, password):
                if reply.code != 334:
                    break
                self._send(base64.b64encode(value.encode()) + b"\r\n")
                reply = await self._reply()
        else:
            raise ClientError(Reply(0, f"{self.endpoint}: AUTH required but the server offers "
                                       f"no PLAIN or LOGIN (offers: "
                                       f"{' '.join(sorted(self.mechanisms)) or 'no AUTH'})"))
        if reply.code != 235:
            raise ClientError(Reply(reply.code, f"{self.endpoint}: AUTH as {user!r} refused: "
                                                f"{reply.text}"))
        self.auth_user = user

    async def _starttls(self, host: str, helo: str, cafile: str | None) -> None:
        """STARTTLS, the handshake, EHLO/LHLO again (what was offered in cleartext is
        forgotten, RFC 3207 4.2)."""
        if "STARTTLS" not in self.extensions:
            raise ClientError(Reply(0, f"{self.endpoint}: TLS required but the server offers "
                                       "no STARTTLS; nothing sent in cleartext"))
        self._send(b"STARTTLS\r\n")
        ready = await self._reply()
        if ready.code != 220:
            raise ClientError(Reply(ready.code, f"{self.endpoint}: STARTTLS refused: "
                                                f"{ready.text}"))
        if self._replies.ready or self._replies.failure is not None:
            # Anything after the 220 came in cleartext before TLS: an injection (a reply
            # planted to be read as the encrypted session's), or the link is gone.
            self.close()
            raise ClientError(Reply(0, f"{self.endpoint}: data after the STARTTLS reply, "
                                       "before TLS: refused"))
        try:
            context = client_context(cafile)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.timeout):
                transport = await loop.start_tls(self._transport, self._replies, context,
                                                 server_hostname=host)
            if transport is None:
                raise ConnectionError("the connection closed during the TLS handshake")
            self._transport = transport
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self.broken = True
            self.close()
            raise ClientError(Reply(0, f"{self.endpoint}: TLS handshake failed: "
                                       f"{describe(exc)}")) from exc
        self.tls = True
        await self._hello(helo)

    def _send(self, data: bytes) -> None:
        self._send_all([data])

    def _send_all(self, pieces: list[bytes]) -> None:
        """Write; a connection the server has closed is a ClientError here (a reused one
        that idled out gets its retry on a new one), not the transport's own error."""
        failure = self._replies.failure
        if failure is not None or self._transport.is_closing():
            self.close()
            raise ClientError(Reply(0, f"{self.endpoint}: {failure or 'connection closed'}"))
        if len(pieces) == 1:
            self._transport.write(pieces[0])
        else:
            self._transport.writelines(pieces)

    async def _reply_lines(self) -> tuple[Reply, list[str]]:
        """Read one (possibly multi-line) reply: at once when it is there already."""
        replies = self._replies
        if not replies.ready and replies.failure is None:
            try:
                await replies.wait(self.timeout)
            except TimeoutError:
                self.close()
                raise ClientError(Reply(0, f"{self.endpoint}: timed out")) from None
        if replies.ready:
            return replies.ready.popleft()
        self.close()
        raise ClientError(Reply(0, f"{self.endpoint}: {replies.failure}"))

    async def _reply(self) -> Reply:
        return (await self._reply_lines())[0]

    async def send(self, mail_from: str, rcpts: list[str], data: bytes) -> dict[str, Reply]:
        """One transaction; each recipient's final reply. ClientError if the link broke
        before any recipient's final reply was read."""
        mail_from = mail_from.removeprefix("<").removesuffix(">")  # aiosmtpd keeps <> as is
        options = ""
        if "8BITMIME" in self.extensions and not data.isascii():
            options += " BODY=8BITMIME"
        if not (mail_from + "".join(rcpts)).isascii():
            if "SMTPUTF8" in self.extensions:
                options += " SMTPUTF8"
            else:
                return await self._send_downgraded(mail_from, rcpts, data, options)
        return await self._transaction(mail_from, rcpts, data, options)

    async def _send_downgraded(self, mail_from: str, rcpts: list[str], data: bytes,
                               options: str) -> dict[str, Reply]:
        """A non-ASCII envelope for a server without SMTPUTF8 (RFC 6531 3.2): domains go
        as A-labels; an address that still is not ASCII (a UTF-8 local part) is refused
        here with 553 5.6.7, nothing of it sent -- a permanent failure, as Postfix does."""
        why = (f"needs SMTPUTF8 (non-ASCII local part, RFC 6531), which {self.endpoint} does "
               "not offer (Postfix: smtputf8_enable = yes)")
        sender = ascii_form(mail_from)
        if sender is None:
            return dict.fromkeys(rcpts, Reply(553, f"5.6.7 sender <{mail_from}> {why}"))
        wire = {rcpt: ascii_form(rcpt) for rcpt in rcpts}
        final = {rcpt: Reply(553, f"5.6.7 <{rcpt}> {why}")
                 for rcpt, form in wire.items() if form is None}
        sendable: dict[str, list[str]] = {}  # both spellings of one address: one RCPT
        for rcpt, form in wire.items():
            if form is not None:
                sendable.setdefault(form, []).append(rcpt)
        if sendable:
            replies = await self._transaction(sender, list(sendable), data, options)
            final.update((rcpt, reply) for form, reply in replies.items()
                         for rcpt in sendable[form])
        return final

    async def _transaction(self, mail_from: str, rcpts: list[str], data: bytes,
                           options: str) -> dict[str, Reply]:
        """MAIL, RCPT, DATA as given (the envelope already in the server's form)."""
        commands = [f"MAIL FROM:<{mail_from}>{options}\r\n".encode()]
        commands += [f"RCPT TO:<{rcpt}>\r\n".encode() for rcpt in rcpts]
        self.transactions += 1
        self.data_sent = False
        if "PIPELINING" in self.extensions:
            # RFC 2920: MAIL, every RCPT and DATA in one write, then the replies in order.
            self._send(b"".join([*commands, b"DATA\r\n"]))
            mail = await self._reply()
            rcpt_replies = [await self._reply() for _ in rcpts]
            data_reply = await self._reply()
        else:
            self._send(commands[0])
            mail = await self._reply()
            rcpt_replies = []
            if mail.ok:
                for command in commands[1:]:
                    self._send(command)
                    rcpt_replies.append(await self._reply())
            data_reply = Reply(503, "no DATA sent")
            if any(r.ok for r in rcpt_replies):
                self._send(b"DATA\r\n")
                data_reply = await self._reply()
        if not mail.ok:
            await self._reset()
            return dict.fromkeys(rcpts, mail)
        final = {rcpt: reply for rcpt, reply in zip(rcpts, rcpt_replies, strict=False)}
        accepted = [rcpt for rcpt, reply in final.items() if reply.ok]
        if data_reply.code != 354:
            if accepted:
                for rcpt in accepted:
                    final[rcpt] = data_reply
                await self._reset()
            elif data_reply.ok:  # a server that answered 2xx to DATA without recipients
                self.broken = True
            else:
                await self._reset()
            return final
        self.data_sent = True
        self._send_all([dot_stuff(data), b".\r\n"])  # no copy of a big message
        if not accepted:  # a confused server said 354 without a recipient: end it cleanly
            await self._reply()
            return final
        if self.lmtp:
            for n, rcpt in enumerate(accepted):  # RFC 2033: one reply each, in order
                try:
                    final[rcpt] = await self._reply()
                except ClientError as exc:
                    # The replies already read stand (those mailboxes have the message:
                    # a retry would deliver it twice); only the rest get the error.
                    for rest in accepted[n:]:
                        final[rest] = exc.reply
                    return final
        else:
            reply = await self._reply()
            for rcpt in accepted:
                final[rcpt] = reply
        if not any(final[rcpt].ok for rcpt in accepted):
            await self._reset()
        return final

    async def check(self, mail_from: str, rcpts: list[str]) -> dict[str, Reply]:
        """MAIL and RCPT for each recipient, then RSET: what the server would answer each
        one, without sending a message (a probe before a flip). ClientError if the link
        broke."""
        self._send(f"MAIL FROM:<{mail_from}>\r\n".encode())
        mail = await self._reply()
        replies = dict.fromkeys(rcpts, mail)
        if mail.ok:
            for rcpt in rcpts:
                self._send(f"RCPT TO:<{rcpt}>\r\n".encode())
                replies[rcpt] = await self._reply()
        await self._reset()
        return replies

    async def _reset(self) -> None:
        """RSET after a transaction that did not complete, so the next one starts clean."""
        self._send(b"RSET\r\n")
        if not (await self._reply()).ok:
            self.broken = True

    async def quit(self) -> None:
        """QUIT politely (errors ignored) and close."""
        if not self.broken:
            try:
                self._send(b"QUIT\r\n")
                await self._reply()
            except ClientError:
                pass
        self.close()

    def close(self) -> None:
        """Close the socket."""
        self.broken = True
        self._transport.close()
