#!/usr/bin/env python3
"""The floor of a Python SMTP server on this machine: a responder that does nothing else.

    bench/smtp_floor.py --port PORT [--mode canned|durable] [--loop uvloop|asyncio]

A server for the peer harness's extra slot (bench/smtp_floor.sh runs it next to Postfix):
it answers smtp-source's dialog with fixed replies, on the event loop fed uses (uvloop),
with no parsing beyond finding line ends and the data's end, no directory, no index, no
logging and no relay. ``--mode durable`` adds the one thing fed may not skip before its
250: the message written over a file that already exists (one ``pwrite``) and
``fdatasync``ed, as fed's blanks are (docs/fed.md). So its rate at one client is the most
any Python asyncio server can accept while keeping invariant 1, and what is left between it
and fed is fed's own work (the session's checks, the spool's index, the relay, the log).

Not a mail server: it keeps nothing (the durable mode overwrites one file) and it accepts
any envelope. Bounded: it runs until SIGTERM (the harness stops it by its process group).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
from typing import cast

GREETING = b"220 floor ESMTP\r\n"
EHLO = b"250-floor\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n"
OK = b"250 2.0.0 ok\r\n"
GO_AHEAD = b"354 go ahead\r\n"
BYE = b"221 2.0.0 bye\r\n"
END = b"\r\n.\r\n"


class Floor(asyncio.Protocol):
    """One session: fixed replies, the data phase ends at CRLF.CRLF."""

    def __init__(self, spool_fd: int) -> None:
        self._spool_fd = spool_fd  # -1: canned (nothing written)
        self._buffer = b""
        self._in_data = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        buffer = self._buffer + data
        replies: list[bytes] = []
        while buffer:
            if self._in_data:
                end = buffer.find(END)
                if end < 0:
                    break
                if self._spool_fd >= 0:
                    os.pwrite(self._spool_fd, buffer[: end + 2], 0)
                    os.fdatasync(self._spool_fd)
                buffer = buffer[end + len(END):]
                self._in_data = False
                replies.append(OK)
                continue
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                break
            verb = buffer[:4].upper()
            buffer = buffer[line_end + 2:]
            if verb in (b"EHLO", b"HELO"):
                replies.append(EHLO)
            elif verb == b"DATA":
                self._in_data = True
                replies.append(GO_AHEAD)
            elif verb == b"QUIT":
                replies.append(BYE)
                self._transport.write(b"".join(replies))
                self._transport.close()
                return
            else:  # MAIL, RCPT, RSET, NOOP
                replies.append(OK)
        self._buffer = buffer
        if replies:
            self._transport.write(b"".join(replies))


async def serve(port: int, mode: str) -> None:
    loop = asyncio.get_running_loop()
    spool_fd = -1
    folder = tempfile.mkdtemp(prefix="smtp-floor-")
    path = os.path.join(folder, "blank")
    if mode == "durable":
        spool_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(spool_fd, bytes(8192), 0)  # a blank as fed makes them: zeros, synced
        os.fsync(spool_fd)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await loop.create_server(lambda: Floor(spool_fd), "127.0.0.1", port,
                                      backlog=1024)
    try:
        await stop.wait()
    finally:
        server.close()
        if spool_fd >= 0:
            os.close(spool_fd)
            os.unlink(path)
        os.rmdir(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["canned", "durable"], default="canned")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop
        uvloop.run(serve(args.port, args.mode))
    else:
        asyncio.run(serve(args.port, args.mode))


if __name__ == "__main__":
    main()
