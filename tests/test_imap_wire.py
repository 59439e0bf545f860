"""The IMAP client's socket (`mailferry/mail/imap/wire.py`) over real loopback TCP: lines
and literals cut anywhere by the sender, the buffer emptied, compacted and grown under
them, the end of the stream and a too long line as StreamReader reports them, and reading
paused (TCP back-pressure) while too much waits unread."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest

from mailferry.mail.imap.wire import Wire, open_wire


async def _with_server(send: Callable[[asyncio.StreamWriter], Awaitable[None]],
                       use: Callable[[Wire], Awaitable[None]]) -> None:
    async def serve(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await send(writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        wire = await open_wire("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            await asyncio.wait_for(use(wire), 30)  # bounded: a lost wake-up fails
        finally:
            wire.close()
    finally:
        server.close()


def test_lines_and_literals_cut_anywhere_come_out_whole() -> None:
    """Each piece sent alone (the reader sees them one by one): CRLF split between two
    pieces, a line after the buffer was read empty, a literal over four buffers long."""
    big = os.urandom(4 << 20) + b"\r\n"
    stream = b"* OK hello\r\n" + b"* 1 FETCH {%d}\r\n" % len(big) + big + b"A1 OK done\r\n" \
        + b"x" * 70_000 + b"\r\n" + b"tail"
    cuts = [1, 5, 11, 12, 13, 30, 31, 100_000, 3_000_000, len(stream) - 5]

    async def send(writer: asyncio.StreamWriter) -> None:
        last = 0
        for cut in [*cuts, len(stream)]:
            writer.write(stream[last:cut])
            await writer.drain()
            await asyncio.sleep(0.01)
            last = cut

    async def use(wire: Wire) -> None:
        assert await wire.readuntil(b"\r\n") == b"* OK hello\r\n"
        assert await wire.readuntil(b"\r\n") == b"* 1 FETCH {%d}\r\n" % len(big)
        assert await wire.readexactly(len(big)) == big
        assert await wire.readuntil(b"\r\n") == b"A1 OK done\r\n"
        assert await wire.readuntil(b"\r\n") == b"x" * 70_000 + b"\r\n"
        with pytest.raises(asyncio.IncompleteReadError) as ended:
            await wire.readuntil(b"\r\n")
        assert ended.value.partial == b"tail"
        assert await wire.read(10) == b""

    asyncio.run(_with_server(send, use))


def test_chunked_reads_return_what_is_there_and_a_line_grows_the_buffer() -> None:
    body = os.urandom(3 << 20)
    line = b"* SEARCH " + b"7 " * 700_000 + b"\r\n"  # 1.4 MB: longer than the buffer

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(body + line + b"y" * (2 << 20))
        await writer.drain()

    async def use(wire: Wire) -> None:
        got = bytearray()
        while len(got) < len(body):
            chunk = await wire.read(min(256 << 10, len(body) - len(got)))
            assert 0 < len(chunk) <= 256 << 10
            got += chunk
        assert got == body
        wire.limit = 2 << 20
        assert await wire.readuntil(b"\r\n") == line
        wire.limit = 1 << 20
        with pytest.raises(asyncio.LimitOverrunError):
            await wire.readuntil(b"\r\n")

    asyncio.run(_with_server(send, use))


def test_reading_pauses_while_too_much_waits_unread() -> None:
    """The sender's drain blocks while the reader does not read (back-pressure through
    TCP, as StreamReader gives it), and everything arrives once the reader reads."""
    total = 64 << 20
    sent = [0]

    async def send(writer: asyncio.StreamWriter) -> None:
        piece = b"z" * (1 << 20)
        while sent[0] < total:
            writer.write(piece)
            await writer.drain()
            sent[0] += len(piece)

    async def use(wire: Wire) -> None:
        await asyncio.sleep(0.5)  # not reading: the server must stop well short of 64 MB
        assert sent[0] < 32 << 20, f"{sent[0] >> 20} MB sent into a reader not reading"
        left = total
        while left:
            left -= len(await wire.read(1 << 20))

    asyncio.run(_with_server(send, use))


def test_the_buffer_grows_for_a_body_and_shrinks_when_the_connection_is_idle() -> None:
    """Small while commands pass, up to 1 MiB while a body streams in, back to 64 KiB when
    the client says nothing is in flight."""
    body = os.urandom(8 << 20)
    go = asyncio.Event()

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK hi\r\n")
        await writer.drain()
        await go.wait()
        writer.write(body + b"rest")
        await writer.drain()

    async def use(wire: Wire) -> None:
        assert await wire.readuntil(b"\r\n") == b"* OK hi\r\n"
        assert wire.capacity == 64 << 10
        go.set()
        grew = 0
        got = 0
        while got < len(body):
            got += len(await wire.read(min(256 << 10, len(body) - got)))
            grew = max(grew, wire.capacity)
        assert grew == 1 << 20
        assert await wire.readexactly(4) == b"rest"
        wire.shrink()
        assert wire.capacity == 64 << 10

    asyncio.run(_with_server(send, use))
