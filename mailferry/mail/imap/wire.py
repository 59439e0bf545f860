"""The socket under the IMAP client: received bytes go straight into one buffer.

Why not asyncio's StreamReader: it receives each read into a new bytes object, copies it
into a growing bytearray (`feed_data`) and copies it out again for the reader; on a copy
of big messages (issue 22, where every byte crosses the mover three times) those copies
and the buffer's growing and shrinking were 17 % of the mover's CPU. Here the transport
receives into free space of one preallocated buffer (`BufferedProtocol`, `recv_into`)
and a read copies out once. The buffer starts at 64 KiB, doubles up to 1 MiB while each
read fills it (a body streaming in: bigger reads, fewer calls) and goes back to 64 KiB
when the client has no command in flight (`shrink`: the pool keeps 40 idle connections
after a pass of 20 mailboxes); it grows past that only for a line longer than it, up to
`limit`. A read of a longer literal takes it in pieces. Flow control as
StreamReader's: reading pauses while more than `high` bytes wait unread (TCP
back-pressure on the server), and `drain` waits while the transport's write buffer is
over its high-water mark. Same reading calls as
StreamReader (`readuntil`, `readexactly`, `read`), same errors (`IncompleteReadError` at
the end of the stream, `LimitOverrunError` for a line longer than `limit`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Protocol, cast

SMALL = 64 << 10  # a connection's buffer while it carries commands, not bodies


class ChunkSource(Protocol):
    """What a literal is read from in chunks (a `Wire`, or a StreamReader)."""

    async def read(self, n: int) -> bytes: ...


class Wire(asyncio.BufferedProtocol):
    """One connection's protocol, reader and writer."""

    def __init__(self, *, limit: int = 1 << 20, size: int = 1 << 20,
                 high: int = 512 << 10) -> None:
        self.limit, self.high, self.size = limit, high, size
        self._buf = bytearray(SMALL)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._offered = 0  # free bytes the last `get_buffer` gave the transport
        self._filled = False  # ... and the read that followed took them all
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self.writing_paused = False  # the transport's write buffer is over its mark
        self._drained: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None

    # -- protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._start == self._end:
            self._start = self._end = 0
        if self._filled and len(self._buf) < self.size:
            # The last read took all the room it had: the sender has more (a body
            # streaming in), so reads get bigger, up to `size`.
            self._grow(min(self.size, len(self._buf) * 2))
        elif self._start and len(self._buf) - self._end < len(self._buf) // 4:
            # Little room at the end: what is unread moves to the front (it is at most
            # `high` plus one read, so the buffer always has room for another read).
            unread = bytes(self._view[self._start:self._end])
            self._buf[:len(unread)] = unread
            self._start, self._end = 0, len(unread)
        if self._end == len(self._buf):  # a line longer than the buffer is being waited for
            self._grow(len(self._buf) * 2)
        self._offered = len(self._buf) - self._end
        return self._view[self._end:]

    def _grow(self, size: int) -> None:
        bigger = bytearray(size)
        unread = self._end - self._start
        bigger[:unread] = self._view[self._start:self._end]
        self._view.release()
        self._buf, self._view = bigger, memoryview(bigger)
        self._start, self._end = 0, unread

    @property
    def capacity(self) -> int:
        """The buffer's size now."""
        return len(self._buf)

    def shrink(self) -> None:
        """Back to the small buffer when nothing waits unread (the client calls it when no
        command is in flight: a pooled connection does not keep a body's buffer)."""
        if self._start == self._end and len(self._buf) > SMALL:
            self._view.release()
            self._buf = bytearray(SMALL)
            self._view = memoryview(self._buf)
            self._start = self._end = 0
            self._filled = False

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._filled = nbytes >= self._offered
        if not self._reading_paused and self._end - self._start > self.high \
                and self._transport is not None:
            try:
                self._transport.pause_reading()
                self._reading_paused = True
            except NotImplementedError:  # a transport that cannot: read on
                pass
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._wake()
        self.writing_paused = False
        self._wake_drain(exc or ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_drain(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self, exc: BaseException | None) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            if exc is None:
                drained.set_result(None)
            else:
                drained.set_exception(exc)
                drained.exception()  # the waiter, if still there, raises it: no warning

    # -- reading -------------------------------------------------------------------------
    async def _more(self) -> None:
        """Wait for more bytes (or the end); raise what broke the connection."""
        if self._error is not None:
            raise self._error
        if self._eof:
            return
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _consumed(self, n: int) -> bytes:
        data = bytes(self._view[self._start:self._start + n])
        self._start += n
        if self._reading_paused and self._end - self._start <= self.high // 2 \
                and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Bytes up to and including `separator`."""
        searched = 0  # bytes after `_start` known to hold no separator (it may move)
        while True:
            found = self._buf.find(separator, self._start + searched, self._end)
            if found >= 0:
                return self._consumed(found + len(separator) - self._start)
            if self._end - self._start > self.limit:
                raise asyncio.LimitOverrunError(
                    "separator is not found, and chunk exceed the limit",
                    self._end - self._start)
            if self._eof:
                partial = self._consumed(self._end - self._start)
                raise asyncio.IncompleteReadError(partial, None)
            searched = max(0, self._end - self._start - len(separator) + 1)
            await self._more()

    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes (one copy when they fit the buffer, else pieces joined)."""
        pieces: list[bytes] = []
        left = n
        while True:
            have = self._end - self._start
            if have >= left and not pieces:
                return self._consumed(left)
            if have:
                piece = self._consumed(min(have, left))
                pieces.append(piece)
                left -= len(piece)
                if not left:
                    return b"".join(pieces)
            if self._eof:
                raise asyncio.IncompleteReadError(b"".join(pieces), n)
            await self._more()

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes, what is there (waiting only when nothing is); b"" at the end."""
        while self._end == self._start:
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            await self._more()
        return self._consumed(min(n, self._end - self._start))

    # -- writing -------------------------------------------------------------------------
    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def writelines(self, data: Iterable[bytes]) -> None:
        self.transport.writelines(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self._error is not None:
            raise self._error
        if self.transport.is_closing() and self._eof:
            raise ConnectionResetError("connection lost")
        while self.writing_paused:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def start_tls(self, context: ssl.SSLContext, *, server_hostname: str) -> None:
        """Upgrade the connection (STARTTLS): the transport becomes the TLS one."""
        loop = asyncio.get_running_loop()
        upgraded = await loop.start_tls(self.transport, self, context,
                                        server_hostname=server_hostname)
        if upgraded is None:
            raise ConnectionResetError("connection lost during the TLS handshake")
        self._transport = upgraded


async def open_wire(host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                    limit: int = 1 << 20) -> Wire:
    """Connect to host:port (TLS with `ssl_context`): the connection's `Wire`."""
    loop = asyncio.get_running_loop()
    _, wire = await loop.create_connection(lambda: Wire(limit=limit), host, port,
                                           ssl=ssl_context)
    return wire
